//! Durable event handlers (see [`EventHandler`]): read models and reactions that process every
//! event of a query exactly once, across crashes and across application instances.
use crate::conn::{db_error, Conn};
use crate::group_queue::Call;
use crate::store::{event_from_row, prepare, PostgresEventStore};
use crate::xid8::Xid8;
use async_trait::async_trait;
use dcb_core::runner::{
    error_chain, guard_batch, FailureDecision, FailurePolicy, FailureTracker, ParkedError,
    ParkedEvent, RunningTask,
};
use dcb_core::{
    conflict_within_batch, validate_batch, validate_query, AppendCommand, ChangeFeed, Cursor,
    Error, Event, Query, ReadOptions,
};
use deadpool_postgres::{ClientWrapper, Object};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::Instrument;

use crate::lag::{lag_from, lag_params, HandlerLag};
use dcb_core::store_metrics;

/// How often a handler that is behind measures its lag for the metrics.
const LAG_MEASURE_INTERVAL: Duration = Duration::from_secs(5);

/// Requested replays a runner performs in one turn between batches (the rest wait a turn).
const REPLAYS_PER_TURN: usize = 16;

/// What an [`EventHandler`] returns when it fails: any error, for instance a
/// `tokio_postgres::Error` from its own statements (`?` converts it).
pub type HandlerError = dcb_core::runner::HandlerError;

/// Processes the events of a query, batch by batch, inside the runner's transaction.
///
/// Everything the handler writes through `tx` commits together with the handler's checkpoint, so
/// it takes effect exactly once per event. A handler that fails (returns `Err` or panics) has
/// its transaction rolled back, and the same batch is delivered again after a backoff. Effects
/// outside `tx` (e-mails, HTTP calls) are at-least-once: make them idempotent.
///
/// **Poison events.** What happens to a batch that keeps failing is
/// [`HandlerOptions::failure_policy`]: by default it is retried forever (the read model stalls
/// until the handler or the data is fixed); [`FailurePolicy::Stop`] and [`FailurePolicy::Park`]
/// give up after a number of attempts, then retry the batch's events one by one, and stop at the
/// first event that still fails alone, or park it (`parked_events`, checkpointed past in the
/// same transaction) and carry on. Parked events are listed, replayed and dropped with
/// [`PostgresEventStore::parked_events`], [`replay_parked`](PostgresEventStore::replay_parked)
/// and [`drop_parked`](PostgresEventStore::drop_parked).
///
/// A runner ([`PostgresEventStore::run_handler`]) feeds the handler batches of
/// events inside a PostgreSQL transaction in which the handler writes its own tables; the runner
/// advances the handler's checkpoint (`handler_checkpoints`) in the **same** transaction. Either
/// both commit or neither does: after a crash, the batch is delivered again, and never skipped.
///
/// **One instance at a time.** Every instance running a handler competes for a *lease*: a
/// session-level advisory lock (`pg_try_advisory_lock`) on a key derived from the schema and the
/// handler name, held on the runner's dedicated connection, which also runs the handler's
/// transactions. The holder processes; the others retry every `lease_retry_interval`. When the
/// holder dies its connection closes, PostgreSQL releases the lock, and another instance takes
/// over from the committed checkpoint. As a second line of defence each batch locks the
/// checkpoint row and checks it is still the one the batch was read after, so two processors
/// can never both commit the same batch. The lease needs a real session: run handlers against
/// PostgreSQL directly or through a pooler in *session* mode.
///
/// **Checkpoints past the last event.** Reads are fenced (see `docs/design.md`): a read that
/// returned fewer events than asked for is complete up to the transaction id horizon of its
/// snapshot, so the runner also advances the checkpoint over non-matching events (at most every
/// `idle_checkpoint_interval`). That is what lets
/// [`wait_until_processed`](PostgresEventStore::wait_until_processed) wait for *any* cursor,
/// including that of an event the handler does not care about.
///
/// ```no_run
/// use dcb_core::{Event, Query};
/// use dcb_postgres::{tokio_postgres, EventHandler, HandlerError, HandlerOptions, PostgresEventStore};
///
/// struct Balances;
///
/// #[async_trait::async_trait]
/// impl EventHandler for Balances {
///     fn name(&self) -> &str {
///         "balances"
///     }
///     fn query(&self) -> Query {
///         Query::types(["Deposited"])
///     }
///     async fn handle(
///         &self,
///         tx: &tokio_postgres::Transaction<'_>,
///         events: &[Event],
///     ) -> Result<(), HandlerError> {
///         for event in events {
///             let account = event.tags[0].value.as_str();
///             let amount = event.data["amount"].as_i64().unwrap_or(0);
///             tx.execute(
///                 "INSERT INTO balances (account, balance) VALUES ($1, $2) \
///                  ON CONFLICT (account) DO UPDATE SET balance = balances.balance + $2",
///                 &[&account, &amount],
///             )
///             .await?;
///         }
///         Ok(())
///     }
/// }
///
/// # async fn demo(store: PostgresEventStore, cursor: dcb_core::Cursor) -> dcb_core::Result<()> {
/// let running = store.run_handler(Balances, HandlerOptions::default())?;
/// // ... after appending an event at `cursor`, read your own write from the read model:
/// store.wait_until_processed("balances", cursor, std::time::Duration::from_secs(5)).await?;
/// println!("{:?}", running.status());
/// running.stop().await;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// The handler's stable name: the key of its checkpoint and of its lease. Renaming a
    /// handler starts it from the beginning.
    fn name(&self) -> &str;

    /// The events the handler processes.
    fn query(&self) -> Query;

    /// Processes `events` (non-empty, in cursor order) inside `tx`. Do not commit or roll back
    /// `tx` yourself.
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), HandlerError>;

    /// For automations ("when X happened, do Y"): the commands to append for `events`, each
    /// with its own events and optional condition, appended in the **same** transaction as the
    /// batch's checkpoint (and before [`handle`](Self::handle) runs in it). So Y's events exist
    /// if and only if the checkpoint moved past X: a crash or a failure anywhere replays the
    /// batch without duplicates. The default appends nothing.
    ///
    /// The commands are appended as one [`append_batch`](dcb_core::EventStore::append_batch),
    /// all or nothing, with the store's exact conditions; their keys are taken first in the
    /// transaction, before anything is written (docs/design.md). A conflict (the decision was
    /// stale) or an invalid command fails the batch, which is retried under the handler's
    /// failure policy and decided again. Read what a decision needs through the store (a
    /// `PostgresEventStore` the handler keeps), not through `tx`, which does not exist yet.
    async fn decide(&self, events: &[Event]) -> Result<Vec<AppendCommand>, HandlerError> {
        let _ = events;
        Ok(Vec::new())
    }
}

