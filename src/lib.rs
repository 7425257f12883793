//! # crablet
//!
//! An event store with Dynamic Consistency Boundary (DCB) concurrency control: append events
//! tagged with key/value pairs, read them back by type and tag, fold them into decision models,
//! and append new events only if nothing relevant changed since the decision was made.
//!
//! This facade re-exports the workspace crates:
//! - [`dcb_core`] types, matching, validation, the fold engine and the store traits (all at the
//!   crate root here),
//! - [`memory`]: the in-memory store,
//! - [`postgres`]: the PostgreSQL store,
//! - [`command`]: the command executor.
//!
//! ```
//! use crablet::memory::InMemoryEventStore;
//! use crablet::{EventReaderExt, EventStore, NewEvent, Query, QueryItem, StateProjector};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> crablet::Result<()> {
//! let store = InMemoryEventStore::new();
//! let course = Query::from(QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1"));
//!
//! let decision = store.project(StateProjector::exists(course.clone())).await?;
//! assert!(!decision.states);
//! let event = NewEvent::builder("CourseDefined").tag("course_id", "c1").build()?;
//! store.append_if(vec![event.clone()], decision.condition.clone()).await?;
//!
//! // The same decision, replayed, now conflicts: c1 exists.
//! let again = store.append_if(vec![event], decision.condition).await;
//! assert!(again.unwrap_err().is_conflict());
//! # Ok(()) }
//! ```
pub use dcb_core::*;
/// The derives of typed events and named decision models.
pub use dcb_derive::{DecisionModel, DomainEvent};

/// The in-memory store.
pub mod memory {
    pub use dcb_memory::*;
}

/// The PostgreSQL store.
pub mod postgres {
    pub use dcb_postgres::*;
}

/// The command executor.
pub mod command {
    pub use dcb_command::*;
}

/// The README's examples, compiled as doctests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
