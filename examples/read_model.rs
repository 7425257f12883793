//! A read model of account balances, built from transfer events and kept up to date live.
//!
//! The events are one typed enum (`#[derive(DomainEvent)]` with inline variants, the accounts as
//! tags); both read models decode what they receive into it.
//!
//! - With `DATABASE_URL` set: a PostgreSQL table `balances` maintained by a durable
//!   [`EventHandler`]: each batch of events (decoded with `decode_all`) updates the table in the
//!   same transaction as the handler's checkpoint, so every event counts exactly once, even
//!   across crashes. After each write, `wait_until_processed` lets the writer read its own write
//!   from the table.
//! - Without it: the in-memory store, with a read model fed by a subscription (decoded with
//!   `decode_stream`).
//!
//! The first line printed names the backend. The example exits non-zero if the read model does
//! not match the balances computed directly from the appended events.
//!
//! ```text
//! cargo run --example read_model
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example read_model
//! ```
use async_trait::async_trait;
use crablet::memory::InMemoryEventStore;
use crablet::postgres::tokio_postgres;
use crablet::postgres::{
    EventHandler, HandlerError, HandlerOptions, PostgresEventStore, StoreConfig,
};
use crablet::{
    decode_all, decode_stream, encode_all, Cursor, DomainEvent, Event, EventStore, Query,
    SubscribeExt,
};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const ACCOUNTS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];
const OPENING_BALANCE: i64 = 100;
const TRANSFERS: usize = 120;

type Balances = BTreeMap<String, i64>;
type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// The events of the example: accounts opened, then money moved between them. Each variant is
/// one event type (its name); the tag fields select an account's events.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum AccountEvent {
    AccountOpened {
        #[crablet(tag)]
        account: String,
        balance: i64,
    },
    MoneyTransferred {
        #[crablet(tag)]
        from: String,
        #[crablet(tag)]
        to: String,
        amount: i64,
    },
}

/// An event no read model cares about; appended last, to wait for the handler to get past it.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct AuditTick;

fn opened(account: &str) -> AccountEvent {
    AccountEvent::AccountOpened {
        account: account.into(),
        balance: OPENING_BALANCE,
    }
}

fn transferred(from: &str, to: &str, amount: i64) -> AccountEvent {
    AccountEvent::MoneyTransferred {
        from: from.into(),
        to: to.into(),
        amount,
    }
}

/// The events the read models follow: every event type of [`AccountEvent`].
fn query() -> Query {
    Query::of::<AccountEvent>()
}

/// How one event changes the balances: `(account, delta)` pairs.
fn deltas(event: &AccountEvent) -> Vec<(String, i64)> {
    match event {
        AccountEvent::AccountOpened { account, balance } => vec![(account.clone(), *balance)],
        AccountEvent::MoneyTransferred { from, to, amount } => {
            vec![(from.clone(), -amount), (to.clone(), *amount)]
        }
    }
}

/// A deterministic workload: `(from, to, amount)`.
fn workload() -> Vec<(&'static str, &'static str, i64)> {
    let mut seed: u64 = 42;
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) as usize
    };
    (0..TRANSFERS)
        .map(|_| {
            let from = next() % ACCOUNTS.len();
            let to = (from + 1 + next() % (ACCOUNTS.len() - 1)) % ACCOUNTS.len();
            (ACCOUNTS[from], ACCOUNTS[to], (next() % 20) as i64 + 1)
        })
        .collect()
}

fn expected() -> Balances {
    let mut balances: Balances = ACCOUNTS
        .iter()
        .map(|a| (a.to_string(), OPENING_BALANCE))
        .collect();
    for (from, to, amount) in workload() {
        *balances.entry(from.to_string()).or_default() -= amount;
        *balances.entry(to.to_string()).or_default() += amount;
    }
    balances
}

