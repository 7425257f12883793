//! Event handlers on the in-memory store: the same contract as the PostgreSQL runner (batches in
//! cursor order, retries with backoff, a failure policy, parked events, a status,
//! `wait_until_processed`), minus the durability a process-local store cannot offer. The
//! checkpoint lives in the runner, so a handler restarted in a new runner starts from the
//! beginning (or from `MemoryHandlerOptions::start_after`); parked events live in the store.
use crate::{select, InMemoryEventStore};
use async_trait::async_trait;
use dcb_core::runner::{
    guard_batch, validate_backoff, FailureDecision, FailurePolicy, FailureTracker, ParkedError,
    ParkedEvent, RunningTask,
};
use dcb_core::{
    validate_query, AppendCommand, Cursor, Error, Event, EventReader, EventStore, Query,
    ReadOptions,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::Instrument;

/// What a [`MemoryEventHandler`] returns when it fails.
pub type MemoryHandlerError = dcb_core::runner::HandlerError;

/// Processes the events of a query on the in-memory store, batch by batch, in cursor order.
///
/// A handler that fails (returns `Err` or panics) gets the same batch again after a backoff, so
/// its effects must tolerate a replay of a failed batch. What happens to a batch that keeps
/// failing is [`MemoryHandlerOptions::failure_policy`]: retried forever (the default), or, after
/// a number of attempts, isolated event by event and the poison event stops the runner or is
/// parked ([`InMemoryEventStore::parked_events`]).
///
/// ```
/// use dcb_core::{Event, EventStore, NewEvent, Query};
/// use dcb_memory::{InMemoryEventStore, MemoryEventHandler, MemoryHandlerError, MemoryHandlerOptions};
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// struct Count(Arc<AtomicUsize>);
///
/// #[async_trait::async_trait]
/// impl MemoryEventHandler for Count {
///     fn name(&self) -> &str { "count" }
///     fn query(&self) -> Query { Query::types(["Opened"]) }
///     async fn handle(&self, events: &[Event]) -> Result<(), MemoryHandlerError> {
///         self.0.fetch_add(events.len(), Ordering::SeqCst);
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dcb_core::Result<()> {
/// let store = InMemoryEventStore::new();
/// let count = Arc::new(AtomicUsize::new(0));
/// let running = store.run_handler(Count(count.clone()), MemoryHandlerOptions::default())?;
/// let cursor = store.append(vec![NewEvent::builder("Opened").build()?]).await?;
/// running.wait_until_processed(cursor, Duration::from_secs(5)).await?;
/// assert_eq!(count.load(Ordering::SeqCst), 1);
/// running.stop().await;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait MemoryEventHandler: Send + Sync + 'static {
    /// The handler's name (for status and tracing).
    fn name(&self) -> &str;

    /// The events the handler processes.
    fn query(&self) -> Query;

    /// Processes `events` (non-empty, in cursor order).
    async fn handle(&self, events: &[Event]) -> Result<(), MemoryHandlerError>;

    /// For automations: the commands to append for `events`, as the PostgreSQL handler's
    /// `decide`. Here they are appended with one `append_batch` (all or nothing, exact
    /// conditions) after [`handle`](Self::handle) succeeded and before the checkpoint moves,
    /// with no await in between; a conflict or an invalid command fails the batch, which is
    /// delivered again (`handle` included) and decided again. The default appends nothing.
    async fn decide(&self, events: &[Event]) -> Result<Vec<AppendCommand>, MemoryHandlerError> {
        let _ = events;
        Ok(Vec::new())
    }
}

/// Settings of an in-memory handler runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryHandlerOptions {
    /// The most events per batch. Default 100.
    pub batch_size: usize,
    /// Delay before the first retry of a failed batch; doubled per failure. Default 100 ms.
    pub retry_initial: Duration,
    /// Longest delay between retries. Default 30 s.
    pub retry_max: Duration,
    /// Start after this cursor instead of at the beginning.
    pub start_after: Option<Cursor>,
    /// Longest time the handler may take over one batch; past it the batch is abandoned (its
    /// future dropped at its current await point) and counts as a failed attempt (retried after
    /// the backoff). Nothing is rolled back here: effects the handler already made stay, so a
    /// handler with a timeout must tolerate being cut off at any await point and replayed.
    /// Default `None`: no limit.
    pub batch_timeout: Option<Duration>,
    /// What to do about a batch that keeps failing (see [`FailurePolicy`]). Default
    /// [`FailurePolicy::RetryForever`]: retry it with backoff for as long as it fails. A parked
    /// event is kept by the store, under the handler's name.
    pub failure_policy: FailurePolicy,
}

