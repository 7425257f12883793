//! What every example shares: choosing the backend, and checking invariants.
//!
//! Without `DATABASE_URL` an example runs on the in-memory store. With it, the example runs on
//! PostgreSQL in a schema of its own, `crablet_example_<name>`, which is dropped and recreated at
//! the start of every run so each run starts from an empty log. The schema is left in place
//! afterwards, so you can look at what the example wrote:
//!
//! ```text
//! psql "$DATABASE_URL" -c 'SELECT * FROM crablet_example_transfer.events'
//! ```
//!
//! This is a module of each example (`mod common;`), not an example itself: cargo only treats
//! `examples/*.rs` and `examples/*/main.rs` as examples.

// Each example uses a different part of this module.
#![allow(dead_code)]

use async_trait::async_trait;
use crablet::command::{Command, CommandHandler};
use crablet::memory::InMemoryEventStore;
use crablet::postgres::{tokio_postgres, PostgresEventStore, StoreConfig};
use crablet::{EventReader, EventStore};
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The error type of the examples.
pub type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// The store an example runs on.
pub struct Backend {
    /// The store, shareable between tasks and with a `CommandExecutor`.
    pub store: Arc<dyn EventStore>,
    /// True on PostgreSQL, false in memory.
    pub on_postgres: bool,
    /// The same store as a `PostgresEventStore`, on PostgreSQL: for what only it has (durable
    /// handlers, health).
    pub postgres: Option<PostgresEventStore>,
    /// The same store as an `InMemoryEventStore`, in memory: for its handlers.
    pub memory: Option<InMemoryEventStore>,
}

/// Opens the example's store and prints which one as the first line of output:
/// `backend: in-memory`, or `backend: postgres (schema crablet_example_<example>)` when
/// `DATABASE_URL` is set.
pub async fn open(example: &str) -> Result<Backend, AnyError> {
    open_with(example, StoreConfig::default()).await
}

/// Like [`open`], with a store configuration of the example's own (its schema is replaced by
/// the example's schema).
pub async fn open_with(example: &str, config: StoreConfig) -> Result<Backend, AnyError> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => {
            let schema = format!("crablet_example_{example}");
            println!("backend: postgres (schema {schema})");
            drop_schema(&url, &schema).await?;
            let store =
                PostgresEventStore::connect(&url, config.schema(schema).auto_migrate(true)).await?;
            Ok(Backend {
                store: Arc::new(store.clone()),
                on_postgres: true,
                postgres: Some(store),
                memory: None,
            })
        }
        _ => {
            println!("backend: in-memory (set DATABASE_URL to run on PostgreSQL)");
            let store = InMemoryEventStore::new();
            Ok(Backend {
                store: Arc::new(store.clone()),
                on_postgres: false,
                postgres: None,
                memory: Some(store),
            })
        }
    }
}

/// Drops `schema` and everything in it, so the example starts from an empty log.
async fn drop_schema(url: &str, schema: &str) -> Result<(), AnyError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {quoted} CASCADE"))
        .await?;
    drop(client);
    connection.await??;
    Ok(())
}

/// Prints `ok: <invariant>` if it holds; otherwise fails the example with
/// `invariant violated: <invariant>`.
pub fn check(holds: bool, invariant: impl Display) -> Result<(), AnyError> {
    if holds {
        println!("  ok: {invariant}");
        Ok(())
    } else {
        Err(format!("invariant violated: {invariant}").into())
    }
}

/// Like [`check`] for a list of problems found: the invariant holds when there are none.
pub fn check_none<T: std::fmt::Debug>(
    found: &[T],
    invariant: impl Display,
) -> Result<(), AnyError> {
    if found.is_empty() {
        println!("  ok: {invariant}");
        Ok(())
    } else {
        Err(format!("invariant violated: {invariant}: {found:?}").into())
    }
}

/// Runs an example's body and turns its outcome into the process exit code: 0 on success, 1
/// (with the error on stderr) if it failed or an invariant was violated.
pub async fn exit_code(body: impl Future<Output = Result<(), AnyError>>) -> ExitCode {
    match body.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("FAILED: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Wraps a command handler for the examples' races: counts its decisions (more decisions than
/// commands means commits conflicted and the executor retried them on fresh state), and yields
/// to other tasks after each decision, as a handler waiting on I/O (a fraud check, say) would.
/// That way racing commands really interleave between their read and their commit, also on the
/// in-memory store, whose operations never wait.
pub struct Interleaving<H> {
    inner: H,
    decisions: AtomicU32,
}

impl<H> Interleaving<H> {
    pub fn new(inner: H) -> Self {
        Self {
            inner,
            decisions: AtomicU32::new(0),
        }
    }

    /// How many decisions the handler took so far.
    pub fn decisions(&self) -> u32 {
        self.decisions.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl<T: Send + Sync, H: CommandHandler<T>> CommandHandler<T> for Interleaving<H> {
    type Error = H::Error;

    async fn handle(
        &self,
        command: &Command<T>,
        reader: &dyn EventReader,
    ) -> crablet::command::HandlerResult<H::Error> {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        let decision = self.inner.handle(command, reader).await;
        tokio::task::yield_now().await;
        decision
    }
}
