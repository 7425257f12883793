//! `PostgresEventStore::health`: a fresh store is healthy; a failing handler left behind is
//! reported stuck past the threshold, with its error; a schema at another version is a problem.
mod support;

use dcb_core::{Event, EventStore, NewEvent, Query};
use dcb_postgres::{tokio_postgres, EventHandler, HandlerError, HandlerOptions, StoreConfig};
use std::time::Duration;
use support::test_store;

struct AlwaysFails;

#[async_trait::async_trait]
impl EventHandler for AlwaysFails {
    fn name(&self) -> &str {
        "always_fails"
    }
    fn query(&self) -> Query {
        Query::types(["Ping"])
    }
    async fn handle(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        _events: &[Event],
    ) -> Result<(), HandlerError> {
        Err("the read model is broken".into())
    }
}

#[tokio::test]
async fn a_fresh_store_is_healthy() {
    let ts = test_store(StoreConfig::default()).await;
    let health = ts.health(Duration::from_secs(60)).await;
    assert!(health.is_healthy(), "{:?}", health.problems);
    assert!(health.reachable);
    assert_eq!(health.schema_version, Some(dcb_postgres::SCHEMA_VERSION));
    assert!(health.handlers.is_empty());
}

#[tokio::test]
async fn a_failing_handler_is_reported_stuck_past_the_threshold() {
    let ts = test_store(StoreConfig::default()).await;
    let ping = || NewEvent::builder("Ping").build().expect("event");
    ts.append(vec![ping(), ping(), ping()])
        .await
        .expect("append");
    let running = ts
        .run_handler(
            AlwaysFails,
            HandlerOptions::default()
                .retry_initial(Duration::from_millis(10))
                .retry_max(Duration::from_millis(50)),
        )
        .expect("run");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running.status().attempts == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the handler never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let lenient = ts.health(Duration::from_secs(3600)).await;
    assert!(lenient.is_healthy(), "{:?}", lenient.problems);
    let handler = &lenient.handlers[0];
    assert_eq!(handler.name, "always_fails");
    assert_eq!(handler.lag.events, 3);
    assert!(handler.lease_held && !handler.stuck);
    assert!(handler.attempts >= 1);

    let strict = ts.health(Duration::ZERO).await;
    assert!(!strict.is_healthy());
    assert!(strict.handlers[0].stuck);
    let problem = &strict.problems[0];
    assert!(
        problem.contains("always_fails") && problem.contains("3 event(s) behind"),
        "{problem}"
    );
    assert!(problem.contains("the read model is broken"), "{problem}");

    running.stop().await;
    let stopped = ts.health(Duration::ZERO).await;
    assert!(
        stopped.problems[0].contains("no instance runs it"),
        "{:?}",
        stopped.problems
    );
}

#[tokio::test]
async fn a_schema_at_another_version_is_a_problem() {
    let ts = test_store(StoreConfig::default()).await;
    ts.admin()
        .await
        .batch_execute(&format!(
            "INSERT INTO {} (version) VALUES (99)",
            ts.table("schema_version")
        ))
        .await
        .expect("bump the version");
    let health = ts.health(Duration::from_secs(60)).await;
    assert_eq!(health.schema_version, Some(99));
    assert!(
        health.problems.iter().any(|p| p.contains("version 99")),
        "{:?}",
        health.problems
    );
}
