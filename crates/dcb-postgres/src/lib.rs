//! # dcb-postgres
//!
//! [`PostgresEventStore`]: crablet's event store on PostgreSQL 14 or later, over
//! tokio-postgres and deadpool-postgres.
//!
//! - **Conditional appends are exact under concurrency.** Every append takes shared advisory
//!   locks on keys derived from its events; every condition check takes exclusive locks on keys
//!   derived from its query, in one sorted statement, before the transaction gets an id. The
//!   check then runs in a later statement and sees every commit the lock wait waited for.
//!   Writers on disjoint boundaries never share a key, so they never wait for or fail because
//!   of each other.
//! - **Reads are fenced.** A read first takes the same exclusive keys for an instant and records
//!   the snapshot it got; it then returns exactly the matching events visible in that snapshot,
//!   in the same transaction and round trip.
//!   A reader that continues after its last cursor never skips an event committed out of order,
//!   sees its own writes, and is not held back by unrelated long transactions.
//!
//! - **Subscriptions** (`dcb_core::SubscribeExt::subscribe`) are loops of fenced reads, woken in
//!   process by this store's appends and across processes by LISTEN/NOTIFY (sent after commit by
//!   a background task, see [`StoreConfig::notify_on_append`]), with a polling fallback.
//! - **Durable handlers** ([`EventHandler`], [`PostgresEventStore::run_handler`]) process events
//!   in a transaction that also advances their checkpoint: exactly once per event, one instance
//!   at a time, with [`PostgresEventStore::wait_until_processed`] for reading your own writes.
//! - **A partitioned log** (opt-in, [`PostgresEventStore::partition`]): `events`
//!   range-partitioned by position (and `commands` by transaction id, its idempotency keys kept
//!   in the unpartitioned `command_ids`) without copying a row, partitions created ahead by the
//!   store, old ones detached for archiving (`docs/scale-out.md`, "A partitioned log").
//!
//! The full argument is in `docs/design.md`.
//!
//! ```no_run
//! use dcb_postgres::{PostgresEventStore, StoreConfig};
//! use dcb_core::{EventStore, NewEvent};
//!
//! # async fn demo() -> dcb_core::Result<()> {
//! let store = PostgresEventStore::connect(
//!     "postgres://postgres@localhost:5432/postgres",
//!     StoreConfig::default().schema("shop").auto_migrate(true),
//! )
//! .await?;
//! store.append(vec![NewEvent::builder("CartOpened").tag("cart_id", "c1").build()?]).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod admin;
mod append;
mod batch;
mod command_work;
mod config;
mod conn;
mod event_store;
mod group;
mod group_queue;
mod handlers;
mod health;
mod json;
mod keys;
mod lag;
mod migrate;
mod notify;
mod partition;
mod partition_ahead;
#[cfg(test)]
mod plan_tests;
mod replica;
mod server_error;
mod session;
mod sql;
mod standby;
mod store;
mod store_session;
mod stream;
mod xid8;

pub use admin::{AdminError, HandlerOverview, IndexSize, StoreStats, TableSize};
pub use command_work::transaction_work;
pub use config::{IsolationLevel, StoreConfig};
pub use dcb_core::runner::{FailurePolicy, ParkedError, ParkedEvent};
pub use deadpool_postgres::Pool;
pub use handlers::{
    EventHandler, HandlerError, HandlerOptions, HandlerRecord, HandlerStatus, RunningHandler,
};
pub use health::{HandlerHealth, Health};
pub use lag::HandlerLag;
pub use migrate::SCHEMA_VERSION;
pub use partition::{PartitionConfig, PartitionError, PartitionInfo, MIN_DEFAULT_COMMAND_RANGE};
pub use replica::{ReadFrom, ReplicaConfig, StandbyFallback};
pub use server_error::ServerError;
pub use store::PostgresEventStore;
pub use store_session::StoreSession;
/// The PostgreSQL client crate, re-exported for [`EventHandler`] implementations.
pub use tokio_postgres;
