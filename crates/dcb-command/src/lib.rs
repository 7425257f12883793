//! # dcb-command
//!
//! The command layer of crablet: a [`CommandExecutor`] runs a [`CommandHandler`] on a
//! consistent read of the store and commits the events it decides on together with the
//! command's audit record, in one transaction.
//!
//! - **Decide on a projection.** The handler reads through the command's session (a
//!   `&dyn EventReader`), builds its decision model with
//!   [`EventReaderExt::project`](dcb_core::EventReaderExt::project) and returns a [`Decision`]:
//!   the events to append and the [`AppendCondition`](dcb_core::AppendCondition) that protects
//!   them. On PostgreSQL every read and the commit of one command go through one pooled
//!   connection, so many concurrent commands cannot deadlock the pool.
//! - **Atomic audit trail.** The command's type, JSON payload and JSON metadata are recorded in
//!   the same transaction as its events: a command record exists if and only if its events
//!   were written. [`CommandExecutor::commands`] lists the records by type and time.
//! - **Idempotency.** A command with an id that was recorded before is not executed again; the
//!   caller gets the original record, flagged as replayed, also when executions race.
//! - **Opt-in retries.** With a [`RetryPolicy`], a commit whose condition failed is retried on
//!   fresh state with jittered exponential backoff.
//! - **Typed errors.** The handler's business error ([`reject`]) comes back as
//!   [`CommandError::Rejected`], distinct from conflicts, invalid input and store failures,
//!   also those of the handler's own reads (`?` in a handler turns them into
//!   [`HandlerError::Store`]).
//!
//! ```
//! use dcb_command::{handler_fn, reject, Command, CommandError, CommandExecutor, Decision, HandlerError};
//! use dcb_core::{CommandFilter, EventReaderExt, EventStore, NewEvent, Query, QueryItem, StateProjector};
//! use dcb_memory::InMemoryEventStore;
//! use std::sync::Arc;
//!
//! #[derive(serde::Serialize)]
//! struct Deposit { account_id: String, amount: u64 }
//!
//! #[derive(Debug, thiserror::Error)]
//! enum DepositError {
//!     #[error("deposits must be positive")]
//!     NotPositive,
//!     #[error("account {0} does not exist")]
//!     NoAccount(String),
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(InMemoryEventStore::new());
//! store.append(vec![NewEvent::builder("AccountOpened").tag("account_id", "a1").build()?]).await?;
//! let executor = CommandExecutor::new(store);
//!
//! let deposit = handler_fn(|command: &Command<Deposit>, reader| {
//!     Box::pin(async move {
//!         let Deposit { account_id, amount } = &command.payload;
//!         if *amount == 0 {
//!             return Err(reject(DepositError::NotPositive));
//!         }
//!         let opened = Query::from(QueryItem::new().types(["AccountOpened"]).tag("account_id", account_id));
//!         let model = reader.project(StateProjector::exists(opened)).await?;
//!         if !model.states {
//!             return Err(reject(DepositError::NoAccount(account_id.clone())));
//!         }
//!         let event = NewEvent::builder("Deposited")
//!             .tag("account_id", account_id)
//!             .data(&serde_json::json!({ "amount": amount }))
//!             .build()?;
//!         Ok::<_, HandlerError<DepositError>>(Decision::append([event]).guarded_by(model.condition))
//!     })
//! });
//!
//! let command = Command::new("Deposit", Deposit { account_id: "a1".into(), amount: 5 })
//!     .with_metadata(serde_json::json!({ "user": "alice", "request_id": "r-1" }));
//! let outcome = executor.execute(command, &deposit).await?;
//! assert!(!outcome.replayed);
//! assert!(outcome.last_event().is_some());
//!
//! let to_nowhere = Command::new("Deposit", Deposit { account_id: "a2".into(), amount: 5 });
//! let err = executor.execute(to_nowhere, &deposit).await.unwrap_err();
//! assert!(matches!(err, CommandError::Rejected(DepositError::NoAccount(_))));
//!
//! let audit = executor.commands(&CommandFilter::default().command_type("Deposit")).await?;
//! assert_eq!(audit.len(), 1); // the rejected command left nothing behind
//! assert_eq!(audit[0].metadata.as_ref().unwrap()["user"], "alice");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod command;
mod decision;
mod error;
mod executor;
mod handler;
mod handler_error;
mod retry;

pub use command::Command;
pub use decision::Decision;
pub use error::CommandError;
pub use executor::{CommandExecutor, CommandOutcome};
pub use handler::{handler_fn, CommandHandler, HandlerFn};
pub use handler_error::{reject, HandlerError, HandlerResult};
pub use retry::RetryPolicy;
