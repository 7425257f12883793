//! Given/when/then tests of decisions and commands, on any store.
//!
//! ```
//! use dcb_command::{handler_fn, reject, Command, Decision, HandlerError};
//! use dcb_core::{EventReaderExt, NewEvent, Query, StateProjector, Tag};
//! use dcb_testkit::scenario::Scenario;
//! use std::sync::Arc;
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("username {0:?} is taken")]
//! struct Taken(String);
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let register = handler_fn(|command: &Command<String>, reader| {
//!     Box::pin(async move {
//!         let name = Query::tags([Tag::new("username", command.payload.as_str())]);
//!         let model = reader.project(StateProjector::exists(name)).await?;
//!         if model.states {
//!             return Err(reject(Taken(command.payload.clone())));
//!         }
//!         let event = NewEvent::builder("AccountRegistered").tag("username", command.payload.as_str()).build()?;
//!         Ok::<_, HandlerError<Taken>>(Decision::append([event]).guarded_by(model.condition))
//!     })
//! });
//! let registered = |name: &str| NewEvent::builder("AccountRegistered").tag("username", name).build().unwrap();
//!
//! let store = || Arc::new(dcb_memory::InMemoryEventStore::new());
//! Scenario::on(store())
//!     .given([registered("alice")])
//!     .await
//!     .when_command(Command::new("Register", "bob".to_string()), &register)
//!     .await
//!     .then_events([registered("bob")])
//!     .await;
//! Scenario::on(store())
//!     .given([registered("alice")])
//!     .await
//!     .when_command(Command::new("Register", "alice".to_string()), &register)
//!     .await
//!     .then_error("username \"alice\" is taken")
//!     .await;
//! # }
//! ```
mod recording;

use dcb_command::{Command, CommandError, CommandExecutor, CommandHandler, CommandOutcome};
use dcb_core::{Cursor, DomainEvent, Event, EventStore, NewEvent, Query, ReadOptions};
use recording::{Log, Recording};
use serde::Serialize;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

/// A test in three steps: the events that happened before (given), the decision or command
/// under test (when), and the events it must have appended or the error it must have failed
/// with (then). Every step panics with a readable report when it does not hold, like
/// `assert_eq!`.
///
/// The same scenario runs on any [`EventStore`]: pass an in-memory store and a PostgreSQL
/// store to one test function to check both backends with the same code.
pub struct Scenario {
    store: Arc<dyn EventStore>,
    given_until: Option<Cursor>,
}

impl fmt::Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scenario")
            .field("given_until", &self.given_until)
            .finish_non_exhaustive()
    }
}

impl Scenario {
    /// A scenario on `store`, used by this test only. Events already in it count as history.
    pub fn on(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            given_until: None,
        }
    }

    /// The store the scenario runs on.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Appends `events` as the history the decision is taken on.
    pub async fn given(self, events: impl IntoIterator<Item = NewEvent>) -> Self {
        let events: Vec<NewEvent> = events.into_iter().collect();
        if !events.is_empty() {
            self.store
                .append(events)
                .await
                .unwrap_or_else(|err| panic!("given: appending the history failed: {err}"));
        }
        self
    }

    /// Appends typed events as the history.
    pub async fn given_typed<E: DomainEvent>(self, events: &[E]) -> Self {
        let events = dcb_core::encode_all(events)
            .unwrap_or_else(|err| panic!("given: encoding the history failed: {err}"));
        self.given(events).await
    }

    /// Runs `action` (a decision and its `append_if`, say) on the store it is given: the
    /// scenario's store, noting what is appended through it. What `action` appends through
    /// that store (appends, conditional appends, batches and command commits) is what the
    /// `then` steps check; events other tasks append meanwhile are not.
    pub async fn when<T, E, F, Fut>(mut self, action: F) -> Then<T, E>
    where
        F: FnOnce(Arc<dyn EventStore>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let newest = ReadOptions::default().backwards().limit(1);
        self.given_until = self
            .store
            .query(&Query::all(), newest)
            .await
            .unwrap_or_else(|err| panic!("when: reading the end of the history failed: {err}"))
            .first()
            .map(|e| e.cursor);
        let writes = Log::default();
        let recording: Arc<dyn EventStore> = Arc::new(Recording {
            inner: self.store.clone(),
            log: writes.clone(),
        });
        let result = action(recording).await;
        Then {
            store: self.store,
            given_until: self.given_until,
            writes,
            result,
        }
    }

    /// Executes `command` with `handler` through a [`CommandExecutor`] on the store (no
    /// retries).
    pub async fn when_command<T, H>(
        self,
        command: Command<T>,
        handler: &H,
    ) -> Then<CommandOutcome, CommandError<H::Error>>
    where
        T: Serialize + Send + Sync,
        H: CommandHandler<T> + ?Sized,
    {
        self.when(
            |store| async move { CommandExecutor::new(store).execute(command, handler).await },
        )
        .await
    }
}

