//! The transactional outbox: a command appends its event and writes the message to publish in
//! ONE transaction, and a relay publishes the messages to a broker at least once, consumed
//! idempotently.
//!
//! - With `DATABASE_URL` set: a "place order" command appends its event with `append_if` (an
//!   order is placed once; racing duplicates conflict) and `INSERT`s into the application's own
//!   `outbox` table, committed together. Each order's first command does it in a
//!   [`StoreSession`]; the second, racing it, goes through a `CommandExecutor` whose decision
//!   carries the insert as transaction work (`Decision::in_transaction`) and which also records
//!   the command in the audit trail. The relay takes outbox rows with
//!   `FOR UPDATE SKIP LOCKED`, publishes each, and deletes them in the same transaction once the
//!   broker acknowledged; it "crashes" once after publishing (rolls back instead of deleting),
//!   so those messages are published again.
//! - Without it: the in-memory store; the event log itself is the outbox, which the relay
//!   follows with a subscription (it also re-publishes one batch, as after a crash).
//!
//! The broker is NATS JetStream at `NATS_URL` (default `127.0.0.1:4222`): a stream of its own
//! per run, each message published with a `Nats-Msg-Id` (the outbox row or the event's cursor),
//! which JetStream deduplicates. When no NATS server answers within 2 s, the example says so and
//! uses an in-process queue as the broker, with the same at-least-once delivery.
//!
//! The consumer is idempotent: it processes a message id once and counts the redeliveries it
//! skipped. The example exits non-zero unless every placed order (and nothing else) was
//! consumed exactly once and the outbox is empty at the end.
//!
//! ```text
//! cargo run --example outbox
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example outbox
//! ```
mod common;

use async_nats::jetstream;
use common::{check, exit_code, AnyError};
use crablet::command::{handler_fn, Command, CommandExecutor, Decision, HandlerError};
use crablet::postgres::{transaction_work, PostgresEventStore};
use crablet::{
    AppendCondition, CommandFilter, DomainEvent, EventStore, Query, QueryItem, ReadOptions,
    SubscribeOptions,
};
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Distinct orders; each is placed by two racing commands, so half of them conflict.
const ORDERS: usize = 40;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct OrderPlaced {
    #[crablet(tag)]
    order: String,
    amount: u32,
}

/// The command's payload, recorded in the audit trail.
#[derive(Debug, Clone, serde::Serialize)]
struct PlaceOrder {
    order: String,
    amount: u32,
}

/// A message to publish: its id (deduplication and idempotent consumption) and body.
#[derive(Debug, Clone)]
struct Message {
    id: String,
    body: Vec<u8>,
}

/// Where the relay publishes.
enum Broker {
    Nats {
        js: Box<jetstream::Context>,
        subject: String,
    },
    /// No broker answered: an in-process queue.
    Local(mpsc::UnboundedSender<Message>),
}

impl Broker {
    /// Publishes `message` and waits for the broker's acknowledgement.
    async fn publish(&self, message: &Message) -> Result<(), AnyError> {
        match self {
            Broker::Nats { js, subject } => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", message.id.as_str());
                js.publish_with_headers(subject.clone(), headers, message.body.clone().into())
                    .await?
                    .await?;
            }
            Broker::Local(queue) => queue.send(message.clone())?,
        }
        Ok(())
    }
}

/// What the consumer saw: message ids processed once each, and redeliveries skipped.
#[derive(Default)]
struct Consumed {
    orders: BTreeMap<String, String>,
    redeliveries: usize,
}