fn check(read_model: &Balances) -> ExitCode {
    let want = expected();
    for (account, balance) in read_model {
        println!("  {account:<6} {balance:>5}");
    }
    let total: i64 = read_model.values().sum();
    if *read_model == want && total == OPENING_BALANCE * ACCOUNTS.len() as i64 {
        println!("invariant holds: the read model matches the events (total {total})");
        ExitCode::SUCCESS
    } else {
        eprintln!("INVARIANT FAILED: read model {read_model:?}, expected {want:?}");
        ExitCode::FAILURE
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            println!("backend: postgres");
            on_postgres(&url).await
        }
        _ => {
            println!("backend: in-memory (set DATABASE_URL to use PostgreSQL)");
            on_memory().await
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a durable handler writes the `balances` table.
// ---------------------------------------------------------------------------------------------

struct BalancesHandler {
    table: String,
}

#[async_trait]
impl EventHandler for BalancesHandler {
    fn name(&self) -> &str {
        "balances"
    }

    fn query(&self) -> Query {
        query()
    }

    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), HandlerError> {
        let upsert = tx
            .prepare(&format!(
                "INSERT INTO {t} (account, balance) VALUES ($1, $2) \
                 ON CONFLICT (account) DO UPDATE SET balance = {t}.balance + EXCLUDED.balance",
                t = self.table
            ))
            .await?;
        for event in decode_all::<AccountEvent>(events)? {
            for (account, delta) in deltas(&event) {
                tx.execute(&upsert, &[&account, &delta]).await?;
            }
        }
        Ok(())
    }
}

async fn on_postgres(url: &str) -> Result<ExitCode, AnyError> {
    // A fresh schema per run, dropped at the end.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let schema = format!(
        "read_model_example_{}_{}",
        std::process::id(),
        nanos % 1_000_000
    );
    let store = PostgresEventStore::connect(
        url,
        StoreConfig::default().schema(&schema).auto_migrate(true),
    )
    .await?;
    let (admin, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let table = format!("\"{schema}\".balances");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} (account text PRIMARY KEY, balance bigint NOT NULL)"
        ))
        .await?;

    let outcome = async {
        store.append(encode_all(&ACCOUNTS.map(opened))?).await?;
        let work = workload();
        let (before, after) = work.split_at(work.len() / 2);
        for (from, to, amount) in before {
            store.append(vec![transferred(from, to, *amount).encode()?]).await?;
        }
        println!("{} events appended before the handler started", before.len() + 1);

        let running = store.run_handler(
            BalancesHandler { table: table.clone() },
            HandlerOptions::default().batch_size(50),
        )?;
        // Write, then read the own write from the read model.
        for (i, (from, to, amount)) in after.iter().enumerate() {
            let cursor = store.append(vec![transferred(from, to, *amount).encode()?]).await?;
            if i % 20 == 0 {
                store.wait_until_processed("balances", cursor, Duration::from_secs(10)).await?;
                let balance: i64 = admin
                    .query_one(&format!("SELECT balance FROM {table} WHERE account = $1"), &[from])
                    .await?
                    .get(0);
                println!("after transfer {cursor}: {from} has {balance} (read your own write)");
            }
        }
        let last = store.append(vec![AuditTick.encode()?]).await?;
        store.wait_until_processed("balances", last, Duration::from_secs(10)).await?;
        let status = running.status();
        println!(
            "handler status: checkpoint {:?}, {} events processed, lease held: {}, last error: {:?}",
            status.checkpoint.map(|c| c.to_string()),
            status.processed,
            status.holds_lease,
            status.last_error
        );
        running.stop().await;
        let rows = admin.query(&format!("SELECT account, balance FROM {table}"), &[]).await?;
        let model: Balances = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok::<_, AnyError>(check(&model))
    }
    .await;
    admin
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await?;
    outcome
}

// ---------------------------------------------------------------------------------------------
// In memory: a read model fed by a subscription.
// ---------------------------------------------------------------------------------------------

/// A read model in process memory, kept up to date by a subscription task.
struct MemoryReadModel {
    balances: Arc<Mutex<Balances>>,
    position: watch::Receiver<Option<Cursor>>,
    task: tokio::task::JoinHandle<()>,
}

impl MemoryReadModel {
    fn start(store: &InMemoryEventStore) -> Self {
        let balances = Arc::new(Mutex::new(Balances::new()));
        let (tx, position) = watch::channel(None);
        let mut events = decode_stream::<AccountEvent>(store.subscribe(&query(), None));
        let model = Arc::clone(&balances);
        let task = tokio::spawn(async move {
            while let Some(item) = events.next().await {
                match item {
                    Ok(logged) => {
                        if let Ok(mut balances) = model.lock() {
                            for (account, delta) in deltas(&logged.event) {
                                *balances.entry(account).or_default() += delta;
                            }
                        }
                        tx.send_replace(Some(logged.cursor));
                    }
                    Err(err) => eprintln!("subscription error (retrying): {err}"),
                }
            }
        });
        Self {
            balances,
            position,
            task,
        }
    }

    /// Waits until the model has applied the event at `cursor`.
    async fn wait_until_processed(
        &mut self,
        cursor: Cursor,
        timeout: Duration,
    ) -> Result<(), AnyError> {
        tokio::time::timeout(timeout, self.position.wait_for(|p| *p >= Some(cursor)))
            .await
            .map_err(|_| "the read model did not catch up in time")??;
        Ok(())
    }

    fn snapshot(&self) -> Balances {
        self.balances.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

async fn on_memory() -> Result<ExitCode, AnyError> {
    let store = InMemoryEventStore::new();
    store.append(encode_all(&ACCOUNTS.map(opened))?).await?;
    let work = workload();
    let (before, after) = work.split_at(work.len() / 2);
    for (from, to, amount) in before {
        store
            .append(vec![transferred(from, to, *amount).encode()?])
            .await?;
    }
    println!(
        "{} events appended before the read model started",
        before.len() + 1
    );
    let mut model = MemoryReadModel::start(&store);
    let mut last = None;
    for (i, (from, to, amount)) in after.iter().enumerate() {
        let cursor = store
            .append(vec![transferred(from, to, *amount).encode()?])
            .await?;
        last = Some(cursor);
        if i % 20 == 0 {
            model
                .wait_until_processed(cursor, Duration::from_secs(10))
                .await?;
            let balance = model.snapshot().get(*from).copied().unwrap_or_default();
            println!("after transfer {cursor}: {from} has {balance} (read your own write)");
        }
    }
    if let Some(cursor) = last {
        model
            .wait_until_processed(cursor, Duration::from_secs(10))
            .await?;
    }
    let snapshot = model.snapshot();
    model.task.abort();
    Ok(check(&snapshot))
}
