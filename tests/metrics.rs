//! The store's metrics, scraped from a Prometheus endpoint: appends, conflicts, reads,
//! commands, group commit, the pool and a durable handler's progress and lag all move, on both
//! backends. One test: a process has one metrics recorder.
mod support;

use crablet::command::{handler_fn, reject, Command, CommandExecutor, Decision, HandlerError};
use crablet::postgres::{tokio_postgres, EventHandler, HandlerOptions, PostgresEventStore};
use crablet::{
    AppendCondition, Event, EventReader, EventReaderExt, EventStore, NewEvent, Query, ReadOptions,
    StateProjector,
};
use dcb_testkit::prometheus::{sample, scrape};
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("refused")]
struct Refused;

/// Appends, a conflict, reads and commands (one committed, one rejected).
async fn workload(store: Arc<dyn EventStore>) {
    let event = || {
        NewEvent::builder("Ping")
            .tag("k", "v")
            .build()
            .expect("event")
    };
    for _ in 0..5 {
        store.append(vec![event(), event()]).await.expect("append");
    }
    let stale = AppendCondition::new(Query::types(["Ping"]));
    let conflict = store.append_if(vec![event()], stale).await;
    assert!(conflict.expect_err("stale condition").is_conflict());
    let read = store
        .query(&Query::types(["Ping"]), ReadOptions::default())
        .await
        .expect("query");
    assert_eq!(read.len(), 10);
    let streamed = store
        .query_stream(&Query::types(["Ping"]), ReadOptions::default())
        .count()
        .await;
    assert_eq!(streamed, 10);

    let executor = CommandExecutor::new(store.clone());
    let ping = handler_fn(|command: &Command<bool>, reader| {
        Box::pin(async move {
            let model = reader
                .project(StateProjector::counter(Query::types(["Ping"])))
                .await?;
            if !command.payload {
                return Err(reject(Refused));
            }
            let event = NewEvent::builder("Pong").build()?;
            Ok::<_, HandlerError<Refused>>(Decision::append([event]).guarded_by(model.condition))
        })
    });
    executor
        .execute(Command::new("Ping", true), &ping)
        .await
        .expect("committed");
    executor
        .execute(Command::new("Ping", false), &ping)
        .await
        .expect_err("rejected");
}

struct Counter;

#[async_trait::async_trait]
impl EventHandler for Counter {
    fn name(&self) -> &str {
        "metrics_counter"
    }
    fn query(&self) -> Query {
        Query::types(["Ping"])
    }
    async fn handle(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        _events: &[Event],
    ) -> Result<(), crablet::postgres::HandlerError> {
        Ok(())
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_on_both_backends() {
    let addr = free_port();
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .expect("install the exporter");
    crablet::describe_metrics();

    workload(support::memory()).await;
    let (store, schema) = support::postgres().await;
    workload(store).await;

    // A durable handler behind by 10 events, then caught up.
    let pg = PostgresEventStore::connect(
        &schema.url,
        crablet::postgres::StoreConfig::default().schema(schema.schema.clone()),
    )
    .await
    .expect("second store on the schema");
    let head = pg
        .query(&Query::all(), ReadOptions::default().backwards().limit(1))
        .await
        .expect("head")[0]
        .cursor;
    let running = pg
        .run_handler(Counter, HandlerOptions::default().batch_size(4))
        .expect("run handler");
    pg.wait_until_processed("metrics_counter", head, Duration::from_secs(10))
        .await
        .expect("processed");

    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(addr).await.expect("scrape");
        if sample(
            &text,
            "crablet_handler_lag_events",
            &[("handler", "metrics_counter")],
        ) == Some(0.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;

    for backend in ["memory", "postgres"] {
        let at = |name: &str, labels: &[(&str, &str)]| {
            let mut all = vec![("backend", backend)];
            all.extend_from_slice(labels);
            sample(&text, name, &all).unwrap_or(0.0)
        };
        assert!(
            at("crablet_appended_events_total", &[("operation", "append")]) >= 10.0,
            "{backend}: {text}"
        );
        assert!(
            at("crablet_conflicts_total", &[("operation", "append_if")]) >= 1.0,
            "{backend}"
        );
        assert!(
            at(
                "crablet_append_duration_seconds_count",
                &[("outcome", "conflict")]
            ) >= 1.0,
            "{backend}"
        );
        assert!(
            at("crablet_read_events_total", &[("operation", "query")]) >= 10.0,
            "{backend}"
        );
        assert!(
            at(
                "crablet_read_events_total",
                &[("operation", "query_stream")]
            ) >= 10.0,
            "{backend}"
        );
        assert!(
            at("crablet_read_duration_seconds_count", &[]) >= 1.0,
            "{backend}"
        );
    }
    let commands = |outcome: &str| {
        sample(
            &text,
            "crablet_commands_total",
            &[("command_type", "Ping"), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(commands("committed"), 2.0, "one per backend");
    assert_eq!(commands("rejected"), 2.0);
    assert!(sample(&text, "crablet_group_commit_calls_count", &[]).unwrap_or(0.0) >= 1.0);
    assert!(sample(&text, "crablet_pool_connections", &[("state", "max")]).unwrap_or(0.0) >= 1.0);
    let handler = [("handler", "metrics_counter")];
    assert!(
        sample(&text, "crablet_handler_events_total", &handler).unwrap_or(0.0) >= 10.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "crablet_handler_lag_events", &handler),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "crablet_handler_lag_seconds", &handler),
        Some(0.0)
    );
    assert!(
        sample(&text, "crablet_handler_checkpoint_transaction_id", &handler)
            .is_some_and(|xid| xid >= head.transaction_id as f64),
        "{text}"
    );
    assert!(
        text.contains("# HELP crablet_append_duration_seconds"),
        "described"
    );
}
