//! An automation: when an order is paid, request its shipment, exactly once.
//!
//! A durable handler's `decide` returns the `ShipmentRequested` command for each `OrderPaid`
//! (unless a shipment was requested already), and the runner appends it in the same
//! transaction as the handler's checkpoint. Meanwhile customers pay orders concurrently (some
//! twice: the second payment conflicts), and a clerk requests some shipments by hand, racing
//! the automation (its decision then goes stale, conflicts, and is decided again).
//!
//! - With `DATABASE_URL` set: two instances of the handler compete for its lease; the first is
//!   killed mid-run (as if its process died), and the second takes over from the committed
//!   checkpoint.
//! - Without it: the in-memory store and its handler runner.
//!
//! The example exits non-zero unless every paid order has exactly one shipment request and no
//! unpaid order has one.
//!
//! ```text
//! cargo run --example automation
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example automation
//! ```
mod common;

use async_trait::async_trait;
use common::{check, exit_code, AnyError};
use crablet::memory::{MemoryEventHandler, MemoryHandlerError, MemoryHandlerOptions};
use crablet::postgres::{tokio_postgres, EventHandler, HandlerError, HandlerOptions};
use crablet::{
    AppendCommand, AppendCondition, DomainEvent, Event, EventKind, EventStore, Query, QueryItem,
    ReadOptions,
};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const ORDERS: usize = 60;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum OrderEvent {
    OrderPaid {
        #[crablet(tag)]
        order: String,
        amount: u32,
    },
    ShipmentRequested {
        #[crablet(tag)]
        order: String,
        by: String,
    },
}

fn shipments_of(order: &str) -> Result<Query, crablet::Error> {
    Ok(Query::from(
        QueryItem::of_kinds([OrderEventKind::ShipmentRequested])?.tag("order", order),
    ))
}

/// The decision, shared by both backends' handlers.
struct Shipping {
    store: Arc<dyn EventStore>,
}

impl Shipping {
    async fn commands(&self, events: &[Event]) -> Result<Vec<AppendCommand>, AnyError> {
        let mut commands = Vec::new();
        for event in events {
            let OrderEvent::OrderPaid { order, .. } = OrderEvent::decode(event)? else {
                continue;
            };
            let requested = shipments_of(&order)?;
            if self
                .store
                .query(&requested, ReadOptions::default())
                .await?
                .is_empty()
            {
                let request = OrderEvent::ShipmentRequested {
                    order,
                    by: "automation".into(),
                };
                commands.push(
                    AppendCommand::new(vec![request.encode()?])
                        .only_if(AppendCondition::new(requested)),
                );
            }
        }
        Ok(commands)
    }
}

fn paid() -> Query {
    Query::types(OrderEventKind::OrderPaid.read_types())
}

#[async_trait]
impl EventHandler for Shipping {
    fn name(&self) -> &str {
        "shipping"
    }

    fn query(&self) -> Query {
        paid()
    }

    async fn decide(&self, events: &[Event]) -> Result<Vec<AppendCommand>, HandlerError> {
        self.commands(events).await
    }

