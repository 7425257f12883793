//! What `notify_on_append` costs the append path: appends per second with notifications off,
//! on, and on with a LISTENing subscriber in another store instance, for 1 and 8 clients, in the
//! same run with alternating order. Ignored by default (it is a measurement, not a test):
//!
//! ```text
//! cargo test -p dcb-postgres --release --test notify_cost -- --ignored --nocapture
//! ```
mod support;

use dcb_core::{EventStore, NewEvent, Query, SubscribeExt};
use dcb_postgres::{PostgresEventStore, StoreConfig};
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use support::test_store;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Off,
    On,
    OnWithListener,
}

async fn run(store: &PostgresEventStore, clients: usize, duration: Duration) -> f64 {
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
    total as f64 / start.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_notify_on_append_cost() {
    let ts = test_store(StoreConfig::default().pool_size(16)).await;
    let connect = |notify: bool| {
        let config = StoreConfig::default()
            .schema(ts.schema.schema.clone())
            .pool_size(16)
            .notify_on_append(notify);
        let url = ts.schema.url.clone();
        async move {
            PostgresEventStore::connect(&url, config)
                .await
                .expect("store")
        }
    };
    let off = connect(false).await;
    let on = connect(true).await;
    let listener_store = connect(true).await;
    let duration = Duration::from_millis(
        std::env::var("NOTIFY_COST_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
    );
    let rounds = 3;
    println!("appends/s, {rounds} rounds of {duration:?} each, median (all rounds)");
    let mut worst = 0.0f64;
    for clients in [1usize, 8] {
        // Warm up pools and statement caches.
        run(&off, clients, Duration::from_millis(300)).await;
        run(&on, clients, Duration::from_millis(300)).await;
        let mut results: Vec<(Mode, Vec<f64>)> = vec![
            (Mode::Off, vec![]),
            (Mode::On, vec![]),
            (Mode::OnWithListener, vec![]),
        ];
        for round in 0..rounds {
            let mut order = vec![Mode::Off, Mode::On, Mode::OnWithListener];
            if round % 2 == 1 {
                order.reverse();
            }
            for mode in order {
                let rate = match mode {
                    Mode::Off => run(&off, clients, duration).await,
                    Mode::On => run(&on, clients, duration).await,
                    Mode::OnWithListener => {
                        // A subscriber in another instance LISTENs (and re-reads on every
                        // wake-up; its query matches nothing, so its reads block no writer).
                        let mut sub = listener_store.subscribe(&Query::types(["Nothing"]), None);
                        let drain =
                            tokio::spawn(async move { while sub.next().await.is_some() {} });
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let rate = run(&on, clients, duration).await;
                        drain.abort();
                        rate
                    }
                };
                if let Some((_, v)) = results.iter_mut().find(|(m, _)| *m == mode) {
                    v.push(rate);
                }
            }
        }
        let base = median(results[0].1.clone());
        for (mode, rates) in &results {
            let m = median(rates.clone());
            let cost = (base - m) / base * 100.0;
            println!(
                "clients={clients} {mode:<16?} {m:>8.0}/s  cost {cost:>5.1}%  ({})",
                rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if *mode == Mode::On {
                worst = worst.max(cost);
            }
        }
    }
    println!("worst cost of notify_on_append on the append path: {worst:.1}%");
}
