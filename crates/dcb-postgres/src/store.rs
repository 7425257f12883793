use crate::config::{IsolationLevel, StoreConfig};
use crate::conn::{db_error, db_error_with_timeout, Conn};
use crate::keys::{KeySpace, LockSet};
use crate::migrate;
use crate::sql;
use crate::xid8::Xid8;
use dcb_core::{
    validate_query, AppendCondition, CommandFilter, CommandRecord, ConflictInfo, Cursor, Error,
    Event, Limits, Query, ReadOptions, Tag,
};
use deadpool_postgres::Pool;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_postgres::Row;

/// For statements whose best plan depends on their values: reads with a limit or cursor
/// bounds, or with type-only items, and conditions with type-only items. Prepared statements
/// switch to a generic plan after five executions, and a generic plan cannot tell a rare type
/// or a recent cursor from a common type or an old one (measured in session 1: a generic probe
/// degenerated to a sequential scan, 0.2 ms → 1 s per check at 1 M events). Everything else is
/// written to be index-driven under any values and runs on `GENERIC_PLANS`.
const CUSTOM_PLANS: &str = "SET LOCAL plan_cache_mode = force_custom_plan";

/// JIT compilation costs milliseconds and pays off only for long analytical queries; crablet's
/// statements are short, but a generic plan's cost estimate can still cross `jit_above_cost`
/// (measured: a 0.08 ms condition check took 30 ms with JIT).
const NO_JIT: &str = "SET LOCAL jit = off";

/// Parallel workers take milliseconds to start; a generic plan's row estimate for a decision
/// read (thousands of rows for an unknown tag) was enough to launch two for a 51-row read
/// (measured 7.8 ms instead of 0.1 ms).
const NO_PARALLEL: &str = "SET LOCAL max_parallel_workers_per_gather = 0";

/// The simple-query text that opens one of crablet's transactions.
///
/// `timeout` bounds its lock waits on the server (`lock_timeout`); the client bounds the rest.
/// No `statement_timeout`: its timer can fire in the instant a statement ends and be reported
/// later, unasked, as the error of another statement (see conn.rs), while a lock timeout is
/// always reported within the statement that waited.
fn begin(isolation: IsolationLevel, access: &str, timeout: Duration, settings: &[&str]) -> String {
    let mut sql = format!(
        "BEGIN ISOLATION LEVEL {}{access}; SET LOCAL statement_timeout = 0; \
         SET LOCAL lock_timeout = '{}ms'; {NO_JIT}; {NO_PARALLEL}",
        isolation.sql(),
        timeout.as_millis()
    );
    for setting in settings {
        sql.push_str("; ");
        sql.push_str(setting);
    }
    sql
}

/// For statements written to be index-driven under any parameter values.
const GENERIC_PLANS: &str = "SET LOCAL plan_cache_mode = force_generic_plan";

/// Append transactions only probe through indexes: on a small (or newly attached) table a
/// plan might otherwise scan it, which under SERIALIZABLE also takes a lock on the whole
/// relation and fails concurrent appends of unrelated boundaries.
pub(crate) const NO_SEQ_SCANS: &str = "SET LOCAL enable_seqscan = off";

/// Restores a fence snapshot taken by `fence_alone` in the read's own transaction.
pub(crate) const SET_FENCE: &str = "SELECT set_config('crablet.fence', $1, true)";

/// How many times a SERIALIZABLE read that failed to serialize is run again.
const READ_RETRIES: usize = 8;

/// The `xmax` of a snapshot in PostgreSQL's text form `xmin:xmax:xip,...`.
pub(crate) fn snapshot_xmax(snapshot: &str) -> Result<u64, Error> {
    snapshot
        .split(':')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| corrupt(format!("unexpected snapshot {snapshot:?} from fence()")))
}

