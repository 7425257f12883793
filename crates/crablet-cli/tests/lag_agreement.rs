//! `crablet status` and the handler metrics report the same lag: one definition (events after
//! the checkpoint, age of the oldest of them), measured by both. Its own test binary: a process
//! has one metrics recorder.
mod support;

use async_trait::async_trait;
use dcb_core::{Event, EventStore, Query};
use dcb_postgres::{tokio_postgres, EventHandler, HandlerError, HandlerOptions};
use dcb_testkit::pg::TestSchema;
use dcb_testkit::prometheus::sample;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{crablet_async, event, store_on};
use tokio::sync::Semaphore;

/// Processes one batch per permit: the test holds it back after the first.
struct Gated {
    permits: Arc<Semaphore>,
}

#[async_trait]
impl EventHandler for Gated {
    fn name(&self) -> &str {
        "gated"
    }

    fn query(&self) -> Query {
        Query::types(["Work"])
    }

    async fn handle(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        _events: &[Event],
    ) -> Result<(), HandlerError> {
        self.permits.acquire().await?.forget();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_agree_on_handler_lag() {
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .expect("the process's recorder");
    let schema = TestSchema::new().await;
    let store = store_on(&schema).await;
    let mut cursors = Vec::new();
    for i in 0..5 {
        let cursor = store
            .append(vec![event("Work", &[("job", "j")], json!({ "i": i }))])
            .await
            .expect("append");
        cursors.push(cursor);
    }
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(1));
    let running = store
        .run_handler(
            Gated {
                permits: Arc::clone(&permits),
            },
            HandlerOptions::default()
                .batch_size(2)
                .poll_interval(Duration::from_millis(50)),
        )
        .expect("run");
    let labels = [("handler", "gated")];
    let gauge = |name: &str| sample(&metrics.render(), name, &labels);

    // After the first (full) batch the runner measures its lag; the second batch waits.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gauge("crablet_handler_lag_events").is_none() {
        assert!(Instant::now() < deadline, "no lag measured");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metric_events = gauge("crablet_handler_lag_events").expect("events");
    let metric_seconds = gauge("crablet_handler_lag_seconds").expect("seconds");
    let status: Value = serde_json::from_str(
        &crablet_async(&schema, &["status", "--json"])
            .await
            .ok()
            .stdout,
    )
    .expect("json");
    let handler = status["handlers"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["name"] == "gated"))
        .expect("gated in status")
        .clone();
    assert_eq!(handler["checkpoint"], cursors[1].to_string());
    assert_eq!(metric_events, 3.0);
    assert_eq!(
        gauge("crablet_handler_checkpoint_transaction_id"),
        Some(cursors[1].transaction_id as f64)
    );
    assert_eq!(handler["lag_events"], 3);
    // The same oldest unprocessed event, aged a little more by the time status ran.
    let status_seconds = handler["lag_seconds"].as_f64().expect("seconds");
    assert!(
        status_seconds >= metric_seconds
            && status_seconds - metric_seconds <= started.elapsed().as_secs_f64(),
        "status {status_seconds}s, metric {metric_seconds}s"
    );

    // Caught up: both say 0.
    permits.add_permits(10);
    store
        .wait_until_processed("gated", cursors[4], Duration::from_secs(20))
        .await
        .expect("processed");
    let status: Value = serde_json::from_str(
        &crablet_async(&schema, &["handlers", "list", "--json"])
            .await
            .ok()
            .stdout,
    )
    .expect("json");
    assert_eq!(
        (
            status[0]["lag_events"].clone(),
            status[0]["lag_seconds"].clone()
        ),
        (json!(0), json!(0.0))
    );
    // (The runner sets the gauges just after its commit, which the wait may see first.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauge("crablet_handler_lag_events") != Some(0.0) {
        assert!(Instant::now() < deadline, "{}", metrics.render());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gauge("crablet_handler_lag_seconds"), Some(0.0));
    running.stop().await;
}
