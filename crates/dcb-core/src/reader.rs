//! The reading side of every store: queries, streams, and decision models folded over reads.
use crate::change_feed::ChangeFeed;
use crate::event_stream::EventStream;
use crate::permit::ProjectionPermit;
use crate::projection::{fold_stream, Projection, ProjectionStep, Projectors};
use crate::typed_event::{decode_stream, TypedEvent};
use crate::{Cursor, DomainEvent, Error, Event, Query, ValidationError, ValidationKind};
use async_trait::async_trait;
use futures_util::stream::BoxStream;

/// Reading direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Ascending cursor order (oldest first).
    #[default]
    Forwards,
    /// Descending cursor order (newest first).
    Backwards,
}

/// Options of a read: exclusive cursor bounds, a limit and the direction.
///
/// ```
/// use dcb_core::{Cursor, Direction, ReadOptions};
/// // The 10 newest events before cursor 100/5:
/// let options = ReadOptions::default().before(Cursor::new(100, 5)).limit(10).backwards();
/// assert_eq!(options.direction, Direction::Backwards);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ReadOptions {
    /// Only events strictly after this cursor.
    pub after: Option<Cursor>,
    /// Only events strictly before this cursor.
    pub before: Option<Cursor>,
    /// At most this many events.
    pub limit: Option<usize>,
    /// The order events are returned in.
    pub direction: Direction,
}

impl ReadOptions {
    /// Reads only events strictly after `cursor`.
    pub fn after(mut self, cursor: Cursor) -> Self {
        self.after = Some(cursor);
        self
    }

    /// Reads only events strictly after `cursor`, if any.
    pub fn after_opt(mut self, cursor: Option<Cursor>) -> Self {
        self.after = cursor;
        self
    }

    /// Reads only events strictly before `cursor`.
    pub fn before(mut self, cursor: Cursor) -> Self {
        self.before = Some(cursor);
        self
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Returns events newest first.
    pub fn backwards(mut self) -> Self {
        self.direction = Direction::Backwards;
        self
    }
}

/// Checks read options: a limit, when given, must be at least 1.
pub fn validate_read_options(options: &ReadOptions) -> Result<(), Error> {
    if options.limit == Some(0) {
        return Err(Error::Validation(ValidationError::new(
            "options.limit",
            ValidationKind::InvalidReadOption,
            "limit must be at least 1 (use None for no limit)",
        )));
    }
    Ok(())
}

/// Reading side of a store: queries by type and tag.
///
/// Reads return events in cursor order and are *complete*: a reader that continues after the
/// last cursor it saw never misses an event matching its query, also when transactions commit
/// out of order. Every backend and every [`CommandSession`](crate::CommandSession) implements it.
#[async_trait]
pub trait EventReader: Send + Sync {
    /// Returns the events matching `query`, bounded by `options`.
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error>;

    /// Streams the events matching `query` with bounded memory; errors arrive as items.
    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream;

    /// Takes a slot in the backend's limit on concurrent projections.
    ///
    /// The default limits nothing; backends with a `max_concurrent_projections` setting return
    /// [`Error::TooManyProjections`] when it is exhausted.
    fn projection_permit(&self) -> Result<ProjectionPermit, Error> {
        Ok(ProjectionPermit::unlimited())
    }

    /// Wake-ups for subscriptions ([`subscribe`](crate::subscribe())): a feed that is woken
    /// after appends. The default, `None`, makes subscriptions poll.
    fn change_feed(&self) -> Option<ChangeFeed> {
        None
    }
}

/// Decision models on top of any [`EventReader`]: implemented for every reader, including
/// `dyn EventStore` and command sessions.
#[async_trait]
pub trait EventReaderExt: EventReader {
    /// Folds `projectors` over ONE read of their combined query and returns their states with
    /// the [`AppendCondition`](crate::AppendCondition) that protects a decision taken on them.
    ///
    /// The condition's query is the combined query and its `after` is the cursor of the last
    /// event the read saw, so `append_if` fails exactly when an event relevant to one of the
    /// projectors was appended since.
    async fn project<P>(&self, projectors: P) -> Result<Projection<P::States>, Error>
    where
        P: Projectors + 'static,
    {
        let _permit = self.projection_permit()?;
        let query = projectors.query()?;
        let events = self.query(&query, projection_read(&projectors)).await?;
        let mut states = projectors.initial();
        for event in &events {
            projectors.apply(&mut states, event)?;
        }
        let after = events.last().map(|e| e.cursor);
        Ok(Projection::new(states, query, after, events.len() as u64))
    }

    /// Like [`project`](Self::project) but folds a [`query_stream`](EventReader::query_stream),
    /// so memory stays flat however many events match. Yields
    /// [`ProjectionStep::Progress`] every `progress_every` events, then one
    /// [`ProjectionStep::Done`].
    fn project_stream<P>(
        &self,
        projectors: P,
        progress_every: u64,
    ) -> BoxStream<'static, Result<ProjectionStep<P::States>, Error>>
    where
        P: Projectors + 'static,
    {
        let permit = match self.projection_permit() {
            Ok(permit) => permit,
            Err(err) => return Box::pin(futures_util::stream::once(async { Err(err) })),
        };
        let query = match projectors.query() {
            Ok(query) => query,
            Err(err) => return Box::pin(futures_util::stream::once(async { Err(err) })),
        };
        let events = self.query_stream(&query, projection_read(&projectors));
        fold_stream(projectors, query, events, progress_every, permit)
    }

    /// Reads the events matching `query` and decodes them into the typed event `E`
    /// ([`DomainEvent::decode`], upcasting included). An event that does not decode fails the
    /// read with [`Error::Decode`] naming it.
    async fn query_typed<E: DomainEvent>(
        &self,
        query: &Query,
        options: ReadOptions,
    ) -> Result<Vec<TypedEvent<E>>, Error> {
        self.query(query, options)
            .await?
            .into_iter()
            .map(TypedEvent::decode)
            .collect()
    }

    /// [`query_stream`](EventReader::query_stream), decoded into the typed event `E`.
    fn query_stream_typed<E: DomainEvent>(
        &self,
        query: &Query,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<TypedEvent<E>, Error>> {
        decode_stream(self.query_stream(query, options))
    }
}

/// How a projection reads: forwards through every matching event, or, for a single projector
/// that only keeps the newest one, backwards with a limit of 1. Either way the condition's
/// `after` is the newest matching event the read saw, which is what makes it exact.
fn projection_read<P: Projectors>(projectors: &P) -> ReadOptions {
    if projectors.newest_only() {
        ReadOptions::default().backwards().limit(1)
    } else {
        ReadOptions::default()
    }
}

impl<T: EventReader + ?Sized> EventReaderExt for T {}
