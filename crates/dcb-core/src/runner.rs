//! Building blocks of the stores' background runners (subscriptions, durable and in-memory event
//! handlers): the retry backoff, a guarded call of a handler's batch, the failure policy of
//! event handlers with its attempt bookkeeping ([`FailurePolicy`], [`FailureTracker`]), the
//! records of parked events, and the handle of a task running in the background. They live here
//! so that every backend's runner behaves the same.
use crate::{Cursor, Error, Event};
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The delay before retry number `failures` (1-based): `initial`, doubled per further failure,
/// capped at `max`.
///
/// ```
/// use dcb_core::runner::backoff_delay;
/// use std::time::Duration;
/// let (initial, max) = (Duration::from_millis(100), Duration::from_secs(1));
/// assert_eq!(backoff_delay(initial, max, 1), Duration::from_millis(100));
/// assert_eq!(backoff_delay(initial, max, 3), Duration::from_millis(400));
/// assert_eq!(backoff_delay(initial, max, 60), max);
/// ```
pub fn backoff_delay(initial: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    initial.saturating_mul(factor).min(max)
}

/// Checks backoff settings: `initial` longer than zero and at most `max` (reported as the field
/// `retry_initial`).
pub fn validate_backoff(initial: Duration, max: Duration) -> Result<(), Error> {
    if initial.is_zero() || max < initial {
        return Err(Error::Config {
            field: "retry_initial",
            reason: "must be longer than zero and at most retry_max".into(),
        });
    }
    Ok(())
}

/// What a handler returns when it fails: any error (`?` converts most).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Runs a handler's `work` on one batch and returns why it failed, if it did: the messages of
/// the error and of its sources (a `tokio_postgres::Error` alone says only "db error"), the
/// panic's message, or, past `timeout`, that the work was dropped unfinished.
///
/// ```
/// use dcb_core::runner::guard_batch;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// assert_eq!(guard_batch(async { Ok(()) }, None).await, Ok(()));
/// let failed = guard_batch(async { Err("no".into()) }, None).await;
/// assert_eq!(failed, Err("no".to_string()));
/// let limit = Duration::from_millis(10);
/// let slow = guard_batch(async { std::future::pending().await }, Some(limit));
/// assert_eq!(
///     slow.await,
///     Err("the handler did not finish the batch within 10ms (batch_timeout)".to_string())
/// );
/// # }
/// ```
pub async fn guard_batch<F>(work: F, timeout: Option<Duration>) -> Result<(), String>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    let work = AssertUnwindSafe(work).catch_unwind();
    let outcome = match timeout {
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(outcome) => outcome,
            Err(_) => {
                return Err(format!(
                    "the handler did not finish the batch within {limit:?} (batch_timeout)"
                ))
            }
        },
        None => work.await,
    };
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(error_chain(&*err)),
        Err(panic) => Err(format!("handler panicked: {}", panic_message(&panic))),
    }
}

/// The error's message followed by those of its sources that it does not already include (a
/// `tokio_postgres::Error` alone says only "db error").
///
/// ```
/// let err = std::io::Error::other("disk full");
/// assert_eq!(dcb_core::runner::error_chain(&err), "disk full");
/// ```
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

/// What an event handler's runner does about a handler that keeps failing.
///
/// Every failed attempt (the handler returned `Err`, panicked, or ran past its batch timeout) is
/// followed by the runner's backoff (`retry_initial`, doubled per attempt up to `retry_max`).
/// With a limit, once a batch of several events has failed `max_attempts` times in a row, the
/// runner retries its events **one by one**, each with up to `max_attempts` attempts: the
/// events before the culprit are handled (and checkpointed) on their own, and the first event
/// that fails `max_attempts` times alone is the poison event. Then:
///
/// - [`Stop`](Self::Stop): the runner stops with its checkpoint just before the poison event;
///   its status shows the event's cursor (`failing_at`), the error and the attempts. Restart it
///   once the handler is fixed, or move the checkpoint past the event.
/// - [`Park`](Self::Park): the runner records the event as *parked* (handler, cursor, event
///   type, error, attempts, time) and advances its checkpoint past it in the same transaction,
///   then carries on. Parked events can be listed, replayed and dropped by an operator.
///
/// The default, [`RetryForever`](Self::RetryForever), retries the failing batch with backoff
/// for as long as it fails, which stalls the handler (the behaviour of earlier releases).
///
/// ```
/// use dcb_core::runner::FailurePolicy;
/// assert_eq!(FailurePolicy::default(), FailurePolicy::RetryForever);
/// assert_eq!(FailurePolicy::Park { max_attempts: 5 }.max_attempts(), Some(5));
/// assert!(FailurePolicy::Stop { max_attempts: 0 }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FailurePolicy {
    /// Retry a failing batch for as long as it fails (the default).
    #[default]
    RetryForever,
    /// After `max_attempts` failed attempts at a lone event, stop the runner at it.
    Stop {
        /// Attempts at a batch, and then at each of its events alone, before giving up (at
        /// least 1).
        max_attempts: u32,
    },
    /// After `max_attempts` failed attempts at a lone event, park it and carry on.
    Park {
        /// Attempts at a batch, and then at each of its events alone, before giving up (at
        /// least 1).
        max_attempts: u32,
    },
}