/// The outcome of a scenario's `when` step, to check.
pub struct Then<T, E> {
    store: Arc<dyn EventStore>,
    given_until: Option<Cursor>,
    /// What `when` appended through the store it was given.
    writes: Log,
    result: Result<T, E>,
}

impl<T, E> fmt::Debug for Then<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Then")
            .field("given_until", &self.given_until)
            .field("succeeded", &self.result.is_ok())
            .finish_non_exhaustive()
    }
}

impl<T: fmt::Debug, E: fmt::Display + fmt::Debug> Then<T, E> {
    /// What `when` returned.
    pub fn result(&self) -> &Result<T, E> {
        &self.result
    }

    /// The events `when` appended, in order, as stored (not those other tasks appended
    /// meanwhile).
    pub async fn appended(&self) -> Vec<Event> {
        let writes = self
            .writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if writes.is_empty() {
            return Vec::new();
        }
        let options = ReadOptions::default().after_opt(self.given_until);
        let events = self
            .store
            .query(&Query::all(), options)
            .await
            .unwrap_or_else(|err| panic!("then: reading the appended events failed: {err}"));
        recording::select(events, &writes)
    }

    /// Asserts that `when` succeeded and appended exactly `expected`, in order: same types,
    /// tags (in order), payloads and metadata. Returns what `when` returned.
    pub async fn then_events(self, expected: impl IntoIterator<Item = NewEvent>) -> T {
        let expected: Vec<NewEvent> = expected.into_iter().collect();
        let appended: Vec<NewEvent> = self
            .appended()
            .await
            .into_iter()
            .map(|e| NewEvent {
                event_type: e.event_type,
                tags: e.tags,
                data: e.data,
                metadata: e.metadata,
                occurred_at: None,
            })
            .collect();
        let value = match self.result {
            Ok(value) => value,
            Err(err) => panic!(
                "then: expected {} event(s), but `when` failed: {err}\n  error: {err:?}",
                expected.len()
            ),
        };
        if appended != expected {
            panic!(
                "then: the appended events differ\n  expected: {}\n  appended: {}",
                show(&expected),
                show(&appended)
            );
        }
        value
    }

    /// Asserts that `when` succeeded and appended exactly these typed events, in order.
    pub async fn then_typed<D: DomainEvent>(self, expected: &[D]) -> T {
        let expected = dcb_core::encode_all(expected)
            .unwrap_or_else(|err| panic!("then: encoding the expected events failed: {err}"));
        self.then_events(expected).await
    }

    /// Asserts that `when` succeeded and appended nothing.
    pub async fn then_nothing(self) -> T {
        self.then_events([]).await
    }

    /// Asserts that `when` failed with an error that displays as `message`, and appended
    /// nothing. Returns the error.
    pub async fn then_error(self, message: &str) -> E {
        self.then_error_where(|err| err.to_string() == message, message)
            .await
    }

    /// Asserts that `when` failed with an error for which `check` holds, and appended nothing.
    /// `expected` describes the error in the panic message.
    pub async fn then_error_where(self, check: impl FnOnce(&E) -> bool, expected: &str) -> E {
        let appended = self.appended().await;
        let err = match self.result {
            Ok(value) => panic!(
                "then: expected the error {expected:?}, but `when` succeeded with {value:?}; \
                 appended: {}",
                show(&appended)
            ),
            Err(err) => err,
        };
        if !check(&err) {
            panic!("then: expected the error {expected:?}, got {err}\n  error: {err:?}");
        }
        if !appended.is_empty() {
            panic!(
                "then: `when` failed as expected but appended {}",
                show(&appended)
            );
        }
        err
    }
}

fn show<T: fmt::Debug>(events: &[T]) -> String {
    if events.is_empty() {
        return "nothing".into();
    }
    events
        .iter()
        .map(|e| format!("\n    {e:?}"))
        .collect::<String>()
}