/// crablet's event store on PostgreSQL. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PostgresEventStore {
    pub(crate) inner: Arc<Inner>,
    /// Where this view's reads go (see `standby.rs`).
    pub(crate) route: crate::standby::Route,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) config: StoreConfig,
    pub(crate) schema: String,
    pub(crate) keys: KeySpace,
    pub(crate) projections: Arc<Semaphore>,
    begin_append: String,
    /// `begin_append` for conditions with a type-only item: how selective a type is and how
    /// recent the cursor is decide between the type index and the primary key, and only a
    /// plan made with the values knows.
    begin_append_custom: String,
    /// A READ COMMITTED, read-only transaction bounded by `query_timeout`: fences of reads
    /// under stricter isolation, and the commands audit query.
    begin_short_read: String,
    begin_read: String,
    /// `begin_read` for match-all reads: every row qualifies, so the primary key's order is the
    /// plan; unhindered, the planner sorted the whole log instead (no first row before the
    /// sort finished, temporary files; measured 474 ms vs 232 ms at 1 M events).
    begin_read_all: String,
    /// `begin_read` for reads whose every item has a tag, without a limit or cursor bounds (a
    /// decision's read): the tag index drives them under any values, so they run on cached
    /// generic plans instead of being planned per call. (A bound would tempt a generic plan
    /// into ANDing a primary-key range estimated at a third of the table.)
    begin_read_tagged: String,
    pub(crate) fence_sql: String,
    /// Takes an append's advisory locks, in its own statement before the checking insert.
    pub(crate) lock_sql: String,
    /// Takes an append's locks at session level, for checks under REPEATABLE READ or
    /// SERIALIZABLE (append.rs), in the transaction `begin_session_lock` opens.
    pub(crate) session_lock_sql: String,
    pub(crate) begin_session_lock: String,
    /// Releases what `session_lock_sql` took.
    pub(crate) session_unlock_sql: String,
    /// The pool's sessions run with `lock_timeout = append_timeout` (set by `connect`), so an
    /// unconditional append can be one autocommit statement with no transaction around it.
    pub(crate) session_timeout: bool,
    /// Wake-ups for subscriptions and handler runners (see `notify.rs`).
    pub(crate) changes: crate::notify::Changes,
    /// Group commit's queue (see `group.rs`).
    pub(crate) groups: crate::group_queue::Groups,
    /// The hot standbys reads may run on (`connect_with_standbys`).
    pub(crate) standbys: Option<crate::standby::Standbys>,
    /// The partitions ahead of the log, when it is partitioned (see `partition_ahead.rs`).
    pub(crate) ahead: crate::partition_ahead::Ahead,
}

