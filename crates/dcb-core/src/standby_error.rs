//! Why a read routed to a hot standby could not be served there.
use crate::Cursor;
use std::fmt;
use std::time::Duration;

/// What went wrong with a standby, in [`Error::Standby`](crate::Error::Standby).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StandbyProblem {
    /// No standby answered (connection refused, timed out, or not in recovery any more).
    Unreachable {
        /// The last failure seen, with the standby it came from.
        reason: String,
    },
    /// Every standby is further behind the primary than the configured bound.
    Lagging {
        /// The smallest lag seen.
        lag: Duration,
        /// The configured bound.
        max_lag: Duration,
    },
    /// The standby did not make `cursor` visible to its reads within `timeout`
    /// (read-your-writes).
    NotReplayed {
        /// The cursor the read asked to see (an append's result on the primary).
        cursor: Cursor,
        /// How long the read waited.
        timeout: Duration,
    },
}

/// A read that was routed to a standby and, under the `Fail` fallback policy (or when it
/// explicitly asked to see a write), could not be served there. Nothing was written; the
/// read can be repeated, or routed to the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyError {
    /// The store operation (`query`, `query_stream`, `handler_read`, `wait_for_standby`, ...).
    pub operation: &'static str,
    /// What went wrong.
    pub problem: StandbyProblem,
}

impl fmt::Display for StandbyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self.operation;
        match &self.problem {
            StandbyProblem::Unreachable { reason } => write!(
                f,
                "{op} on a standby: no standby is reachable ({reason}); route the read to the \
                 primary, or let reads fall back to it (StandbyFallback::FallBackToPrimary)"
            ),
            StandbyProblem::Lagging { lag, max_lag } => write!(
                f,
                "{op} on a standby: every standby lags the primary by more than {max_lag:?} \
                 (the least: {lag:?}); check replication (is replay paused? \
                 pg_is_wal_replay_paused()), raise max_lag, or fall back to the primary"
            ),
            StandbyProblem::NotReplayed { cursor, timeout } => write!(
                f,
                "{op} on a standby: cursor {cursor} did not become visible there within \
                 {timeout:?} (replay is behind, or a long transaction on the primary holds \
                 the standby's horizon back); read on the primary or wait longer"
            ),
        }
    }
}
