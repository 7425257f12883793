use serde::{Deserialize, Serialize};
use std::fmt;

/// A key/value label on an event, such as `course_id = c1`.
///
/// Tags are what queries and append conditions select on. Keys and values are arbitrary
/// non-empty strings, stored and returned byte for byte; the few characters no backend can
/// represent are rejected by validation (see [`validate_events`](crate::validate_events)).
///
/// ```
/// use dcb_core::Tag;
/// let tag = Tag::new("course_id", "c1");
/// assert_eq!(tag.to_string(), "course_id:c1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tag {
    /// The tag's key. Must be non-empty and must not contain `:`.
    pub key: String,
    /// The tag's value. Must be non-empty; may contain any character but NUL.
    pub value: String,
}

impl Tag {
    /// Creates a tag. Nothing is checked here; stores validate tags before writing or reading.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key, self.value)
    }
}

impl<K: Into<String>, V: Into<String>> From<(K, V)> for Tag {
    fn from((key, value): (K, V)) -> Self {
        Tag::new(key, value)
    }
}
