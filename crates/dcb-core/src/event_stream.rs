//! The stream type every streaming read returns.
use crate::{Error, Event};
use futures_util::stream::BoxStream;

/// A stream of events in cursor order that reports failures as `Err` items instead of ending
/// silently. It owns what it needs (`'static`), so it can outlive the borrow of the store.
pub type EventStream = BoxStream<'static, Result<Event, Error>>;
