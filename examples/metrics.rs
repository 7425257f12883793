//! The store's metrics as Prometheus text: the example installs the
//! `metrics-exporter-prometheus` recorder with an HTTP listener, runs a small workload (appends,
//! conditional appends that conflict, reads, commands that commit or are refused, and on
//! PostgreSQL a durable handler), scrapes its own endpoint, checks that the counters moved, and
//! prints the crablet series. With `--serve` it keeps serving until Ctrl-C, for a Prometheus or
//! `curl` to look at.
//!
//! ```text
//! cargo run --example metrics
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example metrics
//! CRABLET_METRICS_ADDR=127.0.0.1:9464 cargo run --example metrics -- --serve   # curl localhost:9464/metrics
//! ```
//!
//! crablet records through the `metrics` facade and installs nothing itself: an application
//! picks its exporter. `docs/operations.md` lists every metric and the alerts to set on them.
mod common;

use common::{check, AnyError};
use crablet::command::{handler_fn, reject, Command, CommandExecutor, Decision, HandlerError};
use crablet::postgres::{tokio_postgres, EventHandler, HandlerOptions};
use crablet::{
    DomainEvent, Event, EventReader, EventReaderExt, Query, QueryItem, ReadOptions, StateProjector,
};
use dcb_testkit::prometheus::{sample, scrape};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Clone, DomainEvent)]
struct SeatReserved {
    #[crablet(tag)]
    show_id: String,
    seat: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("show {0} is sold out")]
struct SoldOut(String);

/// A durable handler that only counts: enough to move the handler metrics.
struct Usher;

#[async_trait::async_trait]
impl EventHandler for Usher {
    fn name(&self) -> &str {
        "usher"
    }
    fn query(&self) -> Query {
        Query::of::<SeatReserved>()
    }
    async fn handle(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), crablet::postgres::HandlerError> {
        crablet::decode_all::<SeatReserved>(events)?;
        Ok(())
    }
}

async fn run() -> Result<(), AnyError> {
    let addr: SocketAddr = std::env::var("CRABLET_METRICS_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:0".into())
        .parse()?;
    // Port 0: take a free one first, so the example can scrape itself.
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    // Durations as Prometheus histograms (aggregatable across instances), not summaries.
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .install()?;
    crablet::describe_metrics();
    println!("metrics: http://{addr}/metrics");

    let backend = common::open("metrics").await?;
    let store = backend.store.clone();
    let usher = match &backend.postgres {
        Some(pg) => Some(pg.run_handler(Usher, HandlerOptions::default().batch_size(8))?),
        None => None,
    };

    // Appends, and a conditional append on a stale decision: a conflict.
    let show = |seat: u32| SeatReserved {
        show_id: "s1".into(),
        seat,
    };
    let before = store
        .project(StateProjector::counter(QueryItem::of::<SeatReserved>()))
        .await?;
    for seat in 1..=20 {
        store.append(vec![show(seat).encode()?]).await?;
    }
    let stale = store
        .append_if(vec![show(21).encode()?], before.condition)
        .await;
    check(
        stale.is_err_and(|e| e.is_conflict()),
        "a decision taken before the 20 appends conflicts",
    )?;
    let read = store
        .query_typed::<SeatReserved>(&Query::of::<SeatReserved>(), ReadOptions::default())
        .await?;
    check(read.len() == 20, "20 seats are reserved")?;

    // Commands: at most 22 seats, so the third of these is refused.
    let executor = CommandExecutor::new(store.clone());
    let reserve = handler_fn(|command: &Command<u32>, reader| {
        Box::pin(async move {
            let taken = reader
                .project(StateProjector::counter(QueryItem::of::<SeatReserved>()))
                .await?;
            if taken.states >= 22 {
                return Err(reject(SoldOut("s1".into())));
            }
            let seat = SeatReserved {
                show_id: "s1".into(),
                seat: command.payload,
            };
            Ok::<_, HandlerError<SoldOut>>(
                Decision::append_typed(&[seat])?.guarded_by(taken.condition),
            )
        })
    });
    for seat in [21, 22, 23] {
        let outcome = executor
            .execute(Command::new("Reserve", seat), &reserve)
            .await;
        println!(
            "  reserve seat {seat}: {}",
            match &outcome {
                Ok(_) => "committed".to_string(),
                Err(err) => format!("refused ({err})"),
            }
        );
    }

    if let (Some(pg), Some(_)) = (&backend.postgres, &usher) {
        let head = pg
            .query(&Query::all(), ReadOptions::default().backwards().limit(1))
            .await?;
        if let Some(head) = head.first() {
            pg.wait_until_processed("usher", head.cursor, Duration::from_secs(10))
                .await?;
        }
        let health = pg.health(Duration::from_secs(60)).await;
        check(
            health.is_healthy(),
            format!("the store is healthy {:?}", health.problems),
        )?;
    }

    let text = scrape(addr).await?;
    let label = if backend.on_postgres {
        "postgres"
    } else {
        "memory"
    };
    let value = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels).unwrap_or(0.0);
    check(
        value(
            "crablet_appended_events_total",
            &[("backend", label), ("operation", "append")],
        ) >= 20.0,
        "crablet_appended_events_total counts the 20 appends",
    )?;
    check(
        value("crablet_conflicts_total", &[("backend", label)]) >= 1.0,
        "crablet_conflicts_total counts the stale decision",
    )?;
    check(
        value("crablet_commands_total", &[("outcome", "committed")]) == 2.0
            && value("crablet_commands_total", &[("outcome", "rejected")]) == 1.0,
        "crablet_commands_total counts 2 committed and 1 refused command",
    )?;
    if backend.on_postgres {
        check(
            value("crablet_handler_events_total", &[("handler", "usher")]) >= 22.0,
            "crablet_handler_events_total counts what the usher processed",
        )?;
    }
    println!("crablet series:");
    for line in text
        .lines()
        .filter(|l| l.starts_with("crablet_") && !l.contains("_bucket"))
    {
        println!("  {line}");
    }

    if std::env::args().any(|a| a == "--serve") {
        println!("serving http://{addr}/metrics until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    if let Some(usher) = usher {
        usher.stop().await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run()).await
}
