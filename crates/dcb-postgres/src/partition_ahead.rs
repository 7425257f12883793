//! Partitions created ahead of need, so that an append never waits for DDL and never fails for
//! want of a partition.
//!
//! - Every successful append reports its position; once fewer than
//!   [`PartitionConfig::ahead`](crate::PartitionConfig::ahead) empty ranges remain above it,
//!   one background task creates the next ones (`ATTACH PARTITION`: a SHARE UPDATE EXCLUSIVE
//!   lock, appends and reads carry on).
//! - An append that still finds no partition (a batch larger than the margin, or a store that
//!   another process partitioned) failed as a whole, certainly, before its commit (PostgreSQL
//!   routes every row before the statement ends). The store then creates what it needs,
//!   synchronously, and runs the append again: the same call, the same validation, the same
//!   locks and checks, so a retried conditional append is exactly as correct as a first one.
//!
//! Creation is serialized per schema by an advisory lock (`MAINTENANCE_LOCK`) and reads the
//! partitions and the sequence after taking it, so processes that race create each range once.
use crate::conn::{db_error, Conn};
use crate::partition::{
    create_command_partition_sql, create_partition_sql, is_partitioned, is_table_partitioned,
    last_position, list, list_of, next_xid, stored_config, PartitionError, Stored,
    MAINTENANCE_LOCK,
};
use crate::server_error::ServerError;
use crate::store::PostgresEventStore;
use dcb_core::{AppendCommand, AppendCondition, Cursor, Error, NewEvent};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use tokio_postgres::error::SqlState;

/// How many times an append that found no partition creates partitions and runs again.
pub(crate) const MISSING_PARTITION_RETRIES: usize = 3;

/// A store's view of its partitions: the stored configuration and the first position no
/// partition holds (`i64::MAX` while unknown or unpartitioned: nothing to watch).
pub(crate) struct Ahead {
    config: Mutex<Option<Stored>>,
    horizon: AtomicI64,
    /// The first transaction id no commands partition holds (`i64::MAX`: nothing to watch).
    command_horizon: AtomicI64,
    running: AtomicBool,
}

impl Default for Ahead {
    fn default() -> Self {
        Self {
            config: Mutex::new(None),
            horizon: AtomicI64::new(i64::MAX),
            command_horizon: AtomicI64::new(i64::MAX),
            running: AtomicBool::new(false),
        }
    }
}

impl Ahead {
    pub(crate) fn configure(&self, stored: Option<Stored>) {
        if let Ok(mut config) = self.config.lock() {
            *config = stored;
        }
        if stored.is_none() {
            self.horizon.store(i64::MAX, Ordering::Release);
            self.command_horizon.store(i64::MAX, Ordering::Release);
        }
    }

    fn stored(&self) -> Option<Stored> {
        self.config.lock().ok().and_then(|c| *c)
    }

    pub(crate) fn is_partitioned(&self) -> bool {
        self.stored().is_some()
    }

    /// Whether a write that reached `position` (of the log) in transaction `xid` leaves fewer
    /// empty ranges than configured, in the log or in the commands table.
    fn wants_more(&self, position: Option<i64>, xid: u64) -> bool {
        let Some(stored) = self.stored() else {
            return false;
        };
        let short = |reached: i64, range: i64, horizon: &AtomicI64| {
            let horizon = horizon.load(Ordering::Acquire);
            let margin = range.saturating_mul(i64::from(stored.ahead));
            horizon != i64::MAX && reached.saturating_add(margin) >= horizon
        };
        position.is_some_and(|p| short(p, stored.range, &self.horizon))
            || short(
                i64::try_from(xid).unwrap_or(i64::MAX),
                stored.command_range,
                &self.command_horizon,
            )
    }
}

/// Whether `error` is PostgreSQL's "no partition of relation … found for row" for the log of
/// the store in `schema`, reported before the commit: nothing was written.
///
/// Told by the server's structured report ([`ServerError`]), never by its message, which
/// follows `lc_messages`: SQLSTATE 23514 (check_violation) on the `events` or `commands` table
/// of `schema` (or one of their partitions, the parent of a sub-partitioned range) **without a
/// constraint name**. A violated CHECK constraint carries its name; a row that no partition
/// accepts carries none. The report survives the sharing of a group commit's failure.
pub(crate) fn is_missing_partition(error: &dcb_core::Error, schema: &str) -> bool {
    let dcb_core::Error::Storage {
        outcome_unknown: false,
        source: Some(source),
        ..
    } = error
    else {
        return false;
    };
    source
        .downcast_ref::<ServerError>()
        .is_some_and(|server| names_missing_partition(server, schema))
}

