//! Event handlers on the in-memory store: the same contract as the PostgreSQL runner (batches in
//! cursor order, retries with backoff, a status, `wait_until_processed`), minus the durability a
//! process-local store cannot offer. The checkpoint lives in the runner, so a handler restarted
//! in a new runner starts from the beginning (or from `MemoryHandlerOptions::start_after`).
use crate::{select, InMemoryEventStore};
use async_trait::async_trait;
use dcb_core::runner::{backoff_delay, guard_batch, validate_backoff, RunningTask};
use dcb_core::{validate_query, Cursor, Error, Event, EventReader, Query, ReadOptions};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::Instrument;

/// What a [`MemoryEventHandler`] returns when it fails.
pub type MemoryHandlerError = dcb_core::runner::HandlerError;

/// Processes the events of a query on the in-memory store, batch by batch, in cursor order.
///
/// A handler that fails (returns `Err` or panics) gets the same batch again after a backoff, so
/// its effects must tolerate a replay of a failed batch.
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
}

impl Default for MemoryHandlerOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            start_after: None,
            batch_timeout: None,
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

    fn validate(&self) -> Result<(), Error> {
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

    fn retry_delay(&self, failures: u32) -> Duration {
        backoff_delay(self.retry_initial, self.retry_max, failures)
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
    /// Consecutive failed attempts at the current batch (0 when healthy).
    pub attempts: u32,
    /// The most recent failure, if the runner has not succeeded since.
    pub last_error: Option<String>,
    /// When `last_error` happened.
    pub last_error_at: Option<SystemTime>,
    /// True once the runner has stopped.
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

async fn run(
    store: InMemoryEventStore,
    handler: Arc<dyn MemoryEventHandler>,
    query: Query,
    options: MemoryHandlerOptions,
    status: watch::Sender<MemoryHandlerStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut feed = store.change_feed();
    let mut checkpoint = options.start_after;
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(f) = feed.as_mut() {
            f.mark_seen();
        }
        let (events, horizon) = store.read_with_horizon(&query, checkpoint, options.batch_size);
        let full = events.len() >= options.batch_size;
        if events.is_empty() {
            if horizon > checkpoint {
                checkpoint = horizon;
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
        let failure = guard_batch(handler.handle(&events), options.batch_timeout)
            .await
            .err();
        match failure {
            None => {
                failures = 0;
                let last = events.last().map(|e| e.cursor);
                checkpoint = if full { last } else { last.max(horizon) };
                let n = events.len() as u64;
                status.send_modify(|s| {
                    s.checkpoint = checkpoint;
                    s.processed += n;
                    s.attempts = 0;
                    s.last_error = None;
                    s.last_error_at = None;
                });
            }
            Some(message) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%message, attempts = failures, "handler failed; the batch will be retried");
                status.send_modify(|s| {
                    s.attempts = failures;
                    s.last_error = Some(message);
                    s.last_error_at = Some(SystemTime::now());
                });
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(options.retry_delay(failures)) => {}
                }
            }
        }
    }
    status.send_modify(|s| s.stopped = true);
}
