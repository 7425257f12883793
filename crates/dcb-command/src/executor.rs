use crate::{Command, CommandError, CommandHandler, HandlerError, RetryPolicy};
use async_trait::async_trait;
use dcb_core::store_metrics;
use dcb_core::{
    validate_command, CommandFilter, CommandRecord, CommandSession, CommitOutcome, Cursor, Error,
    Event, EventReader, EventStore, EventStream, NewCommand, ProjectionPermit, Query, ReadOptions,
};
use serde::Serialize;
use std::fmt;
use std::sync::Arc;
use tracing::{field, Instrument};

/// What a successful [`CommandExecutor::execute`] returns.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CommandOutcome {
    /// The command's audit record. For a replay, the ORIGINAL record (with the original data,
    /// metadata, transaction and time).
    pub record: CommandRecord,
    /// True when the command's idempotency id had been recorded before, so this execution wrote
    /// nothing and returns the original outcome.
    pub replayed: bool,
    /// How many times the handler ran in this execution: 1 without conflicts, more when a
    /// [`RetryPolicy`] retried, 0 for a replay detected before the handler ever ran.
    pub attempts: u32,
}

impl CommandOutcome {
    /// The cursor of the last event the command appended, if it appended any.
    pub fn last_event(&self) -> Option<Cursor> {
        self.record.last_event
    }
}

/// Executes commands against an [`EventStore`]: runs the handler on a consistent read, then
/// commits its events together with the command's audit record in one transaction.
///
/// For each execution the executor
///
/// 1. serializes the payload and validates the command (type, NUL characters, id);
/// 2. opens a [`CommandSession`] (on PostgreSQL: takes ONE pooled connection, used for every
///    read and the commit, so any number of concurrent commands needs at most one connection
///    each and cannot deadlock the pool);
/// 3. if the command has an idempotency id that is already recorded, returns the original
///    record as a replay without running the handler;
/// 4. runs the handler with a reader on the session;
/// 5. commits the decision's events, condition and the command record atomically: the command
///    row exists if and only if its events were written. A concurrent execution with the same
///    id that committed first turns this one into a replay;
/// 6. on an append-condition conflict, retries from step 2 as the [`RetryPolicy`] allows;
///    so does a conflict the handler returns itself (`?` on an `append_if` of its own).
///
/// Every execution runs in a `command.execute` tracing span with the command type, id and
/// number of attempts.
///
/// ```
/// use dcb_command::{handler_fn, Command, CommandExecutor, Decision, HandlerError, RetryPolicy};
/// use dcb_core::{CommandFilter, EventReaderExt, NewEvent, Query, QueryItem, StateProjector};
/// use dcb_memory::InMemoryEventStore;
/// use serde_json::json;
/// use std::sync::Arc;
///
/// #[derive(serde::Serialize)]
/// struct Enroll { course_id: String, student_id: String }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let executor = CommandExecutor::new(Arc::new(InMemoryEventStore::new()))
///     .with_retry(RetryPolicy::attempts(3));
///
/// // At most two students per course.
/// let enroll = handler_fn(|command: &Command<Enroll>, reader| {
///     Box::pin(async move {
///         let course = &command.payload.course_id;
///         let enrolled = Query::from(QueryItem::new().types(["StudentEnrolled"]).tag("course_id", course));
///         let model = reader.project(StateProjector::counter(enrolled)).await?;
///         if model.states >= 2 {
///             return Ok(Decision::nothing());
///         }
///         let event = NewEvent::builder("StudentEnrolled")
///             .tag("course_id", course)
///             .tag("student_id", &command.payload.student_id)
///             .build()?;
///         Ok::<_, HandlerError>(Decision::append([event]).guarded_by(model.condition))
///     })
/// });
///
/// for student in ["s1", "s2", "s3"] {
///     let command = Command::new("Enroll", Enroll { course_id: "c1".into(), student_id: student.into() })
///         .with_id(format!("enroll-{student}"))
///         .with_metadata(json!({ "user": "registrar" }));
///     executor.execute(command, &enroll).await?;
/// }
///
/// // Executing a recorded id again writes nothing and returns the original outcome.
/// let again = Command::new("Enroll", Enroll { course_id: "c1".into(), student_id: "s1".into() })
///     .with_id("enroll-s1");
/// let outcome = executor.execute(again, &enroll).await?;
/// assert!(outcome.replayed);
///
/// // The audit trail: every command, also s3's, which appended nothing.
/// let recorded = executor.commands(&CommandFilter::default().command_type("Enroll")).await?;
/// assert_eq!(recorded.len(), 3);
/// assert_eq!(recorded[2].last_event, None);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CommandExecutor {
    store: Arc<dyn EventStore>,
    retry: RetryPolicy,
}

