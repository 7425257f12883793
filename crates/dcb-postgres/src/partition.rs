//! A partitioned event log: `events` range-partitioned by `position`, on PostgreSQL's own
//! declarative partitioning.
//!
//! - [`PostgresEventStore::partition`] turns an unpartitioned store into a partitioned one
//!   (opt-in) without copying a row: the existing table becomes the first partition
//!   `[MINVALUE, B)`, attached without a scan thanks to a `CHECK (position < B)` validated
//!   beforehand while writers carry on. Every row keeps its `(transaction_id, position)`, and
//!   the identity sequence continues where it was.
//! - Partitions of [`PartitionConfig::range`] positions each are created ahead of need by the
//!   store itself (`partition_ahead.rs`) or by [`PostgresEventStore::create_partitions_ahead`]
//!   (`crablet partition create-ahead`, cron, or pg_partman: see `docs/scale-out.md`, "A partitioned log").
//! - [`PostgresEventStore::detach_partition`] detaches an old partition
//!   (`DETACH PARTITION … CONCURRENTLY`) for archiving. Its events leave every read and every
//!   condition check: see the docs for what that means for decisions.
//!
//! - The commands table is range-partitioned with the log, in the same conversion, by
//!   `transaction_id` (ranges of [`PartitionConfig::range`] transaction ids, `commands_x<from>`):
//!   transaction ids only grow, so old partitions hold old commands and archive by age. The
//!   command executor's idempotency key lives in the unpartitioned `command_ids` (its primary
//!   key is global), so detaching a commands partition forgets no id.
use crate::conn::{db_error, Conn};
use crate::store::PostgresEventStore;
use tokio_postgres::Client;

/// The advisory lock that serializes partition maintenance of one schema (conversion,
/// creation ahead, detach), across processes.
pub(crate) const MAINTENANCE_LOCK: &str = "hashtextextended('crablet/partitions/' || $1, 0)";

/// How a partitioned log is cut.
///
/// ```
/// use dcb_postgres::PartitionConfig;
/// let config = PartitionConfig::new(10_000_000).ahead(2);
/// assert_eq!(config.range_size(), 10_000_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionConfig {
    range: i64,
    ahead: i32,
    headroom: Option<i64>,
    command_range: Option<i64>,
}

/// The smallest default [`PartitionConfig::command_range_size`]: transaction ids are drawn by
/// every writing transaction of the cluster, often far faster than positions, and commands
/// partitions of a few ids would be created by the hundred.
pub const MIN_DEFAULT_COMMAND_RANGE: i64 = 1_000_000;

fn default_command_range(range: i64) -> i64 {
    range.max(MIN_DEFAULT_COMMAND_RANGE)
}

impl PartitionConfig {
    /// Partitions of `range` positions each (`[k·range, (k+1)·range)`). Keep partitions large
    /// (millions to hundreds of millions of events): every decision read probes every
    /// partition's index, so their number, not their size, is what a decision pays for.
    pub fn new(range: i64) -> Self {
        Self {
            range,
            ahead: 2,
            headroom: None,
            command_range: None,
        }
    }

    /// Commands partitions of `xids` transaction ids each (`commands_x<from>` holds
    /// `[from, from + xids)`). Default: the log's range, at least
    /// [`MIN_DEFAULT_COMMAND_RANGE`]. Every writing transaction of the cluster draws an id, so
    /// a commands partition spans a time rather than a number of commands: size it by how many
    /// transaction ids the cluster draws in the period you archive by.
    pub fn command_range(mut self, xids: i64) -> Self {
        self.command_range = Some(xids);
        self
    }

    /// Transaction ids per commands partition.
    pub fn command_range_size(&self) -> i64 {
        self.command_range
            .unwrap_or_else(|| default_command_range(self.range))
    }

    /// How many empty ranges beyond the current one are kept created (default 2). The store
    /// creates the next one when fewer remain; an append that still finds no partition (a
    /// batch larger than the margin) creates what it needs and runs again.
    pub fn ahead(mut self, ranges: i32) -> Self {
        self.ahead = ranges;
        self
    }

    /// For the conversion of a store that keeps being written to: how many positions may be
    /// appended while the bound of the first partition is validated (a scan of the whole
    /// table, concurrent with writers). Default: one range. An append past that bound fails
    /// until the conversion's switch; make it larger than what is appended during the scan.
    pub fn conversion_headroom(mut self, positions: i64) -> Self {
        self.headroom = Some(positions);
        self
    }

