use dcb_core::{ConflictInfo, DecodeError, ValidationError, WorkError};

/// Why [`CommandExecutor::execute`](crate::CommandExecutor::execute) failed. Nothing was
/// written, neither events nor the command record, unless the error is a
/// [`Store`](Self::Store) error whose `outcome_unknown` is true.
///
/// `E` is the handler's own error type; the handler's business errors come back unchanged as
/// [`Rejected`](Self::Rejected).
///
/// ```
/// use dcb_command::CommandError;
/// use dcb_core::ConflictInfo;
///
/// let err: CommandError<std::io::Error> = CommandError::Conflict {
///     attempts: 3,
///     conflict: ConflictInfo::new(None, None),
/// };
/// assert!(err.is_conflict());
/// assert_eq!(err.attempts(), Some(3));
/// assert!(err.to_string().starts_with("append condition failed after 3 attempts"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The handler rejected the command for a reason of its own (a business rule), with
    /// [`reject`](crate::reject). Displays as, and has the source of, the handler's error.
    ///
    /// Store errors raised inside the handler (`?` on a read) are never reported here: they
    /// come back as [`Store`](Self::Store), [`Validation`](Self::Validation),
    /// [`Decode`](Self::Decode) or, after the retries, [`Conflict`](Self::Conflict).
    #[error(transparent)]
    Rejected(E),

    /// The decision's append condition failed on the last attempt: an event matching it was
    /// appended after the handler's read. `attempts` counts the handler runs of this execution
    /// (1 unless a [`RetryPolicy`](crate::RetryPolicy) retried).
    #[error("append condition failed after {attempts} attempt{}: {conflict}", if *.attempts == 1 { "" } else { "s" })]
    Conflict {
        /// How many times the handler ran and its decision was tried.
        attempts: u32,
        /// What the store reported about the conflict.
        conflict: ConflictInfo,
    },

    /// The command or the events it decided on are invalid (an empty or too long type, a NUL
    /// character, a payload that does not serialize, a duplicate tag key, ...).
    #[error("invalid command: {0}")]
    Validation(ValidationError),

    /// A stored event the handler read does not decode into the typed event it was read as
    /// (its payload or a tag does not fit, no upcaster brings its version to the current
    /// one): a data or schema problem, not a failure of the store, and retrying does not help.
    /// Fix the type or register an upcaster ([`dcb_core::Upcasters`]).
    #[error("the command's read found an event that does not decode: {0}")]
    Decode(Box<DecodeError>),

    /// The application's own work in the commit's transaction
    /// ([`Decision::in_transaction`](crate::Decision::in_transaction)) failed, so the
    /// transaction rolled back: neither the events, nor the command record, nor the work's
    /// writes were committed. Holds the work's own error; downcast it to get it back. Not
    /// retried: the handler decided, the work refused.
    #[error("the command's transaction work failed, so nothing was written: {0}")]
    TransactionWork(WorkError),

    /// The store failed (connection lost, pool exhausted, timeout, SQL error, ...). See
    /// [`dcb_core::Error`]: `Storage { outcome_unknown: true, .. }` means the commit may have
    /// been applied; executing again with the same idempotency id resolves that safely.
    #[error(transparent)]
    Store(dcb_core::Error),
}

impl<E> CommandError<E> {
    /// True for [`CommandError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, CommandError::Conflict { .. })
    }

    /// True for [`CommandError::Rejected`].
    pub fn is_rejected(&self) -> bool {
        matches!(self, CommandError::Rejected(_))
    }

    /// The number of attempts, for [`CommandError::Conflict`].
    pub fn attempts(&self) -> Option<u32> {
        match self {
            CommandError::Conflict { attempts, .. } => Some(*attempts),
            _ => None,
        }
    }

    /// The handler's error, for [`CommandError::Rejected`].
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(err) => Some(err),
            _ => None,
        }
    }

    /// The handler's error, for [`CommandError::Rejected`]; otherwise gives `self` back.
    pub fn into_rejection(self) -> Result<E, Self> {
        match self {
            CommandError::Rejected(err) => Ok(err),
            other => Err(other),
        }
    }

    /// The validation details, for [`CommandError::Validation`].
    pub fn as_validation(&self) -> Option<&ValidationError> {
        match self {
            CommandError::Validation(v) => Some(v),
            _ => None,
        }
    }

    /// The decoding failure, for [`CommandError::Decode`].
    pub fn as_decode(&self) -> Option<&DecodeError> {
        match self {
            CommandError::Decode(err) => Some(err),
            _ => None,
        }
    }

    /// Maps a store error raised after `attempts` handler runs onto the command error kinds.
    pub(crate) fn from_store(err: dcb_core::Error, attempts: u32) -> Self {
        match err {
            dcb_core::Error::Validation(v) => CommandError::Validation(v),
            dcb_core::Error::Conflict(conflict) => CommandError::Conflict { attempts, conflict },
            dcb_core::Error::Decode(err) => CommandError::Decode(err),
            dcb_core::Error::TransactionWork { source } => CommandError::TransactionWork(source),
            other => CommandError::Store(other),
        }
    }
}