impl Default for MemoryHandlerOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            start_after: None,
            batch_timeout: None,
            failure_policy: FailurePolicy::RetryForever,
        }
    }
}

impl MemoryHandlerOptions {
    /// Sets the batch size.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets the retry backoff: first delay and cap.
    pub fn retry(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max;
        self
    }

    /// Starts after `cursor`.
    pub fn start_after(mut self, cursor: Cursor) -> Self {
        self.start_after = Some(cursor);
        self
    }

    /// Sets (or, with `None`, removes) the longest time the handler may take over one batch.
    pub fn batch_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.batch_timeout = timeout;
        self
    }

    /// Sets what to do about a batch that keeps failing.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        self.failure_policy.validate()?;
        if self.batch_size == 0 {
            return Err(Error::Config {
                field: "batch_size",
                reason: "must be at least 1".into(),
            });
        }
        if self.batch_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::Config {
                field: "batch_timeout",
                reason: "must be longer than zero (None for no limit)".into(),
            });
        }
        validate_backoff(self.retry_initial, self.retry_max)
    }

    fn tracker(&self) -> FailureTracker {
        FailureTracker::new(self.failure_policy, self.retry_initial, self.retry_max)
    }
}

/// What an in-memory runner knows about its handler.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryHandlerStatus {
    /// The handler's name.
    pub name: String,
    /// Everything up to this cursor is processed (it moves past non-matching events too).
    pub checkpoint: Option<Cursor>,
    /// Events processed.
    pub processed: u64,
    /// Events parked by this runner ([`FailurePolicy::Park`]).
    pub parked: u64,
    /// Consecutive failed attempts at the current batch, or at the current event alone while
    /// the runner isolates the events of a failed batch (0 when healthy).
    pub attempts: u32,
    /// The first event of the batch that is failing (`None` when healthy): the poison event
    /// itself once the runner tries events alone, and where a runner stopped by
    /// [`FailurePolicy::Stop`] is stuck.
    pub failing_at: Option<Cursor>,
    /// The most recent failure, if the runner has not succeeded since.
    pub last_error: Option<String>,
    /// When `last_error` happened.
    pub last_error_at: Option<SystemTime>,
    /// True once the runner has stopped (asked to, or by [`FailurePolicy::Stop`]).
    pub stopped: bool,
}

/// A handler running in the background on the in-memory store. Dropping it aborts the runner.
#[derive(Debug)]
pub struct RunningMemoryHandler {
    task: RunningTask<MemoryHandlerStatus>,
}

impl RunningMemoryHandler {
    /// A snapshot of the runner's status.
    pub fn status(&self) -> MemoryHandlerStatus {
        self.task.status()
    }

    /// A receiver of status updates.
    pub fn status_updates(&self) -> watch::Receiver<MemoryHandlerStatus> {
        self.task.status_updates()
    }

    /// Waits until everything up to and including `cursor` is processed; fails with
    /// [`Error::Timeout`] after `timeout`.
    pub async fn wait_until_processed(
        &self,
        cursor: Cursor,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut updates = self.task.status_updates();
        let reached = async {
            updates
                .wait_for(|s| s.checkpoint >= Some(cursor))
                .await
                .is_ok()
        };
        match tokio::time::timeout(timeout, reached).await {
            Ok(true) => Ok(()),
            _ => Err(Error::Timeout {
                operation: "wait_until_processed",
                timeout,
            }),
        }
    }

    /// Stops after the batch in progress.
    pub async fn stop(self) {
        self.task.stop().await;
    }
}

