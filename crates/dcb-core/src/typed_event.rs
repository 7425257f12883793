use crate::event_stream::EventStream;
use crate::{Cursor, DomainEvent, Error, Event};
use futures_util::stream::{BoxStream, StreamExt};
use serde_json::Value;
use std::time::SystemTime;

/// A stored event decoded into its Rust type `E`, with where and when it was stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedEvent<E> {
    /// Where the event stands in the log.
    pub cursor: Cursor,
    /// The decoded (and upcast) event.
    pub event: E,
    /// The JSON metadata, as appended (including the `schema_version` of typed events above
    /// version 1).
    pub metadata: Option<Value>,
    /// When the event was appended.
    pub occurred_at: SystemTime,
}

impl<E: DomainEvent> TypedEvent<E> {
    /// Decodes `event` ([`DomainEvent::decode`]).
    pub fn decode(event: Event) -> Result<Self, Error> {
        let decoded = E::decode(&event)?;
        Ok(Self {
            cursor: event.cursor,
            event: decoded,
            metadata: event.metadata,
            occurred_at: event.occurred_at,
        })
    }
}

/// Decodes every item of an event stream (a [`query_stream`](crate::EventReader::query_stream)
/// or a [`subscribe`](crate::subscribe()) stream) into `E`. A decoding failure is an error item;
/// the stream goes on after it, as after any error item.
pub fn decode_stream<E: DomainEvent>(
    events: EventStream,
) -> BoxStream<'static, Result<TypedEvent<E>, Error>> {
    events.map(|item| item.and_then(TypedEvent::decode)).boxed()
}

/// Decodes a batch of events (for instance what an event handler receives) into `E`.
pub fn decode_all<E: DomainEvent>(events: &[Event]) -> Result<Vec<E>, Error> {
    events.iter().map(E::decode).collect()
}