    /// Positions per partition.
    pub fn range_size(&self) -> i64 {
        self.range
    }

    /// Empty ranges kept created ahead.
    pub fn ahead_ranges(&self) -> i32 {
        self.ahead
    }

    fn validate(&self) -> Result<(), PartitionError> {
        if self.range < 1 {
            return Err(PartitionError::InvalidConfig {
                reason: format!("range must be at least 1 position, not {}", self.range),
            });
        }
        if self.ahead < 1 {
            return Err(PartitionError::InvalidConfig {
                reason: format!("ahead must be at least 1 range, not {}", self.ahead),
            });
        }
        if self.command_range.is_some_and(|r| r < 1) {
            return Err(PartitionError::InvalidConfig {
                reason: "command_range must be at least 1 transaction id".into(),
            });
        }
        if self.headroom.is_some_and(|h| h < 1) {
            return Err(PartitionError::InvalidConfig {
                reason: "conversion_headroom must be at least 1 position".into(),
            });
        }
        Ok(())
    }
}

/// One partition of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Its table's name, in the store's schema.
    pub name: String,
    /// The first position it holds; `None` for the first partition (`MINVALUE`: the table
    /// of a converted store).
    pub from: Option<i64>,
    /// The first position it does not hold.
    pub to: i64,
    /// PostgreSQL's estimate of its rows (`reltuples`); `None` before its first VACUUM or
    /// ANALYZE.
    pub estimated_rows: Option<u64>,
    /// Its size with indexes and TOAST (`pg_total_relation_size`).
    pub total_bytes: u64,
    /// An interrupted `DETACH … CONCURRENTLY` left it half detached: readers no longer see it;
    /// [`PostgresEventStore::detach_partition`] finishes the detach.
    pub detach_pending: bool,
}

/// Why a partition operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    /// The configuration cannot be used.
    #[error("invalid partition configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The store's `events` table is not partitioned.
    #[error("the events table of schema {schema:?} is not partitioned: run `crablet partition enable --range N` (PostgresEventStore::partition) first")]
    NotPartitioned {
        /// The schema's name.
        schema: String,
    },
    /// No partition of that name.
    #[error("no partition {name:?} of the events table in schema {schema:?}: see `crablet partition list`")]
    UnknownPartition {
        /// The schema's name.
        schema: String,
        /// The name asked for.
        name: String,
    },
    /// The partition still receives (or will receive) appends, or is the one just below them.
    #[error("partition {name:?} ends at position {to}, at or above the start {current_from} of the partition now being written: only older partitions can be detached")]
    TooRecent {
        /// The partition asked for.
        name: String,
        /// Its upper bound.
        to: i64,
        /// The lower bound of the partition holding the newest position.
        current_from: i64,
    },
    /// The commands partition may still receive commands: a transaction that is still
    /// running, or a later one, may record a command in it.
    #[error("commands partition {name:?} ends at transaction id {to}, above the oldest transaction still running ({oldest_running}): a command may still be recorded in it; only older partitions can be detached")]
    CommandsTooRecent {
        /// The partition asked for.
        name: String,
        /// Its upper bound (a transaction id).
        to: i64,
        /// The oldest transaction id still running when the detach was asked for.
        oldest_running: i64,
    },
    /// While the first partition's bound was being validated, appends went past it.
    #[error("appends reached position {reached} while the conversion validated the bound {bound}: appends past it failed; run the conversion again with a larger conversion_headroom (at least {reached})")]
    Outran {
        /// The bound.
        bound: i64,
        /// The sequence's position at the switch.
        reached: i64,
    },
    /// The database failed, or a lock was not granted in time.
    #[error(transparent)]
    Store(#[from] dcb_core::Error),
}

/// The stored configuration of a partitioned store (table `partitioning`, created by the
/// conversion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) range: i64,
    pub(crate) ahead: i32,
    /// Transaction ids per commands partition.
    pub(crate) command_range: i64,
}

fn err(operation: &'static str) -> impl Fn(tokio_postgres::Error) -> PartitionError {
    move |e| PartitionError::Store(db_error(operation, e, false))
}

/// The partition table holding positions from `from` (`events_p<from>`).
pub(crate) fn partition_name(from: i64) -> String {
    format!("events_p{from}")
}

/// The commands partition holding transaction ids from `from` (`commands_x<from>`).
pub(crate) fn command_partition_name(from: i64) -> String {
    format!("commands_x{from}")
}

