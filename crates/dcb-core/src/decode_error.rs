use crate::Cursor;
use std::fmt;

/// Why a stored event does not decode into a typed event ([`DomainEvent`](crate::DomainEvent)).
///
/// Carried by [`Error::Decode`](crate::Error::Decode) with the event's cursor, its stored type
/// and the Rust type it was decoded into.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// The event's type (after renames by the upcasters) is none of the Rust type's event types.
    UnknownType {
        /// The event types the Rust type decodes.
        expected: Vec<String>,
    },
    /// The payload does not deserialize into the event's fields.
    Payload {
        /// What serde reported.
        reason: String,
    },
    /// A tag field's key is missing on the event.
    MissingTag {
        /// The tag key.
        key: String,
    },
    /// A single-valued tag field's key carries several values on the event.
    SeveralTagValues {
        /// The tag key.
        key: String,
    },
    /// A tag value does not parse into the field's type.
    BadTag {
        /// The tag key.
        key: String,
        /// The stored value.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The event's metadata carries a `schema_version` that is not a positive integer.
    BadVersion {
        /// What the metadata holds.
        found: String,
    },
    /// The event was stored at an older schema version and no upcaster turns it into the next.
    MissingUpcaster {
        /// The version of the stored payload (after the upcasters that did apply).
        from: u32,
        /// The version the Rust type reads.
        current: u32,
    },
    /// The event was stored at a newer schema version than this build knows.
    NewerVersion {
        /// The stored version.
        found: u32,
        /// The newest version this build reads.
        current: u32,
    },
    /// The upcasters brought a payload stored at an older or the current version past the
    /// version the Rust type reads: a step (which always yields the next version) registered
    /// where a version-keeping [`Upcasters::rename_with`](crate::Upcasters::rename_with) was
    /// meant, or versions numbered anew after a rename.
    UpcastPastCurrent {
        /// The version the event was stored at.
        stored: u32,
        /// The version the upcasters brought it to.
        reached: u32,
        /// The version the Rust type reads.
        current: u32,
    },
    /// The reshaping of a [`rename_with`](crate::Upcasters::rename_with) failed.
    Reshape {
        /// The old event type.
        old: String,
        /// The event type it is read as.
        current: String,
        /// What the reshaping reported.
        reason: String,
    },
    /// An upcaster failed.
    Upcast {
        /// The version the failed upcaster started from.
        from: u32,
        /// What the upcaster reported.
        reason: String,
    },
    /// The upcasters rename or step in a circle.
    UpcastCycle,
}

impl fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownType { expected } => {
                write!(f, "the type is none of {}", expected.join(", "))
            }
            Self::Payload { reason } => write!(f, "the payload does not deserialize: {reason}"),
            Self::MissingTag { key } => write!(f, "it carries no tag with key {key:?}"),
            Self::SeveralTagValues { key } => write!(
                f,
                "it carries several values for the tag key {key:?}; the field takes one (use a Vec)"
            ),
            Self::BadTag { key, value, reason } => {
                write!(f, "its tag {key}:{value} does not parse: {reason}")
            }
            Self::BadVersion { found } => write!(
                f,
                "its metadata's schema_version is {found}, not a positive integer"
            ),
            Self::MissingUpcaster { from, current } => write!(
                f,
                "it is at schema version {from}, this build reads version {current}, and no \
                 upcaster is registered from version {from}"
            ),
            Self::NewerVersion { found, current } => write!(
                f,
                "it is at schema version {found}, newer than version {current} this build reads: \
                 deploy the newer code"
            ),
            Self::UpcastPastCurrent {
                stored,
                reached,
                current,
            } => write!(
                f,
                "it was stored at schema version {stored}, and the upcasters bring it to \
                 version {reached}, past version {current} this build reads: every step yields \
                 the next version (reshape a renamed type's payload with Upcasters::rename_with, \
                 which keeps the version)"
            ),
            Self::Reshape {
                old,
                current,
                reason,
            } => write!(
                f,
                "reshaping its payload from {old:?} to {current:?} failed: {reason}"
            ),
            Self::Upcast { from, reason } => {
                write!(f, "the upcaster from version {from} failed: {reason}")
            }
            Self::UpcastCycle => write!(f, "the upcasters rename or step in a circle"),
        }
    }
}

/// A stored event that does not decode into a typed event.
///
/// ```
/// use dcb_core::{Cursor, DecodeError, DecodeErrorKind};
/// let err = DecodeError {
///     cursor: Cursor::new(7, 0),
///     event_type: "CourseDefined".into(),
///     target: "my_app::CourseEvent",
///     kind: DecodeErrorKind::MissingTag { key: "course_id".into() },
/// };
/// assert!(err.to_string().contains("CourseDefined"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The event's cursor.
    pub cursor: Cursor,
    /// The event's stored type.
    pub event_type: String,
    /// The Rust type it was decoded into.
    pub target: &'static str,
    /// What went wrong.
    pub kind: DecodeErrorKind,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event {} of type {:?} does not decode into {}: {}",
            self.cursor, self.event_type, self.target, self.kind
        )
    }
}

impl std::error::Error for DecodeError {}
