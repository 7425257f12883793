use crate::{Cursor, Query};
use serde::{Deserialize, Serialize};

/// The guard of a conditional append: fail, writing nothing, if any event matching
/// `fail_if_events_match` exists strictly after `after` (or at all, when `after` is `None`).
///
/// [`EventReaderExt::project`](crate::EventReaderExt::project) returns the condition that
/// protects a decision; you can also build one yourself, and `after` may be any cursor, also one
/// past the last matching event.
///
/// ```
/// use dcb_core::{AppendCondition, Cursor, Query, QueryItem};
/// let condition = AppendCondition::new(Query::from(QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1")))
///     .with_after(Some(Cursor::new(42, 7)));
/// assert_eq!(condition.after, Some(Cursor::new(42, 7)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendCondition {
    /// Events that, if present after `after`, make the append fail.
    pub fail_if_events_match: Query,
    /// The exclusive lower bound of the check; `None` checks the whole log.
    pub after: Option<Cursor>,
}

impl AppendCondition {
    /// The same condition with its query simplified ([`Query::simplified`]): fewer items mean
    /// fewer probes and lock keys, and the condition fails for exactly the same events.
    pub fn simplified(&self) -> Self {
        Self {
            fail_if_events_match: self.fail_if_events_match.simplified(),
            after: self.after,
        }
    }

    /// A condition that fails if any event matching `query` exists at all.
    pub fn new(query: Query) -> Self {
        Self {
            fail_if_events_match: query,
            after: None,
        }
    }

    /// Sets the exclusive lower bound of the check.
    pub fn with_after(mut self, after: Option<Cursor>) -> Self {
        self.after = after;
        self
    }
}