/// Settings of a handler runner.
///
/// ```
/// use dcb_postgres::HandlerOptions;
/// use std::time::Duration;
/// let options = HandlerOptions::default().batch_size(50).lease_retry_interval(Duration::from_millis(500));
/// assert!(options.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerOptions {
    /// The most events per batch (per transaction). Default 100.
    pub batch_size: usize,
    /// How long a caught-up runner waits for a wake-up before it reads again anyway. Default 1 s.
    pub poll_interval: Duration,
    /// How often an instance without the lease tries to take it. Default 1 s.
    pub lease_retry_interval: Duration,
    /// Delay before the first retry of a failed batch; doubled per consecutive failure.
    /// Default 100 ms.
    pub retry_initial: Duration,
    /// Longest delay between retries of a failed batch. Default 30 s.
    pub retry_max: Duration,
    /// Least time between checkpoint writes that only skip non-matching events. Default 100 ms.
    pub idle_checkpoint_interval: Duration,
    /// Longest time the handler may take over one batch. A batch that takes longer is
    /// abandoned (its future dropped), its transaction rolled back, and it counts as a failed
    /// attempt (retried after the backoff, visible in the status). The handler's statements
    /// run with `statement_timeout` set to this limit, so none can outlive it on the server
    /// (its timer can fire late and be reported as another statement's error: every error on
    /// the runner's connection closes it and reloads the checkpoint, so that costs a retry at
    /// most). Code that blocks its thread without yielding is not interrupted. Default `None`: no limit; a handler that never returns stalls its read
    /// model (and keeps the lease).
    pub batch_timeout: Option<Duration>,
    /// What to do about a batch that keeps failing (see [`FailurePolicy`]). Default
    /// [`FailurePolicy::RetryForever`]: retry it with backoff for as long as it fails, as
    /// earlier releases did. With `Stop` or `Park`, attempts are counted by the instance
    /// holding the lease; one that takes the lease over counts afresh.
    pub failure_policy: FailurePolicy,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            lease_retry_interval: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            idle_checkpoint_interval: Duration::from_millis(100),
            batch_timeout: None,
            failure_policy: FailurePolicy::RetryForever,
        }
    }
}

macro_rules! option_setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl HandlerOptions {
    option_setter!(/// Sets the batch size.
        batch_size: usize);
    option_setter!(/// Sets the polling fallback interval.
        poll_interval: Duration);
    option_setter!(/// Sets how often a standby instance tries to take the lease.
        lease_retry_interval: Duration);
    option_setter!(/// Sets the delay before the first retry of a failed batch.
        retry_initial: Duration);
    option_setter!(/// Sets the longest delay between retries of a failed batch.
        retry_max: Duration);
    option_setter!(/// Sets the least time between checkpoint writes over non-matching events.
        idle_checkpoint_interval: Duration);
    option_setter!(/// Sets (or, with `None`, removes) the longest time the handler may take over
        /// one batch.
        batch_timeout: Option<Duration>);
    option_setter!(/// Sets what to do about a batch that keeps failing.
        failure_policy: FailurePolicy);

    /// Checks every field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.to_string(),
            })
        };
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return bad("batch_size", "must be between 1 and 100000");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval", "must be longer than zero");
        }
        if self.lease_retry_interval.is_zero() {
            return bad("lease_retry_interval", "must be longer than zero");
        }
        dcb_core::runner::validate_backoff(self.retry_initial, self.retry_max)?;
        self.failure_policy.validate()?;
        if self
            .batch_timeout
            .is_some_and(|t| t.as_millis() == 0 || t > Duration::from_secs(24 * 3600))
        {
            return bad(
                "batch_timeout",
                "must be between 1 ms and 24 h (None for no limit)",
            );
        }
        Ok(())
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        dcb_core::runner::backoff_delay(self.retry_initial, self.retry_max, failures)
    }

    fn tracker(&self) -> FailureTracker {
        FailureTracker::new(self.failure_policy, self.retry_initial, self.retry_max)
    }
}

/// What one runner knows about its handler, from [`RunningHandler::status`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandlerStatus {
    /// The handler's name.
    pub name: String,
    /// Whether this instance holds the lease (is the one processing).
    pub holds_lease: bool,
    /// The last committed checkpoint this instance saw (`None`: nothing processed yet, or not
    /// known because this instance never held the lease).
    pub checkpoint: Option<Cursor>,
    /// Events this instance processed (committed).
    pub processed: u64,
    /// Events this instance parked ([`FailurePolicy::Park`]).
    pub parked: u64,
    /// Consecutive failed attempts at the current batch, or at the current event alone while
    /// the runner isolates the events of a failed batch (0 when healthy). A growing number
    /// means the handler is stuck on the batch after `checkpoint`.
    pub attempts: u32,
    /// The first event of the batch the handler is failing on (`None` when healthy): the
    /// poison event itself once the runner tries events alone, and where a runner stopped by
    /// [`FailurePolicy::Stop`] is stuck.
    pub failing_at: Option<Cursor>,
    /// The most recent failure (handler error or panic, lost connection, failed read), if the
    /// runner has not succeeded since.
    pub last_error: Option<String>,
    /// When `last_error` happened.
    pub last_error_at: Option<SystemTime>,
    /// True once the runner has stopped (asked to, or by [`FailurePolicy::Stop`]).
    pub stopped: bool,
}

/// A handler's stored state, visible from any instance: [`PostgresEventStore::handler_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerRecord {
    /// The handler's name.
    pub name: String,
    /// The committed checkpoint (`None`: nothing processed yet).
    pub checkpoint: Option<Cursor>,
    /// When the checkpoint (or error) was last written.
    pub updated_at: SystemTime,
    /// Consecutive failed attempts at the batch after the checkpoint (or at its event alone),
    /// as counted by the instance that failed.
    pub attempts: u32,
    /// The first event of that batch (the poison event itself once the runner tries events
    /// alone, and where a runner stopped by [`FailurePolicy::Stop`] is stuck).
    pub failing_at: Option<Cursor>,
    /// The most recent failure of that batch.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<SystemTime>,
    /// Whether some instance currently holds the handler's lease.
    pub lease_held: bool,
}

/// A handler running in the background, returned by [`PostgresEventStore::run_handler`].
///
/// Dropping it aborts the runner at once (like a crash: an open batch rolls back and is
/// processed again by whoever takes over); [`stop`](Self::stop) stops it gracefully.
pub struct RunningHandler {
    name: String,
    task: RunningTask<HandlerStatus>,
}

impl std::fmt::Debug for RunningHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningHandler")
            .field("name", &self.name)
            .field("status", &self.task.status())
            .finish_non_exhaustive()
    }
}

impl RunningHandler {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A snapshot of the runner's status.
    pub fn status(&self) -> HandlerStatus {
        self.task.status()
    }

    /// A receiver of status updates (for dashboards, health checks and tests).
    pub fn status_updates(&self) -> watch::Receiver<HandlerStatus> {
        self.task.status_updates()
    }

    /// Stops gracefully: a batch in progress is finished (committed or rolled back), then the
    /// lease is released.
    pub async fn stop(self) {
        self.task.stop().await;
    }

    /// Aborts at once, as if the process died: an open transaction is rolled back by the
    /// server when the connection closes, and the lease is released. (Dropping the handle does
    /// the same.)
    pub fn abort(self) {
        self.task.abort();
    }
}

