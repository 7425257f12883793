use crate::Cursor;
use std::fmt;
use std::time::Duration;

/// The result type of every fallible crablet operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in crablet, one variant per way a caller would react.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input was rejected before anything was written or read. Fix the input.
    #[error("invalid input: {0}")]
    Validation(ValidationError),

    /// An append condition failed: an event matching it exists after its cursor. Nothing was
    /// written. Re-read the decision model and decide again.
    #[error("append condition failed: {0}")]
    Conflict(ConflictInfo),

    /// The backend failed (connection lost, SQL error, pool exhausted). Usually transient;
    /// whether anything was written is only unknown if `outcome_unknown` says so.
    #[error("storage error during {operation}: {message}")]
    Storage {
        /// The store operation that failed (`append`, `query`, ...).
        operation: &'static str,
        /// What went wrong.
        message: String,
        /// True when the failure happened while a commit was in flight, so the write may or may
        /// not have been applied.
        outcome_unknown: bool,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A stored event cannot be decoded (a tag without `:`, JSON serde_json cannot read, ...).
    /// crablet's appends never write such a row: it was written around the store, straight
    /// into its table (or, for JSON nested too deep, by a version without the depth check).
    /// Retrying does not help; repair or delete the row named by `cursor`.
    #[error(
        "stored event {cursor} (type {event_type:?}) cannot be read: {reason}; the row breaks \
         the storage format (this version's append never writes such a row): repair or delete it"
    )]
    CorruptEvent {
        /// The event's cursor: its row's `(transaction_id, position)`.
        cursor: Cursor,
        /// The event's type, or `<unreadable>` when the type itself cannot be decoded.
        event_type: String,
        /// The column that failed and why.
        reason: String,
    },

    /// A stored event does not decode into the typed event it was read as: its type is not one
    /// of the Rust type's, its payload or a tag does not fit, or no upcaster brings its schema
    /// version to the current one. Nothing is wrong with the store; fix the type, or register
    /// an upcaster ([`Upcasters`](crate::Upcasters)).
    #[error("{0}")]
    Decode(Box<crate::DecodeError>),

    /// The database schema is missing or at another version than this library expects.
    #[error("schema mismatch: {message}")]
    Schema {
        /// What was found and what to do about it.
        message: String,
    },

    /// The operation ran longer than its configured timeout and was cancelled; nothing was
    /// written.
    #[error("{operation} timed out after {timeout:?}; nothing was written")]
    Timeout {
        /// The store operation that timed out.
        operation: &'static str,
        /// The configured limit.
        timeout: Duration,
    },

    /// More projections ran at once than the configured maximum allows. Retry later or raise
    /// the limit.
    #[error("too many concurrent projections: the limit is {limit}")]
    TooManyProjections {
        /// The configured maximum.
        limit: usize,
    },

    /// A call inside a store session (PostgreSQL's `StoreSession`) that would break a
    /// guarantee, refused before anything was written by it; the session stays usable, and
    /// what it wrote before stays pending. Also a command commit whose
    /// [`TransactionWork`](crate::TransactionWork) the store cannot run (nothing written).
    /// The reason says what to do instead.
    #[error("{operation} refused in this session: {reason}")]
    Session {
        /// The session operation.
        operation: &'static str,
        /// Why, and how to order the session's work instead.
        reason: String,
    },

    /// The application's own work in a command's transaction
    /// ([`TransactionWork`](crate::TransactionWork)) failed: the transaction rolled back, so
    /// neither the events, nor the command record, nor the work's writes were committed.
    /// `source` is the work's own error (downcast it to get it back).
    #[error("the command's transaction work failed, so nothing was written: {source}")]
    TransactionWork {
        /// The work's error.
        source: crate::WorkError,
    },

    /// A read routed to a hot standby could not be served there (unreachable, lagging beyond
    /// the bound, or not showing a write it was asked to see in time) and was not allowed to
    /// fall back to the primary. Nothing was written; retry, or read on the primary.
    #[error("{0}")]
    Standby(crate::StandbyError),

    /// A configuration value is invalid.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid and what is accepted.
        reason: String,
    },
}

