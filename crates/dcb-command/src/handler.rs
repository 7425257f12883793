use crate::{Command, HandlerResult};
use async_trait::async_trait;
use dcb_core::EventReader;
use futures_util::future::BoxFuture;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// Decides what a command does.
///
/// The handler gets the command and a read view of the store that goes through the command's
/// session (on PostgreSQL: the session's single pooled connection). It builds its decision
/// model with [`EventReaderExt::project`](dcb_core::EventReaderExt::project) and returns the
/// events to append with the condition that protects the decision. It fails with
/// [`reject(error)`](crate::reject) for a business refusal, which the executor returns as
/// [`CommandError::Rejected`](crate::CommandError::Rejected), or with a store error (`?` on a
/// read), which the executor returns as the store error it is.
///
/// A handler may run more than once for one execution when a
/// [`RetryPolicy`](crate::RetryPolicy) retries conflicts, so it should only read through
/// `reader` and have no other side effects.
///
/// ```
/// use dcb_command::{reject, Command, CommandError, CommandExecutor, CommandHandler, Decision, HandlerResult};
/// use dcb_core::{EventReader, EventReaderExt, NewEvent, Query, QueryItem, StateProjector};
/// use dcb_memory::InMemoryEventStore;
/// use std::sync::Arc;
///
/// #[derive(serde::Serialize)]
/// struct DefineCourse { course_id: String }
///
/// #[derive(Debug, thiserror::Error)]
/// enum DefineError {
///     #[error("course {0} is already defined")]
///     AlreadyDefined(String),
/// }
///
/// struct DefineCourseHandler;
///
/// #[async_trait::async_trait]
/// impl CommandHandler<DefineCourse> for DefineCourseHandler {
///     type Error = DefineError;
///
///     async fn handle(
///         &self,
///         command: &Command<DefineCourse>,
///         reader: &dyn EventReader,
///     ) -> HandlerResult<DefineError> {
///         let id = &command.payload.course_id;
///         let course = Query::from(QueryItem::new().types(["CourseDefined"]).tag("course_id", id));
///         let model = reader.project(StateProjector::exists(course)).await?;
///         if model.states {
///             return Err(reject(DefineError::AlreadyDefined(id.clone())));
///         }
///         let event = NewEvent::builder("CourseDefined").tag("course_id", id).build()?;
///         Ok(Decision::append([event]).guarded_by(model.condition))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let executor = CommandExecutor::new(Arc::new(InMemoryEventStore::new()));
/// let define = || Command::new("DefineCourse", DefineCourse { course_id: "c1".into() });
/// executor.execute(define(), &DefineCourseHandler).await.expect("first definition");
/// match executor.execute(define(), &DefineCourseHandler).await {
///     Err(CommandError::Rejected(DefineError::AlreadyDefined(id))) => assert_eq!(id, "c1"),
///     other => panic!("expected a rejection, got {other:?}"),
/// }
/// # }
/// ```
#[async_trait]
pub trait CommandHandler<T>: Send + Sync
where
    T: Send + Sync,
{
    /// The handler's business error, returned to the caller as
    /// [`CommandError::Rejected`](crate::CommandError::Rejected).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads through `reader` and decides.
    async fn handle(
        &self,
        command: &Command<T>,
        reader: &dyn EventReader,
    ) -> HandlerResult<Self::Error>;
}

#[async_trait]
impl<T, H> CommandHandler<T> for Arc<H>
where
    T: Send + Sync,
    H: CommandHandler<T> + ?Sized,
{
    type Error = H::Error;

    async fn handle(
        &self,
        command: &Command<T>,
        reader: &dyn EventReader,
    ) -> HandlerResult<Self::Error> {
        (**self).handle(command, reader).await
    }
}

#[async_trait]
impl<T, H> CommandHandler<T> for Box<H>
where
    T: Send + Sync,
    H: CommandHandler<T> + ?Sized,
{
    type Error = H::Error;

    async fn handle(
        &self,
        command: &Command<T>,
        reader: &dyn EventReader,
    ) -> HandlerResult<Self::Error> {
        (**self).handle(command, reader).await
    }
}

/// A [`CommandHandler`] made from a closure; see [`handler_fn`].
pub struct HandlerFn<F, T, E> {
    f: F,
    _types: PhantomData<fn(&T) -> E>,
}

impl<F, T, E> fmt::Debug for HandlerFn<F, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

impl<F: Clone, T, E> Clone for HandlerFn<F, T, E> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _types: PhantomData,
        }
    }
}

/// Turns a closure into a [`CommandHandler`].
///
/// The closure gets the command and the session's reader and returns a boxed future; write it
/// as `|command, reader| Box::pin(async move { ... })`. The rejection type usually needs to be
/// named once, for instance in an `Ok::<_, HandlerError<MyError>>(...)` at the end; a handler
/// that never rejects ends with `Ok::<_, HandlerError>(...)`.
///
/// ```
/// use dcb_command::{handler_fn, Command, CommandExecutor, Decision, HandlerError};
/// use dcb_core::{EventReaderExt, NewEvent, Query, StateProjector};
/// use dcb_memory::InMemoryEventStore;
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let open_account = handler_fn(|command: &Command<String>, reader| {
///     Box::pin(async move {
///         let account = Query::tags([dcb_core::Tag::new("account_id", command.payload.as_str())]);
///         let model = reader.project(StateProjector::exists(account)).await?;
///         let event = NewEvent::builder("AccountOpened")
///             .tag("account_id", command.payload.as_str())
///             .build()?;
///         Ok::<_, HandlerError>(Decision::append([event]).guarded_by(model.condition))
///     })
/// });
///
/// let executor = CommandExecutor::new(Arc::new(InMemoryEventStore::new()));
/// let outcome = executor.execute(Command::new("OpenAccount", "a1".to_string()), &open_account).await?;
/// assert!(outcome.record.last_event.is_some());
/// # Ok(()) }
/// ```
pub fn handler_fn<T, E, F>(f: F) -> HandlerFn<F, T, E>
where
    F: for<'a> Fn(&'a Command<T>, &'a dyn EventReader) -> BoxFuture<'a, HandlerResult<E>>
        + Send
        + Sync,
{
    HandlerFn {
        f,
        _types: PhantomData,
    }
}

#[async_trait]
impl<T, E, F> CommandHandler<T> for HandlerFn<F, T, E>
where
    T: Send + Sync,
    E: std::error::Error + Send + Sync + 'static,
    F: for<'a> Fn(&'a Command<T>, &'a dyn EventReader) -> BoxFuture<'a, HandlerResult<E>>
        + Send
        + Sync,
{
    type Error = E;

    async fn handle(&self, command: &Command<T>, reader: &dyn EventReader) -> HandlerResult<E> {
        (self.f)(command, reader).await
    }
}