/// `x` rounded up to a multiple of `range` (at least one range).
fn align_up(x: i64, range: i64) -> i64 {
    (x.max(1).saturating_add(range - 1) / range).saturating_mul(range)
}

/// Whether the store's `events` table is partitioned.
pub(crate) async fn is_partitioned(client: &Client, schema: &str) -> Result<bool, PartitionError> {
    is_table_partitioned(client, schema, "events").await
}

/// Whether the store's table `table` (`events` or `commands`) is partitioned.
pub(crate) async fn is_table_partitioned(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<bool, PartitionError> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT c.relkind = 'p' FROM pg_class c \
             WHERE c.oid = to_regclass(format('%I.%I', $1::text, $2::text))), false)",
            &[&schema, &table],
        )
        .await
        .map_err(err("partition"))?;
    row.try_get(0).map_err(err("partition"))
}

/// The first transaction id not yet assigned (`xmax` of a snapshot taken now): every
/// transaction that starts writing later gets this one or a higher one.
pub(crate) async fn next_xid(client: &Client) -> Result<i64, PartitionError> {
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8",
            &[],
        )
        .await
        .map_err(err("partition"))?;
    row.try_get(0).map_err(err("partition"))
}

/// The oldest transaction id still running (`xmin` of a snapshot taken now): no transaction
/// below it can write any more.
async fn oldest_running_xid(client: &Client) -> Result<i64, PartitionError> {
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8",
            &[],
        )
        .await
        .map_err(err("partition"))?;
    row.try_get(0).map_err(err("partition"))
}

/// The stored configuration, if the store was converted.
pub(crate) async fn stored_config(
    client: &Client,
    schema: &str,
    quoted: &str,
) -> Result<Option<Stored>, dcb_core::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.partitioning', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(|e| db_error("partition", e, false))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    // `command_range` is read through jsonb: a table stored by a version before it has no
    // such column (the default applies).
    let row = client
        .query_opt(
            &format!(
                "SELECT range_size, ahead, (to_jsonb(p) ->> 'command_range')::int8 \
                 FROM {quoted}.partitioning p"
            ),
            &[],
        )
        .await
        .map_err(|e| db_error("partition", e, false))?;
    Ok(row.map(|row| {
        let range: i64 = row.get(0);
        let command_range: Option<i64> = row.get(2);
        Stored {
            range,
            ahead: row.get(1),
            command_range: command_range.unwrap_or_else(|| default_command_range(range)),
        }
    }))
}

/// The newest position drawn from the identity sequence (one below its start when none was:
/// the sequence of a converted store starts where the old one stopped).
pub(crate) async fn last_position(client: &Client, schema: &str) -> Result<i64, PartitionError> {
    let e = err("partition");
    let sequence: Option<String> = client
        .query_one(
            "SELECT pg_get_serial_sequence(format('%I.events', $1::text), 'position')",
            &[&schema],
        )
        .await
        .map_err(&e)?
        .try_get(0)
        .map_err(&e)?;
    let Some(sequence) = sequence else {
        return Ok(0);
    };
    let row = client
        .query_one(
            &format!(
                "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {sequence}"
            ),
            &[],
        )
        .await
        .map_err(&e)?;
    row.try_get(0).map_err(&e)
}

/// The partitions of the event log, by bound.
pub(crate) async fn list(
    client: &Client,
    schema: &str,
) -> Result<Vec<PartitionInfo>, PartitionError> {
    list_of(client, schema, "events").await
}

