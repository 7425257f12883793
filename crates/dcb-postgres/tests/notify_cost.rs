//! What `notify_on_append` costs the append path: appends per second with notifications off and
//! on (default 10 ms `notify_interval`, and unthrottled), and on with a LISTENing subscriber in
//! another store instance, for 1 and 8 clients, interleaved in the same run (the order alternates
//! every round, and the cost is the median of per-round paired ratios, which cancels slow drift
//! in machine load). It also counts the notifications actually sent per 1000 appends.
//!
//! Ignored by default (it is a measurement, not a test):
//!
//! ```text
//! cargo test -p dcb-postgres --release --test notify_cost -- --ignored --nocapture
//! NOTIFY_COST_ROUNDS=20 NOTIFY_COST_MS=500 DATABASE_URL=... cargo test ...   # tune
//! ```
mod support;

use dcb_core::{EventStore, NewEvent, Query, SubscribeExt};
use dcb_postgres::{PostgresEventStore, StoreConfig};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::test_store;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Off,
    On,
    /// `notify_interval = 0`: one NOTIFY per notifier round trip, no throttling.
    OnUnthrottled,
    /// Notifications on, and a subscriber in another instance LISTENs and re-reads on every
    /// wake-up (its query matches nothing, so its reads block no writer).
    OnWithListener,
}

const MODES: [Mode; 4] = [
    Mode::Off,
    Mode::On,
    Mode::OnUnthrottled,
    Mode::OnWithListener,
];

/// Appends single events from `clients` tasks for `duration`; returns (appends, seconds).
async fn run(store: &PostgresEventStore, clients: usize, duration: Duration) -> (u64, f64) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < duration {
                    let event = NewEvent::builder("Bench")
                        .tag("client", c.to_string())
                        .build()
                        .expect("event");
                    store.append(vec![event]).await.expect("append");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("client");
    }
    (total, start.elapsed().as_secs_f64())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_notify_on_append_cost() {
    let ts = test_store(StoreConfig::default()).await;
    let connect = |notify: bool, interval: Duration| {
        let config = StoreConfig::default()
            .schema(ts.schema.schema.clone())
            .pool_size(16)
            .notify_on_append(notify)
            .notify_interval(interval);
        let url = ts.schema.url.clone();
        async move {
            PostgresEventStore::connect(&url, config)
                .await
                .expect("store")
        }
    };
    let default_interval = StoreConfig::default().notify_interval;
    let off = connect(false, default_interval).await;
    let on = connect(true, default_interval).await;
    let unthrottled = connect(true, Duration::ZERO).await;
    let listener_store = connect(true, default_interval).await;

    // A raw LISTEN connection counts what is actually sent.
    let channel = format!("crablet_{}", ts.schema.schema);
    let (listen_client, mut listen_conn) =
        tokio_postgres::connect(&ts.schema.url, tokio_postgres::NoTls)
            .await
            .expect("listen connection");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let driver = tokio::spawn(async move {
        while let Some(message) =
            futures_util::future::poll_fn(|cx| listen_conn.poll_message(cx)).await
        {
            if let Ok(tokio_postgres::AsyncMessage::Notification(_)) = message {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    listen_client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .expect("LISTEN");

    let duration = Duration::from_millis(env("NOTIFY_COST_MS", 1000));
    let rounds: usize = env("NOTIFY_COST_ROUNDS", 7);
    println!(
        "{rounds} interleaved rounds of {duration:?} per mode; cost = median over rounds of \
         1 - rate/rate(Off)"
    );
    let mut worst = 0.0f64;
    for clients in [1usize, 8] {
        run(&off, clients, Duration::from_millis(300)).await;
        run(&on, clients, Duration::from_millis(300)).await;
        run(&unthrottled, clients, Duration::from_millis(300)).await;
        // rates[mode][round], notifications and appends per mode
        // rates[round][mode]
        let mut rates: Vec<[f64; 4]> = Vec::with_capacity(rounds);
        let mut notes = [(0u64, 0u64); 4];
        for round in 0..rounds {
            let mut rate = [0.0f64; 4];
            let mut order: Vec<usize> = (0..MODES.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for m in order {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let before = sent.load(Ordering::Relaxed);
                let (n, secs) = match MODES[m] {
                    Mode::Off => run(&off, clients, duration).await,
                    Mode::On => run(&on, clients, duration).await,
                    Mode::OnUnthrottled => run(&unthrottled, clients, duration).await,
                    Mode::OnWithListener => {
                        let mut sub = listener_store.subscribe(&Query::types(["Nothing"]), None);
                        let drain =
                            tokio::spawn(async move { while sub.next().await.is_some() {} });
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let result = run(&on, clients, duration).await;
                        drain.abort();
                        result
                    }
                };
                tokio::time::sleep(Duration::from_millis(30)).await; // late notifications
                notes[m].0 += sent.load(Ordering::Relaxed) - before;
                notes[m].1 += n;
                rate[m] = n as f64 / secs;
            }
            rates.push(rate);
        }
        for (m, mode) in MODES.iter().enumerate() {
            let paired: Vec<f64> = rates.iter().map(|r| (1.0 - r[m] / r[0]) * 100.0).collect();
            let cost = median(paired);
            let per_1000 = notes[m].0 as f64 * 1000.0 / notes[m].1.max(1) as f64;
            println!(
                "clients={clients} {:<15} median {:>7.0}/s  cost {cost:>6.1}%  \
                 NOTIFYs per 1000 appends {per_1000:>6.1}",
                format!("{mode:?}"),
                median(rates.iter().map(|r| r[m]).collect()),
            );
            if *mode == Mode::On {
                worst = worst.max(cost);
            }
        }
    }
    println!("worst median cost of notify_on_append (default settings): {worst:.1}%");
    driver.abort();
}