impl fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("config", &self.inner.config)
            .field("replicas", &self.inner.standbys.as_ref().map(|s| &s.config))
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl PostgresEventStore {
    /// Connects to `url` with a pool of `config.pool_size` connections, runs the migrations if
    /// `config.auto_migrate`, and checks the schema version.
    #[tracing::instrument(name = "pg.connect", skip_all, fields(schema = %config.schema))]
    pub async fn connect(url: &str, config: StoreConfig) -> Result<Self, Error> {
        Self::connect_to(url, config, None).await
    }

    /// [`connect`](Self::connect) to the primary at `url`, with the hot standbys of
    /// `replicas` for reads (see [`ReplicaConfig`](crate::ReplicaConfig) and
    /// `docs/scale-out.md`). Writes, conditions and sessions go to the primary; reads go where
    /// [`ReplicaConfig::default_read`](crate::ReplicaConfig::default_read) or the view
    /// ([`on_standby`](Self::on_standby), [`on_primary`](Self::on_primary)) says. No
    /// connection to a standby is opened here: a standby that is down makes reads fall back or
    /// fail, not the store's start.
    ///
    /// ```no_run
    /// use dcb_postgres::{PostgresEventStore, ReadFrom, ReplicaConfig, StoreConfig};
    /// # async fn demo() -> dcb_core::Result<()> {
    /// let store = PostgresEventStore::connect_with_standbys(
    ///     "postgres://app@primary/app",
    ///     StoreConfig::default().schema("shop"),
    ///     ReplicaConfig::new(["postgres://app@standby-1/app"]).default_read(ReadFrom::Standby),
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "pg.connect_with_standbys", skip_all, fields(schema = %config.schema, standbys = replicas.standby_urls.len()))]
    pub async fn connect_with_standbys(
        url: &str,
        config: StoreConfig,
        replicas: crate::ReplicaConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let standbys = crate::standby::Standbys::new(replicas, config.query_timeout)?;
        Self::connect_to(url, config, Some(standbys)).await
    }

    async fn connect_to(
        url: &str,
        config: StoreConfig,
        standbys: Option<crate::standby::Standbys>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let pg_config: tokio_postgres::Config = url.parse().map_err(|e| Error::Config {
            field: "url",
            reason: format!("not a valid PostgreSQL connection string: {e}"),
        })?;
        let listen_config = pg_config.clone();
        // The default lock timeout of the store's own sessions is the append timeout: an
        // unconditional append is then one autocommit statement. Everything else sets its own
        // timeouts in its transaction.
        let pool = crate::conn::session_pool(
            pg_config,
            config.append_timeout,
            config.pool_size,
            None,
            "pool_size",
        )?;
        let store = Self::build(pool, config, true, standbys).await?;
        store.inner.changes.set_listen_config(listen_config);
        Ok(store)
    }

    /// Uses an existing pool (its size wins over `config.pool_size`), runs the migrations if
    /// `config.auto_migrate`, and checks the schema version.
    ///
    /// The pool's sessions keep their settings: appends then always run in an explicit
    /// transaction that sets its own timeout (one statement more than on a store built by
    /// [`connect`](Self::connect)).
    pub async fn from_pool(pool: Pool, config: StoreConfig) -> Result<Self, Error> {
        Self::build(pool, config, false, None).await
    }

    async fn build(
        pool: Pool,
        config: StoreConfig,
        session_timeout: bool,
        standbys: Option<crate::standby::Standbys>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let session_timeout = session_timeout && session_settings_hold(&pool, &config).await?;
        let schema = config.quoted_schema();
        let inner = Inner {
            keys: KeySpace::new(&config.schema, config.max_lock_keys),
            projections: Arc::new(Semaphore::new(config.max_concurrent_projections)),
            // Generic plans here: the condition probes are written to be safe under one
            // (sql::append), and planning the append statement with its values cost more than
            // executing it (measured 0.155 ms bind vs 0.062 ms execute).
            begin_append: begin(
                config.append_isolation,
                "",
                config.append_timeout,
                &[GENERIC_PLANS, NO_SEQ_SCANS],
            ),
            begin_append_custom: begin(
                config.append_isolation,
                "",
                config.append_timeout,
                &[CUSTOM_PLANS, NO_SEQ_SCANS],
            ),
            begin_short_read: begin(
                IsolationLevel::ReadCommitted,
                " READ ONLY",
                config.query_timeout,
                &[],
            ),
            begin_read: begin(
                config.read_isolation,
                " READ ONLY",
                config.query_timeout,
                &[CUSTOM_PLANS],
            ),
            begin_read_all: begin(
                config.read_isolation,
                " READ ONLY",
                config.query_timeout,
                &[CUSTOM_PLANS, "SET LOCAL enable_sort = off"],
            ),
            begin_read_tagged: begin(
                config.read_isolation,
                " READ ONLY",
                config.query_timeout,
                &[GENERIC_PLANS],
            ),
            fence_sql: format!("SELECT {schema}.fence($1, $2)"),
            lock_sql: sql::lock_rows("$1", "$2"),
            session_lock_sql: sql::session_lock_rows("$1", "$2"),
            begin_session_lock: begin(
                IsolationLevel::ReadCommitted,
                "",
                config.append_timeout,
                &[],
            ),
            session_unlock_sql: sql::session_unlock_rows("$1", "$2"),
            session_timeout,
            changes: crate::notify::Changes::new(&config, pool.clone()),
            groups: crate::group_queue::Groups::default(),
            standbys,
            ahead: crate::partition_ahead::Ahead::default(),
            schema,
            pool,
            config,
        };
        let store = Self {
            inner: Arc::new(inner),
            route: crate::standby::Route::default(),
        };
        if store.inner.config.auto_migrate {
            store.migrate().await?;
        }
        let conn = Conn::get(&store.inner.pool, "connect").await?;
        conn.run(
            "connect",
            migrate::check_version(
                conn.object(),
                &store.inner.config.schema,
                &store.inner.schema,
            ),
        )
        .await?;
        conn.run("connect", store.load_partitioning(&conn)).await?;
        Ok(store)
    }

    /// Creates or upgrades the schema; safe to run from several processes at once.
    #[tracing::instrument(name = "pg.migrate", skip_all, fields(schema = %self.inner.config.schema))]
    pub async fn migrate(&self) -> Result<(), Error> {
        let mut conn = Conn::get(&self.inner.pool, "migrate").await?;
        conn.begin_exchange("migrate")?;
        let client: &mut tokio_postgres::Client = conn.object_mut();
        let result = migrate::migrate(client, &self.inner.config.schema, &self.inner.schema).await;
        if result.is_ok() {
            conn.end_exchange();
        }
        result
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The configuration in force.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_batch_size: self.inner.config.max_batch_size,
        }
    }

    /// The statements that open an append transaction with `condition`.
    pub(crate) fn begin_append(&self, condition: Option<&AppendCondition>) -> &str {
        self.begin_append_for(condition.into_iter())
    }

    /// [`begin_append`](Self::begin_append) for a statement checking all of `conditions`.
    pub(crate) fn begin_append_for<'a>(
        &self,
        mut conditions: impl Iterator<Item = &'a AppendCondition>,
    ) -> &str {
        let type_only = |c: &AppendCondition| {
            c.fail_if_events_match
                .items
                .iter()
                .any(|i| i.tags.is_empty() && !i.types.is_empty())
        };
        if conditions.any(type_only) {
            &self.inner.begin_append_custom
        } else {
            &self.inner.begin_append
        }
    }

    /// The statements that open a read transaction for `query`.
    pub(crate) fn begin_read(&self, query: &Query, options: &ReadOptions) -> &str {
        if query.is_match_all() {
            &self.inner.begin_read_all
        } else if sql::is_tag_driven(query, options) {
            &self.inner.begin_read_tagged
        } else {
            &self.inner.begin_read
        }
    }

    /// The fence's lock parameters for `query`: its exclusive keys and the shared escalation key.
    pub(crate) fn fence_params(&self, query: &Query) -> (Vec<i64>, Vec<bool>) {
        let mut locks = LockSet::default();
        self.inner.keys.add_query_keys(&mut locks, query);
        locks.into_params()
    }

    /// Takes the fence for `query` in a transaction of its own and returns its snapshot, for
    /// reads whose transaction-wide snapshot (REPEATABLE READ, SERIALIZABLE) would otherwise be
    /// taken before the fence's lock waits.
    pub(crate) async fn fence_alone(
        &self,
        client: &deadpool_postgres::Object,
        query: &Query,
        operation: &'static str,
    ) -> Result<String, Error> {
        let inner = &self.inner;
        let (keys, exclusive) = self.fence_params(query);
        let fence = prepare(client, &inner.fence_sql, operation).await?;
        let params: [&(dyn postgres_types::ToSql + Sync); 2] = [&keys, &exclusive];
        let (begin, snapshot, commit) = tokio::join!(
            client.batch_execute(&inner.begin_short_read),
            client.query_one(&fence, &params),
            client.batch_execute("COMMIT"),
        );
        let timeout = Some(inner.config.query_timeout);
        let map = |e| db_error_with_timeout(operation, e, false, timeout);
        begin.map_err(map)?;
        let row = snapshot.map_err(map)?;
        commit.map_err(map)?;
        row.try_get(0).map_err(|e| db_error(operation, e, false))
    }

    /// A fenced, buffered read on `conn`, inside the caller's exchange (`Conn::run`): the rows
    /// of `sql::read` and the fence snapshot's
    /// `xmax` (every transaction that gets an id after the fence has an id >= xmax).
    ///
    /// Under READ COMMITTED this is one round trip and one transaction: `fence()`, then the read
    /// in the next statement, whose snapshot is taken after the fence's lock waits.
    ///
    /// On a standby (`on_standby`), the fence is replaced by the standby's own xmin horizon
    /// (`standby::HORIZON_SQL`): the returned `xmax` is that horizon, and every event not
    /// returned that ever commits has a transaction id at or above it (docs/scale-out.md).
    pub(crate) async fn fenced_rows(
        &self,
        conn: &Conn,
        query: &Query,
        options: &ReadOptions,
        operation: &'static str,
        on_standby: bool,
    ) -> Result<(Vec<Row>, u64), Error> {
        let inner = &self.inner;
        // Fewer items, fewer index scans and keys (projectors on one entity share its tags).
        let query = &query.simplified();
        let stmt = sql::read(&inner.schema, query, options);
        let client = conn.object();
        let read = prepare(client, &stmt.sql, operation).await?;
        let params = stmt.param_refs();
        let begin = self.begin_read(query, options);
        let (snapshot, rows) = if on_standby {
            // One transaction at any level: under REPEATABLE READ the horizon and the read
            // share the transaction snapshot, under READ COMMITTED the read's newer snapshot
            // has every transaction below the horizon ended as well.
            let begin = standby_begin(begin, inner.config.read_isolation);
            let horizon = prepare(client, crate::standby::HORIZON_SQL, operation).await?;
            let (fenced, rows) = self
                .read_transaction(conn, &begin, (&horizon, &[]), (&read, &params), operation)
                .await?;
            let snapshot: String = fenced
                .first()
                .ok_or_else(|| corrupt("the standby horizon returned no row".into()))?
                .try_get(0)
                .map_err(|e| db_error(operation, e, false))?;
            (snapshot, rows)
        } else if inner.config.read_isolation == IsolationLevel::ReadCommitted {
            let (keys, exclusive) = self.fence_params(query);
            let fence = prepare(client, &inner.fence_sql, operation).await?;
            let fence_params: [&(dyn postgres_types::ToSql + Sync); 2] = [&keys, &exclusive];
            let (fenced, rows) = self
                .read_transaction(
                    conn,
                    begin,
                    (&fence, &fence_params),
                    (&read, &params),
                    operation,
                )
                .await?;
            let snapshot: String = fenced
                .first()
                .ok_or_else(|| corrupt("fence() returned no row".into()))?
                .try_get(0)
                .map_err(|e| db_error(operation, e, false))?;
            (snapshot, rows)
        } else {
            let snapshot = self.fence_alone(conn.object(), query, operation).await?;
            let set = prepare(client, SET_FENCE, operation).await?;
            let set_params: [&(dyn postgres_types::ToSql + Sync); 1] = [&snapshot];
            let (_, rows) = self
                .read_transaction(
                    conn,
                    begin,
                    (&set, &set_params),
                    (&read, &params),
                    operation,
                )
                .await?;
            (snapshot, rows)
        };
        Ok((rows, snapshot_xmax(&snapshot)?))
    }

    /// `begin`, a first statement (the fence, or restoring its snapshot), the read, `COMMIT`:
    /// one transaction, pipelined in one round trip. Returns both statements' rows.
    async fn read_transaction(
        &self,
        conn: &Conn,
        begin: &str,
        first: (
            &tokio_postgres::Statement,
            &[&(dyn postgres_types::ToSql + Sync)],
        ),
        read: (
            &tokio_postgres::Statement,
            &[&(dyn postgres_types::ToSql + Sync)],
        ),
        operation: &'static str,
    ) -> Result<(Vec<Row>, Vec<Row>), Error> {
        let client = conn.object();
        let (begin, first, rows, commit) = tokio::join!(
            client.batch_execute(begin),
            client.query(first.0, first.1),
            client.query(read.0, read.1),
            client.batch_execute("COMMIT"),
        );
        let timeout = Some(self.inner.config.query_timeout);
        let map = |e| db_error_with_timeout(operation, e, false, timeout);
        begin.map_err(map)?;
        let first = first.map_err(map)?;
        let rows = rows.map_err(map)?;
        commit.map_err(map)?;
        Ok((first, rows))
    }

    /// A fenced, buffered read on `conn`, bounded by `query_timeout` (on the client; its lock
    /// waits also on the server).
    pub(crate) async fn read_on(
        &self,
        conn: &Conn,
        query: &Query,
        options: ReadOptions,
        on_standby: bool,
    ) -> Result<Vec<Event>, Error> {
        validate_query(query)?;
        dcb_core::validate_read_options(&options)?;
        let timeout = self.inner.config.query_timeout;
        let give_up = tokio::time::Instant::now() + timeout;
        let mut attempt = 0;
        loop {
            let read = async {
                let (rows, _) = self
                    .fenced_rows(conn, query, &options, "query", on_standby)
                    .await?;
                rows.iter().map(event_from_row).collect()
            };
            let read = async {
                tokio::time::timeout_at(give_up, read)
                    .await
                    .unwrap_or(Err(Error::Timeout {
                        operation: "query",
                        timeout,
                    }))
            };
            match conn.run("query", read).await {
                // A SERIALIZABLE read transaction can fail to serialize; the fence pins what it
                // sees, so it is simply read again (on the same connection, once it is proven
                // clean: the failure was the server's, and its COMMIT was answered).
                Err(Error::Conflict(ConflictInfo {
                    conflicting: None, ..
                })) if !on_standby
                    && self.inner.config.read_isolation == IsolationLevel::Serializable
                    && attempt < READ_RETRIES
                    && tokio::time::timeout_at(give_up, conn.recover())
                        .await
                        .unwrap_or(false) =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// The command recorded with the idempotency key `id`, found by its `command_ids` row:
    /// also after its `commands` row left with a detached (archived) partition, when the
    /// record has the id, type, transaction, last event and time, and `data` is `null`
    /// without metadata.
    pub(crate) async fn find_command_by_id(
        &self,
        conn: &Conn,
        id: &str,
    ) -> Result<Option<CommandRecord>, Error> {
        let quoted = &self.inner.schema;
        // Joined by transaction id, the partition key of a partitioned `commands`: one
        // partition's primary key is probed.
        let sql = format!(
            "SELECT i.command_id, coalesce(c.type, i.command_type), \
                    coalesce(c.data, 'null'::jsonb), c.metadata, i.transaction_id, \
                    i.last_event_position, coalesce(c.occurred_at, i.occurred_at) \
             FROM {quoted}.command_ids i \
             LEFT JOIN {quoted}.commands c ON c.transaction_id = i.transaction_id \
             WHERE i.command_id = $1"
        );
        let client = conn.object();
        let timeout = self.inner.config.query_timeout;
        let exchange = async {
            let stmt = prepare(client, &sql, "commands").await?;
            let params: [&(dyn postgres_types::ToSql + Sync); 1] = [&id];
            let (begin, rows, commit) = tokio::join!(
                client.batch_execute(&self.inner.begin_short_read),
                client.query(&stmt, &params),
                client.batch_execute("COMMIT"),
            );
            let map = |e| db_error_with_timeout("commands", e, false, Some(timeout));
            begin.map_err(map)?;
            let rows = rows.map_err(map)?;
            commit.map_err(map)?;
            rows.first().map(command_from_row).transpose()
        };
        conn.run("commands", within(timeout, "commands", exchange))
            .await
    }

    pub(crate) async fn list_commands(
        &self,
        conn: &Conn,
        filter: &CommandFilter,
        by_id: Option<&str>,
    ) -> Result<Vec<CommandRecord>, Error> {
        let mut sql = format!(
            "SELECT command_id, type, data, metadata, transaction_id, last_event_position, occurred_at \
             FROM {}.commands WHERE TRUE",
            self.inner.schema
        );
        let mut params: Vec<Box<dyn postgres_types::ToSql + Sync + Send>> = Vec::new();
        let mut bind =
            |sql: &mut String,
             clause: &str,
             value: Box<dyn postgres_types::ToSql + Sync + Send>| {
                params.push(value);
                sql.push_str(&clause.replace('?', &format!("${}", params.len())));
            };
        if let Some(id) = by_id {
            bind(&mut sql, " AND command_id = ?", Box::new(id.to_string()));
        }
        if let Some(t) = &filter.command_type {
            bind(&mut sql, " AND type = ?", Box::new(t.clone()));
        }
        if let Some(from) = filter.from {
            bind(&mut sql, " AND occurred_at >= ?", Box::new(from));
        }
        if let Some(to) = filter.to {
            bind(&mut sql, " AND occurred_at < ?", Box::new(to));
        }
        sql.push_str(" ORDER BY occurred_at, transaction_id");
        if let Some(limit) = filter.limit {
            bind(
                &mut sql,
                " LIMIT ?",
                Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
            );
        }
        let refs: Vec<&(dyn postgres_types::ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn postgres_types::ToSql + Sync))
            .collect();
        let client = conn.object();
        let timeout = self.inner.config.query_timeout;
        let exchange = async {
            let stmt = prepare(client, &sql, "commands").await?;
            let (begin, rows, commit) = tokio::join!(
                client.batch_execute(&self.inner.begin_short_read),
                client.query(&stmt, &refs),
                client.batch_execute("COMMIT"),
            );
            let map = |e| db_error_with_timeout("commands", e, false, Some(timeout));
            begin.map_err(map)?;
            let rows = rows.map_err(map)?;
            commit.map_err(map)?;
            rows.iter().map(command_from_row).collect()
        };
        conn.run("commands", within(timeout, "commands", exchange))
            .await
    }
}

/// Whether the sessions of a store built by `connect` really run with the settings its
/// connection options ask for (`lock_timeout = append_timeout`, no `statement_timeout`, READ
/// COMMITTED by default), which the one-statement append relies on. A pooler may drop startup options, and
/// a role or database may default to another isolation level; the store then appends in
/// explicit transactions, as on a pool it did not build.
async fn session_settings_hold(pool: &Pool, config: &StoreConfig) -> Result<bool, Error> {
    let conn = Conn::get(pool, "connect").await?;
    let row = conn
        .run("connect", async {
            conn.object()
                .query_one(
                    "SELECT (SELECT setting::int8 FROM pg_settings WHERE name = 'lock_timeout'), \
                            (SELECT setting::int8 FROM pg_settings WHERE name = 'statement_timeout'), \
                            current_setting('default_transaction_isolation')",
                    &[],
                )
                .await
                .map_err(|e| db_error("connect", e, false))
        })
        .await?;
    let timeout: i64 = row.try_get(0).map_err(|e| db_error("connect", e, false))?;
    let statement_timeout: i64 = row.try_get(1).map_err(|e| db_error("connect", e, false))?;
    let isolation: String = row.try_get(2).map_err(|e| db_error("connect", e, false))?;
    let expected = i64::try_from(config.append_timeout.as_millis()).unwrap_or(i64::MAX);
    let holds = timeout == expected && statement_timeout == 0 && isolation == "read committed";
    if !holds {
        tracing::warn!(
            timeout,
            statement_timeout,
            isolation,
            "the store's session settings did not take effect; appends use explicit transactions"
        );
    }
    Ok(holds)
}

/// `begin` for a read on a hot standby, which refuses SERIALIZABLE (SQLSTATE 0A000): there
/// the read runs at REPEATABLE READ, whose one snapshot already pins what it sees.
pub(crate) fn standby_begin(begin: &str, isolation: IsolationLevel) -> std::borrow::Cow<'_, str> {
    if isolation == IsolationLevel::Serializable {
        std::borrow::Cow::Owned(begin.replacen(
            IsolationLevel::Serializable.sql(),
            IsolationLevel::RepeatableRead.sql(),
            1,
        ))
    } else {
        std::borrow::Cow::Borrowed(begin)
    }
}

