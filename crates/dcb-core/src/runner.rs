//! Building blocks of the stores' background runners (subscriptions, durable and in-memory event
//! handlers): the retry backoff, a guarded call of a handler's batch, and the handle of a task
//! running in the background. They live here so that every backend's runner behaves the same.
use crate::Error;
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;
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

/// The error's message followed by those of its sources that it does not already include.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
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