impl InMemoryEventStore {
    /// Starts running `handler` in the background (must be called inside a Tokio runtime).
    pub fn run_handler<H: MemoryEventHandler>(
        &self,
        handler: H,
        options: MemoryHandlerOptions,
    ) -> Result<RunningMemoryHandler, Error> {
        options.validate()?;
        let query = handler.query();
        validate_query(&query)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::Config {
            field: "runtime",
            reason: "run_handler must be called inside a Tokio runtime".into(),
        })?;
        let name = handler.name().to_string();
        let initial = MemoryHandlerStatus {
            name: name.clone(),
            checkpoint: options.start_after,
            ..MemoryHandlerStatus::default()
        };
        let span = tracing::info_span!("memory.handler", handler = %name);
        let store = self.clone();
        let task = RunningTask::spawn(&runtime, initial, move |status, stop| {
            run(store, Arc::new(handler), query, options, status, stop).instrument(span)
        });
        Ok(RunningMemoryHandler { task })
    }

    /// The events `handler` parked, in cursor order. (Infallible here; a `Result` like the
    /// PostgreSQL store's.)
    pub async fn parked_events(&self, handler: &str) -> Result<Vec<ParkedEvent>, Error> {
        Ok(self
            .handlers
            .parked()
            .range((handler.to_string(), Cursor::new(0, i64::MIN))..)
            .take_while(|((name, _), _)| name == handler)
            .map(|(_, parked)| parked.clone())
            .collect())
    }

    /// Runs `handler` on its parked event at `cursor` and, if it succeeds, removes the parked
    /// record; if it fails, the record stays with the new error and one more attempt, and the
    /// failure is returned ([`ParkedError::HandlerFailed`]). Replays and drops of a handler's
    /// parked events, and the batches of its runners on this store, run one at a time, so a
    /// parked event is replayed successfully at most once.
    pub async fn replay_parked<H: MemoryEventHandler + ?Sized>(
        &self,
        handler: &H,
        cursor: Cursor,
    ) -> Result<(), ParkedError> {
        let name = handler.name().to_string();
        let gate = self.handlers.gate(&name);
        let _turn = gate.lock().await;
        let key = (name.clone(), cursor);
        if !self.handlers.parked().contains_key(&key) {
            return Err(ParkedError::NotFound {
                handler: name,
                cursor,
            });
        }
        let event = {
            let log = self.lock();
            let found = log.events.binary_search_by(|e| e.cursor.cmp(&cursor));
            match found {
                Ok(index) => log.events[index].clone(),
                Err(_) => {
                    return Err(ParkedError::EventMissing {
                        handler: name,
                        cursor,
                    })
                }
            }
        };
        let outcome = guard_batch(handler.handle(std::slice::from_ref(&event)), None).await;
        let mut parked = self.handlers.parked();
        match outcome {
            Ok(()) => {
                parked.remove(&key);
                Ok(())
            }
            Err(message) => {
                let attempts = match parked.get_mut(&key) {
                    Some(record) => {
                        record.attempts = record.attempts.saturating_add(1);
                        record.error = message.clone();
                        record.last_attempt_at = SystemTime::now();
                        record.attempts
                    }
                    None => 0,
                };
                Err(ParkedError::HandlerFailed {
                    handler: name,
                    cursor,
                    attempts,
                    message,
                })
            }
        }
    }

    /// Removes `handler`'s parked event at `cursor` without handling it, and returns it.
    pub async fn drop_parked(
        &self,
        handler: &str,
        cursor: Cursor,
    ) -> Result<ParkedEvent, ParkedError> {
        let gate = self.handlers.gate(handler);
        let _turn = gate.lock().await;
        self.handlers
            .parked()
            .remove(&(handler.to_string(), cursor))
            .ok_or_else(|| ParkedError::NotFound {
                handler: handler.to_string(),
                cursor,
            })
    }

    /// At most `limit` events matching `query` after `after`, and the last cursor of the log at
    /// that instant (every later append lands above it).
    fn read_with_horizon(
        &self,
        query: &Query,
        after: Option<Cursor>,
        limit: usize,
    ) -> (Vec<Event>, Option<Cursor>) {
        let log = self.lock();
        let options = ReadOptions::default().after_opt(after).limit(limit);
        let events = select(&log, query, &options, limit);
        (events, log.events.last().map(|e| e.cursor))
    }
}

