use crate::projection::{fold_stream, Projection, ProjectionStep, Projectors};
use crate::{
    AppendCommand, AppendCondition, CommandFilter, CommandRecord, CommandSession, Cursor, Error,
    Event, NewEvent, Query,
};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use std::any::Any;

/// A stream of events in cursor order that reports failures as `Err` items instead of ending
/// silently. It owns what it needs (`'static`), so it can outlive the borrow of the store.
pub type EventStream = BoxStream<'static, Result<Event, Error>>;

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

/// A slot in a backend's limit on concurrent projections, released when dropped.
#[derive(Default)]
pub struct ProjectionPermit(#[allow(dead_code)] Option<Box<dyn Any + Send + Sync>>);

impl ProjectionPermit {
    /// A permit that limits nothing.
    pub fn unlimited() -> Self {
        Self(None)
    }

    /// Wraps a backend's guard (a semaphore permit, say).
    pub fn new(guard: impl Any + Send + Sync) -> Self {
        Self(Some(Box::new(guard)))
    }
}

impl std::fmt::Debug for ProjectionPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProjectionPermit")
    }
}

/// Reading side of a store: queries by type and tag.
///
/// Reads return events in cursor order and are *complete*: a reader that continues after the
/// last cursor it saw never misses an event matching its query, also when transactions commit
/// out of order. Every backend and every [`CommandSession`] implements it.
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
    fn change_feed(&self) -> Option<crate::ChangeFeed> {
        None
    }
}

/// Writing side of a store: unconditional and conditional appends, plus what the command layer
/// needs.
///
/// ```
/// # async fn demo(store: &dyn dcb_core::EventStore) -> dcb_core::Result<()> {
/// use dcb_core::{AppendCondition, EventReaderExt, NewEvent, Query, QueryItem, StateProjector};
///
/// let course = Query::from(QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1"));
/// let decision = store.project(StateProjector::exists(course)).await?;
/// if !decision.states {
///     let event = NewEvent::builder("CourseDefined").tag("course_id", "c1").build()?;
///     store.append_if(vec![event], decision.condition).await?; // fails if c1 appeared meanwhile
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait EventStore: EventReader {
    /// Appends `events` atomically and returns the cursor of the last one.
    async fn append(&self, events: Vec<NewEvent>) -> Result<Cursor, Error>;

    /// Appends `events` atomically unless an event matching `condition` exists after its
    /// cursor, in which case nothing is written and [`Error::Conflict`] is returned.
    async fn append_if(
        &self,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<Cursor, Error>;

    /// Appends several commands, each with its own events and condition, in one transaction:
    /// all or nothing. Returns the cursor of each command's last event, in order.
    ///
    /// The commands take effect in order: a command's condition fails when an event matching
    /// it exists after its cursor, or when an earlier command of the batch appends one. Then
    /// nothing is written and [`Error::Conflict`] names the first failing command
    /// ([`ConflictInfo::command`](crate::ConflictInfo::command)). Invalid input is named by
    /// its command too (`commands[3].events[0]…`). All events of the batch count against
    /// `max_batch_size`.
    ///
    /// ```
    /// # async fn demo(store: &dyn dcb_core::EventStore) -> dcb_core::Result<()> {
    /// use dcb_core::{AppendCommand, AppendCondition, NewEvent, Query, QueryItem};
    ///
    /// let mut commands = Vec::new();
    /// for user in ["u1", "u2"] {
    ///     let exists = Query::from(QueryItem::new().types(["UserCreated"]).tag("user_id", user));
    ///     let event = NewEvent::builder("UserCreated").tag("user_id", user).build()?;
    ///     commands.push(AppendCommand::new(vec![event]).only_if(AppendCondition::new(exists)));
    /// }
    /// match store.append_batch(commands).await {
    ///     Ok(cursors) => assert_eq!(cursors.len(), 2),
    ///     Err(dcb_core::Error::Conflict(info)) => println!("command {:?} exists", info.command),
    ///     Err(other) => return Err(other),
    /// }
    /// # Ok(()) }
    /// ```
    async fn append_batch(&self, commands: Vec<AppendCommand>) -> Result<Vec<Cursor>, Error>;

    /// Opens a session for one command: reads through it and commit its events together with
    /// the command's audit record, atomically.
    async fn command_session(&self) -> Result<Box<dyn CommandSession>, Error>;

    /// Lists recorded commands, oldest first.
    async fn commands(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, Error>;
}

/// Decision models on top of any [`EventReader`]: implemented for every reader, including
/// `dyn EventStore` and command sessions.
#[async_trait]
pub trait EventReaderExt: EventReader {
    /// Folds `projectors` over ONE read of their combined query and returns their states with
    /// the [`AppendCondition`] that protects a decision taken on them.
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
        let events = self.query(&query, ReadOptions::default()).await?;
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
        let events = self.query_stream(&query, ReadOptions::default());
        fold_stream(projectors, query, events, progress_every, permit)
    }
}

impl<T: EventReader + ?Sized> EventReaderExt for T {}