    async fn handle(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        _events: &[Event],
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[async_trait]
impl MemoryEventHandler for Shipping {
    fn name(&self) -> &str {
        "shipping"
    }

    fn query(&self) -> Query {
        paid()
    }

    async fn decide(&self, events: &[Event]) -> Result<Vec<AppendCommand>, MemoryHandlerError> {
        self.commands(events).await
    }

    async fn handle(&self, _events: &[Event]) -> Result<(), MemoryHandlerError> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run()).await
}

async fn run() -> Result<(), AnyError> {
    let backend = common::open("automation").await?;
    let store = backend.store.clone();
    let shipping = || Shipping {
        store: store.clone(),
    };

    // PostgreSQL: two competing instances; the first is killed once orders flow.
    let (mut first, mut second, mut memory) = (None, None, None);
    if let Some(pg) = &backend.postgres {
        let options = HandlerOptions::default()
            .batch_size(8)
            .poll_interval(Duration::from_millis(50))
            .lease_retry_interval(Duration::from_millis(100));
        first = Some(pg.run_handler(shipping(), options)?);
        second = Some(pg.run_handler(shipping(), options)?);
    } else if let Some(mem) = &backend.memory {
        memory = Some(mem.run_handler(shipping(), MemoryHandlerOptions::default().batch_size(8))?);
    }

    // Customers pay orders 0..ORDERS (every fifth twice, concurrently); a clerk requests the
    // shipment of every seventh order by hand, racing the automation.
    let mut tasks = Vec::new();
    for i in 0..ORDERS {
        for attempt in 0..(1 + usize::from(i % 5 == 0)) {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let order = format!("order-{i:02}");
                let pay = OrderEvent::OrderPaid {
                    order: order.clone(),
                    amount: 20 + attempt as u32,
                };
                let once = AppendCondition::new(Query::from(
                    QueryItem::of_kinds([OrderEventKind::OrderPaid])?.tag("order", &order),
                ));
                let paid = match store.append_if(vec![pay.encode()?], once).await {
                    Ok(cursor) => Some(cursor),
                    Err(err) if err.is_conflict() => None,
                    Err(err) => return Err::<_, AnyError>(err.into()),
                };
                if paid.is_some() && i % 7 == 0 {
                    let by_hand = OrderEvent::ShipmentRequested {
                        order: order.clone(),
                        by: "clerk".into(),
                    };
                    match store
                        .append_if(
                            vec![by_hand.encode()?],
                            AppendCondition::new(shipments_of(&order)?),
                        )
                        .await
                    {
                        Ok(_) => {}
                        Err(err) if err.is_conflict() => {} // the automation was first
                        Err(err) => return Err(err.into()),
                    }
                }
                Ok(paid)
            }));
        }
        if i == ORDERS / 2 {
            if let Some(killed) = first.take() {
                killed.abort();
                println!("killed the first instance halfway; the second takes over");
            }
        }
    }
    let mut head = None;
    let mut payments = 0;
    for task in tasks {
        if let Some(cursor) = task.await?? {
            payments += 1;
            head = head.max(Some(cursor));
        }
    }
    let head = head.ok_or("no order was paid")?;
    let newest = store
        .query(&Query::all(), ReadOptions::default().backwards().limit(1))
        .await?
        .first()
        .map(|e| e.cursor)
        .unwrap_or(head);
    if let (Some(pg), Some(running)) = (&backend.postgres, second.take()) {
        pg.wait_until_processed("shipping", newest, Duration::from_secs(30))
            .await?;
        running.stop().await;
    }
    if let Some(running) = memory.take() {
        running
            .wait_until_processed(newest, Duration::from_secs(30))
            .await?;
        running.stop().await;
    }
    println!("{payments} payment(s) accepted for {ORDERS} orders");

    let mut requests: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut paid_orders = Vec::new();
    for event in store
        .query(&Query::of::<OrderEvent>(), ReadOptions::default())
        .await?
    {
        match OrderEvent::decode(&event)? {
            OrderEvent::OrderPaid { order, .. } => paid_orders.push(order),
            OrderEvent::ShipmentRequested { order, by } => {
                requests.entry(order).or_default().push(by)
            }
        }
    }
    let by_clerk = requests
        .values()
        .flatten()
        .filter(|by| *by == "clerk")
        .count();
    println!(
        "{} shipment request(s): {} by the automation, {by_clerk} by the clerk",
        requests.values().map(Vec::len).sum::<usize>(),
        requests
            .values()
            .flatten()
            .filter(|by| *by == "automation")
            .count()
    );
    check(paid_orders.len() == ORDERS, "every order paid exactly once")?;
    check(
        paid_orders
            .iter()
            .all(|order| requests.get(order).map(Vec::len) == Some(1)),
        "every paid order has exactly one shipment request",
    )?;
    check(
        requests.len() == paid_orders.len(),
        "no shipment request without a payment",
    )?;
    Ok(())
}