impl Consumed {
    /// Idempotent consumption: a message id is processed once.
    fn receive(&mut self, message: &Message) -> Result<(), AnyError> {
        if self.orders.values().any(|id| id == &message.id) {
            self.redeliveries += 1;
            return Ok(());
        }
        let body: serde_json::Value = serde_json::from_slice(&message.body)?;
        let order = body["order"].as_str().ok_or("a message without an order")?;
        if self
            .orders
            .insert(order.to_string(), message.id.clone())
            .is_some()
        {
            return Err(format!("order {order} consumed under two message ids").into());
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run()).await
}

async fn run() -> Result<(), AnyError> {
    let backend = common::open("outbox").await?;
    let run_id = std::process::id();
    let (broker, mut local) = connect_broker(run_id).await;

    let placed = match &backend.postgres {
        Some(store) => {
            let table = create_outbox(store).await?;
            let insert = format!("INSERT INTO {table} (body) VALUES ($1)");
            let executor = CommandExecutor::new(Arc::new(store.clone()));
            let turn = AtomicUsize::new(0);
            let placed = place_orders(|placed, once| {
                let insert = insert.clone();
                let (store, executor) = (store.clone(), executor.clone());
                // Each order's second attempt is a command, racing its first, a session.
                let by_command = turn.fetch_add(1, Ordering::Relaxed) >= ORDERS;
                async move {
                    if by_command {
                        place_by_command(executor, insert, placed, once).await
                    } else {
                        place_in_session(store, insert, placed, once).await
                    }
                }
            })
            .await?;
            let recorded = executor
                .commands(&CommandFilter::default().command_type("PlaceOrder"))
                .await?
                .len();
            check(
                recorded <= placed.len(),
                format!(
                    "the executor's winning commands are recorded ({recorded} of {} orders; the \
                     sessions won the rest)",
                    placed.len()
                ),
            )?;
            relay_outbox(store, &table, &broker).await?;
            let left: i64 = store
                .pool()
                .get()
                .await?
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0);
            check(left == 0, format!("the outbox is empty ({left} rows left)"))?;
            placed
        }
        None => {
            let store = backend.store.clone();
            let placed =
                place_orders(|placed, once| place_in_memory(store.clone(), placed, once)).await?;
            relay_log(backend.store.clone(), &broker, placed.len()).await?;
            placed
        }
    };

    let consumed = match (&broker, local.as_mut()) {
        (Broker::Nats { js, .. }, _) => consume_nats(js, run_id, placed.len()).await?,
        (Broker::Local(_), Some(queue)) => {
            let mut consumed = Consumed::default();
            while let Ok(message) = queue.try_recv() {
                consumed.receive(&message)?;
            }
            consumed
        }
        (Broker::Local(_), None) => return Err("the local queue has no receiver".into()),
    };
    println!(
        "consumed {} order(s), skipped {} redelivered message(s)",
        consumed.orders.len(),
        consumed.redeliveries
    );
    let consumed_orders: BTreeSet<&String> = consumed.orders.keys().collect();
    let placed_orders: BTreeSet<&String> = placed.iter().collect();
    check(
        consumed_orders == placed_orders,
        "every placed order was consumed exactly once, and nothing else",
    )?;
    check(
        placed.len() == ORDERS,
        format!("{ORDERS} orders placed once each"),
    )?;
    let events = backend
        .store
        .query(&Query::of::<OrderPlaced>(), ReadOptions::default())
        .await?;
    check(
        events.len() == ORDERS,
        format!(
            "one OrderPlaced per order in the log ({} found)",
            events.len()
        ),
    )?;
    Ok(())
}

/// NATS JetStream when it answers, else an in-process queue (and its receiving end).
async fn connect_broker(run_id: u32) -> (Broker, Option<mpsc::UnboundedReceiver<Message>>) {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let connected = tokio::time::timeout(Duration::from_secs(2), async {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(url.as_str())
            .await?;
        let js = jetstream::new(client);
        let stream = stream_name(run_id);
        let _ = js.delete_stream(&stream).await;
        js.create_stream(jetstream::stream::Config {
            name: stream,
            subjects: vec![format!("crablet.example.outbox.{run_id}")],
            ..Default::default()
        })
        .await?;
        Ok::<_, AnyError>(js)
    })
    .await;
    match connected {
        Ok(Ok(js)) => {
            println!("broker: NATS JetStream at {url}");
            let subject = format!("crablet.example.outbox.{run_id}");
            (
                Broker::Nats {
                    js: Box::new(js),
                    subject,
                },
                None,
            )
        }
        Ok(Err(err)) => local_broker(&format!("NATS at {url} failed: {err}")),
        Err(_) => local_broker(&format!("NATS at {url} did not answer within 2 s")),
    }
}