impl PostgresEventStore {
    /// Starts running `handler` in the background on this store (must be called inside a Tokio
    /// runtime). Several instances may run the same handler; one processes at a time.
    pub fn run_handler<H: EventHandler>(
        &self,
        handler: H,
        options: HandlerOptions,
    ) -> Result<RunningHandler, Error> {
        options.validate()?;
        let name = handler.name().to_string();
        check_name(&name)?;
        let query = handler.query();
        validate_query(&query)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::Config {
            field: "runtime",
            reason: "run_handler must be called inside a Tokio runtime".into(),
        })?;
        let initial = HandlerStatus {
            name: name.clone(),
            ..HandlerStatus::default()
        };
        let span = tracing::info_span!("pg.handler", handler = %name);
        let (store, runner_name) = (self.clone(), name.clone());
        let task = RunningTask::spawn(&runtime, initial, move |status, stop| {
            Runner {
                lease_key: format!(
                    "crablet/handler/{}/{}",
                    store.inner.config.schema, runner_name
                ),
                sql: Statements::new(&store.inner.schema),
                store,
                handler: Arc::new(handler),
                name: runner_name,
                query,
                options,
                status,
                stop,
            }
            .run()
            .instrument(span)
        });
        Ok(RunningHandler { name, task })
    }

    /// Waits until `handler` has processed everything up to and including `cursor` (its
    /// committed checkpoint is at or past it), so a caller can read its own write from the
    /// handler's read model. `cursor` does not have to match the handler's query. Fails with
    /// [`Error::Timeout`] after `timeout`.
    #[tracing::instrument(name = "pg.wait_until_processed", skip(self), fields(%cursor))]
    pub async fn wait_until_processed(
        &self,
        handler: &str,
        cursor: Cursor,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        // Runners of this store wake us at once; others are polled.
        let mut feed = self.inner.changes.checkpoints.feed();
        let mut delay = Duration::from_millis(5);
        loop {
            feed.mark_seen();
            if self.handler_checkpoint(handler).await? >= Some(cursor) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    operation: "wait_until_processed",
                    timeout,
                });
            }
            let _ = tokio::time::timeout(delay.min(deadline - now), feed.changed()).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// The committed checkpoint of `handler` (`None` if it processed nothing yet or is unknown).
    pub async fn handler_checkpoint(&self, handler: &str) -> Result<Option<Cursor>, Error> {
        let conn = Conn::get(&self.inner.pool, "handler_checkpoint").await?;
        // Closed, not pooled, unless the statement's reply came back.
        conn.begin_exchange("handler_checkpoint")?;
        let client = conn.object();
        let stmt = prepare(
            client,
            &Statements::new(&self.inner.schema).select_checkpoint,
            "handler_checkpoint",
        )
        .await?;
        let row = client
            .query_opt(&stmt, &[&handler])
            .await
            .map_err(|e| db_error("handler_checkpoint", e, false))?;
        conn.end_exchange();
        match row {
            Some(row) => {
                checkpoint_from(&row).map_err(|e| db_error("handler_checkpoint", e, false))
            }
            None => Ok(None),
        }
    }

    /// Moves `handler`'s checkpoint to `to` (`None`: before the first event): the handler then
    /// processes every matching event after `to` again, or skips ahead to it. A handler that
    /// never ran starts after `to`. A batch in progress finishes first (the reset waits for the
    /// checkpoint row, at most the session's lock timeout: `append_timeout` on a store
    /// built by `connect`; a reset that times out changes nothing). Running instances carry on
    /// from the new checkpoint: this process's at once, others when woken by the next append
    /// or within their `poll_interval`.
    ///
    /// The handler's read model is the application's: to rebuild it, reset the checkpoint and
    /// clear the read model in one transaction with [`reset_handler_in`](Self::reset_handler_in).
    ///
    /// Parked events after `to` ([`FailurePolicy::Park`]) are dropped in the same statement:
    /// the handler meets them again, and parks them again if they still fail. Skipping ahead
    /// past the event a [`FailurePolicy::Stop`] runner stopped at (`reset_handler(name,
    /// Some(failing_at))`) skips that event for good.
    #[tracing::instrument(name = "pg.reset_handler", skip(self))]
    pub async fn reset_handler(&self, handler: &str, to: Option<Cursor>) -> Result<(), Error> {
        check_name(handler)?;
        let conn = Conn::get(&self.inner.pool, "reset_handler").await?;
        conn.begin_exchange("reset_handler")?;
        let client: &tokio_postgres::Client = conn.object();
        self.reset_on(client, handler, to).await?;
        conn.end_exchange();
        // Wake runners (here, and through NOTIFY elsewhere) so they look at the checkpoint.
        self.inner.changes.committed();
        Ok(())
    }

    /// [`reset_handler`](Self::reset_handler) inside the caller's transaction, so that resetting
    /// the checkpoint and clearing the read model commit together. Reset **first**: a batch in
    /// progress holds the checkpoint row and then writes the read model, so a transaction that
    /// locked the read model first and then waited for the row would deadlock with it.
    ///
    /// ```no_run
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut client = store.pool().get().await?;
    /// let tx = client.transaction().await?;
    /// store.reset_handler_in(&tx, "balances", None).await?;
    /// tx.batch_execute("TRUNCATE balances").await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Running instances pick the new checkpoint up at the next append or within their
    /// `poll_interval` (nothing wakes them when the caller commits).
    pub async fn reset_handler_in(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        handler: &str,
        to: Option<Cursor>,
    ) -> Result<(), Error> {
        check_name(handler)?;
        self.reset_on(tx, handler, to).await
    }

    /// The upsert of `reset_handler` and `reset_handler_in`, on a connection or a transaction.
    async fn reset_on(
        &self,
        client: &impl tokio_postgres::GenericClient,
        handler: &str,
        to: Option<Cursor>,
    ) -> Result<(), Error> {
        let xid = to.map(|c| Xid8(c.transaction_id));
        let position = to.map(|c| c.position);
        client
            .execute(
                &Statements::new(&self.inner.schema).reset,
                &[&handler, &xid, &position],
            )
            .await
            .map_err(|e| db_error("reset_handler", e, false))?;
        Ok(())
    }

    /// The stored state of `handler`, as any instance sees it: checkpoint, current failure
    /// streak, and whether some instance holds the lease. `None` if it never ran.
    pub async fn handler_status(&self, handler: &str) -> Result<Option<HandlerRecord>, Error> {
        let conn = Conn::get(&self.inner.pool, "handler_status").await?;
        conn.begin_exchange("handler_status")?;
        let client = conn.object();
        let sql = format!(
            "SELECT c.transaction_id, c.position, c.updated_at, c.attempts, c.last_error, \
                    c.last_error_at, c.failing_transaction_id, c.failing_position, \
                    {} \
             FROM {}.handler_checkpoints c WHERE c.handler_name = $1",
            lease_held_sql("$2"),
            self.inner.schema
        );
        let stmt = prepare(client, &sql, "handler_status").await?;
        let key = format!("crablet/handler/{}/{}", self.inner.config.schema, handler);
        let row = client
            .query_opt(&stmt, &[&handler, &key])
            .await
            .map_err(|e| db_error("handler_status", e, false))?;
        conn.end_exchange();
        let Some(row) = row else { return Ok(None) };
        let get = |e| db_error("handler_status", e, false);
        let attempts: i32 = row.try_get(3).map_err(get)?;
        Ok(Some(HandlerRecord {
            name: handler.to_string(),
            checkpoint: checkpoint_from(&row).map_err(get)?,
            updated_at: row.try_get(2).map_err(get)?,
            attempts: u32::try_from(attempts).unwrap_or(0),
            last_error: row.try_get(4).map_err(get)?,
            last_error_at: row.try_get(5).map_err(get)?,
            failing_at: cursor_from(&row, 6, 7).map_err(get)?,
            lease_held: row.try_get(8).map_err(get)?,
        }))
    }
}

impl PostgresEventStore {
    /// The events `handler` parked under [`FailurePolicy::Park`], in cursor order.
    pub async fn parked_events(&self, handler: &str) -> Result<Vec<ParkedEvent>, Error> {
        let operation = "parked_events";
        let conn = Conn::get(&self.inner.pool, operation).await?;
        conn.begin_exchange(operation)?;
        let rows = conn
            .object()
            .query(
                &Statements::new(&self.inner.schema).list_parked,
                &[&handler],
            )
            .await
            .map_err(|e| db_error(operation, e, false))?;
        conn.end_exchange();
        rows.iter()
            .map(|row| parked_from(row).map_err(|e| db_error(operation, e, false)))
            .collect()
    }