impl FailurePolicy {
    /// The attempt limit (`None` for [`RetryForever`](Self::RetryForever)).
    pub fn max_attempts(&self) -> Option<u32> {
        match self {
            FailurePolicy::RetryForever => None,
            FailurePolicy::Stop { max_attempts } | FailurePolicy::Park { max_attempts } => {
                Some(*max_attempts)
            }
        }
    }

    /// Checks the limit: at least one attempt (reported as the field `failure_policy`).
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_attempts() == Some(0) {
            return Err(Error::Config {
                field: "failure_policy",
                reason: "max_attempts must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// What a runner does after a failed attempt, as decided by [`FailureTracker::failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureDecision {
    /// Retry the same batch after `delay`.
    Retry {
        /// Consecutive failed attempts so far.
        attempts: u32,
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// The batch used up its attempts: read again at once and handle its events one at a time
    /// ([`FailureTracker::batch_limit`] is now 1), up to and including `through`.
    Isolate {
        /// Failed attempts at the whole batch.
        attempts: u32,
        /// The last event of the failed batch.
        through: Cursor,
    },
    /// The lone event `event` used up its attempts under [`FailurePolicy::Stop`]: stop.
    Stop {
        /// Failed attempts at the event alone.
        attempts: u32,
        /// The poison event.
        event: Cursor,
    },
    /// The lone event `event` used up its attempts under [`FailurePolicy::Park`]: park it,
    /// advance the checkpoint to it, then report [`FailureTracker::committed`].
    Park {
        /// Failed attempts at the event alone.
        attempts: u32,
        /// The poison event.
        event: Cursor,
    },
}

impl FailureDecision {
    /// The failed attempts the decision counted.
    pub fn attempts(&self) -> u32 {
        match *self {
            FailureDecision::Retry { attempts, .. }
            | FailureDecision::Isolate { attempts, .. }
            | FailureDecision::Stop { attempts, .. }
            | FailureDecision::Park { attempts, .. } => attempts,
        }
    }
}

/// The attempt bookkeeping of a handler runner: counts consecutive failures, applies the
/// [`FailurePolicy`] and the backoff, and remembers when the runner is isolating the events of
/// a failed batch. One per runner (per lease, on PostgreSQL), shared by every backend.
///
/// ```
/// use dcb_core::runner::{FailureDecision, FailurePolicy, FailureTracker};
/// use dcb_core::{Cursor, Event};
/// use std::time::{Duration, SystemTime};
///
/// let event = |p| Event {
///     cursor: Cursor::new(1, p),
///     event_type: "E".into(),
///     tags: vec![],
///     data: serde_json::Value::Null,
///     metadata: None,
///     occurred_at: SystemTime::UNIX_EPOCH,
/// };
/// let ms = Duration::from_millis;
/// let mut tracker = FailureTracker::new(FailurePolicy::Park { max_attempts: 2 }, ms(10), ms(100));
/// let batch = [event(1), event(2), event(3)];
/// assert_eq!(tracker.batch_limit(100), 100);
/// assert_eq!(tracker.failed(&batch), FailureDecision::Retry { attempts: 1, delay: ms(10) });
/// assert_eq!(
///     tracker.failed(&batch),
///     FailureDecision::Isolate { attempts: 2, through: Cursor::new(1, 3) }
/// );
/// assert_eq!(tracker.batch_limit(100), 1);
/// tracker.committed(Cursor::new(1, 1)); // event 1 alone is fine
/// tracker.failed(&batch[1..2]);
/// assert_eq!(
///     tracker.failed(&batch[1..2]),
///     FailureDecision::Park { attempts: 2, event: Cursor::new(1, 2) }
/// );
/// tracker.committed(Cursor::new(1, 2)); // parked
/// tracker.committed(Cursor::new(1, 3)); // event 3 alone is fine: back to whole batches
/// assert_eq!(tracker.batch_limit(100), 100);
/// ```
#[derive(Debug, Clone)]
pub struct FailureTracker {
    policy: FailurePolicy,
    retry_initial: Duration,
    retry_max: Duration,
    attempts: u32,
    isolate_through: Option<Cursor>,
}

impl FailureTracker {
    /// A tracker with no failures yet, applying `policy` with the backoff `retry_initial`
    /// (doubled per failure) up to `retry_max`.
    pub fn new(policy: FailurePolicy, retry_initial: Duration, retry_max: Duration) -> Self {
        Self {
            policy,
            retry_initial,
            retry_max,
            attempts: 0,
            isolate_through: None,
        }
    }

    /// The policy applied.
    pub fn policy(&self) -> FailurePolicy {
        self.policy
    }

    /// Consecutive failed attempts at the current batch (or lone event).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// True while the runner handles the events of a failed batch one at a time.
    pub fn isolating(&self) -> bool {
        self.isolate_through.is_some()
    }

    /// The most events the next batch may hold: `batch_size`, or 1 while isolating.
    pub fn batch_limit(&self, batch_size: usize) -> usize {
        if self.isolating() {
            1
        } else {
            batch_size
        }
    }

    /// Counts a failed attempt at `batch` (the events the handler was given, in cursor order)
    /// and decides what to do next.
    pub fn failed(&mut self, batch: &[Event]) -> FailureDecision {
        self.attempts = self.attempts.saturating_add(1);
        let attempts = self.attempts;
        let retry = FailureDecision::Retry {
            attempts,
            delay: backoff_delay(self.retry_initial, self.retry_max, attempts),
        };
        let Some(max) = self.policy.max_attempts() else {
            return retry;
        };
        if attempts < max {
            return retry;
        }
        match batch {
            [] => retry,
            [only] => match self.policy {
                FailurePolicy::Stop { .. } => FailureDecision::Stop {
                    attempts,
                    event: only.cursor,
                },
                FailurePolicy::Park { .. } => FailureDecision::Park {
                    attempts,
                    event: only.cursor,
                },
                FailurePolicy::RetryForever => retry,
            },
            [.., last] => {
                self.attempts = 0;
                self.isolate_through = self.isolate_through.max(Some(last.cursor));
                FailureDecision::Isolate {
                    attempts,
                    through: last.cursor,
                }
            }
        }
    }

    /// The checkpoint moved to `checkpoint` by this runner (a batch committed, or an event was
    /// parked): the failure streak ends, and so does isolation once past the failed batch.
    pub fn committed(&mut self, checkpoint: Cursor) {
        self.attempts = 0;
        if self
            .isolate_through
            .is_some_and(|through| through <= checkpoint)
        {
            self.isolate_through = None;
        }
    }

    /// The checkpoint was moved from outside (a reset, another instance): forget everything.
    pub fn forget(&mut self) {
        self.attempts = 0;
        self.isolate_through = None;
    }
}

/// An event a handler gave up on under [`FailurePolicy::Park`]: its checkpoint moved past it,
/// and the event waits for an operator to replay or drop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    /// The handler's name.
    pub handler: String,
    /// The event's cursor.
    pub cursor: Cursor,
    /// The event's type.
    pub event_type: String,
    /// The most recent failure (when parked, or of the last failed replay).
    pub error: String,
    /// Failed attempts at the event alone: those before it was parked, plus failed replays.
    pub attempts: u32,
    /// When it was parked.
    pub parked_at: SystemTime,
    /// When it last failed (when parked, or the last failed replay).
    pub last_attempt_at: SystemTime,
    /// When an operator asked the running handler to replay it (PostgreSQL's
    /// `request_replay`, `crablet handlers replay`), until the replay is attempted; always
    /// `None` in memory, where replays are direct calls.
    pub replay_requested_at: Option<SystemTime>,
}

/// Why an operation on a parked event failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParkedError {
    /// No such parked event (never parked, already replayed or dropped).
    #[error("handler {handler:?} has no parked event at {cursor}")]
    NotFound {
        /// The handler's name.
        handler: String,
        /// The cursor asked for.
        cursor: Cursor,
    },
    /// The parked event is no longer in the event log.
    #[error("parked event {cursor} of handler {handler:?} is not in the event log")]
    EventMissing {
        /// The handler's name.
        handler: String,
        /// The parked event's cursor.
        cursor: Cursor,
    },
    /// The handler failed again on the replayed event; the event stays parked with the new
    /// error and attempt count.
    #[error("replaying parked event {cursor} of handler {handler:?} failed (attempt {attempts}): {message}")]
    HandlerFailed {
        /// The handler's name.
        handler: String,
        /// The parked event's cursor.
        cursor: Cursor,
        /// The parked event's attempts, this one included.
        attempts: u32,
        /// The failure (error with its sources, panic message).
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

/// A task running in the background with a watched status `S` and a stop signal. Dropping it
/// aborts the task at once; [`stop`](Self::stop) asks it to finish and waits.
pub struct RunningTask<S> {
    status: watch::Receiver<S>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RunningTask<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningTask")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl<S: Clone + Send + Sync + 'static> RunningTask<S> {
    /// Spawns `run(status, stop)` on `runtime`, with `initial` as the first status. `run` should
    /// return soon after `stop` becomes `true`.
    pub fn spawn<F, Fut>(runtime: &tokio::runtime::Handle, initial: S, run: F) -> Self
    where
        F: FnOnce(watch::Sender<S>, watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (status_tx, status) = watch::channel(initial);
        let (stop, stop_rx) = watch::channel(false);
        let task = runtime.spawn(run(status_tx, stop_rx));
        Self {
            status,
            stop,
            task: Some(task),
        }
    }

    /// A snapshot of the status.
    pub fn status(&self) -> S {
        self.status.borrow().clone()
    }

    /// A receiver of status updates.
    pub fn status_updates(&self) -> watch::Receiver<S> {
        self.status.clone()
    }

    /// Asks the task to stop and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Aborts the task at once.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<S> Drop for RunningTask<S> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("db error")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn event(position: i64) -> Event {
        Event {
            cursor: Cursor::new(7, position),
            event_type: "E".into(),
            tags: vec![],
            data: serde_json::Value::Null,
            metadata: None,
            occurred_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn retry_forever_never_gives_up_and_backs_off() {
        let ms = Duration::from_millis;
        let mut tracker = FailureTracker::new(FailurePolicy::RetryForever, ms(10), ms(40));
        let batch = [event(1), event(2)];
        let mut delays = Vec::new();
        for _ in 0..1_000 {
            match tracker.failed(&batch) {
                FailureDecision::Retry { delay, .. } => delays.push(delay),
                other => panic!("gave up: {other:?}"),
            }
        }
        assert_eq!(&delays[..4], &[ms(10), ms(20), ms(40), ms(40)]);
        assert_eq!(tracker.attempts(), 1_000);
        assert!(!tracker.isolating());
        let single = tracker.failed(&batch[..1]);
        assert!(
            matches!(single, FailureDecision::Retry { .. }),
            "{single:?}"
        );
        tracker.committed(Cursor::new(7, 2));
        assert_eq!(tracker.attempts(), 0);
    }

    #[test]
    fn stop_isolates_a_batch_then_stops_at_the_lone_poison_event() {
        let ms = Duration::from_millis;
        let mut tracker =
            FailureTracker::new(FailurePolicy::Stop { max_attempts: 1 }, ms(1), ms(1));
        let batch = [event(1), event(2), event(3)];
        assert_eq!(
            tracker.failed(&batch),
            FailureDecision::Isolate {
                attempts: 1,
                through: Cursor::new(7, 3)
            }
        );
        assert_eq!(
            tracker.attempts(),
            0,
            "each lone event gets its own attempts"
        );
        assert_eq!(tracker.batch_limit(50), 1);
        assert_eq!(
            tracker.failed(&batch[..1]),
            FailureDecision::Stop {
                attempts: 1,
                event: Cursor::new(7, 1)
            }
        );
        // A checkpoint moved from outside ends the isolation.
        tracker.forget();
        assert_eq!((tracker.attempts(), tracker.batch_limit(50)), (0, 50));
        // So does a checkpoint past the failed batch (a horizon, say), not one inside it.
        tracker.failed(&batch);
        tracker.committed(Cursor::new(7, 2));
        assert!(tracker.isolating());
        tracker.committed(Cursor::new(8, i64::MAX));
        assert!(!tracker.isolating());
    }

    #[test]
    fn a_zero_attempt_limit_is_rejected() {
        assert!(FailurePolicy::Park { max_attempts: 0 }.validate().is_err());
        assert!(FailurePolicy::Park { max_attempts: 1 }.validate().is_ok());
        assert!(FailurePolicy::RetryForever.validate().is_ok());
    }

    #[tokio::test]
    async fn failures_carry_their_sources_and_panics_their_message() {
        let inner = std::io::Error::other("canceling statement due to statement timeout");
        let failed = guard_batch(async { Err(Outer(inner).into()) }, None).await;
        assert_eq!(
            failed,
            Err("db error: canceling statement due to statement timeout".to_string())
        );
        let panicked = guard_batch(async { panic!("boom") }, None).await;
        assert_eq!(panicked, Err("handler panicked: boom".to_string()));
    }
}
