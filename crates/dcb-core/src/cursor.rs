use serde::{Deserialize, Serialize};
use std::fmt;

/// The position of an event in the log.
///
/// Events are totally ordered by `(transaction_id, position)`: first by the id of the
/// transaction that wrote them, then by their position inside the store. Reads return events in
/// this order, and every "after cursor" bound is exclusive.
///
/// A cursor does not have to name an existing event: any value is a valid bound, which is how an
/// [`AppendCondition`](crate::AppendCondition) can say "nothing after this point".
///
/// ```
/// use dcb_core::Cursor;
/// let a = Cursor::new(10, 5);
/// let b = Cursor::new(11, 1);
/// assert!(a < b); // the transaction id decides first
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cursor {
    /// The id of the transaction that wrote the event (PostgreSQL `xid8`).
    pub transaction_id: u64,
    /// The event's position inside the store, unique and increasing within a transaction.
    pub position: i64,
}

impl Cursor {
    /// Creates a cursor from its two components.
    pub const fn new(transaction_id: u64, position: i64) -> Self {
        Self {
            transaction_id,
            position,
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.transaction_id, self.position)
    }
}