    /// Runs `handler` on its parked event at `cursor`, in a transaction that also deletes the
    /// parked row: the handler's writes and the removal commit together, or neither does, so a
    /// parked event is replayed successfully at most once. If the handler fails (or panics),
    /// the transaction rolls back, the row stays with the new error and one more attempt, and
    /// the failure is returned as [`ParkedError::HandlerFailed`].
    ///
    /// The transaction first locks the handler's checkpoint row, so a replay never runs beside
    /// one of the handler's batches (it waits for a batch in progress, at most the session's
    /// lock timeout: `append_timeout` on a store built by `connect`), nor beside another
    /// replay of the same handler; the handler's own statements then run without a timeout. The
    /// handler is given the event alone, out of cursor order: its checkpoint is already past
    /// it.
    #[tracing::instrument(name = "pg.replay_parked", skip(self, handler), fields(handler = handler.name(), %cursor))]
    pub async fn replay_parked<H: EventHandler + ?Sized>(
        &self,
        handler: &H,
        cursor: Cursor,
    ) -> Result<(), ParkedError> {
        let operation = "replay_parked";
        let name = handler.name().to_string();
        check_name(&name)?;
        let sql = Statements::new(&self.inner.schema);
        let err = |e| ParkedError::Store(db_error(operation, e, false));
        let xid = Xid8(cursor.transaction_id);
        let mut conn = Conn::get(&self.inner.pool, operation).await?;
        // Until the transaction has ended cleanly, a dropped connection is discarded.
        conn.begin_exchange(operation)?;
        let client: &mut tokio_postgres::Client = conn.object_mut();
        let tx = client.transaction().await.map_err(err)?;
        tx.query_opt(&sql.lock_checkpoint, &[&name])
            .await
            .map_err(err)?;
        let taken = tx
            .query_opt(&sql.take_parked, &[&name, &xid, &cursor.position])
            .await
            .map_err(err)?;
        let row = match taken {
            Some(_) => tx
                .query_opt(&sql.select_event, &[&xid, &cursor.position])
                .await
                .map_err(err)?,
            None => {
                tx.rollback().await.map_err(err)?;
                conn.end_exchange();
                return Err(ParkedError::NotFound {
                    handler: name,
                    cursor,
                });
            }
        };
        let Some(row) = row else {
            tx.rollback().await.map_err(err)?;
            conn.end_exchange();
            return Err(ParkedError::EventMissing {
                handler: name,
                cursor,
            });
        };
        let event = event_from_row(&row)?;
        tx.batch_execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
            .await
            .map_err(err)?;
        match guard_batch(handler.handle(&tx, std::slice::from_ref(&event)), None).await {
            Ok(()) => {
                tx.commit()
                    .await
                    .map_err(|e| ParkedError::Store(db_error(operation, e, true)))?;
                conn.end_exchange();
                Ok(())
            }
            Err(message) => {
                tx.rollback().await.map_err(err)?;
                let row = conn
                    .object()
                    .query_opt(
                        &sql.parked_failed,
                        &[&name, &xid, &cursor.position, &message],
                    )
                    .await
                    .map_err(err)?;
                conn.end_exchange();
                let attempts = match row {
                    Some(row) => row.try_get::<_, i32>(0).map_err(err)?,
                    None => 0,
                };
                Err(ParkedError::HandlerFailed {
                    handler: name,
                    cursor,
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    message,
                })
            }
        }
    }

    /// Deletes `handler`'s parked event at `cursor` without handling it, and returns it. Waits
    /// for a replay of it in progress (and then finds nothing if the replay succeeded).
    #[tracing::instrument(name = "pg.drop_parked", skip(self))]
    pub async fn drop_parked(
        &self,
        handler: &str,
        cursor: Cursor,
    ) -> Result<ParkedEvent, ParkedError> {
        let sql = Statements::new(&self.inner.schema).drop_parked;
        self.on_parked_row("drop_parked", &sql, handler, cursor)
            .await
    }

    /// Runs `sql` (an autocommit statement on one parked row: `$1` handler, `$2`/`$3` cursor,
    /// returning [`Statements::PARKED_COLUMNS`]) and returns the row, or `NotFound`.
    async fn on_parked_row(
        &self,
        operation: &'static str,
        sql: &str,
        handler: &str,
        cursor: Cursor,
    ) -> Result<ParkedEvent, ParkedError> {
        let conn = Conn::get(&self.inner.pool, operation).await?;
        conn.begin_exchange(operation)?;
        let row = conn
            .object()
            .query_opt(
                sql,
                &[&handler, &Xid8(cursor.transaction_id), &cursor.position],
            )
            .await
            // An autocommit statement: a cancel or a lost session may come after its commit.
            .map_err(|e| db_error(operation, e, true))?;
        conn.end_exchange();
        match row {
            Some(row) => Ok(parked_from(&row).map_err(|e| db_error(operation, e, false))?),
            None => Err(ParkedError::NotFound {
                handler: handler.to_string(),
                cursor,
            }),
        }
    }
}

impl PostgresEventStore {
    /// Asks the running instance of `handler` to replay its parked event at `cursor`, for
    /// operators, whose tools do not have the handler's code (`crablet handlers replay`).
    ///
    /// Marks the parked row and returns it. The instance holding the handler's lease looks for
    /// marked rows between batches, once per `poll_interval`, and replays each with
    /// [`replay_parked`](Self::replay_parked): a success deletes the row, a failure records the
    /// error and one more attempt and clears the mark. Poll
    /// [`parked_events`](Self::parked_events) for the outcome. If no instance runs, the mark
    /// waits for the next one; asking again before the attempt changes nothing.
    #[tracing::instrument(name = "pg.request_replay", skip(self))]
    pub async fn request_replay(
        &self,
        handler: &str,
        cursor: Cursor,
    ) -> Result<ParkedEvent, ParkedError> {
        let sql = Statements::new(&self.inner.schema).request_replay;
        self.on_parked_row("request_replay", &sql, handler, cursor)
            .await
    }
}

/// Whether some session holds the lease whose key (text) is `key`: the advisory lock the
/// runner takes with `pg_try_advisory_lock(hashtextextended(key, 0))`, as `pg_locks` shows it
/// (the 64-bit key split into classid and objid). Read by `handler_status` and the operator
/// overview.
pub(crate) fn lease_held_sql(key: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks l, (SELECT hashtextextended({key}, 0) AS k) hk \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                   AND l.database = (SELECT oid FROM pg_database \
                                     WHERE datname = current_database()) \
                   AND l.classid::int8 = ((hk.k >> 32) & 4294967295) \
                   AND l.objid::int8 = (hk.k & 4294967295))"
    )
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::Config {
            field: "handler.name",
            reason: "must be non-empty and contain no NUL".into(),
        });
    }
    Ok(())
}

/// Reads the (nullable) checkpoint from columns 0 and 1.
fn checkpoint_from(row: &tokio_postgres::Row) -> Result<Option<Cursor>, tokio_postgres::Error> {
    cursor_from(row, 0, 1)
}

/// Reads a nullable cursor from columns `tx` and `position`.
fn cursor_from(
    row: &tokio_postgres::Row,
    tx: usize,
    position: usize,
) -> Result<Option<Cursor>, tokio_postgres::Error> {
    let tx: Option<Xid8> = row.try_get(tx)?;
    let position: Option<i64> = row.try_get(position)?;
    Ok(match (tx, position) {
        (Some(tx), Some(position)) => Some(Cursor::new(tx.0, position)),
        _ => None,
    })
}

/// Reads a `parked_events` row selected with [`Statements::PARKED_COLUMNS`].
fn parked_from(row: &tokio_postgres::Row) -> Result<ParkedEvent, tokio_postgres::Error> {
    let tx: Xid8 = row.try_get(1)?;
    let attempts: i32 = row.try_get(5)?;
    Ok(ParkedEvent {
        handler: row.try_get(0)?,
        cursor: Cursor::new(tx.0, row.try_get(2)?),
        event_type: row.try_get(3)?,
        error: row.try_get(4)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        parked_at: row.try_get(6)?,
        last_attempt_at: row.try_get(7)?,
        replay_requested_at: row.try_get(8)?,
    })
}