/// The partitions of the store's table `table` (`events` or `commands`), by bound.
pub(crate) async fn list_of(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Vec<PartitionInfo>, PartitionError> {
    let rows = client
        .query(
            "SELECT c.relname::text, \
                    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''?([-0-9]+)''?\\)'))[1]::int8, \
                    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''?([-0-9]+)''?\\)'))[1]::int8, \
                    c.reltuples::float8, pg_total_relation_size(c.oid), i.inhdetachpending \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass(format('%I.%I', $1::text, $2::text)) \
             ORDER BY 3",
            &[&schema, &table],
        )
        .await
        .map_err(err("partition"))?;
    let mut partitions = Vec::with_capacity(rows.len());
    for row in rows {
        let to: Option<i64> = row.try_get(2).map_err(err("partition"))?;
        let estimate: f64 = row.try_get(3).map_err(err("partition"))?;
        let bytes: i64 = row.try_get(4).map_err(err("partition"))?;
        partitions.push(PartitionInfo {
            name: row.try_get(0).map_err(err("partition"))?,
            from: row.try_get(1).map_err(err("partition"))?,
            // crablet creates no partition up to MAXVALUE; one made by hand reads as the end.
            to: to.unwrap_or(i64::MAX),
            estimated_rows: (estimate >= 0.0).then_some(estimate as u64),
            total_bytes: u64::try_from(bytes).unwrap_or(0),
            detach_pending: row.try_get(5).map_err(err("partition"))?,
        });
    }
    Ok(partitions)
}

/// DDL that creates the partition `[from, to)` and attaches it. A table of its own attached
/// afterwards: `ATTACH PARTITION` takes only a SHARE UPDATE EXCLUSIVE lock on `events`, so
/// appends and reads carry on (`CREATE TABLE … PARTITION OF` would take an ACCESS EXCLUSIVE
/// one). The new table is empty: attaching it scans nothing.
pub(crate) fn create_partition_sql(quoted: &str, from: i64, to: i64) -> String {
    let name = partition_name(from);
    format!(
        "CREATE TABLE {quoted}.{name} (LIKE {quoted}.events INCLUDING DEFAULTS \
            INCLUDING CONSTRAINTS INCLUDING INDEXES INCLUDING STORAGE INCLUDING COMPRESSION); \
         ALTER TABLE {quoted}.events ATTACH PARTITION {quoted}.{name} \
            FOR VALUES FROM ({from}) TO ({to});"
    )
}

/// DDL that creates the commands partition `[from, to)` of transaction ids and attaches it,
/// as [`create_partition_sql`] does for the log.
pub(crate) fn create_command_partition_sql(quoted: &str, from: i64, to: i64) -> String {
    let name = command_partition_name(from);
    format!(
        "CREATE TABLE {quoted}.{name} (LIKE {quoted}.commands INCLUDING DEFAULTS \
            INCLUDING CONSTRAINTS INCLUDING INDEXES INCLUDING STORAGE INCLUDING COMPRESSION); \
         ALTER TABLE {quoted}.commands ATTACH PARTITION {quoted}.{name} \
            FOR VALUES FROM ('{from}') TO ('{to}');"
    )
}

/// The statements, each its own transaction, that add the bound of the first commands
/// partition `NOT VALID` (a brief ACCESS EXCLUSIVE lock) and validate it (a scan under SHARE
/// UPDATE EXCLUSIVE: commands are recorded meanwhile).
fn command_bound_statements(quoted: &str, bound: i64) -> [String; 3] {
    [
        format!("ALTER TABLE {quoted}.commands DROP CONSTRAINT IF EXISTS commands_partition_bound"),
        format!(
            "ALTER TABLE {quoted}.commands ADD CONSTRAINT commands_partition_bound \
             CHECK (transaction_id < '{bound}'::xid8) NOT VALID"
        ),
        format!("ALTER TABLE {quoted}.commands VALIDATE CONSTRAINT commands_partition_bound"),
    ]
}

/// The switch of `commands` to a table range-partitioned by transaction id, in the caller's
/// transaction (which holds ACCESS EXCLUSIVE on it): the old table, without its `command_id`
/// unique constraint (the key is `command_ids`' since migration 6), becomes the partition
/// `[MINVALUE, bound)` without a scan (its validated bound implies the partition constraint),
/// and `[bound, bound + range)` is created.
fn command_switch_sql(quoted: &str, bound: i64, range: i64) -> String {
    let first = command_partition_name(0);
    format!(
        "ALTER TABLE {quoted}.commands RENAME TO {first}; \
         ALTER INDEX {quoted}.commands_pkey RENAME TO {first}_pkey; \
         ALTER INDEX {quoted}.commands_type_time_idx RENAME TO {first}_type_time_idx; \
         ALTER INDEX {quoted}.commands_time_idx RENAME TO {first}_time_idx; \
         ALTER TABLE {quoted}.{first} DROP CONSTRAINT IF EXISTS commands_command_id_key; \
         CREATE TABLE {quoted}.commands (LIKE {quoted}.{first} INCLUDING DEFAULTS \
            INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION) \
            PARTITION BY RANGE (transaction_id); \
         ALTER TABLE {quoted}.commands DROP CONSTRAINT commands_partition_bound; \
         ALTER TABLE {quoted}.commands ADD PRIMARY KEY (transaction_id); \
         CREATE INDEX commands_type_time_idx ON {quoted}.commands (type, occurred_at); \
         CREATE INDEX commands_time_idx ON {quoted}.commands (occurred_at); \
         ALTER TABLE {quoted}.commands ATTACH PARTITION {quoted}.{first} \
            FOR VALUES FROM (MINVALUE) TO ('{bound}'); \
         ALTER TABLE {quoted}.{first} DROP CONSTRAINT commands_partition_bound; \
         {ahead}",
        ahead = create_command_partition_sql(quoted, bound, bound.saturating_add(range)),
    )
}

impl PostgresEventStore {
    /// Turns the store's `events` table into one range-partitioned by position (or, on a
    /// partitioned store, changes the stored configuration), then creates the partitions
    /// ahead. Returns the partitions.
    ///
    /// The conversion copies nothing and changes no event: the existing table becomes the
    /// first partition. Its steps: (1) a `CHECK (position < B)` is added `NOT VALID` (a brief
    /// ACCESS EXCLUSIVE lock) and validated (a scan of the whole table that appends and reads
    /// run alongside; `B` leaves [`PartitionConfig::conversion_headroom`] positions); (2) one
    /// transaction under an ACCESS EXCLUSIVE lock on `events` (it waits for in-flight appends
    /// and reads, and they wait for it; milliseconds) renames the table, creates the
    /// partitioned `events` with the same columns, indexes and identity sequence (continuing
    /// at the next position), attaches the old table as `[MINVALUE, B)` without a scan, and
    /// creates the partitions ahead. Safe to run from several processes at once.
    ///
    /// The commands table is converted in the same steps and the same switch, by transaction
    /// id (ranges of [`PartitionConfig::command_range`]); the command ids stay unique through
    /// the unpartitioned `command_ids`. On a store whose events alone were partitioned (by an
    /// earlier version), this converts the commands table.
    ///
    /// ```no_run
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> Result<(), dcb_postgres::PartitionError> {
    /// let partitions = store.partition(dcb_postgres::PartitionConfig::new(50_000_000)).await?;
    /// assert!(partitions.len() >= 3);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "pg.partition", skip(self), fields(schema = %self.inner.config.schema))]
    pub async fn partition(
        &self,
        config: PartitionConfig,
    ) -> Result<Vec<PartitionInfo>, PartitionError> {
        config.validate()?;
        let operation = "partition";
        let schema = &self.inner.config.schema;
        let quoted = &self.inner.schema;
        let conn = Conn::get(&self.inner.pool, operation).await?;
        conn.begin_exchange(operation)?;
        let result = async {
            let client = conn.object();
            let e = err(operation);
            // Session-level: the conversion spans several transactions. Released below, or by
            // closing the connection (an exchange that fails is never pooled).
            client
                .execute(
                    &format!("SELECT pg_advisory_lock({MAINTENANCE_LOCK})"),
                    &[schema],
                )
                .await
                .map_err(&e)?;
            self.partition_locked(client, config).await?;
            client
                .execute(
                    &format!("SELECT pg_advisory_unlock({MAINTENANCE_LOCK})"),
                    &[schema],
                )
                .await
                .map_err(&e)?;
            Ok::<_, PartitionError>(stored_config(client, schema, quoted).await?)
        }
        .await;
        let stored = match result {
            Ok(stored) => {
                conn.end_exchange();
                stored
            }
            Err(error) => {
                // Closed first: its aborted transaction and locks go with it.
                drop(conn);
                self.drop_conversion_bound().await;
                return Err(error);
            }
        };
        self.inner.ahead.configure(stored);
        self.create_partitions_ahead(0).await?;
        self.partitions().await
    }

    async fn partition_locked(
        &self,
        client: &Client,
        config: PartitionConfig,
    ) -> Result<(), PartitionError> {
        let e = err("partition");
        let schema = &self.inner.config.schema;
        let quoted = &self.inner.schema;
        let save_config = format!(
            "CREATE TABLE IF NOT EXISTS {quoted}.partitioning (\
                singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton), \
                range_size bigint  NOT NULL CHECK (range_size > 0), \
                ahead      integer NOT NULL CHECK (ahead > 0)); \
             ALTER TABLE {quoted}.partitioning ADD COLUMN IF NOT EXISTS \
                command_range bigint CHECK (command_range > 0); \
             INSERT INTO {quoted}.partitioning (range_size, ahead, command_range) \
                VALUES ({}, {}, {}) \
             ON CONFLICT (singleton) DO UPDATE SET range_size = EXCLUDED.range_size, \
                ahead = EXCLUDED.ahead, command_range = EXCLUDED.command_range;",
            config.range,
            config.ahead,
            config.command_range_size()
        );
        let events_done = is_partitioned(client, schema).await?;
        let commands_done = is_table_partitioned(client, schema, "commands").await?;
        if events_done && commands_done {
            client.batch_execute(&save_config).await.map_err(&e)?;
            return Ok(());
        }
        let headroom = config.headroom.unwrap_or(config.range);
        // Separate statements, each its own transaction: the ACCESS EXCLUSIVE lock of ADD
        // CONSTRAINT ends before the scan, which holds only SHARE UPDATE EXCLUSIVE.
        let mut statements = vec!["SET lock_timeout = 0".to_string()];
        // (1) The bounds of the first partitions, validated while writers carry on.
        let bound = if events_done {
            None
        } else {
            let last = last_position(client, schema).await?;
            let bound = align_up(
                last.saturating_add(headroom).saturating_add(1),
                config.range,
            );
            tracing::info!(
                schema,
                last,
                bound,
                "partition: validating the first partition's bound"
            );
            statements.extend([
                format!(
                    "ALTER TABLE {quoted}.events DROP CONSTRAINT IF EXISTS events_partition_bound"
                ),
                format!(
                    "ALTER TABLE {quoted}.events ADD CONSTRAINT events_partition_bound \
                     CHECK (position < {bound}) NOT VALID"
                ),
                format!("ALTER TABLE {quoted}.events VALIDATE CONSTRAINT events_partition_bound"),
            ]);
            Some(bound)
        };
        // Transaction ids also grow with every other transaction of the cluster: one commands
        // range of headroom.
        let command_range = config.command_range_size();
        let command_bound = if commands_done {
            None
        } else {
            let next = next_xid(client).await?;
            let bound = align_up(
                next.saturating_add(command_range).saturating_add(1),
                command_range,
            );
            tracing::info!(
                schema,
                next,
                bound,
                "partition: validating the first commands partition's bound"
            );
            statements.extend(command_bound_statements(quoted, bound));
            Some(bound)
        };
        statements.push("RESET lock_timeout".to_string());
        for statement in statements {
            client.batch_execute(&statement).await.map_err(&e)?;
        }
        // (2) The switch, in one transaction under an exclusive lock on both tables.
        let locked = match (bound, command_bound) {
            (Some(_), Some(_)) => format!("{quoted}.events, {quoted}.commands"),
            (Some(_), None) => format!("{quoted}.events"),
            _ => format!("{quoted}.commands"),
        };
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0; \
                 LOCK TABLE {locked} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .map_err(&e)?;
        let mut switch = String::new();
        let mut next = None;
        if let Some(bound) = bound {
            let sequence: String = client
                .query_one(
                    "SELECT pg_get_serial_sequence(format('%I.events', $1::text), 'position')",
                    &[schema],
                )
                .await
                .map_err(&e)?
                .try_get(0)
                .map_err(&e)?;
            let row = client
                .query_one(
                    &format!("SELECT last_value, is_called FROM {sequence}"),
                    &[],
                )
                .await
                .map_err(&e)?;
            let (last_value, is_called): (i64, bool) =
                (row.try_get(0).map_err(&e)?, row.try_get(1).map_err(&e)?);
            let first_free = if is_called {
                last_value + 1
            } else {
                last_value
            };
            if first_free > bound {
                client.batch_execute("ROLLBACK").await.map_err(&e)?;
                // The caller drops the bound: appends past it fail while it stands.
                return Err(PartitionError::Outran {
                    bound,
                    reached: last_value,
                });
            }
            next = Some(first_free);
            let first = partition_name(0);
            switch.push_str(&format!(
                "ALTER TABLE {quoted}.events ALTER COLUMN position DROP IDENTITY; \
                 ALTER TABLE {quoted}.events RENAME TO {first}; \
                 ALTER INDEX {quoted}.events_pkey RENAME TO {first}_pkey; \
                 ALTER INDEX {quoted}.events_tags_idx RENAME TO {first}_tags_idx; \
                 ALTER INDEX {quoted}.events_type_idx RENAME TO {first}_type_idx; \
                 CREATE TABLE {quoted}.events (LIKE {quoted}.{first} INCLUDING DEFAULTS \
                    INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION) \
                    PARTITION BY RANGE (position); \
                 ALTER TABLE {quoted}.events DROP CONSTRAINT events_partition_bound; \
                 ALTER TABLE {quoted}.events ALTER COLUMN position \
                    ADD GENERATED ALWAYS AS IDENTITY (START WITH {first_free}); \
                 ALTER TABLE {quoted}.events ADD PRIMARY KEY (transaction_id, position); \
                 CREATE INDEX events_tags_idx ON {quoted}.events USING gin (tags) \
                    WITH (fastupdate = off); \
                 CREATE INDEX events_type_idx ON {quoted}.events (type, transaction_id, position); \
                 ALTER TABLE {quoted}.events ATTACH PARTITION {quoted}.{first} \
                    FOR VALUES FROM (MINVALUE) TO ({bound}); \
                 ALTER TABLE {quoted}.{first} DROP CONSTRAINT events_partition_bound; \
                 {ahead} ",
                ahead = create_partition_sql(quoted, bound, bound.saturating_add(config.range)),
            ));
        }
        if let Some(command_bound) = command_bound {
            switch.push_str(&command_switch_sql(quoted, command_bound, command_range));
            switch.push(' ');
        }
        client
            .batch_execute(&format!("{switch} {save_config} COMMIT"))
            .await
            .map_err(&e)?;
        tracing::info!(
            schema,
            ?bound,
            ?next,
            ?command_bound,
            "partition: events and commands are partitioned"
        );
        Ok(())
    }

    /// After a failed conversion: the `NOT VALID` bound it may have left would make appends
    /// past it fail. Best effort, on a connection of its own (the failed one is closed).
    async fn drop_conversion_bound(&self) {
        let quoted = &self.inner.schema;
        if let Ok(conn) = Conn::get(&self.inner.pool, "partition").await {
            let dropped = conn
                .run("partition", async {
                    conn.object()
                        .batch_execute(&format!(
                            "ALTER TABLE IF EXISTS ONLY {quoted}.events \
                             DROP CONSTRAINT IF EXISTS events_partition_bound; \
                             ALTER TABLE IF EXISTS ONLY {quoted}.commands \
                             DROP CONSTRAINT IF EXISTS commands_partition_bound"
                        ))
                        .await
                        .map_err(|e| db_error("partition", e, false))
                })
                .await;
            if let Err(error) = dropped {
                tracing::warn!(%error, "partition: could not drop the conversion's bound");
            }
        }
    }

    /// Whether the store's `events` table is partitioned.
    pub async fn is_partitioned(&self) -> Result<bool, PartitionError> {
        let conn = Conn::get(&self.inner.pool, "partition").await?;
        conn.begin_exchange("partition")?;
        let partitioned = is_partitioned(conn.object(), &self.inner.config.schema).await?;
        conn.end_exchange();
        Ok(partitioned)
    }

    /// The partitions of the event log, by position; empty when the store is not partitioned.
    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>, PartitionError> {
        let conn = Conn::get(&self.inner.pool, "partition").await?;
        conn.begin_exchange("partition")?;
        let partitions = list(conn.object(), &self.inner.config.schema).await?;
        conn.end_exchange();
        Ok(partitions)
    }

    /// The partitions of the commands table, by transaction id (`from` and `to` are
    /// transaction ids); empty when it is not partitioned.
    pub async fn command_partitions(&self) -> Result<Vec<PartitionInfo>, PartitionError> {
        let conn = Conn::get(&self.inner.pool, "partition").await?;
        conn.begin_exchange("partition")?;
        let partitions = list_of(conn.object(), &self.inner.config.schema, "commands").await?;
        conn.end_exchange();
        Ok(partitions)
    }

    /// Detaches the old partition `name` from the log (`DETACH PARTITION … CONCURRENTLY`:
    /// appends and reads carry on; it waits for every transaction that may still see the
    /// partition), leaving it as a plain table in the store's schema to dump and drop, or
    /// drops it at once with `drop`. Finishes an interrupted detach of the same partition.
    ///
    /// Its events leave every read and every condition check: a decision that depended on
    /// them decides differently afterwards (`docs/scale-out.md`, "A partitioned log", "Archiving"). Refused
    /// ([`PartitionError::TooRecent`]) for the partition holding the newest position and every
    /// later one.
    ///
    /// `name` may also be a partition of the commands table (`commands_x<from>`, see
    /// [`PostgresEventStore::command_partitions`]): its commands leave
    /// [`commands`](dcb_core::EventStore::commands), while their ids stay recorded
    /// (`command_ids`), so a retry of one is still reported as a duplicate. Refused
    /// ([`PartitionError::CommandsTooRecent`]) while a running or later transaction may still
    /// record a command in it.
    #[tracing::instrument(name = "pg.detach_partition", skip(self), fields(schema = %self.inner.config.schema))]
    pub async fn detach_partition(&self, name: &str, drop: bool) -> Result<(), PartitionError> {
        let operation = "detach_partition";
        let schema = &self.inner.config.schema;
        let quoted = &self.inner.schema;
        let e = err(operation);
        let conn = Conn::get(&self.inner.pool, operation).await?;
        conn.begin_exchange(operation)?;
        let client = conn.object();
        if !is_partitioned(client, schema).await? {
            return Err(PartitionError::NotPartitioned {
                schema: schema.clone(),
            });
        }
        let partitions = list(client, schema).await?;
        let (table, detach_pending) =
            if let Some(target) = partitions.iter().find(|p| p.name == name) {
                let last = last_position(client, schema).await?;
                let current_from = partitions
                    .iter()
                    .find(|p| p.from.is_none_or(|from| from <= last) && last < p.to)
                    .map(|p| p.from.unwrap_or(i64::MIN))
                    .unwrap_or(i64::MIN);
                if target.to > current_from {
                    return Err(PartitionError::TooRecent {
                        name: name.to_string(),
                        to: target.to,
                        current_from,
                    });
                }
                ("events", target.detach_pending)
            } else {
                let commands = list_of(client, schema, "commands").await?;
                let Some(target) = commands.iter().find(|p| p.name == name) else {
                    return Err(PartitionError::UnknownPartition {
                        schema: schema.clone(),
                        name: name.to_string(),
                    });
                };
                // Every transaction that may still record a command has an id at or above the
                // oldest one running; later ones get higher ids.
                let oldest_running = oldest_running_xid(client).await?;
                if target.to > oldest_running {
                    return Err(PartitionError::CommandsTooRecent {
                        name: name.to_string(),
                        to: target.to,
                        oldest_running,
                    });
                }
                ("commands", target.detach_pending)
            };
        let mode = if detach_pending {
            "FINALIZE"
        } else {
            "CONCURRENTLY"
        };
        // Not in a transaction block (CONCURRENTLY refuses one); no lock timeout: it waits for
        // every transaction that may see the partition, however long it runs.
        client
            .batch_execute("SET lock_timeout = 0")
            .await
            .map_err(&e)?;
        client
            .batch_execute(&format!(
                "ALTER TABLE {quoted}.{table} DETACH PARTITION {quoted}.{} {mode}",
                quote_ident(name)
            ))
            .await
            .map_err(&e)?;
        client
            .batch_execute("RESET lock_timeout")
            .await
            .map_err(&e)?;
        if drop {
            client
                .batch_execute(&format!("DROP TABLE {quoted}.{}", quote_ident(name)))
                .await
                .map_err(&e)?;
        }
        conn.end_exchange();
        tracing::info!(schema, name, drop, "partition detached");
        Ok(())
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_aligned_to_the_range() {
        assert_eq!(align_up(1, 100), 100);
        assert_eq!(align_up(100, 100), 100);
        assert_eq!(align_up(101, 100), 200);
        assert_eq!(align_up(0, 7), 7);
    }

    #[test]
    fn a_partition_is_created_apart_and_attached() {
        let sql = create_partition_sql("\"s\"", 100, 200);
        assert!(sql.starts_with("CREATE TABLE \"s\".events_p100 (LIKE \"s\".events"));
        assert!(sql.contains("INCLUDING INDEXES"));
        assert!(sql.contains(
            "ALTER TABLE \"s\".events ATTACH PARTITION \"s\".events_p100 FOR VALUES FROM (100) TO (200)"
        ));
        assert!(!sql.contains("PARTITION OF"));
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(PartitionConfig::new(0).validate().is_err());
        assert!(PartitionConfig::new(10).ahead(0).validate().is_err());
        assert!(PartitionConfig::new(10)
            .conversion_headroom(0)
            .validate()
            .is_err());
        assert!(PartitionConfig::new(10)
            .command_range(0)
            .validate()
            .is_err());
        assert!(PartitionConfig::new(10).validate().is_ok());
    }

    #[test]
    fn commands_ranges_default_to_the_log_s_with_a_floor() {
        assert_eq!(
            PartitionConfig::new(10).command_range_size(),
            MIN_DEFAULT_COMMAND_RANGE
        );
        assert_eq!(
            PartitionConfig::new(50_000_000).command_range_size(),
            50_000_000
        );
        assert_eq!(
            PartitionConfig::new(10)
                .command_range(64)
                .command_range_size(),
            64
        );
    }
}