impl Error {
    /// True for [`Error::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict(_))
    }

    /// True for [`Error::Validation`].
    pub fn is_validation(&self) -> bool {
        matches!(self, Error::Validation(_))
    }

    /// The validation details, if this is a validation error.
    pub fn as_validation(&self) -> Option<&ValidationError> {
        match self {
            Error::Validation(v) => Some(v),
            _ => None,
        }
    }

    /// Builds a storage error.
    pub fn storage(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Storage {
            operation,
            message: source.to_string(),
            outcome_unknown: false,
            source: Some(Box::new(source)),
        }
    }
}

/// What kind of input problem a [`ValidationError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ValidationKind {
    /// An event type or query type is empty.
    EmptyEventType,
    /// An event type is longer than [`MAX_EVENT_TYPE_LEN`](crate::MAX_EVENT_TYPE_LEN) characters.
    EventTypeTooLong,
    /// A tag key is empty.
    EmptyTagKey,
    /// A tag value is empty.
    EmptyTagValue,
    /// A tag key contains `:`, which the storage format reserves as the key/value separator.
    ReservedCharacter,
    /// A string contains NUL (`\0`, `\u0000`), which PostgreSQL text and jsonb cannot store.
    NulCharacter,
    /// JSON data or metadata nests arrays and objects deeper than
    /// [`MAX_JSON_DEPTH`](crate::MAX_JSON_DEPTH) levels.
    JsonTooDeep,
    /// An event carries the same tag (key and value) twice. Tags are a set: one key may carry
    /// several values, each pair is given once.
    DuplicateTag,
    /// An append without events.
    EmptyAppend,
    /// An append with more events than the configured maximum batch size.
    BatchTooLarge,
    /// A query without items where one is required, or
    /// [`QueryItem::of_kinds`](crate::QueryItem::of_kinds) without kinds.
    EmptyQuery,
    /// A value could not be serialized to or deserialized from JSON.
    NotSerializable,
    /// A float to serialize is NaN or infinite, which JSON cannot represent (serde_json
    /// would write `null`, which does not read back as the float).
    NonFiniteFloat,
    /// A read option is out of range.
    InvalidReadOption,
}

/// Details of rejected input: which field, what kind of problem, and a readable explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Path of the offending field, such as `events[2].tags[0].key`.
    pub field: String,
    /// The kind of problem.
    pub kind: ValidationKind,
    /// A readable explanation including what is accepted.
    pub message: String,
}

impl ValidationError {
    /// Creates a validation error.
    pub fn new(field: impl Into<String>, kind: ValidationKind, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// What is known about a failed append condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictInfo {
    /// A matching event found after the condition's cursor, when the backend reports it.
    pub conflicting: Option<Cursor>,
    /// The condition's `after` cursor.
    pub after: Option<Cursor>,
    /// In a multi-command append ([`EventStore::append_batch`](crate::EventStore::append_batch)):
    /// the index of the first command whose condition failed.
    pub command: Option<usize>,
    /// In a multi-command append: the earlier command of the same batch whose events match
    /// the failed condition, when that is why it failed.
    pub earlier_command: Option<usize>,
}

impl ConflictInfo {
    /// A conflict of a single append: `conflicting` found after `after`.
    pub fn new(conflicting: Option<Cursor>, after: Option<Cursor>) -> Self {
        Self {
            conflicting,
            after,
            command: None,
            earlier_command: None,
        }
    }

    /// The same conflict, attributed to command `index` of a multi-command append.
    pub fn in_command(mut self, index: usize) -> Self {
        self.command = Some(index);
        self
    }
}

impl fmt::Display for ConflictInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let after = match self.after {
            Some(c) => format!("after {c}"),
            None => "in the whole log".to_string(),
        };
        if let Some(index) = self.command {
            write!(f, "command {index} of the batch: ")?;
            if let Some(earlier) = self.earlier_command {
                return write!(
                    f,
                    "its condition matches events of command {earlier} of the same batch \
                     (the commands take effect in order)"
                );
            }
        }
        match self.conflicting {
            Some(c) => write!(f, "event {c} matches the condition's query {after}"),
            None => write!(
                f,
                "an event matching the condition's query exists {after} (or a concurrent append serialized before this one)"
            ),
        }
    }
}