/// How long an abandoned batch's rollback may take (beyond `batch_timeout`, during which a
/// statement of the handler may still run) before the runner gives up its connection instead.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

/// The SQL of the runner and of the operator API, for one schema.
struct Statements {
    ensure_row: String,
    select_checkpoint: String,
    lock_checkpoint: String,
    advance: String,
    record_failure: String,
    reset: String,
    park: String,
    list_parked: String,
    take_parked: String,
    parked_failed: String,
    drop_parked: String,
    request_replay: String,
    requested_replays: String,
    select_event: String,
    lag: String,
}

impl Statements {
    /// The columns [`parked_from`] reads.
    const PARKED_COLUMNS: &'static str = "handler_name, transaction_id, position, event_type, \
         error, attempts, parked_at, last_attempt_at, replay_requested_at";

    fn new(schema: &str) -> Self {
        let table = format!("{schema}.handler_checkpoints");
        let parked = format!("{schema}.parked_events");
        let columns = Self::PARKED_COLUMNS;
        let this_parked = "handler_name = $1 AND transaction_id = $2 AND position = $3";
        Self {
            lag: crate::lag::lag_sql(schema),
            ensure_row: format!(
                "INSERT INTO {table} (handler_name) VALUES ($1) ON CONFLICT (handler_name) DO NOTHING"
            ),
            select_checkpoint: format!(
                "SELECT transaction_id, position FROM {table} WHERE handler_name = $1"
            ),
            lock_checkpoint: format!(
                "SELECT transaction_id, position FROM {table} WHERE handler_name = $1 FOR UPDATE"
            ),
            advance: format!(
                "UPDATE {table} SET transaction_id = $2, position = $3, updated_at = now(), \
                 attempts = 0, last_error = NULL, last_error_at = NULL, \
                 failing_transaction_id = NULL, failing_position = NULL WHERE handler_name = $1"
            ),
            record_failure: format!(
                "UPDATE {table} SET attempts = $5, last_error = $2, last_error_at = now(), \
                 updated_at = now(), failing_transaction_id = $3, failing_position = $4 \
                 WHERE handler_name = $1"
            ),
            // Parked events after the new checkpoint are dropped with the reset: the handler
            // meets them again (and parks them again if they still fail). The checkpoint row is
            // written first (the DELETE needs the upsert's output for its key), the order in
            // which batches, parking and replays lock the two tables.
            reset: format!(
                "WITH reset AS (\
                     INSERT INTO {table} (handler_name, transaction_id, position) \
                     VALUES ($1, $2, $3) \
                     ON CONFLICT (handler_name) DO UPDATE SET \
                     transaction_id = EXCLUDED.transaction_id, position = EXCLUDED.position, \
                     updated_at = now(), attempts = 0, last_error = NULL, last_error_at = NULL, \
                     failing_transaction_id = NULL, failing_position = NULL \
                     RETURNING handler_name) \
                 DELETE FROM {parked} WHERE handler_name = (SELECT handler_name FROM reset) \
                 AND ($2::xid8 IS NULL OR (transaction_id, position) > ($2::xid8, $3::bigint))"
            ),
            park: format!(
                "INSERT INTO {parked} (handler_name, transaction_id, position, event_type, error, \
                 attempts) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (handler_name, transaction_id, position) DO UPDATE SET \
                 error = EXCLUDED.error, attempts = EXCLUDED.attempts, last_attempt_at = now()"
            ),
            list_parked: format!(
                "SELECT {columns} FROM {parked} WHERE handler_name = $1 \
                 ORDER BY transaction_id, position"
            ),
            take_parked: format!("DELETE FROM {parked} WHERE {this_parked} RETURNING attempts"),
            parked_failed: format!(
                "UPDATE {parked} SET attempts = attempts + 1, error = $4, last_attempt_at = now(), \
                 replay_requested_at = NULL WHERE {this_parked} RETURNING attempts"
            ),
            drop_parked: format!("DELETE FROM {parked} WHERE {this_parked} RETURNING {columns}"),
            request_replay: format!(
                "UPDATE {parked} SET replay_requested_at = now() WHERE {this_parked} \
                 RETURNING {columns}"
            ),
            requested_replays: format!(
                "SELECT transaction_id, position FROM {parked} \
                 WHERE handler_name = $1 AND replay_requested_at IS NOT NULL \
                 ORDER BY transaction_id, position LIMIT {REPLAYS_PER_TURN}"
            ),
            select_event: format!(
                "SELECT transaction_id, position, type, tags, data, metadata, occurred_at \
                 FROM {schema}.events WHERE transaction_id = $1 AND position = $2"
            ),
        }
    }
}

/// Why a batch did not commit.
enum Failure {
    /// The handler failed, panicked or timed out; the batch is retried on the same lease.
    Handler(String),
    /// The stored checkpoint is not the one the batch was read after (it was reset, or another
    /// instance processed): carry on from the stored one.
    Moved(Option<Cursor>),
    /// The lease connection failed: give up the lease.
    Lost(String),
}

/// Why leading ended.
enum LeadEnd {
    /// A stop was requested.
    Stopped,
    /// The failure policy stopped the runner at a poison event.
    Halted,
    /// The lease connection failed.
    Lost(String),
}

/// What the leading loop does before its next read.
enum Next {
    Read,
    Wait(Duration),
    Backoff(Duration),
}

struct Runner {
    store: PostgresEventStore,
    handler: Arc<dyn EventHandler>,
    name: String,
    query: Query,
    options: HandlerOptions,
    lease_key: String,
    sql: Statements,
    status: watch::Sender<HandlerStatus>,
    stop: watch::Receiver<bool>,
}