/// What the store keeps for its handlers: parked events, and one turn per handler name that
/// serializes a runner's batches with replays and drops of its parked events.
#[derive(Default)]
pub(crate) struct Handlers {
    parked: Mutex<BTreeMap<(String, Cursor), ParkedEvent>>,
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Handlers {
    fn parked(&self) -> MutexGuard<'_, BTreeMap<(String, Cursor), ParkedEvent>> {
        // Every change is a single insert, update or removal: a poisoned map is consistent.
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gate(&self, handler: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(gates.entry(handler.to_string()).or_default())
    }

    /// Records `event` as parked by `handler` (again, if it already was: error and attempts
    /// replaced, parked time kept).
    fn park(&self, handler: &str, event: &Event, error: String, attempts: u32) {
        let now = SystemTime::now();
        self.parked()
            .entry((handler.to_string(), event.cursor))
            .and_modify(|record| {
                record.error.clone_from(&error);
                record.attempts = attempts;
                record.last_attempt_at = now;
            })
            .or_insert_with(|| ParkedEvent {
                handler: handler.to_string(),
                cursor: event.cursor,
                event_type: event.event_type.clone(),
                error: error.clone(),
                attempts,
                parked_at: now,
                last_attempt_at: now,
                replay_requested_at: None,
            });
    }
}

async fn run(
    store: InMemoryEventStore,
    handler: Arc<dyn MemoryEventHandler>,
    query: Query,
    options: MemoryHandlerOptions,
    status: watch::Sender<MemoryHandlerStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let name = handler.name().to_string();
    let gate = store.handlers.gate(&name);
    let mut feed = store.change_feed();
    let mut checkpoint = options.start_after;
    let mut tracker = options.tracker();
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(f) = feed.as_mut() {
            f.mark_seen();
        }
        let limit = tracker.batch_limit(options.batch_size);
        let (events, horizon) = store.read_with_horizon(&query, checkpoint, limit);
        let full = events.len() >= limit;
        if events.is_empty() {
            if horizon > checkpoint {
                checkpoint = horizon;
                if let Some(c) = checkpoint {
                    tracker.committed(c);
                }
                status.send_modify(|s| s.checkpoint = checkpoint);
            }
            let woken = async {
                let open = match feed.as_mut() {
                    Some(f) => f.changed().await,
                    None => false,
                };
                if !open {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = woken => {}
            }
            continue;
        }
        let turn = gate.lock().await;
        let work = async {
            let commands = handler.decide(&events).await?;
            handler.handle(&events).await?;
            if !commands.is_empty() {
                store.append_batch(commands).await?;
            }
            Ok(())
        };
        let failure = guard_batch(work, options.batch_timeout).await.err();
        let Some(message) = failure else {
            drop(turn);
            let last = events.last().map(|e| e.cursor);
            checkpoint = if full { last } else { last.max(horizon) };
            if let Some(c) = checkpoint {
                tracker.committed(c);
            }
            let n = events.len() as u64;
            status.send_modify(|s| {
                s.checkpoint = checkpoint;
                s.processed += n;
                s.attempts = 0;
                s.failing_at = None;
                s.last_error = None;
                s.last_error_at = None;
            });
            continue;
        };
        let decision = tracker.failed(&events);
        let failing_at = events.first().map(|e| e.cursor);
        status.send_modify(|s| {
            s.attempts = decision.attempts();
            s.failing_at = failing_at;
            s.last_error = Some(message.clone());
            s.last_error_at = Some(SystemTime::now());
        });
        match decision {
            FailureDecision::Retry { attempts, delay } => {
                drop(turn);
                tracing::warn!(%message, attempts, "handler failed; the batch will be retried");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            FailureDecision::Isolate { attempts, through } => {
                tracing::warn!(%message, attempts, %through, "handler failed on a batch too often; retrying its events one by one");
            }
            FailureDecision::Stop { attempts, event } => {
                tracing::error!(%message, attempts, %event, "handler failed on an event too often; stopping (FailurePolicy::Stop)");
                break;
            }
            FailureDecision::Park { attempts, event } => {
                tracing::error!(%message, attempts, %event, "handler failed on an event too often; parking it (FailurePolicy::Park)");
                if let Some(poison) = events.iter().find(|e| e.cursor == event) {
                    store.handlers.park(&name, poison, message, attempts);
                }
                drop(turn);
                checkpoint = Some(event);
                tracker.committed(event);
                status.send_modify(|s| {
                    s.checkpoint = checkpoint;
                    s.parked += 1;
                    s.attempts = 0;
                    s.failing_at = None;
                    s.last_error = None;
                    s.last_error_at = None;
                });
            }
        }
    }
    status.send_modify(|s| s.stopped = true);
}