impl fmt::Debug for CommandExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandExecutor")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl CommandExecutor {
    /// An executor on `store` that does not retry conflicts.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            retry: RetryPolicy::never(),
        }
    }

    /// Retries append-condition conflicts as `policy` says.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The store the executor writes to.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Executes `command` with `handler`; see the [type documentation](Self) for the steps.
    ///
    /// Returns the command's record, or, if its idempotency id was recorded before (also by a
    /// concurrent execution that committed first), the original record flagged as
    /// [`replayed`](CommandOutcome::replayed). On error nothing was written.
    pub async fn execute<T, H>(
        &self,
        command: Command<T>,
        handler: &H,
    ) -> Result<CommandOutcome, CommandError<H::Error>>
    where
        T: Serialize + Send + Sync,
        H: CommandHandler<T> + ?Sized,
    {
        let span = tracing::info_span!(
            "command.execute",
            command_type = %command.command_type,
            command_id = command.id.as_deref(),
            attempts = field::Empty,
            outcome = field::Empty,
        );
        let started = std::time::Instant::now();
        let command_type = command.command_type.clone();
        async {
            let result = self.run(&command, handler).await;
            let span = tracing::Span::current();
            match &result {
                Ok(outcome) => {
                    span.record("attempts", outcome.attempts);
                    span.record(
                        "outcome",
                        if outcome.replayed {
                            "replayed"
                        } else {
                            "committed"
                        },
                    );
                }
                Err(err) => {
                    if let Some(attempts) = err.attempts() {
                        span.record("attempts", attempts);
                    }
                    let kind = match err {
                        CommandError::Rejected(_) => "rejected",
                        CommandError::Conflict { .. } => "conflict",
                        CommandError::Validation(_) => "invalid",
                        CommandError::Decode(_) => "decode_error",
                        CommandError::TransactionWork(_) => "work_failed",
                        _ => "store_error",
                    };
                    span.record("outcome", kind);
                    tracing::debug!(error = %err, "command failed");
                }
            }
            let outcome = match &result {
                Ok(outcome) if outcome.replayed => "replayed",
                Ok(_) => "committed",
                Err(CommandError::Rejected(_)) => "rejected",
                Err(CommandError::Conflict { .. }) => "conflict",
                Err(CommandError::Validation(_)) => "invalid",
                Err(CommandError::Decode(_)) => "decode_error",
                Err(CommandError::TransactionWork(_)) => "work_failed",
                Err(_) => "store_error",
            };
            metrics::counter!(store_metrics::COMMANDS, "command_type" => command_type.clone(), "outcome" => outcome)
                .increment(1);
            metrics::histogram!(store_metrics::COMMAND_DURATION, "command_type" => command_type, "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            result
        }
        .instrument(span)
        .await
    }

    async fn run<T, H>(
        &self,
        command: &Command<T>,
        handler: &H,
    ) -> Result<CommandOutcome, CommandError<H::Error>>
    where
        T: Serialize + Send + Sync,
        H: CommandHandler<T> + ?Sized,
    {
        let record = command
            .to_new_command()
            .map_err(|e| CommandError::from_store(e, 0))?;
        validate_command(&record).map_err(|e| CommandError::from_store(e, 0))?;
        let max_attempts = self.retry.max_attempts();
        let mut attempt: u32 = 0;
        loop {
            let ran = attempt;
            let mut session = self
                .store
                .command_session()
                .await
                .map_err(|e| CommandError::from_store(e, ran))?;
            if let Some(original) = find_original(session.as_ref(), &record)
                .await
                .map_err(|e| CommandError::from_store(e, ran))?
            {
                return Ok(replay(original, ran));
            }

            attempt += 1;
            tracing::Span::current().record("attempts", attempt);
            let conflict = match handler
                .handle(command, &SessionReader(session.as_ref()))
                .await
            {
                Ok(decision) => {
                    let (events, condition, work) = decision.into_parts();
                    match session.commit_with(&record, events, condition, work).await {
                        Ok(CommitOutcome::Committed(committed)) => {
                            return Ok(CommandOutcome {
                                record: committed,
                                replayed: false,
                                attempts: attempt,
                            })
                        }
                        Ok(CommitOutcome::Duplicate(original)) => {
                            return Ok(replay(original, attempt))
                        }
                        Err(Error::Conflict(conflict)) => {
                            // A same-id command that committed first may be what conflicts
                            // with us: then this execution is a replay, not a failure.
                            match find_original(session.as_ref(), &record).await {
                                Ok(Some(original)) => return Ok(replay(original, attempt)),
                                Ok(None) => {}
                                Err(err) => {
                                    tracing::debug!(error = %err, "looking up the command id after a conflict failed");
                                }
                            }
                            conflict
                        }
                        Err(err) => return Err(CommandError::from_store(err, attempt)),
                    }
                }
                Err(HandlerError::Rejected(rejection)) => {
                    return Err(CommandError::Rejected(rejection))
                }
                // A conflict of an append the handler made itself (`?` on its own
                // `append_if`) means what the executor's own conflict means: the state it
                // decided on changed. It is retried the same way.
                Err(HandlerError::Store(Error::Conflict(conflict))) => conflict,
                Err(HandlerError::Store(err)) => {
                    return Err(CommandError::from_store(err, attempt))
                }
            };
            if attempt >= max_attempts {
                return Err(CommandError::Conflict {
                    attempts: attempt,
                    conflict,
                });
            }
            // Give the connection back before waiting.
            drop(session);
            metrics::counter!(store_metrics::COMMAND_RETRIES, "command_type" => command.command_type.clone())
                .increment(1);
            let wait = self.retry.jittered_backoff(attempt);
            tracing::debug!(attempt, ?wait, %conflict, "append condition failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Lists recorded commands, oldest first, filtered by type and time range: the audit trail.
    ///
    /// Delegates to [`EventStore::commands`].
    ///
    /// ```
    /// use dcb_command::{handler_fn, Command, CommandExecutor, Decision, HandlerError};
    /// use dcb_core::CommandFilter;
    /// use dcb_memory::InMemoryEventStore;
    /// use std::sync::Arc;
    /// use std::time::{Duration, SystemTime};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let executor = CommandExecutor::new(Arc::new(InMemoryEventStore::new()));
    /// let noop = handler_fn(|_: &Command<()>, _| Box::pin(async { Ok::<_, HandlerError>(Decision::nothing()) }));
    /// let start = SystemTime::now();
    /// executor.execute(Command::new("Ping", ()), &noop).await?;
    /// executor.execute(Command::new("Pong", ()), &noop).await?;
    ///
    /// let pings = executor.commands(&CommandFilter::default().command_type("Ping")).await?;
    /// assert_eq!(pings.len(), 1);
    /// let window = CommandFilter::default().between(start, SystemTime::now() + Duration::from_secs(1));
    /// assert_eq!(executor.commands(&window).await?.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn commands(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, Error> {
        self.store.commands(filter).await
    }

    /// The command recorded with idempotency id `id`, if any.
    pub async fn find_command(&self, id: &str) -> Result<Option<CommandRecord>, Error> {
        let session = self.store.command_session().await?;
        session.find_command(id).await
    }
}

/// The record of a command with the same idempotency id as `record`, if there is one.
async fn find_original(
    session: &dyn CommandSession,
    record: &NewCommand,
) -> Result<Option<CommandRecord>, Error> {
    match &record.id {
        Some(id) => {
            let original = session.find_command(id).await?;
            if let Some(original) = &original {
                if original.command_type != record.command_type || original.data != record.data {
                    tracing::warn!(
                        command_id = %id,
                        original_type = %original.command_type,
                        "idempotency id reused for a different command; returning the original outcome"
                    );
                }
            }
            Ok(original)
        }
        None => Ok(None),
    }
}

fn replay(record: CommandRecord, attempts: u32) -> CommandOutcome {
    CommandOutcome {
        record,
        replayed: true,
        attempts,
    }
}

/// The handler's view of a session: its reading side only.
struct SessionReader<'a>(&'a dyn CommandSession);

#[async_trait]
impl EventReader for SessionReader<'_> {
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        self.0.query(query, options).await
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        self.0.query_stream(query, options)
    }

    fn projection_permit(&self) -> Result<ProjectionPermit, Error> {
        self.0.projection_permit()
    }
}