fn local_broker(why: &str) -> (Broker, Option<mpsc::UnboundedReceiver<Message>>) {
    println!("broker: in-process queue ({why})");
    let (sender, receiver) = mpsc::unbounded_channel();
    (Broker::Local(sender), Some(receiver))
}

fn stream_name(run_id: u32) -> String {
    format!("CRABLET_EXAMPLE_OUTBOX_{run_id}")
}

async fn create_outbox(store: &PostgresEventStore) -> Result<String, AnyError> {
    let table = format!("\"{}\".outbox", store.config().schema);
    store
        .pool()
        .get()
        .await?
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, body jsonb NOT NULL)"
        ))
        .await?;
    Ok(table)
}

fn order_id(i: usize) -> String {
    format!("order-{i:03}")
}

/// Places every order twice, concurrently, each attempt with `place` (true: placed; false: it
/// conflicted with the other attempt). Returns the orders placed.
async fn place_orders<F, Fut>(place: F) -> Result<Vec<String>, AnyError>
where
    F: Fn(OrderPlaced, AppendCondition) -> Fut,
    Fut: std::future::Future<Output = Result<bool, AnyError>> + Send + 'static,
{
    let mut tasks = Vec::new();
    for attempt in 0..2 * ORDERS {
        let order = order_id(attempt % ORDERS);
        let placed = OrderPlaced {
            order: order.clone(),
            amount: 10 + attempt as u32 % 7,
        };
        let once = AppendCondition::new(Query::from(
            QueryItem::of::<OrderPlaced>().tag("order", &order),
        ));
        let attempt = place(placed, once);
        tasks.push(tokio::spawn(async move {
            Ok::<_, AnyError>(attempt.await?.then_some(order))
        }));
    }
    let mut placed = Vec::new();
    for task in tasks {
        placed.extend(task.await??);
    }
    println!(
        "placed {} order(s) from {} commands",
        placed.len(),
        2 * ORDERS
    );
    Ok(placed)
}

/// Each attempt is a session: the event and the outbox row commit together, or (on a
/// conflict) neither.
async fn place_in_session(
    store: PostgresEventStore,
    insert: String,
    placed: OrderPlaced,
    once: AppendCondition,
) -> Result<bool, AnyError> {
    let mut session = store.begin_session().await?;
    match session.append_if(vec![placed.encode()?], once).await {
        Ok(cursor) => {
            let body = serde_json::json!({ "order": placed.order, "cursor": cursor.to_string() });
            session.client().execute(&insert, &[&body]).await?;
            session.commit().await?;
            Ok(true)
        }
        Err(err) if err.is_conflict() => {
            session.rollback().await?;
            Ok(false)
        }
        Err(err) => Err(err.into()),
    }
}