/// `operation` bounded by `timeout` on the client: past it, the future is dropped (its
/// connection, left inside its exchange, is closed and its query cancelled) and the operation
/// fails with `Error::Timeout`. For reads and for exchanges that write nothing.
pub(crate) async fn within<T>(
    timeout: Duration,
    operation: &'static str,
    future: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, future)
        .await
        .unwrap_or(Err(Error::Timeout { operation, timeout }))
}

pub(crate) async fn prepare(
    client: &deadpool_postgres::Object,
    sql: &str,
    operation: &'static str,
) -> Result<tokio_postgres::Statement, Error> {
    client
        .prepare_cached(sql)
        .await
        .map_err(|e| db_error(operation, e, false))
}

fn corrupt(what: String) -> Error {
    Error::Storage {
        operation: "query",
        message: what,
        outcome_unknown: false,
        source: None,
    }
}

/// Why a column could not be decoded: the decoder's own message (the error itself only says
/// "error deserializing column 4").
fn decode_reason(column: &str, err: &tokio_postgres::Error) -> String {
    match std::error::Error::source(err) {
        Some(source) => format!("column {column}: {source}"),
        None => format!("column {column}: {err}"),
    }
}

/// Decodes a row of `sql::read`. A row that breaks the storage format (written around the
/// store) fails with [`Error::CorruptEvent`] naming its cursor, type and the reason.
pub(crate) fn event_from_row(row: &Row) -> Result<Event, Error> {
    let get_err = |e| db_error("query", e, false);
    let tx: Xid8 = row.try_get(0).map_err(get_err)?;
    let position: i64 = row.try_get(1).map_err(get_err)?;
    let cursor = Cursor::new(tx.0, position);
    let event_type: String = row.try_get(2).map_err(|e| Error::CorruptEvent {
        cursor,
        event_type: "<unreadable>".into(),
        reason: decode_reason("type", &e),
    })?;
    let corrupt_event = |reason: String| Error::CorruptEvent {
        cursor,
        event_type: event_type.clone(),
        reason,
    };
    // Borrowed from the row: one allocation per key and per value, none for the stored text.
    let raw_tags: Vec<&str> = row
        .try_get(3)
        .map_err(|e| corrupt_event(decode_reason("tags", &e)))?;
    let tags = raw_tags
        .into_iter()
        .map(|t| match t.split_once(':') {
            Some((k, v)) => Ok(Tag::new(k, v)),
            None => Err(corrupt_event(format!(
                "column tags: tag {t:?} has no ':' between key and value"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = row
        .try_get(4)
        .map_err(|e| corrupt_event(decode_reason("data", &e)))?;
    let metadata = row
        .try_get(5)
        .map_err(|e| corrupt_event(decode_reason("metadata", &e)))?;
    let occurred_at = row
        .try_get(6)
        .map_err(|e| corrupt_event(decode_reason("occurred_at", &e)))?;
    Ok(Event {
        cursor,
        event_type,
        tags,
        data,
        metadata,
        occurred_at,
    })
}

fn command_from_row(row: &Row) -> Result<CommandRecord, Error> {
    let get_err = |e| db_error("commands", e, false);
    let tx: Xid8 = row.try_get(4).map_err(get_err)?;
    let last: Option<i64> = row.try_get(5).map_err(get_err)?;
    Ok(CommandRecord {
        id: row.try_get(0).map_err(get_err)?,
        command_type: row.try_get(1).map_err(get_err)?,
        data: row.try_get(2).map_err(get_err)?,
        metadata: row.try_get(3).map_err(get_err)?,
        transaction_id: tx.0,
        last_event: last.map(|p| Cursor::new(tx.0, p)),
        occurred_at: row.try_get(6).map_err(get_err)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_xmax_reads_the_middle_field() {
        assert_eq!(snapshot_xmax("10:20:12,15").expect("xmax"), 20);
        assert_eq!(snapshot_xmax("7:7:").expect("xmax"), 7);
        assert!(snapshot_xmax("garbage").is_err());
    }

    #[test]
    fn transactions_open_without_jit_or_parallel_workers_and_with_their_timeout() {
        let sql = begin(
            IsolationLevel::ReadCommitted,
            " READ ONLY",
            Duration::from_millis(1500),
            &[GENERIC_PLANS],
        );
        assert_eq!(
            sql,
            "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; SET LOCAL statement_timeout = 0; \
             SET LOCAL lock_timeout = '1500ms'; SET LOCAL jit = off; \
             SET LOCAL max_parallel_workers_per_gather = 0; \
             SET LOCAL plan_cache_mode = force_generic_plan"
        );
    }

    #[tokio::test]
    async fn the_same_backend_guard_fails_a_transaction_elsewhere() {
        let schema = dcb_testkit::pg::TestSchema::new().await;
        let client = dcb_testkit::pg::connect(&schema.url).await.expect("client");
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        client
            .batch_execute(&format!(
                "BEGIN; {}; ROLLBACK",
                sql::same_backend_guard(pid)
            ))
            .await
            .expect("on the backend holding the locks");
        let err = client
            .batch_execute(&format!("BEGIN; {}", sql::same_backend_guard(pid + 1)))
            .await
            .expect_err("on another backend");
        assert!(
            err.to_string().contains("transaction mode")
                || format!("{err:?}").contains("transaction mode"),
            "{err:?}"
        );
        client.batch_execute("ROLLBACK").await.expect("rollback");
    }

    async fn pool_with_options(options: &str) -> Pool {
        let schema = dcb_testkit::pg::TestSchema::new().await;
        let mut config: tokio_postgres::Config = schema.url.parse().expect("url");
        config.options(options);
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        Pool::builder(manager).max_size(1).build().expect("pool")
    }

    #[tokio::test]
    async fn the_one_statement_append_needs_the_session_settings_it_asked_for() {
        let config = StoreConfig::default().append_timeout(Duration::from_millis(1500));
        let holds = |options: &'static str| {
            let config = config.clone();
            async move {
                session_settings_hold(&pool_with_options(options).await, &config)
                    .await
                    .expect("settings")
            }
        };
        assert!(holds("-c statement_timeout=0 -c lock_timeout=1500").await);
        assert!(
            !holds("-c statement_timeout=0 -c lock_timeout=1000").await,
            "a timeout that did not take"
        );
        assert!(
            !holds("-c statement_timeout=1500 -c lock_timeout=1500").await,
            "a statement timeout left on the sessions"
        );
        assert!(
            !holds(
                "-c statement_timeout=0 -c lock_timeout=1500 \
                 -c default_transaction_isolation=serializable"
            )
            .await,
            "sessions defaulting to another isolation level"
        );
    }
}
