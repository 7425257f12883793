//! Automations: a durable handler that appends events in the same transaction as its
//! checkpoint ("when an order is paid, request its shipment"), exactly once, also when it is
//! killed mid-batch or its decision goes stale.
mod support;

use async_trait::async_trait;
use dcb_core::{
    AppendCommand, AppendCondition, Event, EventReader, EventStore, NewEvent, Query, QueryItem,
    ReadOptions,
};
use dcb_postgres::{
    tokio_postgres, EventHandler, HandlerError, HandlerOptions, PostgresEventStore, StoreConfig,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::test_store;
use tokio::sync::{Barrier, Notify, Semaphore};

fn event(t: &str, order: &str) -> NewEvent {
    NewEvent::builder(t)
        .tag("order", order)
        .build()
        .expect("event")
}

fn shipments_of(order: &str) -> Query {
    Query::from(
        QueryItem::new()
            .types(["ShipmentRequested"])
            .tag("order", order),
    )
}

/// When an order is paid, request its shipment, unless one was requested already.
struct Shipping {
    store: PostgresEventStore,
    /// `handle` says it started, then takes a permit per batch (none: never waits).
    gate: Option<(Arc<Notify>, Arc<Semaphore>)>,
    /// Meets the test here once, between its read and its decision.
    race: Option<Arc<Barrier>>,
}

#[async_trait]
impl EventHandler for Shipping {
    fn name(&self) -> &str {
        "shipping"
    }

    fn query(&self) -> Query {
        Query::types(["OrderPaid"])
    }

    async fn decide(&self, events: &[Event]) -> Result<Vec<AppendCommand>, HandlerError> {
        let mut commands = Vec::new();
        for paid in events {
            let order = paid.tags[0].value.as_str();
            let requested = self
                .store
                .query(&shipments_of(order), ReadOptions::default())
                .await?;
            if let Some(race) = &self.race {
                race.wait().await;
                race.wait().await;
            }
            if requested.is_empty() {
                commands.push(
                    AppendCommand::new(vec![event("ShipmentRequested", order)])
                        .only_if(AppendCondition::new(shipments_of(order))),
                );
            }
        }
        Ok(commands)
    }

    async fn handle(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        _events: &[Event],
    ) -> Result<(), HandlerError> {
        if let Some((entered, gate)) = &self.gate {
            entered.notify_one();
            gate.acquire().await?.forget();
        }
        Ok(())
    }
}

fn options() -> HandlerOptions {
    HandlerOptions::default()
        .batch_size(5)
        .poll_interval(Duration::from_millis(50))
        .lease_retry_interval(Duration::from_millis(50))
        .retry_initial(Duration::from_millis(10))
        .retry_max(Duration::from_millis(50))
}

async fn shipments(store: &PostgresEventStore) -> BTreeMap<String, usize> {
    let mut per_order = BTreeMap::new();
    for e in store
        .query(&Query::types(["ShipmentRequested"]), ReadOptions::default())
        .await
        .expect("read")
    {
        *per_order.entry(e.tags[0].value.clone()).or_default() += 1;
    }
    per_order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_automation_replays_without_duplicates() {
    let ts = test_store(StoreConfig::default()).await;
    let mut head = None;
    for i in 0..12 {
        head = Some(
            ts.append(vec![event("OrderPaid", &format!("o{i}"))])
                .await
                .expect("append"),
        );
    }
    let head = head.expect("head");
    // The first instance decides and appends in its transaction, then hangs in `handle`.
    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let first = ts
        .run_handler(
            Shipping {
                store: ts.store.clone(),
                gate: Some((Arc::clone(&entered), Arc::clone(&gate))),
                race: None,
            },
            options(),
        )
        .expect("run");
    // Its batch's transaction now holds the appended, uncommitted shipments.
    tokio::time::timeout(Duration::from_secs(20), entered.notified())
        .await
        .expect("the automation reached handle");
    let committed: i64 = ts
        .admin()
        .await
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE type = 'ShipmentRequested'",
                ts.table("events")
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        committed, 0,
        "nothing is visible before the checkpoint commits"
    );
    // Killed between handling and commit: the transaction rolls back with the connection.
    first.abort();
    let second = ts
        .run_handler(
            Shipping {
                store: ts.store.clone(),
                gate: None,
                race: None,
            },
            options(),
        )
        .expect("run");
    ts.wait_until_processed("shipping", head, Duration::from_secs(20))
        .await
        .expect("processed");
    let per_order = shipments(&ts.store).await;
    assert_eq!(per_order.len(), 12, "{per_order:?}");
    assert!(per_order.values().all(|n| *n == 1), "{per_order:?}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_automation_decision_conflicts_and_is_decided_again() {
    let ts = test_store(StoreConfig::default()).await;
    let head = ts
        .append(vec![event("OrderPaid", "o1")])
        .await
        .expect("append");
    let race = Arc::new(Barrier::new(2));
    let running = ts
        .run_handler(
            Shipping {
                store: ts.store.clone(),
                gate: None,
                race: Some(Arc::clone(&race)),
            },
            options(),
        )
        .expect("run");
    // The automation has read "no shipment for o1"; a clerk requests one by hand meanwhile.
    race.wait().await;
    ts.append(vec![event("ShipmentRequested", "o1")])
        .await
        .expect("manual request");
    race.wait().await;
    // Its append conflicts; the batch is decided again (reading the manual request) and
    // commits without a second shipment.
    race.wait().await;
    race.wait().await;
    if let Err(err) = ts
        .wait_until_processed("shipping", head, Duration::from_secs(20))
        .await
    {
        panic!("{err}: {:?}", ts.handler_status("shipping").await);
    }
    assert_eq!(shipments(&ts.store).await.get("o1"), Some(&1));
    let status = ts
        .handler_status("shipping")
        .await
        .expect("status")
        .expect("record");
    assert_eq!(status.attempts, 0, "caught up after the retry");
    running.stop().await;
}