/// The classification of [`is_missing_partition`], on the server's fields.
fn names_missing_partition(server: &ServerError, schema: &str) -> bool {
    let of_the_log = |table: &str| {
        ["events", "commands"].iter().any(|log| {
            table == *log
                || table
                    .strip_prefix(log)
                    .is_some_and(|rest| rest.starts_with('_'))
        })
    };
    server.code() == SqlState::CHECK_VIOLATION.code()
        && server.constraint().is_none()
        && server.schema() == Some(schema)
        && server.table().is_some_and(of_the_log)
}

impl PostgresEventStore {
    /// `append_checked`, run again after creating partitions when it found none.
    pub(crate) async fn append_partitioned(
        &self,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Cursor, Error> {
        let partitioned = self.inner.ahead.is_partitioned();
        // Before the spare copy: an invalid payload (JSON nested too deep) must not be cloned,
        // and is refused as `append_checked` would.
        if partitioned {
            if let Err(err) = dcb_core::validate_events(&events, &self.limits()) {
                dcb_core::discard_events(events);
                return Err(err);
            }
        }
        let count = events.len();
        let cursor = if partitioned {
            // Boxed: only a partitioned store keeps a spare copy to run the append again, and
            // the retry loop's future would otherwise enlarge every append's.
            Box::pin(
                self.retry_missing_partition(partitioned, events, count, |events| {
                    self.append_checked(events, condition)
                }),
            )
            .await?
        } else {
            // What `retry_missing_partition` does without a spare: a store partitioned since
            // this process connected gets its partitions (and this process the news) for the
            // next call, and this one reports the error.
            match self.append_checked(events, condition).await {
                Err(err) if is_missing_partition(&err, &self.inner.config.schema) => {
                    Box::pin(self.recover_missing_partition(count)).await;
                    return Err(err);
                }
                other => other?,
            }
        };
        self.appended_up_to(Some(cursor.position), cursor.transaction_id);
        Ok(cursor)
    }

    /// `append_commands`, run again after creating partitions when it found none.
    pub(crate) async fn append_commands_partitioned(
        &self,
        commands: Vec<AppendCommand>,
    ) -> Result<Vec<Cursor>, Error> {
        let partitioned = self.inner.ahead.is_partitioned();
        if partitioned {
            if let Err(err) = dcb_core::validate_batch(&commands, &self.limits()) {
                dcb_core::discard_commands(commands);
                return Err(err);
            }
        }
        let count = commands.iter().map(|c| c.events.len()).sum();
        let cursors = self
            .retry_missing_partition(partitioned, commands, count, |commands| {
                self.append_commands(commands)
            })
            .await?;
        if let Some(last) = cursors.iter().max_by_key(|c| c.position) {
            self.appended_up_to(Some(last.position), last.transaction_id);
        }
        Ok(cursors)
    }

    /// Runs `append(input)`; on a partitioned store, while it fails for want of a partition
    /// (nothing written), creates partitions for `count` more events and runs it again with a
    /// copy of the input, up to [`MISSING_PARTITION_RETRIES`] times.
    async fn retry_missing_partition<T, R, F, Fut>(
        &self,
        partitioned: bool,
        mut input: T,
        count: usize,
        append: F,
    ) -> Result<R, Error>
    where
        T: Clone,
        F: Fn(T) -> Fut,
        Fut: std::future::Future<Output = Result<R, Error>>,
    {
        let mut attempt = 0;
        loop {
            let spare = (partitioned && attempt < MISSING_PARTITION_RETRIES).then(|| input.clone());
            match append(input).await {
                Err(err) if is_missing_partition(&err, &self.inner.config.schema) => {
                    // Also without a spare: the partitions (and the news that the store is
                    // partitioned, for a process that connected before it was) are there for
                    // the next call.
                    // Concurrent appenders draw positions between the creation and the run
                    // again: each attempt covers four times the batch of the one before
                    // (1, 4, 16 batches), so a burst of them does not exhaust the retries.
                    let cover = count.saturating_mul(1usize << (2 * attempt.min(8)));
                    // Boxed: rare, and its future would enlarge every append's.
                    let recovered = Box::pin(self.recover_missing_partition(cover)).await;
                    match spare {
                        Some(spare) if recovered => {
                            attempt += 1;
                            tracing::debug!(attempt, "append found no partition; running it again");
                            input = spare;
                        }
                        _ => return Err(err),
                    }
                }
                other => return other,
            }
        }
    }

    /// Learns whether the store is partitioned (at connect).
    pub(crate) async fn load_partitioning(&self, conn: &Conn) -> Result<(), dcb_core::Error> {
        let stored =
            stored_config(conn.object(), &self.inner.config.schema, &self.inner.schema).await?;
        self.inner.ahead.configure(stored);
        if stored.is_some() {
            let partitions = list(conn.object(), &self.inner.config.schema)
                .await
                .map_err(into_store)?;
            let horizon = partitions.iter().map(|p| p.to).max().unwrap_or(i64::MAX);
            self.inner.ahead.horizon.store(horizon, Ordering::Release);
            let commands = list_of(conn.object(), &self.inner.config.schema, "commands")
                .await
                .map_err(into_store)?;
            let horizon = commands.iter().map(|p| p.to).max().unwrap_or(i64::MAX);
            self.inner
                .ahead
                .command_horizon
                .store(horizon, Ordering::Release);
        }
        Ok(())
    }

    /// After a write that reached `position` of the log (if it appended events) in
    /// transaction `xid`: creates the next partitions (of the log and of the commands table)
    /// in the background when a margin runs short. One task at a time per store.
    pub(crate) fn appended_up_to(&self, position: Option<i64>, xid: u64) {
        let ahead = &self.inner.ahead;
        if !ahead.wants_more(position, xid) || ahead.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            ahead.running.store(false, Ordering::Release);
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            if let Err(error) = store.create_partitions_ahead(0).await {
                tracing::warn!(%error, "could not create partitions ahead of the log");
            }
            store.inner.ahead.running.store(false, Ordering::Release);
        });
    }

    /// After an append that failed for want of a partition: creates partitions for at least
    /// `events` more positions (and the configured margin). Whether the append may run again.
    pub(crate) async fn recover_missing_partition(&self, events: usize) -> bool {
        self.recover_missing_partition_on(None, events).await
    }

    /// [`recover_missing_partition`](Self::recover_missing_partition) on `conn` (a command
    /// session's, outside its transaction), or on a pooled connection.
    pub(crate) async fn recover_missing_partition_on(
        &self,
        conn: Option<&Conn>,
        events: usize,
    ) -> bool {
        let extra = i64::try_from(events).unwrap_or(i64::MAX);
        let created = match conn {
            // A session whose connection the failed commit left unusable: a pooled one.
            Some(conn) => match self.create_partitions_ahead_on(conn, extra).await {
                Err(PartitionError::Store(_)) => self.create_partitions_ahead(extra).await,
                other => other,
            },
            None => self.create_partitions_ahead(extra).await,
        };
        match created {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, "an append found no partition, and none could be created");
                false
            }
        }
    }

    /// Creates the partitions missing so that every position up to the newest one drawn, plus
    /// `extra`, plus [`PartitionConfig::ahead`](crate::PartitionConfig::ahead) ranges, has a
    /// partition. Returns the names of the partitions created. The store calls it itself as
    /// the log grows; operators can run it ahead of a bulk load (`crablet partition
    /// create-ahead --extra N`). Safe to run from several processes at once.
    ///
    /// ```no_run
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> Result<(), dcb_postgres::PartitionError> {
    /// // Before importing 5 million events:
    /// store.create_partitions_ahead(5_000_000).await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "pg.create_partitions_ahead", skip(self), fields(schema = %self.inner.config.schema))]
    pub async fn create_partitions_ahead(&self, extra: i64) -> Result<Vec<String>, PartitionError> {
        let conn = Conn::get(&self.inner.pool, "create_partitions_ahead").await?;
        self.create_partitions_ahead_on(&conn, extra).await
    }

    /// [`create_partitions_ahead`](Self::create_partitions_ahead) on `conn`, which must be
    /// outside a transaction: a command session recovers on its own connection, so that
    /// sessions holding every pooled connection never wait for one more.
    pub(crate) async fn create_partitions_ahead_on(
        &self,
        conn: &Conn,
        extra: i64,
    ) -> Result<Vec<String>, PartitionError> {
        let operation = "create_partitions_ahead";
        let schema = &self.inner.config.schema;
        let quoted = &self.inner.schema;
        let e = |err| PartitionError::Store(db_error(operation, err, false));
        conn.begin_exchange(operation)?;
        let client = conn.object();
        // Waits as long as an ATTACH must (a concurrent DETACH … CONCURRENTLY holds its lock
        // until old snapshots are gone); appends carry on meanwhile within the margin.
        client
            .batch_execute("BEGIN; SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            .await
            .map_err(e)?;
        client
            .execute(
                &format!("SELECT pg_advisory_xact_lock({MAINTENANCE_LOCK})"),
                &[schema],
            )
            .await
            .map_err(e)?;
        if !is_partitioned(client, schema).await? {
            return Err(PartitionError::NotPartitioned {
                schema: schema.clone(),
            });
        }
        let Some(stored) = stored_config(client, schema, quoted).await? else {
            return Err(PartitionError::NotPartitioned {
                schema: schema.clone(),
            });
        };
        self.inner.ahead.configure(Some(stored));
        let mut horizon = list(client, schema)
            .await?
            .iter()
            .map(|p| p.to)
            .max()
            .unwrap_or(1);
        let last = last_position(client, schema).await?;
        let needed = last
            .saturating_add(extra.max(0))
            .saturating_add(stored.range.saturating_mul(i64::from(stored.ahead)));
        let mut created = Vec::new();
        let mut ddl = String::new();
        while horizon <= needed && horizon < i64::MAX {
            let to = horizon.saturating_add(stored.range);
            ddl.push_str(&create_partition_sql(quoted, horizon, to));
            created.push(crate::partition::partition_name(horizon));
            horizon = to;
        }
        // The commands table, by transaction id (ranges of `command_range`): every transaction
        // that starts writing from now on gets `next_xid` or a higher one.
        let mut command_horizon = i64::MAX;
        if is_table_partitioned(client, schema, "commands").await? {
            command_horizon = list_of(client, schema, "commands")
                .await?
                .iter()
                .map(|p| p.to)
                .max()
                .unwrap_or(1);
            // `extra` counts positions; a write takes one transaction id whatever its size.
            let needed = next_xid(client)
                .await?
                .saturating_add(stored.command_range.saturating_mul(i64::from(stored.ahead)));
            while command_horizon <= needed && command_horizon < i64::MAX {
                let to = command_horizon.saturating_add(stored.command_range);
                ddl.push_str(&create_command_partition_sql(quoted, command_horizon, to));
                created.push(crate::partition::command_partition_name(command_horizon));
                command_horizon = to;
            }
        }
        ddl.push_str("COMMIT");
        client.batch_execute(&ddl).await.map_err(e)?;
        conn.end_exchange();
        self.inner.ahead.horizon.store(horizon, Ordering::Release);
        self.inner
            .ahead
            .command_horizon
            .store(command_horizon, Ordering::Release);
        if !created.is_empty() {
            tracing::info!(schema, ?created, horizon, "created partitions ahead");
        }
        Ok(created)
    }
}

fn into_store(error: PartitionError) -> dcb_core::Error {
    match error {
        PartitionError::Store(error) => error,
        other => dcb_core::Error::Storage {
            operation: "partition",
            message: other.to_string(),
            outcome_unknown: false,
            source: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(server: ServerError) -> Error {
        Error::Storage {
            operation: "append",
            // Deliberately not the server's English text: the message plays no part.
            message: "keine Partition von Relation gefunden".into(),
            outcome_unknown: false,
            source: Some(Box::new(server)),
        }
    }

    #[test]
    fn a_row_no_partition_accepts_is_a_missing_partition_whatever_the_message() {
        let missing = ServerError::from_fields("23514", Some("shop"), Some("events"), None);
        assert!(is_missing_partition(&storage(missing), "shop"));
        let commands = ServerError::from_fields("23514", Some("shop"), Some("commands"), None);
        assert!(is_missing_partition(&storage(commands), "shop"));
        // A sub-partitioned range: the partition that found no sub-partition is named.
        let sub = ServerError::from_fields("23514", Some("shop"), Some("events_p100"), None);
        assert!(is_missing_partition(&storage(sub), "shop"));
    }

    #[test]
    fn a_named_check_constraint_is_not_a_missing_partition() {
        let check = ServerError::from_fields(
            "23514",
            Some("shop"),
            Some("events"),
            Some("events_type_check"),
        );
        assert!(!is_missing_partition(&storage(check), "shop"));
        let bound = ServerError::from_fields(
            "23514",
            Some("shop"),
            Some("events"),
            Some("events_partition_bound"),
        );
        assert!(!is_missing_partition(&storage(bound), "shop"));
    }

    #[test]
    fn other_codes_tables_schemas_and_uncertain_outcomes_are_not_a_missing_partition() {
        let unique = ServerError::from_fields("23505", Some("shop"), Some("events"), None);
        assert!(!is_missing_partition(&storage(unique), "shop"));
        let other_schema = ServerError::from_fields("23514", Some("other"), Some("events"), None);
        assert!(!is_missing_partition(&storage(other_schema), "shop"));
        let other_table = ServerError::from_fields("23514", Some("shop"), Some("eventsx"), None);
        assert!(!is_missing_partition(&storage(other_table), "shop"));
        let outbox = ServerError::from_fields("23514", Some("shop"), Some("outbox"), None);
        assert!(!is_missing_partition(&storage(outbox), "shop"));
        let unknown = Error::Storage {
            operation: "command",
            message: String::new(),
            outcome_unknown: true,
            source: Some(Box::new(ServerError::from_fields(
                "23514",
                Some("shop"),
                Some("events"),
                None,
            ))),
        };
        assert!(!is_missing_partition(&unknown, "shop"));
        // The English text alone, with no server report, is not enough.
        let text_only = Error::Storage {
            operation: "append",
            message: "no partition of relation \"events\" found for row (SQLSTATE 23514)".into(),
            outcome_unknown: false,
            source: None,
        };
        assert!(!is_missing_partition(&text_only, "shop"));
    }
}
