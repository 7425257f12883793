//! Automations in memory: a handler's decided commands are appended once per event, and a
//! decision gone stale conflicts and is decided again (the PostgreSQL store's semantics).
use async_trait::async_trait;
use dcb_core::{
    AppendCommand, AppendCondition, Event, EventReader, EventStore, NewEvent, Query, QueryItem,
    ReadOptions,
};
use dcb_memory::{
    InMemoryEventStore, MemoryEventHandler, MemoryHandlerError, MemoryHandlerOptions,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

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

/// When an order is paid, request its shipment unless one was requested already.
struct Shipping {
    store: InMemoryEventStore,
    race: Option<Arc<Barrier>>,
}

#[async_trait]
impl MemoryEventHandler for Shipping {
    fn name(&self) -> &str {
        "shipping"
    }

    fn query(&self) -> Query {
        Query::types(["OrderPaid"])
    }

    async fn decide(&self, events: &[Event]) -> Result<Vec<AppendCommand>, MemoryHandlerError> {
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

    async fn handle(&self, _events: &[Event]) -> Result<(), MemoryHandlerError> {
        Ok(())
    }
}

async fn shipments(store: &InMemoryEventStore, order: &str) -> usize {
    store
        .query(&shipments_of(order), ReadOptions::default())
        .await
        .expect("read")
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automation_appends_once_per_event() {
    let store = InMemoryEventStore::new();
    let mut head = None;
    for i in 0..12 {
        head = Some(
            store
                .append(vec![event("OrderPaid", &format!("o{i}"))])
                .await
                .expect("append"),
        );
    }
    let running = store
        .run_handler(
            Shipping {
                store: store.clone(),
                race: None,
            },
            MemoryHandlerOptions::default().batch_size(5),
        )
        .expect("run");
    running
        .wait_until_processed(head.expect("head"), Duration::from_secs(10))
        .await
        .expect("processed");
    for i in 0..12 {
        assert_eq!(shipments(&store, &format!("o{i}")).await, 1);
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_automation_decision_conflicts_and_is_decided_again() {
    let store = InMemoryEventStore::new();
    let head = store
        .append(vec![event("OrderPaid", "o1")])
        .await
        .expect("append");
    let race = Arc::new(Barrier::new(2));
    let running = store
        .run_handler(
            Shipping {
                store: store.clone(),
                race: Some(Arc::clone(&race)),
            },
            MemoryHandlerOptions::default()
                .retry(Duration::from_millis(5), Duration::from_millis(20)),
        )
        .expect("run");
    // The automation read "no shipment"; a clerk requests one meanwhile.
    race.wait().await;
    store
        .append(vec![event("ShipmentRequested", "o1")])
        .await
        .expect("manual request");
    race.wait().await;
    // Conflict, then decided again after reading the manual request.
    race.wait().await;
    race.wait().await;
    running
        .wait_until_processed(head, Duration::from_secs(10))
        .await
        .expect("processed");
    assert_eq!(shipments(&store, "o1").await, 1);
    running.stop().await;
}