/// Each attempt is a command: the executor commits the event, the command record and the
/// handler's outbox row (its transaction work) together, or (on a conflict) none of them.
async fn place_by_command(
    executor: CommandExecutor,
    insert: String,
    placed: OrderPlaced,
    once: AppendCondition,
) -> Result<bool, AnyError> {
    let handler = handler_fn(move |command: &Command<PlaceOrder>, _reader| {
        let (insert, once) = (insert.clone(), once.clone());
        Box::pin(async move {
            let order = command.payload.order.clone();
            let placed = OrderPlaced {
                order: order.clone(),
                amount: command.payload.amount,
            };
            let outbox_row = transaction_work(move |client, record| {
                Box::pin(async move {
                    let cursor = record.last_event.map(|c| c.to_string());
                    let body = serde_json::json!({ "order": order, "cursor": cursor });
                    client.execute(&insert, &[&body]).await?;
                    Ok(())
                })
            });
            Ok::<_, HandlerError>(
                Decision::append([placed.encode()?])
                    .guarded_by(once)
                    .in_transaction(outbox_row),
            )
        })
    });
    match executor
        .execute(
            Command::new(
                "PlaceOrder",
                PlaceOrder {
                    order: placed.order,
                    amount: placed.amount,
                },
            ),
            &handler,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(err) if err.is_conflict() => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// In memory: a plain conditional append.
async fn place_in_memory(
    store: Arc<dyn EventStore>,
    placed: OrderPlaced,
    once: AppendCondition,
) -> Result<bool, AnyError> {
    match store.append_if(vec![placed.encode()?], once).await {
        Ok(_) => Ok(true),
        Err(err) if err.is_conflict() => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Publishes the outbox in batches, deleting rows after the broker acknowledged them. The
/// first batch "crashes" after publishing: rolled back, so its rows are published again.
async fn relay_outbox(
    store: &PostgresEventStore,
    table: &str,
    broker: &Broker,
) -> Result<(), AnyError> {
    let mut client = store.pool().get().await?;
    let mut crashed = false;
    let mut published = 0;
    loop {
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT id, body FROM {table} ORDER BY id LIMIT 16 FOR UPDATE SKIP LOCKED"
                ),
                &[],
            )
            .await?;
        if rows.is_empty() {
            tx.commit().await?;
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get(0);
            let body: serde_json::Value = row.get(1);
            let message = Message {
                id: format!("{}-outbox-{id}", store.config().schema),
                body: serde_json::to_vec(&body)?,
            };
            broker.publish(&message).await?;
            published += 1;
            ids.push(id);
        }
        if !crashed {
            crashed = true;
            tx.rollback().await?;
            println!(
                "relay: crashed after publishing {} message(s); they stay in the outbox",
                ids.len()
            );
            continue;
        }
        tx.execute(&format!("DELETE FROM {table} WHERE id = ANY($1)"), &[&ids])
            .await?;
        tx.commit().await?;
    }
    println!("relay: {published} publication(s), the outbox is empty");
    Ok(())
}

/// The log is the outbox: a subscription publishes every OrderPlaced, with its cursor as the
/// message id. The first batch is published twice, as by a relay that crashed before recording
/// its position.
async fn relay_log(
    store: Arc<dyn EventStore>,
    broker: &Broker,
    expected: usize,
) -> Result<(), AnyError> {
    let mut events = crablet::subscribe(
        store,
        &Query::of::<OrderPlaced>(),
        None,
        SubscribeOptions::default(),
    );
    let mut published = 0;
    for n in 0..expected {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await?
            .ok_or("the subscription ended")??;
        let order = OrderPlaced::decode(&event)?;
        let message = Message {
            id: format!("event-{}", event.cursor),
            body: serde_json::to_vec(&serde_json::json!({ "order": order.order }))?,
        };
        broker.publish(&message).await?;
        published += 1;
        if n < 8 {
            broker.publish(&message).await?;
            published += 1;
        }
    }
    println!("relay: {published} publication(s) of {expected} event(s)");
    Ok(())
}

/// Reads the run's stream until every order arrived (or 10 s passed), acknowledging each.
async fn consume_nats(
    js: &jetstream::Context,
    run_id: u32,
    expected: usize,
) -> Result<Consumed, AnyError> {
    let mut stream = js.get_stream(stream_name(run_id)).await?;
    let stored = stream.info().await?.state.messages;
    println!("broker: the stream holds {stored} message(s) (duplicates dropped by Nats-Msg-Id)");
    check(
        stored as usize == expected,
        format!("JetStream kept one message per order ({stored} for {expected})"),
    )?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("checker".into()),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut consumed = Consumed::default();
    while consumed.orders.len() < expected {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let Ok(Some(message)) = next else { break };
        let message = message?;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .ok_or("a message without Nats-Msg-Id")?;
        consumed.receive(&Message {
            id,
            body: message.payload.to_vec(),
        })?;
        message.ack().await?;
    }
    let _ = js.delete_stream(stream_name(run_id)).await;
    Ok(consumed)
}