impl Runner {
    async fn run(mut self) {
        let mut failures = 0u32;
        let mut client: Option<ClientWrapper> = None;
        loop {
            if self.stop_requested() {
                break;
            }
            // A dedicated connection, detached from the pool: dropping it closes the session and
            // releases the lease, whatever state it is in.
            let mut conn = match client.take() {
                Some(c) if !c.is_closed() => c,
                _ => match self.store.inner.pool.get().await {
                    Ok(object) => Object::take(object),
                    Err(err) => {
                        failures = failures.saturating_add(1);
                        self.note_error(format!("could not connect: {err}"));
                        if self.pause(self.options.retry_delay(failures)).await {
                            break;
                        }
                        continue;
                    }
                },
            };
            // The store's sessions default to the append timeout; a handler's batch is the
            // application's own work and is not bounded by it.
            match conn
                .query_one(
                    "SELECT set_config('statement_timeout', '0', false), \
                     set_config('lock_timeout', '0', false), \
                     pg_try_advisory_lock(hashtextextended($1, 0))",
                    &[&self.lease_key],
                )
                .await
                .and_then(|row| row.try_get::<_, bool>(2))
            {
                Ok(true) => {
                    tracing::info!("lease acquired");
                    failures = 0;
                    self.status.send_modify(|s| s.holds_lease = true);
                    let end = self.lead(&mut conn).await;
                    if matches!(end, LeadEnd::Stopped | LeadEnd::Halted) {
                        // Release explicitly, so the lease is free when `stop` returns (the
                        // server may notice the closed socket only a moment later).
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] =
                            [&self.lease_key];
                        let unlock = conn.execute(
                            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                            &params,
                        );
                        if let Err(err) = tokio::time::timeout(Duration::from_secs(2), unlock)
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string()))
                        {
                            tracing::debug!(%err, "could not release the lease explicitly");
                        }
                    }
                    self.status.send_modify(|s| s.holds_lease = false);
                    // Closing the session releases the lease (and rolls back anything open).
                    drop(conn);
                    match end {
                        LeadEnd::Stopped | LeadEnd::Halted => break,
                        LeadEnd::Lost(reason) => {
                            tracing::warn!(%reason, "lease lost");
                            failures = failures.saturating_add(1);
                            self.note_error(reason);
                            if self.pause(self.options.retry_delay(failures)).await {
                                break;
                            }
                        }
                    }
                }
                Ok(false) => {
                    client = Some(conn);
                    if self.pause(self.options.lease_retry_interval).await {
                        break;
                    }
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    self.note_error(format!("lease attempt failed: {err}"));
                    if self.pause(self.options.retry_delay(failures)).await {
                        break;
                    }
                }
            }
        }
        self.status.send_modify(|s| {
            s.holds_lease = false;
            s.stopped = true;
        });
    }

    /// Processes batches while holding the lease on `conn`.
    async fn lead(&mut self, conn: &mut ClientWrapper) -> LeadEnd {
        let mut checkpoint = match self.load_checkpoint(conn).await {
            Ok(c) => c,
            Err(err) => return LeadEnd::Lost(format!("could not load the checkpoint: {err}")),
        };
        self.status.send_modify(|s| s.checkpoint = checkpoint);
        let mut feed: Option<ChangeFeed> = dcb_core::EventReader::change_feed(&self.store);
        let mut next = Next::Read;
        let mut tracker = self.options.tracker();
        let mut read_failures = 0u32;
        let mut lag_measured: Option<Instant> = None;
        let mut last_idle_advance: Option<Instant> = None;
        let mut replays_checked: Option<Instant> = None;
        loop {
            if self.stop_requested() {
                return LeadEnd::Stopped;
            }
            if replays_checked.is_none_or(|at| at.elapsed() >= self.options.poll_interval) {
                replays_checked = Some(Instant::now());
                if let Err(reason) = self.replay_requested(conn).await {
                    return LeadEnd::Lost(reason);
                }
            }
            match next {
                Next::Read => {}
                Next::Wait(limit) => {
                    let stop = self.stop.wait_for(|s| *s);
                    let woken = async {
                        match feed.as_mut() {
                            Some(f) => {
                                if !f.changed().await {
                                    std::future::pending::<()>().await;
                                }
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = stop => return LeadEnd::Stopped,
                        _ = tokio::time::timeout(limit, woken) => {}
                    }
                }
                Next::Backoff(delay) => {
                    if self.pause(delay).await {
                        return LeadEnd::Stopped;
                    }
                }
            }
            if let Some(f) = feed.as_mut() {
                f.mark_seen();
            }
            let limit = tracker.batch_limit(self.options.batch_size);
            let (events, horizon) =
                match read_with_horizon(&self.store, &self.query, checkpoint, limit).await {
                    Ok(read) => {
                        read_failures = 0;
                        read
                    }
                    Err(err) => {
                        read_failures = read_failures.saturating_add(1);
                        self.note_error(format!("read failed: {err}"));
                        next = Next::Backoff(self.options.retry_delay(read_failures));
                        continue;
                    }
                };
            if conn.is_closed() {
                return LeadEnd::Lost("the lease connection closed".into());
            }
            let full = events.len() >= limit;
            let last = events.last().map(|e| e.cursor);
            let target = if full { last } else { last.max(Some(horizon)) };
            let Some(target) = target else {
                next = Next::Wait(self.options.poll_interval);
                continue;
            };
            if events.is_empty() {
                if Some(target) <= checkpoint {
                    // (A reset of the stored checkpoint wrote in a transaction of its own, so
                    // the next horizon is past `checkpoint` and the batch below finds it moved.)
                    next = Next::Wait(self.options.poll_interval);
                    continue;
                }
                // Only skipping non-matching events: throttle these writes.
                if let Some(at) = last_idle_advance {
                    let due = at + self.options.idle_checkpoint_interval;
                    let now = Instant::now();
                    if now < due {
                        next = Next::Wait(due - now);
                        continue;
                    }
                }
                last_idle_advance = Some(Instant::now());
            }
            let span = tracing::debug_span!("pg.handler.batch", events = events.len(), after = ?checkpoint);
            match self
                .process(conn, &events, checkpoint, target)
                .instrument(span)
                .await
            {
                Ok(()) => {
                    tracker.committed(target);
                    checkpoint = Some(target);
                    let n = events.len() as u64;
                    self.record_progress(conn, n, full, target, &mut lag_measured)
                        .await;
                    self.status.send_modify(|s| {
                        s.checkpoint = checkpoint;
                        s.processed += n;
                        s.attempts = 0;
                        s.failing_at = None;
                        s.last_error = None;
                        s.last_error_at = None;
                    });
                    self.store.inner.changes.checkpoints.notify();
                    next = if full {
                        Next::Read
                    } else {
                        Next::Wait(self.options.poll_interval)
                    };
                }
                Err(Failure::Handler(message)) => {
                    metrics::counter!(store_metrics::HANDLER_ERRORS, "handler" => self.name.clone())
                        .increment(1);
                    let decision = tracker.failed(&events);
                    let attempts = decision.attempts();
                    let failing_at = events.first().map(|e| e.cursor);
                    self.record_failure(conn, &message, failing_at, attempts)
                        .await;
                    self.status.send_modify(|s| {
                        s.attempts = attempts;
                        s.failing_at = failing_at;
                        s.last_error = Some(message.clone());
                        s.last_error_at = Some(SystemTime::now());
                    });
                    if conn.is_closed() {
                        return LeadEnd::Lost(format!("the lease connection closed: {message}"));
                    }
                    next = match decision {
                        FailureDecision::Retry { delay, .. } => {
                            tracing::warn!(%message, attempts, "handler failed; the batch will be retried");
                            Next::Backoff(delay)
                        }
                        FailureDecision::Isolate { through, .. } => {
                            tracing::warn!(%message, attempts, %through, "handler failed on a batch too often; retrying its events one by one");
                            Next::Read
                        }
                        FailureDecision::Stop { event, .. } => {
                            tracing::error!(%message, attempts, %event, "handler failed on an event too often; stopping (FailurePolicy::Stop)");
                            return LeadEnd::Halted;
                        }
                        FailureDecision::Park { event, .. } => {
                            tracing::error!(%message, attempts, %event, "handler failed on an event too often; parking it (FailurePolicy::Park)");
                            let Some(poison) = events.iter().find(|e| e.cursor == event) else {
                                return LeadEnd::Lost(format!("event {event} left its batch"));
                            };
                            match self
                                .park(conn, poison, checkpoint, &message, attempts)
                                .await
                            {
                                Ok(()) => {
                                    tracker.committed(event);
                                    checkpoint = Some(event);
                                    self.status.send_modify(|s| {
                                        s.checkpoint = checkpoint;
                                        s.parked += 1;
                                        s.attempts = 0;
                                        s.failing_at = None;
                                        s.last_error = None;
                                        s.last_error_at = None;
                                    });
                                    self.store.inner.changes.checkpoints.notify();
                                }
                                Err(Failure::Moved(stored)) => {
                                    tracker.forget();
                                    checkpoint = self.moved(checkpoint, stored);
                                }
                                Err(Failure::Lost(reason) | Failure::Handler(reason)) => {
                                    return LeadEnd::Lost(format!(
                                        "could not park event {event}: {reason}"
                                    ))
                                }
                            }
                            Next::Read
                        }
                    };
                }
                Err(Failure::Moved(stored)) => {
                    tracker.forget();
                    checkpoint = self.moved(checkpoint, stored);
                    next = Next::Read;
                }
                Err(Failure::Lost(reason)) => return LeadEnd::Lost(reason),
            }
        }
    }

    /// Replays the parked events an operator asked for ([`PostgresEventStore::request_replay`]),
    /// between two batches. A failed replay is the handler's failure, not the lease's: it is
    /// recorded on the parked row and logged, and the runner carries on.
    async fn replay_requested(&self, conn: &mut ClientWrapper) -> Result<(), String> {
        let rows = conn
            .query(&self.sql.requested_replays, &[&self.name])
            .await
            .map_err(|e| format!("could not look for requested replays: {e}"))?;
        for row in rows {
            let tx: Xid8 = row.try_get(0).map_err(|e| e.to_string())?;
            let position: i64 = row.try_get(1).map_err(|e| e.to_string())?;
            let cursor = Cursor::new(tx.0, position);
            match self.store.replay_parked(&*self.handler, cursor).await {
                Ok(()) => tracing::info!(%cursor, "replayed a parked event on request"),
                Err(ParkedError::HandlerFailed {
                    message, attempts, ..
                }) => {
                    metrics::counter!(store_metrics::HANDLER_ERRORS, "handler" => self.name.clone())
                        .increment(1);
                    tracing::warn!(%cursor, attempts, %message, "a requested replay of a parked event failed; it stays parked");
                }
                // Dropped or replayed meanwhile.
                Err(ParkedError::NotFound { .. }) => {}
                Err(err) => {
                    tracing::warn!(%cursor, %err, "a requested replay of a parked event could not run")
                }
            }
        }
        Ok(())
    }

    /// Records a committed batch of `processed` events in the metrics. A batch that was not
    /// full leaves the handler caught up (lag 0); after a full one the lag is measured, at most
    /// every [`LAG_MEASURE_INTERVAL`], since counting costs as much as the lag is long.
    async fn record_progress(
        &self,
        conn: &mut ClientWrapper,
        processed: u64,
        full: bool,
        checkpoint: Cursor,
        measured: &mut Option<Instant>,
    ) {
        let handler = self.name.clone();
        metrics::counter!(store_metrics::HANDLER_EVENTS, "handler" => handler.clone())
            .increment(processed);
        metrics::gauge!(store_metrics::HANDLER_POSITION, "handler" => handler.clone())
            .set(checkpoint.transaction_id as f64);
        let lag = if !full {
            HandlerLag::default()
        } else {
            if measured.is_some_and(|at| at.elapsed() < LAG_MEASURE_INTERVAL) {
                return;
            }
            *measured = Some(Instant::now());
            let (xid, position) = lag_params(Some(checkpoint));
            let row = match conn.prepare_cached(&self.sql.lag).await {
                Ok(stmt) => conn.query_one(&stmt, &[&xid, &position]).await,
                Err(err) => Err(err),
            };
            match row.and_then(|row| lag_from(&row)) {
                Ok(lag) => lag,
                Err(err) => {
                    tracing::debug!(error = %err, "measuring the handler's lag failed");
                    return;
                }
            }
        };
        metrics::gauge!(store_metrics::HANDLER_LAG_EVENTS, "handler" => handler.clone())
            .set(lag.events as f64);
        metrics::gauge!(store_metrics::HANDLER_LAG_SECONDS, "handler" => handler).set(lag.seconds);
    }

    /// One batch: lock and verify the checkpoint row, run the handler, advance the checkpoint,
    /// commit, all in one transaction on the lease connection.
    async fn process(
        &self,
        conn: &mut ClientWrapper,
        events: &[Event],
        from: Option<Cursor>,
        to: Cursor,
    ) -> Result<(), Failure> {
        let lost = |e: tokio_postgres::Error| Failure::Lost(error_chain(&e));
        let commands = if events.is_empty() {
            Vec::new()
        } else {
            self.decided(events).await?
        };
        // Prepared once per connection, so a batch costs no extra parse round trips.
        let lock_checkpoint = conn
            .prepare_cached(&self.sql.lock_checkpoint)
            .await
            .map_err(lost)?;
        let advance = conn.prepare_cached(&self.sql.advance).await.map_err(lost)?;
        let client: &mut tokio_postgres::Client = conn;
        // An automation's check needs READ COMMITTED (its snapshot must follow its lock wait);
        // a plain batch keeps the session's default level.
        let tx = if commands.is_empty() {
            client.transaction().await
        } else {
            client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
                .start()
                .await
        }
        .map_err(lost)?;
        // The automation's events first: their keys before anything gives the transaction an
        // id (the checkpoint row's lock below would).
        let appended = !commands.is_empty();
        if appended {
            if let Err(failure) = self.append_decided(&tx, commands).await {
                tx.rollback().await.map_err(lost)?;
                return Err(failure);
            }
        }
        let row = tx
            .query_opt(&lock_checkpoint, &[&self.name])
            .await
            .map_err(lost)?;
        let current = match row {
            Some(row) => checkpoint_from(&row).map_err(lost)?,
            None => return Err(Failure::Lost("the checkpoint row disappeared".into())),
        };
        if current != from {
            tx.rollback().await.map_err(lost)?;
            return Err(Failure::Moved(current));
        }
        if !events.is_empty() {
            if let Some(limit) = self.options.batch_timeout {
                // The server bounds each of the handler's statements too, so a statement still
                // running when the batch is abandoned ends by itself (no out-of-band cancel,
                // which could race the next statement or fail on TLS-only servers).
                tx.batch_execute(&format!(
                    "SET LOCAL statement_timeout = {}",
                    limit.as_millis().max(1)
                ))
                .await
                .map_err(lost)?;
            }
            let outcome =
                guard_batch(self.handler.handle(&tx, events), self.options.batch_timeout).await;
            if let Err(message) = outcome {
                // After a timeout a statement of the handler may still run: the server ends it
                // within `batch_timeout` (its statement_timeout), then the rollback runs.
                let grace = ABANDON_GRACE + self.options.batch_timeout.unwrap_or_default();
                return match tokio::time::timeout(grace, tx.rollback()).await {
                    Ok(Ok(())) => Err(Failure::Handler(message)),
                    Ok(Err(err)) => {
                        Err(Failure::Lost(format!("{message}; rollback failed: {err}")))
                    }
                    Err(_) => Err(Failure::Lost(format!(
                        "{message}; rollback did not finish within {grace:?}"
                    ))),
                };
            }
            if self.options.batch_timeout.is_some() {
                // The runner's own statements are not the handler's: no limit for them.
                tx.batch_execute("SET LOCAL statement_timeout = 0")
                    .await
                    .map_err(lost)?;
            }
        }
        tx.execute(
            &advance,
            &[&self.name, &Xid8(to.transaction_id), &to.position],
        )
        .await
        .map_err(lost)?;
        // A failed commit has an unknown outcome: give up the lease and reload the checkpoint.
        tx.commit().await.map_err(lost)?;
        if appended {
            self.store.inner.changes.committed();
        }
        Ok(())
    }

    /// The handler's [`decide`](EventHandler::decide) for `events`, checked like an
    /// `append_batch` (invalid input or an in-batch conflict fails the batch).
    async fn decided(&self, events: &[Event]) -> Result<Vec<Call>, Failure> {
        let mut decided = Vec::new();
        guard_batch(
            async {
                let commands = self.handler.decide(events).await?;
                if commands.is_empty() {
                    return Ok(());
                }
                validate_batch(&commands, &self.store.limits())?;
                if let Some(info) = conflict_within_batch(&commands) {
                    return Err(Error::Conflict(info).into());
                }
                decided = commands;
                Ok(())
            },
            self.options.batch_timeout,
        )
        .await
        .map_err(|message| Failure::Handler(format!("deciding the automation: {message}")))?;
        Ok(decided
            .into_iter()
            .map(|c| (c.events, c.condition.map(|c| c.simplified())))
            .collect())
    }

    /// Appends the decided commands in `tx`, all or nothing: the keys in their own statement
    /// (bounded by the store's `append_timeout`), then the checking insert. A conflict fails
    /// the batch (decided again on retry).
    async fn append_decided(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        calls: Vec<Call>,
    ) -> Result<(), Failure> {
        let store = &self.store;
        let (lock, stmt, shapes) = store.group_statement(calls, true, false);
        let (keys, exclusive) = &lock;
        let timeout = store.inner.config.append_timeout.as_millis().max(1);
        let failed = |what: &str, e: tokio_postgres::Error| {
            Failure::Handler(format!("{what}: {}", error_chain(&e)))
        };
        tx.batch_execute(&format!("SET LOCAL lock_timeout = {timeout}"))
            .await
            .map_err(|e| failed("the automation's lock timeout", e))?;
        tx.execute(&store.inner.lock_sql, &[keys, exclusive])
            .await
            .map_err(|e| failed("taking the automation's lock keys", e))?;
        tx.batch_execute("SET LOCAL lock_timeout = 0")
            .await
            .map_err(|e| failed("the automation's lock timeout", e))?;
        let rows = tx
            .query(&stmt.sql, &stmt.param_refs())
            .await
            .map_err(|e| failed("appending the automation's events", e))?;
        let results = store
            .group_results(&rows, &shapes, true)
            .map_err(|e| Failure::Handler(e.to_string()))?;
        for (index, result) in results.into_iter().enumerate() {
            if let Err(err) = result {
                return Err(Failure::Handler(format!(
                    "the automation's command {index} was not appended ({err}); the batch will be decided again"
                )));
            }
        }
        Ok(())
    }

    /// Parks `event` under the failure policy: in one transaction, lock and verify the
    /// checkpoint row, record the event in `parked_events`, advance the checkpoint to it, and
    /// commit. A crash at any point parks and advances, or does neither.
    async fn park(
        &self,
        conn: &mut ClientWrapper,
        event: &Event,
        from: Option<Cursor>,
        error: &str,
        attempts: u32,
    ) -> Result<(), Failure> {
        let lost = |e: tokio_postgres::Error| Failure::Lost(error_chain(&e));
        let lock_checkpoint = conn
            .prepare_cached(&self.sql.lock_checkpoint)
            .await
            .map_err(lost)?;
        let park = conn.prepare_cached(&self.sql.park).await.map_err(lost)?;
        let advance = conn.prepare_cached(&self.sql.advance).await.map_err(lost)?;
        let client: &mut tokio_postgres::Client = conn;
        let tx = client.transaction().await.map_err(lost)?;
        let row = tx
            .query_opt(&lock_checkpoint, &[&self.name])
            .await
            .map_err(lost)?;
        let current = match row {
            Some(row) => checkpoint_from(&row).map_err(lost)?,
            None => return Err(Failure::Lost("the checkpoint row disappeared".into())),
        };
        if current != from {
            tx.rollback().await.map_err(lost)?;
            return Err(Failure::Moved(current));
        }
        let xid = Xid8(event.cursor.transaction_id);
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        tx.execute(
            &park,
            &[
                &self.name,
                &xid,
                &event.cursor.position,
                &event.event_type,
                &error,
                &attempts,
            ],
        )
        .await
        .map_err(lost)?;
        tx.execute(&advance, &[&self.name, &xid, &event.cursor.position])
            .await
            .map_err(lost)?;
        // A failed commit has an unknown outcome: give up the lease and reload the checkpoint.
        tx.commit().await.map_err(lost)
    }

    /// Records a failed attempt in the checkpoint row (best effort: the status has it too).
    async fn record_failure(
        &self,
        conn: &ClientWrapper,
        message: &str,
        failing_at: Option<Cursor>,
        attempts: u32,
    ) {
        let xid = failing_at.map(|c| Xid8(c.transaction_id));
        let position = failing_at.map(|c| c.position);
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        if let Err(err) = conn
            .execute(
                &self.sql.record_failure,
                &[&self.name, &message, &xid, &position, &attempts],
            )
            .await
        {
            tracing::debug!(%err, "could not record the failure");
        }
    }

    /// Carries on from a checkpoint that was moved under the runner.
    fn moved(&self, from: Option<Cursor>, stored: Option<Cursor>) -> Option<Cursor> {
        tracing::info!(?from, to = ?stored, "the checkpoint was moved (reset, or processed by another instance); continuing from it");
        self.status.send_modify(|s| {
            s.checkpoint = stored;
            s.attempts = 0;
            s.failing_at = None;
        });
        stored
    }

    async fn load_checkpoint(
        &self,
        conn: &ClientWrapper,
    ) -> Result<Option<Cursor>, tokio_postgres::Error> {
        conn.execute(&self.sql.ensure_row, &[&self.name]).await?;
        let row = conn
            .query_one(&self.sql.select_checkpoint, &[&self.name])
            .await?;
        checkpoint_from(&row)
    }

    fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `delay`; returns true if a stop was requested meanwhile.
    async fn pause(&mut self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.stop.wait_for(|s| *s) => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    fn note_error(&self, message: String) {
        tracing::debug!(%message, "handler runner error");
        self.status.send_modify(|s| {
            s.last_error = Some(message);
            s.last_error_at = Some(SystemTime::now());
        });
    }
}

/// A fenced read after `after` that also returns its horizon: every event matching `query` that
/// is not returned and ever commits has a cursor above the last returned event, and, when fewer
/// than `limit` events came back, above the horizon too.
async fn read_with_horizon(
    store: &PostgresEventStore,
    query: &Query,
    after: Option<Cursor>,
    limit: usize,
) -> Result<(Vec<Event>, Cursor), Error> {
    let inner = &store.inner;
    let options = ReadOptions::default().after_opt(after).limit(limit);
    dcb_core::validate_read_options(&options)?;
    let mut standby = store.standby_for_read("handler_read").await?;
    let mut failovers = 0;
    while let Some(node) = standby {
        let read = store
            .on_standby_retrying(node, "handler_read", |conn| async move {
                read_with_horizon_on(store, &conn, query, &options, true).await
            })
            .await;
        match read {
            Ok(read) => return Ok(read),
            Err(e) => {
                standby = store
                    .failover(node, "handler_read", e, &mut failovers)
                    .await?
            }
        }
    }
    let conn = Conn::get(&inner.pool, "handler_read").await?;
    read_with_horizon_on(store, &conn, query, &options, false).await
}

/// [`read_with_horizon`] on `conn` (a standby's when `on_standby`).
async fn read_with_horizon_on(
    store: &PostgresEventStore,
    conn: &Conn,
    query: &Query,
    options: &ReadOptions,
    on_standby: bool,
) -> Result<(Vec<Event>, Cursor), Error> {
    let read = async {
        let (rows, xmax) = store
            .fenced_rows(conn, query, options, "handler_read", on_standby)
            .await?;
        let events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        // Every transaction that gets an id after the fence's snapshot has an id >= xmax.
        let horizon = Cursor::new(xmax.saturating_sub(1), i64::MAX);
        Ok((events, horizon))
    };
    let timeout = store.inner.config.query_timeout;
    conn.run(
        "handler_read",
        crate::store::within(timeout, "handler_read", read),
    )
    .await
}
