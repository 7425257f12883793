use std::convert::Infallible;

/// How a [`CommandHandler`](crate::CommandHandler) fails: it rejects the command for a
/// business reason of its own, or a store operation it ran failed.
///
/// The executor returns the first as [`CommandError::Rejected`](crate::CommandError::Rejected)
/// and the second as the store error it is ([`CommandError::Store`](crate::CommandError::Store),
/// `Validation` for invalid input, `Decode` for an event that does not decode), so a lost
/// connection is never mistaken for a refusal. A conflict (`?` on an `append_if` the handler
/// made itself) is retried like a conflict of the decision's own append.
/// `?` on a store result converts by itself; a rejection is written [`reject(error)`](reject).
///
/// ```
/// use dcb_command::{reject, Decision, HandlerError, HandlerResult};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("the course is full")]
/// struct CourseFull;
///
/// fn decide(seats_left: u32, read: dcb_core::Result<()>) -> HandlerResult<CourseFull> {
///     read?; // a store error stays a store error
///     if seats_left == 0 {
///         return Err(reject(CourseFull));
///     }
///     Ok(Decision::nothing())
/// }
///
/// assert!(matches!(decide(0, Ok(())), Err(HandlerError::Rejected(CourseFull))));
/// let lost = dcb_core::Error::storage("query", std::io::Error::other("connection reset"));
/// assert!(matches!(decide(3, Err(lost)), Err(HandlerError::Store(_))));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum HandlerError<E = Infallible> {
    /// The handler refused the command: a business rule, not a failure.
    #[error(transparent)]
    Rejected(E),
    /// A store operation inside the handler failed (a read, encoding an event, ...).
    #[error(transparent)]
    Store(dcb_core::Error),
}

impl<E> From<dcb_core::Error> for HandlerError<E> {
    fn from(err: dcb_core::Error) -> Self {
        HandlerError::Store(err)
    }
}

/// Rejects the command with the handler's business error `error`:
/// `return Err(reject(MyError::CourseFull))`.
pub fn reject<E>(error: E) -> HandlerError<E> {
    HandlerError::Rejected(error)
}

/// What a handler returns; `HandlerResult` alone is a handler that never rejects.
pub type HandlerResult<E = Infallible> = Result<crate::Decision, HandlerError<E>>;
