use dcb_core::Error;
use std::time::Duration;

/// Transaction isolation level of a store operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum IsolationLevel {
    /// PostgreSQL's default; every statement sees what committed before it started.
    #[default]
    ReadCommitted,
    /// One snapshot for the whole transaction.
    RepeatableRead,
    /// Repeatable read plus serializable snapshot isolation checks.
    Serializable,
}

impl IsolationLevel {
    pub(crate) fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

/// Settings of a [`PostgresEventStore`](crate::PostgresEventStore), mirroring go-crablet's
/// `EventStoreConfig`. Every field takes effect; [`StoreConfig::validate`] rejects invalid
/// values when the store is built.
///
/// ```
/// use dcb_postgres::StoreConfig;
/// use std::time::Duration;
/// let config = StoreConfig::default()
///     .schema("billing")
///     .append_timeout(Duration::from_secs(2));
/// assert!(config.validate().is_ok());
/// assert!(StoreConfig::default().schema("").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The PostgreSQL schema holding the store's tables, so several stores can share one
    /// database without seeing each other. Default `public`.
    pub schema: String,
    /// The most events one append may carry. Default 1000.
    pub max_batch_size: usize,
    /// Isolation of append transactions. Default `ReadCommitted`, the fastest: one round trip.
    /// Under `RepeatableRead` and `Serializable` a conditional append takes its locks at session
    /// level in a transaction of its own before the checking transaction takes its snapshot
    /// (one round trip more), and a transaction that fails to serialize is run again (it wrote
    /// nothing), so neither level reports false conflicts. See docs/design.md.
    pub append_isolation: IsolationLevel,
    /// Isolation of the read transaction behind streams and reads. Default `ReadCommitted`.
    /// Reads are pinned to a fenced snapshot either way (docs/design.md); a stricter level adds
    /// its own guarantees for the read transaction.
    pub read_isolation: IsolationLevel,
    /// Longest an append may wait for locks, enforced by the server (`lock_timeout`): past it
    /// the append fails with `Error::Timeout` and certainly wrote nothing. The client waits at
    /// most this long again (at least 250 ms, at most 2 s) for the server's answer; past that
    /// the connection is closed and the error says the outcome is unknown. Default 10 s. Also
    /// the `lock_timeout` of the sessions a store opens with `connect` (which run without a
    /// `statement_timeout`).
    pub append_timeout: Duration,
    /// Longest a read may take, lock waits included; for streams, each fetch of
    /// `stream_buffer` rows. Past it the read fails with `Error::Timeout` and its connection is
    /// closed. Default 30 s.
    pub query_timeout: Duration,
    /// Rows fetched per round trip by streams. Fetched batches are handed to the consumer whole
    /// while the next one is fetched, so at most three batches are in memory per stream.
    /// Default 1000.
    pub stream_buffer: usize,
    /// How many projections may run at once before `project` fails with
    /// `TooManyProjections`. Default 256.
    pub max_concurrent_projections: usize,
    /// Size of the connection pool when the store builds it from a URL. Default 16.
    pub pool_size: usize,
    /// Whether [`PostgresEventStore::connect`](crate::PostgresEventStore::connect) runs the
    /// migrations before checking the schema version. Default `false`.
    pub auto_migrate: bool,
    /// Whether appends wake subscribers in *other* processes with a PostgreSQL NOTIFY on the
    /// channel `crablet_<schema>`, sent after the commit by a background task (never inside the
    /// append transaction). Subscribers of the same store instance are woken in process either
    /// way, and every subscriber also polls. Default `true`.
    pub notify_on_append: bool,
    /// Least time between two of those notifications from one store instance: the first append
    /// after a quiet period notifies at once, later ones within the interval are coalesced into
    /// one notification at its end. Bounds what NOTIFY costs the database under load. Default
    /// 10 ms.
    pub notify_interval: Duration,
    /// The most advisory lock keys one append or one read takes one by one. An append whose
    /// events yield more distinct keys (about two per tag) takes one exclusive escalation key
    /// instead, which waits for, and holds up, every concurrent read and conditional append of
    /// this store and every other escalated append; a read or condition with more keys locks
    /// the whole log. Default 48. Raising it lets large batches and queries run beside
    /// unrelated decisions, at the price of that many entries in PostgreSQL's shared lock table
    /// per transaction (sized `max_locks_per_transaction` × `max_connections`): raise
    /// `max_locks_per_transaction` with it. Processes with different values can share a store.
    pub max_lock_keys: usize,
    /// The most `append`/`append_if` calls one shared transaction may carry (group commit).
    /// Concurrent calls on one store are coalesced: a group is whatever queued while the
    /// previous flush was in flight, so a lone caller never waits for company. Each call keeps
    /// its own outcome (cursor, conflict, timeout); the calls of a group take effect in their
    /// queue order, and a call whose condition matches events of an earlier call of the same
    /// group goes to the next group, so it conflicts exactly as if they had run one after the
    /// other. `1` turns group commit off: every append is its own transaction. Appends of
    /// command sessions never join a group. Default 32.
    pub group_commit_max: usize,
    /// How many groups may be in flight at once, each on its own pooled connection (no more
    /// than the pool's size are ever used). One flusher runs while calls are queued; another
    /// starts only while a full group (`group_commit_max` calls) waits, so groups grow with the
    /// load instead of splitting it. Default 4. Independently of this bound, when queued calls
    /// see no group make progress for 20 ms (one is stuck on a lock), another flusher starts, up
    /// to the pool's size: a stuck group never holds up appends of other boundaries.
    pub group_commit_flushers: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            schema: "public".into(),
            max_batch_size: 1000,
            append_isolation: IsolationLevel::ReadCommitted,
            read_isolation: IsolationLevel::ReadCommitted,
            append_timeout: Duration::from_secs(10),
            query_timeout: Duration::from_secs(30),
            stream_buffer: 1000,
            max_concurrent_projections: 256,
            pool_size: 16,
            auto_migrate: false,
            notify_on_append: true,
            notify_interval: Duration::from_millis(10),
            max_lock_keys: 48,
            group_commit_max: 32,
            group_commit_flushers: 4,
        }
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl StoreConfig {
    /// Sets the schema.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
    setter!(/// Sets the maximum batch size.
        max_batch_size: usize);
    setter!(/// Sets the isolation of appends.
        append_isolation: IsolationLevel);
    setter!(/// Sets the isolation of reads.
        read_isolation: IsolationLevel);
    setter!(/// Sets the append timeout.
        append_timeout: Duration);
    setter!(/// Sets the query timeout.
        query_timeout: Duration);
    setter!(/// Sets the stream buffer.
        stream_buffer: usize);
    setter!(/// Sets the limit on concurrent projections.
        max_concurrent_projections: usize);
    setter!(/// Sets the pool size used when building the pool from a URL.
        pool_size: usize);
    setter!(/// Sets whether `connect` runs the migrations.
        auto_migrate: bool);
    setter!(/// Sets whether appends send a NOTIFY for subscribers in other processes.
        notify_on_append: bool);
    setter!(/// Sets the least time between two notifications of one store instance.
        notify_interval: Duration);
    setter!(/// Sets the most lock keys one operation takes before it escalates.
        max_lock_keys: usize);
    setter!(/// Sets the most appends one group commit carries (`1`: off).
        group_commit_max: usize);
    setter!(/// Sets how many group commits may be in flight at once.
        group_commit_flushers: usize);

    /// Checks every field, naming the first invalid one.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.to_string(),
            })
        };
        if self.schema.is_empty() || self.schema.len() > 63 {
            return bad("schema", "must be 1 to 63 bytes long");
        }
        if self.schema.contains('\0') {
            return bad("schema", "must not contain NUL");
        }
        if self.max_batch_size == 0 || self.max_batch_size > 100_000 {
            return bad("max_batch_size", "must be between 1 and 100000");
        }
        if self.append_timeout.is_zero() || self.append_timeout > Duration::from_secs(24 * 3600) {
            return bad("append_timeout", "must be between 1 ms and 24 h");
        }
        if self.query_timeout.is_zero() || self.query_timeout > Duration::from_secs(24 * 3600) {
            return bad("query_timeout", "must be between 1 ms and 24 h");
        }
        if self.append_timeout.as_millis() == 0 || self.query_timeout.as_millis() == 0 {
            return bad("append_timeout", "timeouts must be at least 1 ms");
        }
        if self.stream_buffer == 0 || self.stream_buffer > 1_000_000 {
            return bad("stream_buffer", "must be between 1 and 1000000");
        }
        if self.max_concurrent_projections == 0 {
            return bad("max_concurrent_projections", "must be at least 1");
        }
        if self.notify_interval > Duration::from_secs(60) {
            return bad("notify_interval", "must be at most 60 s");
        }
        if self.pool_size == 0 {
            return bad("pool_size", "must be at least 1");
        }
        if self.max_lock_keys == 0 || self.max_lock_keys > 10_000 {
            return bad("max_lock_keys", "must be between 1 and 10000");
        }
        if self.group_commit_max == 0 || self.group_commit_max > 10_000 {
            return bad(
                "group_commit_max",
                "must be between 1 (group commit off) and 10000",
            );
        }
        if self.group_commit_flushers == 0 || self.group_commit_flushers > 1000 {
            return bad("group_commit_flushers", "must be between 1 and 1000");
        }
        Ok(())
    }

    /// The schema name as a quoted SQL identifier.
    pub(crate) fn quoted_schema(&self) -> String {
        format!("\"{}\"", self.schema.replace('"', "\"\""))
    }
}
