use crate::Cursor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::SystemTime;

/// A command to record in the audit trail together with the events it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewCommand {
    /// The command type, such as `TransferMoney`.
    pub command_type: String,
    /// The command's JSON payload.
    pub data: Value,
    /// JSON metadata: request id, user, ...
    pub metadata: Option<Value>,
    /// An idempotency key: a second command with the same id writes nothing and gets the first
    /// one's outcome.
    pub id: Option<String>,
}

/// A recorded command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// The idempotency key, if the command had one.
    pub id: Option<String>,
    /// The command type.
    pub command_type: String,
    /// The command's JSON payload.
    pub data: Value,
    /// The command's JSON metadata.
    pub metadata: Option<Value>,
    /// The transaction that wrote the command and its events.
    pub transaction_id: u64,
    /// The cursor of the last event the command appended, if it appended any.
    pub last_event: Option<Cursor>,
    /// When the command was recorded.
    pub occurred_at: SystemTime,
}

/// Which recorded commands to list.
///
/// ```
/// let filter = dcb_core::CommandFilter::default().command_type("TransferMoney").limit(50);
/// assert_eq!(filter.limit, Some(50));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandFilter {
    /// Only commands of this type.
    pub command_type: Option<String>,
    /// Only commands recorded at or after this time.
    pub from: Option<SystemTime>,
    /// Only commands recorded before this time.
    pub to: Option<SystemTime>,
    /// At most this many commands.
    pub limit: Option<usize>,
}

impl CommandFilter {
    /// Keeps only commands of `command_type`.
    pub fn command_type(mut self, command_type: impl Into<String>) -> Self {
        self.command_type = Some(command_type.into());
        self
    }

    /// Keeps only commands recorded in `[from, to)`.
    pub fn between(mut self, from: SystemTime, to: SystemTime) -> Self {
        self.from = Some(from);
        self.to = Some(to);
        self
    }

    /// Returns at most `limit` commands.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// The outcome of [`CommandSession::commit`](crate::CommandSession::commit).
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// The events and the command record were written in one transaction.
    Committed(CommandRecord),
    /// A command with the same id was recorded before; nothing was written. Holds the original.
    Duplicate(CommandRecord),
}
