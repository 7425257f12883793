//! # dcb-core
//!
//! The pure heart of crablet: the types of a Dynamic Consistency Boundary (DCB) event store,
//! the one matching function every backend uses, input validation, the fold engine that turns
//! events into decision models, and the [`EventStore`] trait that backends implement.
//!
//! Nothing here talks to a database. Backends (`dcb-memory`, `dcb-postgres`) implement
//! [`EventReader`] and [`EventStore`]; everything else ([`EventReaderExt::project`], the command
//! layer) is written once on top of those traits.
//!
//! ```
//! use dcb_core::{matches, NewEvent, Query, QueryItem, Tag};
//!
//! let event = NewEvent::builder("CourseDefined")
//!     .tag("course_id", "c1")
//!     .data(&serde_json::json!({ "capacity": 30 }))
//!     .build()
//!     .unwrap();
//! let query = Query::from(QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1"));
//! assert!(matches(&query, &event.event_type, &event.tags));
//! assert!(!matches(&Query::tags([Tag::new("course_id", "c2")]), &event.event_type, &event.tags));
//! ```
#![warn(missing_docs)]

mod batch;
mod change_feed;
mod command;
mod condition;
mod cursor;
mod decode_error;
#[doc(hidden)]
pub mod derive_support;
mod domain_event;
mod error;
mod event;
mod event_stream;
mod finite;
mod matching;
mod permit;
mod projection;
mod query;
mod reader;
pub mod runner;
mod standby_error;
mod store;
pub mod store_metrics;
mod subscribe;
mod tag;
mod tag_value;
mod transaction_work;
mod typed_event;
mod upcast;
mod validate;

pub use batch::{conflict_within_batch, discard_commands, validate_batch, AppendCommand};
pub use change_feed::{ChangeFeed, ChangeNotifier};
pub use command::{CommandFilter, CommandRecord, CommitOutcome, NewCommand};
pub use condition::AppendCondition;
pub use cursor::Cursor;
pub use decode_error::{DecodeError, DecodeErrorKind};
pub use domain_event::{
    encode_all, stored_version, DomainEvent, EventKind, EventTypes, EventView, SCHEMA_VERSION_KEY,
};
pub use error::{ConflictInfo, Error, Result, ValidationError, ValidationKind};
pub use event::{Event, NewEvent, NewEventBuilder};
pub use event_stream::EventStream;
pub use finite::{to_finite_json, ToJsonError};
pub use matching::matches;
pub use permit::ProjectionPermit;
pub use projection::{fold, Projection, ProjectionStep, Projectors, StateProjector};
pub use query::{Query, QueryItem};
pub use reader::{validate_read_options, Direction, EventReader, EventReaderExt, ReadOptions};
pub use standby_error::{StandbyError, StandbyProblem};
pub use store::{CommandSession, EventStore};
pub use store_metrics::describe_metrics;
pub use subscribe::{is_fatal_for_subscription, subscribe, SubscribeExt, SubscribeOptions};
pub use tag::Tag;
pub use tag_value::TagValue;
pub use transaction_work::{TransactionWork, WorkError};
pub use typed_event::{decode_all, decode_stream, TypedEvent};
pub use upcast::Upcasters;
pub use validate::{
    discard_events, validate_command, validate_condition, validate_events, validate_query, Limits,
    MAX_EVENT_TYPE_LEN, MAX_JSON_DEPTH,
};

/// Builds a `Vec<Tag>` from `key => value` pairs.
///
/// ```
/// let tags = dcb_core::tags!["course_id" => "c1", "student_id" => 7];
/// assert_eq!(tags[1].value, "7");
/// ```
#[macro_export]
macro_rules! tags {
    ($($key:expr => $value:expr),* $(,)?) => {
        vec![$($crate::Tag::new($key, $value.to_string())),*]
    };
}
