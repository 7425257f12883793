//! # dcb-memory
//!
//! [`InMemoryEventStore`]: an [`EventStore`] that keeps everything in process memory, with the
//! same semantics as the PostgreSQL store: the same matching, validation, cursor order and
//! atomic conditional appends under concurrency. It is the embedded default for examples and
//! for fast unit tests of application code.
//!
//! ```
//! use dcb_memory::InMemoryEventStore;
//! use dcb_core::{EventReader, EventStore, NewEvent, Query, ReadOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dcb_core::Result<()> {
//! let store = InMemoryEventStore::new();
//! store.append(vec![NewEvent::builder("Opened").tag("account_id", "a1").build()?]).await?;
//! let events = store.query(&Query::types(["Opened"]), ReadOptions::default()).await?;
//! assert_eq!(events.len(), 1);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod handlers;

pub use dcb_core::runner::{FailurePolicy, ParkedError, ParkedEvent};
pub use handlers::{
    MemoryEventHandler, MemoryHandlerError, MemoryHandlerOptions, MemoryHandlerStatus,
    RunningMemoryHandler,
};

use async_trait::async_trait;
use dcb_core::store_metrics::{counted_stream, record_append, record_query};
use dcb_core::{
    conflict_within_batch, matches, validate_batch, validate_condition, validate_events,
    validate_query, AppendCommand, AppendCondition, CommandFilter, CommandRecord, CommandSession,
    CommitOutcome, ConflictInfo, Cursor, Direction, Error, Event, EventReader, EventStore,
    EventStream, Limits, NewCommand, NewEvent, Query, ReadOptions,
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

/// How many events a stream copies out per lock acquisition.
const STREAM_CHUNK: usize = 256;

/// The `backend` label of this store's metrics.
const BACKEND: &str = "memory";

#[derive(Default)]
struct Log {
    events: Vec<Event>,
    commands: Vec<CommandRecord>,
    last_transaction: u64,
}

impl Log {
    /// The first matching event after `after` (exclusive), if any.
    fn first_match_after(&self, query: &Query, after: Option<Cursor>) -> Option<Cursor> {
        let start = after.map_or(0, |c| self.events.partition_point(|e| e.cursor <= c));
        self.events[start..]
            .iter()
            .find(|e| matches(query, &e.event_type, &e.tags))
            .map(|e| e.cursor)
    }

    fn check(&self, condition: Option<&AppendCondition>) -> Result<(), Error> {
        match condition {
            Some(cond) => match self.first_match_after(&cond.fail_if_events_match, cond.after) {
                Some(conflicting) => Err(Error::Conflict(ConflictInfo::new(
                    Some(conflicting),
                    cond.after,
                ))),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Writes `events` as one transaction; returns the transaction id and last cursor.
    fn write(&mut self, events: Vec<dcb_core::NewEvent>) -> (u64, Option<Cursor>) {
        self.last_transaction += 1;
        let transaction_id = self.last_transaction;
        let now = SystemTime::now();
        for event in events {
            let cursor = Cursor::new(transaction_id, self.events.len() as i64 + 1);
            self.events.push(Event {
                cursor,
                event_type: event.event_type,
                tags: event.tags,
                data: event.data,
                metadata: event.metadata,
                occurred_at: event.occurred_at.unwrap_or(now),
            });
        }
        (transaction_id, self.events.last().map(|e| e.cursor))
    }

    /// Index range of events within the exclusive cursor bounds.
    fn bounds(&self, options: &ReadOptions) -> (usize, usize) {
        let start = options
            .after
            .map_or(0, |c| self.events.partition_point(|e| e.cursor <= c));
        let end = options.before.map_or(self.events.len(), |c| {
            self.events.partition_point(|e| e.cursor < c)
        });
        (start, end.max(start))
    }
}

/// An in-memory [`EventStore`]. Cloning is cheap and shares the same log.
#[derive(Clone, Default)]
pub struct InMemoryEventStore {
    log: Arc<Mutex<Log>>,
    limits: Limits,
    /// Wakes subscriptions after every commit (in-process, so they never need to poll).
    changes: dcb_core::ChangeNotifier,
    /// Parked events and per-handler turns of the event handlers run on this store.
    handlers: Arc<handlers::Handlers>,
}

impl std::fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryEventStore")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl InMemoryEventStore {
    /// An empty store with default [`Limits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with the given limits; a zero batch size is rejected.
    pub fn with_limits(limits: Limits) -> Result<Self, Error> {
        if limits.max_batch_size == 0 {
            return Err(Error::Config {
                field: "max_batch_size",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            log: Arc::default(),
            limits,
            changes: dcb_core::ChangeNotifier::new(),
            handlers: Arc::default(),
        })
    }

    /// The number of stored events.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// True when no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock cannot leave the log half-written (every write is a
        // sequence of pushes after all checks), so a poisoned lock is still consistent.
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn append_checked(
        &self,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Cursor, Error> {
        if let Err(err) = validate_events(&events, &self.limits) {
            // Rejected payloads may nest too deep to drop the ordinary way.
            dcb_core::discard_events(events);
            return Err(err);
        }
        if let Some(cond) = condition {
            validate_condition(cond)?;
        }
        let mut log = self.lock();
        log.check(condition)?;
        let (_, last) = log.write(events);
        self.changes.notify();
        last.ok_or_else(|| unreachable_empty("append"))
    }
}

fn unreachable_empty(operation: &'static str) -> Error {
    Error::Storage {
        operation,
        message: "an append wrote no event".into(),
        outcome_unknown: false,
        source: None,
    }
}

fn select(log: &Log, query: &Query, options: &ReadOptions, max: usize) -> Vec<Event> {
    let (start, end) = log.bounds(options);
    let slice = &log.events[start..end];
    let wanted = |e: &&Event| matches(query, &e.event_type, &e.tags);
    let limit = options.limit.unwrap_or(usize::MAX).min(max);
    match options.direction {
        Direction::Forwards => slice.iter().filter(wanted).take(limit).cloned().collect(),
        Direction::Backwards => slice
            .iter()
            .rev()
            .filter(wanted)
            .take(limit)
            .cloned()
            .collect(),
    }
}

#[async_trait]
impl EventReader for InMemoryEventStore {
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        let started = Instant::now();
        let result = validate_query(query)
            .and_then(|()| dcb_core::validate_read_options(&options))
            .map(|()| select(&self.lock(), query, &options, usize::MAX));
        record_query(BACKEND, started, &result);
        result
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        counted_stream(BACKEND, self.walk(query, options))
    }

    fn change_feed(&self) -> Option<dcb_core::ChangeFeed> {
        Some(self.changes.feed())
    }
}

impl InMemoryEventStore {
    /// The events matching `query`, read in chunks so other tasks run between them.
    fn walk(&self, query: &Query, options: ReadOptions) -> EventStream {
        if let Err(err) =
            validate_query(query).and_then(|()| dcb_core::validate_read_options(&options))
        {
            return Box::pin(futures_util::stream::once(async { Err(err) }));
        }
        struct Walk {
            store: InMemoryEventStore,
            query: Query,
            options: ReadOptions,
            remaining: usize,
            buffer: std::vec::IntoIter<Event>,
            done: bool,
        }
        let walk = Walk {
            store: self.clone(),
            query: query.clone(),
            options,
            remaining: options.limit.unwrap_or(usize::MAX),
            buffer: Vec::new().into_iter(),
            done: false,
        };
        Box::pin(futures_util::stream::unfold(walk, |mut w| async move {
            loop {
                if let Some(event) = w.buffer.next() {
                    // Continue after (or before) the last event handed out.
                    match w.options.direction {
                        Direction::Forwards => w.options.after = Some(event.cursor),
                        Direction::Backwards => w.options.before = Some(event.cursor),
                    }
                    w.remaining -= 1;
                    return Some((Ok(event), w));
                }
                if w.done || w.remaining == 0 {
                    return None;
                }
                let chunk = {
                    let log = w.store.lock();
                    let mut chunk_options = w.options;
                    chunk_options.limit = None;
                    select(
                        &log,
                        &w.query,
                        &chunk_options,
                        STREAM_CHUNK.min(w.remaining),
                    )
                };
                w.done = chunk.len() < STREAM_CHUNK.min(w.remaining);
                w.buffer = chunk.into_iter();
                tokio_yield().await;
            }
        }))
    }
}

/// Lets other tasks run between chunks of a long stream.
async fn tokio_yield() {
    let mut yielded = false;
    futures_util::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

impl InMemoryEventStore {
    /// A multi-command append: every command's condition, then all events, under one lock.
    fn append_commands(&self, commands: Vec<AppendCommand>) -> Result<Vec<Cursor>, Error> {
        if let Err(err) = validate_batch(&commands, &self.limits) {
            dcb_core::discard_commands(commands);
            return Err(err);
        }
        if let Some(info) = conflict_within_batch(&commands) {
            return Err(Error::Conflict(info));
        }
        let mut log = self.lock();
        for (index, command) in commands.iter().enumerate() {
            log.check(command.condition.as_ref())
                .map_err(|err| match err {
                    Error::Conflict(info) => Error::Conflict(info.in_command(index)),
                    other => other,
                })?;
        }
        // One transaction: the commands' events in order, each command's last cursor returned.
        let ends: Vec<usize> = commands
            .iter()
            .scan(0, |n, c| {
                *n += c.events.len();
                Some(*n)
            })
            .collect();
        let first = log.events.len();
        log.write(commands.into_iter().flat_map(|c| c.events).collect());
        let cursors = ends
            .iter()
            .map(|end| log.events[first + end - 1].cursor)
            .collect();
        drop(log);
        self.changes.notify();
        Ok(cursors)
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    #[tracing::instrument(name = "memory.append", skip_all, fields(events = events.len()))]
    async fn append(&self, events: Vec<NewEvent>) -> Result<Cursor, Error> {
        let (started, count) = (Instant::now(), events.len());
        let result = self.append_checked(events, None);
        record_append(BACKEND, "append", count, started, &result);
        result
    }

    #[tracing::instrument(name = "memory.append_if", skip_all, fields(events = events.len()))]
    async fn append_if(
        &self,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<Cursor, Error> {
        let (started, count) = (Instant::now(), events.len());
        let result = self.append_checked(events, Some(&condition));
        record_append(BACKEND, "append_if", count, started, &result);
        result
    }

    #[tracing::instrument(name = "memory.append_batch", skip_all, fields(commands = commands.len()))]
    async fn append_batch(&self, commands: Vec<AppendCommand>) -> Result<Vec<Cursor>, Error> {
        let started = Instant::now();
        let count = commands.iter().map(|c| c.events.len()).sum();
        let result = self.append_commands(commands);
        record_append(BACKEND, "append_batch", count, started, &result);
        result
    }

    async fn command_session(&self) -> Result<Box<dyn CommandSession>, Error> {
        Ok(Box::new(MemoryCommandSession {
            store: self.clone(),
        }))
    }

    async fn commands(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, Error> {
        let log = self.lock();
        Ok(log
            .commands
            .iter()
            .filter(|c| {
                filter
                    .command_type
                    .as_ref()
                    .is_none_or(|t| &c.command_type == t)
                    && filter.from.is_none_or(|from| c.occurred_at >= from)
                    && filter.to.is_none_or(|to| c.occurred_at < to)
            })
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect())
    }
}

/// The in-memory [`CommandSession`]: reads go to the shared log, the commit is one critical
/// section.
struct MemoryCommandSession {
    store: InMemoryEventStore,
}

#[async_trait]
impl EventReader for MemoryCommandSession {
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        self.store.query(query, options).await
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        self.store.query_stream(query, options)
    }
}

#[async_trait]
impl CommandSession for MemoryCommandSession {
    async fn find_command(&self, id: &str) -> Result<Option<CommandRecord>, Error> {
        let log = self.store.lock();
        Ok(log
            .commands
            .iter()
            .find(|c| c.id.as_deref() == Some(id))
            .cloned())
    }

    async fn commit(
        &mut self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<CommitOutcome, Error> {
        let checked = dcb_core::validate_command(command).and_then(|()| {
            if events.is_empty() {
                Ok(())
            } else {
                validate_events(&events, &self.store.limits)
            }
        });
        if let Err(err) = checked {
            // Rejected payloads may nest too deep to drop the ordinary way.
            dcb_core::discard_events(events);
            return Err(err);
        }
        if let Some(cond) = &condition {
            validate_condition(cond)?;
        }
        let mut log = self.store.lock();
        if let Some(id) = &command.id {
            if let Some(original) = log.commands.iter().find(|c| c.id.as_ref() == Some(id)) {
                return Ok(CommitOutcome::Duplicate(original.clone()));
            }
        }
        log.check(condition.as_ref())?;
        let (transaction_id, last_event) = if events.is_empty() {
            log.last_transaction += 1;
            (log.last_transaction, None)
        } else {
            log.write(events)
        };
        let record = CommandRecord {
            id: command.id.clone(),
            command_type: command.command_type.clone(),
            data: command.data.clone(),
            metadata: command.metadata.clone(),
            transaction_id,
            last_event,
            occurred_at: SystemTime::now(),
        };
        log.commands.push(record.clone());
        self.store.changes.notify();
        Ok(CommitOutcome::Committed(record))
    }
}
