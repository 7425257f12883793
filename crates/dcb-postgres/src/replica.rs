//! Settings of a store with hot standbys: where reads go by default, how far behind a standby
//! may be, and what a read does when no standby can serve it. See `docs/scale-out.md`.
use dcb_core::Error;
use std::time::Duration;

/// Where a read goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ReadFrom {
    /// The primary: fenced reads, exact and never behind (docs/design.md, "Fenced reads").
    #[default]
    Primary,
    /// A hot standby: horizon-filtered reads (`docs/scale-out.md`), gap-safe and sound for
    /// decisions, possibly behind the primary by the replication lag.
    Standby,
}

/// What a read routed to a standby does when no standby can serve it (unreachable, or lagging
/// beyond [`ReplicaConfig::max_lag`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum StandbyFallback {
    /// Read on the primary instead (a warning is logged): reads keep working, the primary
    /// carries their load.
    #[default]
    FallBackToPrimary,
    /// Fail with [`Error::Standby`]: the primary is never loaded by reads.
    Fail,
}

/// The standbys of a [`PostgresEventStore`](crate::PostgresEventStore) and how reads use them,
/// for [`connect_with_standbys`](crate::PostgresEventStore::connect_with_standbys).
///
/// Writes, conditions, command sessions, store sessions, handler checkpoints and everything
/// administrative always go to the primary. Reads (`query`, `query_stream`, `project`,
/// subscriptions, durable handlers' reads) go where [`default_read`](Self::default_read)
/// says, or where the store view says ([`on_standby`](crate::PostgresEventStore::on_standby),
/// [`on_primary`](crate::PostgresEventStore::on_primary)).
///
/// ```
/// use dcb_postgres::{ReadFrom, ReplicaConfig, StandbyFallback};
/// use std::time::Duration;
/// let replicas = ReplicaConfig::new(["postgres://app@standby-1/app", "postgres://app@standby-2/app"])
///     .default_read(ReadFrom::Standby)
///     .max_lag(Duration::from_secs(2))
///     .fallback(StandbyFallback::Fail);
/// assert!(replicas.validate().is_ok());
/// assert!(ReplicaConfig::new(Vec::<String>::new()).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Connection strings of the hot standbys (streaming replicas of the primary, with
    /// `hot_standby = on`). Reads are spread over the healthy ones in turn.
    pub standby_urls: Vec<String>,
    /// Where reads go unless a store view says otherwise. Default [`ReadFrom::Primary`]: a
    /// store with standbys reads on them only when asked to.
    pub default_read: ReadFrom,
    /// The largest replication lag a standby may have and still serve reads. Measured by the
    /// store (see [`lag_check_interval`](Self::lag_check_interval)) as the time since the
    /// primary's WAL first went beyond what the standby has replayed, so an idle primary does
    /// not make a standby look behind. Default 5 s.
    pub max_lag: Duration,
    /// What a standby read does when no standby can serve it. Default
    /// [`StandbyFallback::FallBackToPrimary`].
    pub fallback: StandbyFallback,
    /// How long a read that asked to see a write
    /// ([`seeing`](crate::PostgresEventStore::seeing)) waits for the standby to make it
    /// visible before it falls back or fails (per [`fallback`](Self::fallback)). Default 5 s.
    pub replay_wait_timeout: Duration,
    /// How long a standby's health (reachable, in recovery, lag) is trusted before the next
    /// read checks it again (one short query on the primary and one on the standby, at most
    /// once per interval per standby, not per read). Default 250 ms.
    pub lag_check_interval: Duration,
    /// Longest a connection attempt or a health check on a standby may take before the standby
    /// counts as unreachable. Default 2 s.
    pub connect_timeout: Duration,
    /// Size of each standby's connection pool. Default 16.
    pub pool_size: usize,
}

impl ReplicaConfig {
    /// Standbys at `urls`, with every other setting at its default.
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self {
            standby_urls: urls.into_iter().map(Into::into).collect(),
            default_read: ReadFrom::Primary,
            max_lag: Duration::from_secs(5),
            fallback: StandbyFallback::FallBackToPrimary,
            replay_wait_timeout: Duration::from_secs(5),
            lag_check_interval: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(2),
            pool_size: 16,
        }
    }

    /// Sets where reads go by default.
    pub fn default_read(mut self, value: ReadFrom) -> Self {
        self.default_read = value;
        self
    }

    /// Sets the largest lag a standby may have and still serve reads.
    pub fn max_lag(mut self, value: Duration) -> Self {
        self.max_lag = value;
        self
    }

    /// Sets what a standby read does when no standby can serve it.
    pub fn fallback(mut self, value: StandbyFallback) -> Self {
        self.fallback = value;
        self
    }

    /// Sets how long a read waits for a standby to show a write it asked to see.
    pub fn replay_wait_timeout(mut self, value: Duration) -> Self {
        self.replay_wait_timeout = value;
        self
    }

    /// Sets how long a standby's health check is trusted.
    pub fn lag_check_interval(mut self, value: Duration) -> Self {
        self.lag_check_interval = value;
        self
    }

    /// Sets the connect and health-check timeout of standbys.
    pub fn connect_timeout(mut self, value: Duration) -> Self {
        self.connect_timeout = value;
        self
    }

    /// Sets the size of each standby's pool.
    pub fn pool_size(mut self, value: usize) -> Self {
        self.pool_size = value;
        self
    }

    /// Checks every field, naming the first invalid one.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.to_string(),
            })
        };
        if self.standby_urls.is_empty() {
            return bad(
                "standby_urls",
                "at least one standby URL is needed (use `connect` for a store without standbys)",
            );
        }
        let ms = |d: Duration| d.as_millis();
        if ms(self.max_lag) == 0 || self.max_lag > Duration::from_secs(24 * 3600) {
            return bad("max_lag", "must be between 1 ms and 24 h");
        }
        if ms(self.replay_wait_timeout) == 0 || self.replay_wait_timeout > Duration::from_secs(3600)
        {
            return bad("replay_wait_timeout", "must be between 1 ms and 1 h");
        }
        if self.lag_check_interval > Duration::from_secs(60) {
            return bad("lag_check_interval", "must be at most 60 s");
        }
        if ms(self.connect_timeout) == 0 || self.connect_timeout > Duration::from_secs(600) {
            return bad("connect_timeout", "must be between 1 ms and 10 min");
        }
        if self.pool_size == 0 {
            return bad("pool_size", "must be at least 1");
        }
        Ok(())
    }
}
