//! Operator queries: what is in a store and how far behind its durable handlers are. The SQL
//! behind `crablet status` and `crablet handlers list`, offered to applications too.
use crate::conn::{db_error, Conn};
use crate::handlers::lease_held_sql;
use crate::lag::{lag_from, lag_params, lag_sql, HandlerLag};
use crate::store::{prepare, within, PostgresEventStore};
use crate::xid8::Xid8;
use dcb_core::Cursor;
use std::time::SystemTime;
use tokio_postgres::Row;

/// Why an operator query failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The store's schema has no crablet tables (it was never migrated, or was dropped since
    /// the store connected).
    #[error("no crablet schema {schema:?} in this database: run `crablet migrate` (PostgresEventStore::migrate) first")]
    MissingSchema {
        /// The schema's name.
        schema: String,
    },
    /// The database failed, or a statement timed out (after the store's `query_timeout`).
    #[error(transparent)]
    Store(#[from] dcb_core::Error),
}

/// The size of one table of a store, from `pg_table_size`, `pg_indexes_size` and
/// `pg_total_relation_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSize {
    /// The table's name (unqualified: it is in the store's schema).
    pub name: String,
    /// Bytes of the table itself, TOAST and free-space/visibility maps included.
    pub table_bytes: u64,
    /// Bytes of all its indexes.
    pub index_bytes: u64,
    /// Everything: `table_bytes + index_bytes`.
    pub total_bytes: u64,
    /// The planner's estimate of its rows (`pg_class.reltuples`; `None` before the first
    /// `VACUUM` or `ANALYZE`).
    pub estimated_rows: Option<u64>,
}

/// The size of one index of a store (`pg_relation_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSize {
    /// The index's name.
    pub name: String,
    /// The table it indexes.
    pub table: String,
    /// Its bytes.
    pub bytes: u64,
}

/// What is in a store: [`PostgresEventStore::stats`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoreStats {
    /// The schema (unquoted).
    pub schema: String,
    /// Its migration version (see [`SCHEMA_VERSION`](crate::SCHEMA_VERSION)).
    pub schema_version: i32,
    /// Events in the log (an exact count).
    pub events: u64,
    /// The cursor of the last event in cursor order (`None` for an empty log).
    pub head: Option<Cursor>,
    /// When that event was appended.
    pub head_occurred_at: Option<SystemTime>,
    /// Recorded commands (rows of the `commands` audit table).
    pub commands: u64,
    /// Every table of the schema, by name.
    pub tables: Vec<TableSize>,
    /// Every index of the schema, by table and name.
    pub indexes: Vec<IndexSize>,
    /// The sum of the tables' `total_bytes`.
    pub total_bytes: u64,
}

/// A durable handler as an operator sees it: [`PostgresEventStore::handlers`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HandlerOverview {
    /// The handler's name.
    pub name: String,
    /// Its committed checkpoint (`None`: nothing processed yet). It may lie past the last
    /// event the handler selects: runners also move it over events they do not select.
    pub checkpoint: Option<Cursor>,
    /// When the checkpoint (or the last error) was written.
    pub updated_at: SystemTime,
    /// How far it is behind: events after the checkpoint (of any type; 0 when caught up)
    /// and the age of the oldest of them by the database's clock. The same definition as the
    /// handler metrics (`crablet_handler_lag_events`, `crablet_handler_lag_seconds`) and
    /// [`health`](PostgresEventStore::health), so the three agree.
    pub lag: HandlerLag,
    /// Whether some instance holds the handler's lease (is running it).
    pub lease_held: bool,
    /// Consecutive failed attempts at the batch after the checkpoint (0 when healthy).
    pub attempts: u32,
    /// The first event of the batch it is failing on.
    pub failing_at: Option<Cursor>,
    /// Its most recent failure, while the batch keeps failing.
    pub last_error: Option<String>,
    /// When that failure happened.
    pub last_error_at: Option<SystemTime>,
    /// Events it parked ([`FailurePolicy::Park`](crate::FailurePolicy::Park)).
    pub parked: u64,
}

/// Opens the operator queries' transaction: one snapshot for every number of a report.
const BEGIN_REPORT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
     SET LOCAL statement_timeout = 0; SET LOCAL jit = off";

impl PostgresEventStore {
    /// The schema's migration version, or `None` when the schema has no crablet tables.
    ///
    /// ```no_run
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> Result<(), dcb_postgres::AdminError> {
    /// assert_eq!(store.schema_version().await?, Some(dcb_postgres::SCHEMA_VERSION));
    /// # Ok(()) }
    /// ```
    pub async fn schema_version(&self) -> Result<Option<i32>, AdminError> {
        let operation = "schema_version";
        let conn = Conn::get(&self.inner.pool, operation).await?;
        let schema = &self.inner.config.schema;
        let quoted = &self.inner.schema;
        let exchange = async {
            let client = conn.object();
            let exists: bool = client
                .query_one(
                    "SELECT to_regclass(format('%I.schema_version', $1::text)) IS NOT NULL",
                    &[schema],
                )
                .await
                .map_err(|e| db_error(operation, e, false))?
                .try_get(0)
                .map_err(|e| db_error(operation, e, false))?;
            if !exists {
                return Ok(None);
            }
            let version: i32 = client
                .query_one(
                    &format!("SELECT coalesce(max(version), 0) FROM {quoted}.schema_version"),
                    &[],
                )
                .await
                .map_err(|e| db_error(operation, e, false))?
                .try_get(0)
                .map_err(|e| db_error(operation, e, false))?;
            Ok(Some(version))
        };
        let timeout = self.inner.config.query_timeout;
        Ok(conn
            .run(operation, within(timeout, operation, exchange))
            .await?)
    }

    /// What is in the store: schema version, event and command counts, the head cursor, and
    /// the size of every table and index of the schema. All numbers come from one snapshot.
    ///
    /// Counting is exact, so it reads the whole primary key of `events` (an index-only scan on
    /// a vacuumed table): on a log of many millions of events it takes seconds. Bounded by the
    /// store's `query_timeout`.
    ///
    /// ```no_run
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> Result<(), dcb_postgres::AdminError> {
    /// let stats = store.stats().await?;
    /// println!("{} events, head {:?}, {} bytes", stats.events, stats.head, stats.total_bytes);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "pg.stats", skip(self))]
    pub async fn stats(&self) -> Result<StoreStats, AdminError> {
        let operation = "stats";
        let conn = Conn::get(&self.inner.pool, operation).await?;
        let timeout = self.inner.config.query_timeout;
        let exchange = self.stats_on(&conn, operation);
        match conn
            .run(operation, within(timeout, operation, exchange))
            .await
        {
            Ok(Some(stats)) => Ok(stats),
            Ok(None) => Err(self.missing_schema()),
            Err(err) => Err(err.into()),
        }
    }

    async fn stats_on(
        &self,
        conn: &Conn,
        operation: &'static str,
    ) -> Result<Option<StoreStats>, dcb_core::Error> {
        let client = conn.object();
        let schema = &self.inner.config.schema;
        let quoted = &self.inner.schema;
        let err = |e| db_error(operation, e, false);
        if !begin_report(client, schema, ["events", "schema_version"], operation).await? {
            return Ok(None);
        }
        let counts = client
            .query_one(
                &format!(
                    "SELECT (SELECT coalesce(max(version), 0) FROM {quoted}.schema_version), \
                            (SELECT count(*) FROM {quoted}.events), \
                            (SELECT count(*) FROM {quoted}.commands)"
                ),
                &[],
            )
            .await
            .map_err(err)?;
        let schema_version: i32 = counts.try_get(0).map_err(err)?;
        let events: i64 = counts.try_get(1).map_err(err)?;
        let commands: i64 = counts.try_get(2).map_err(err)?;
        let head = client
            .query_opt(
                &format!(
                    "SELECT transaction_id, position, occurred_at FROM {quoted}.events \
                     ORDER BY transaction_id DESC, position DESC LIMIT 1"
                ),
                &[],
            )
            .await
            .map_err(err)?;
        let (head, head_occurred_at) = match head {
            Some(row) => {
                let tx: Xid8 = row.try_get(0).map_err(err)?;
                let position: i64 = row.try_get(1).map_err(err)?;
                let at: SystemTime = row.try_get(2).map_err(err)?;
                (Some(Cursor::new(tx.0, position)), Some(at))
            }
            None => (None, None),
        };
        let table_rows = client
            .query(
                "SELECT c.relname::text, pg_table_size(c.oid), pg_indexes_size(c.oid), \
                        pg_total_relation_size(c.oid), c.reltuples::float8 \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY c.relname",
                &[schema],
            )
            .await
            .map_err(err)?;
        let mut tables = Vec::with_capacity(table_rows.len());
        for row in &table_rows {
            let estimate: f64 = row.try_get(4).map_err(err)?;
            tables.push(TableSize {
                name: row.try_get(0).map_err(err)?,
                table_bytes: bytes(row, 1).map_err(err)?,
                index_bytes: bytes(row, 2).map_err(err)?,
                total_bytes: bytes(row, 3).map_err(err)?,
                // -1 (PostgreSQL 14+) until the table was first vacuumed or analyzed.
                estimated_rows: (estimate >= 0.0).then_some(estimate as u64),
            });
        }
        let index_rows = client
            .query(
                "SELECT i.relname::text, t.relname::text, pg_relation_size(i.oid) \
                 FROM pg_index x \
                 JOIN pg_class i ON i.oid = x.indexrelid \
                 JOIN pg_class t ON t.oid = x.indrelid \
                 JOIN pg_namespace n ON n.oid = t.relnamespace \
                 WHERE n.nspname = $1 ORDER BY t.relname, i.relname",
                &[schema],
            )
            .await
            .map_err(err)?;
        let mut indexes = Vec::with_capacity(index_rows.len());
        for row in &index_rows {
            indexes.push(IndexSize {
                name: row.try_get(0).map_err(err)?,
                table: row.try_get(1).map_err(err)?,
                bytes: bytes(row, 2).map_err(err)?,
            });
        }
        client.batch_execute("COMMIT").await.map_err(err)?;
        let total_bytes = tables.iter().map(|t| t.total_bytes).sum();
        Ok(Some(StoreStats {
            schema: schema.clone(),
            schema_version,
            events: u64::try_from(events).unwrap_or(0),
            head,
            head_occurred_at,
            commands: u64::try_from(commands).unwrap_or(0),
            tables,
            indexes,
            total_bytes,
        }))
    }

    /// Every durable handler that ever ran on the store (every row of
    /// `handler_checkpoints`), by name: checkpoint, lag, lease, failure streak and parked
    /// events. All numbers come from one snapshot; the lease is read live from `pg_locks`.
    ///
    /// Measuring a lag counts the events after the checkpoint, so it costs as much as the lag
    /// is long. Bounded by the store's `query_timeout`.
    ///
    /// ```no_run
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> Result<(), dcb_postgres::AdminError> {
    /// for handler in store.handlers().await? {
    ///     println!("{}: {} events behind, lease held: {}", handler.name, handler.lag.events, handler.lease_held);
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "pg.handlers", skip(self))]
    pub async fn handlers(&self) -> Result<Vec<HandlerOverview>, AdminError> {
        self.handler_overviews(None).await
    }

    /// The overview of one handler (see [`handlers`](Self::handlers)); `None` if it never ran
    /// and no checkpoint was set for it.
    pub async fn handler_overview(
        &self,
        name: &str,
    ) -> Result<Option<HandlerOverview>, AdminError> {
        Ok(self.handler_overviews(Some(name)).await?.into_iter().next())
    }

    async fn handler_overviews(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<HandlerOverview>, AdminError> {
        let operation = "handlers";
        let conn = Conn::get(&self.inner.pool, operation).await?;
        let timeout = self.inner.config.query_timeout;
        let exchange = self.handlers_on(&conn, name, operation);
        match conn
            .run(operation, within(timeout, operation, exchange))
            .await
        {
            Ok(Some(handlers)) => Ok(handlers),
            Ok(None) => Err(self.missing_schema()),
            Err(err) => Err(err.into()),
        }
    }

    async fn handlers_on(
        &self,
        conn: &Conn,
        name: Option<&str>,
        operation: &'static str,
    ) -> Result<Option<Vec<HandlerOverview>>, dcb_core::Error> {
        let client = conn.object();
        let schema = &self.inner.config.schema;
        let quoted = &self.inner.schema;
        let err = |e| db_error(operation, e, false);
        if !begin_report(
            client,
            schema,
            ["handler_checkpoints", "parked_events"],
            operation,
        )
        .await?
        {
            return Ok(None);
        }
        // The lease key is the runner's (handlers.rs): crablet/handler/<schema>/<name>.
        let rows = client
            .query(
                &format!(
                    "SELECT c.handler_name, c.transaction_id, c.position, c.updated_at, \
                            c.attempts, c.last_error, c.last_error_at, \
                            c.failing_transaction_id, c.failing_position, \
                            {lease}, \
                            (SELECT count(*) FROM {quoted}.parked_events p \
                             WHERE p.handler_name = c.handler_name) \
                     FROM {quoted}.handler_checkpoints c \
                     WHERE $2::text IS NULL OR c.handler_name = $2::text \
                     ORDER BY c.handler_name",
                    lease =
                        lease_held_sql("'crablet/handler/' || $1::text || '/' || c.handler_name"),
                ),
                &[schema, &name],
            )
            .await
            .map_err(err)?;
        let lag_stmt = prepare(client, &lag_sql(quoted), operation).await?;
        let mut handlers = Vec::with_capacity(rows.len());
        for row in &rows {
            let checkpoint = cursor_at(row, 1, 2).map_err(err)?;
            let (xid, position) = lag_params(checkpoint);
            let lag = client
                .query_one(&lag_stmt, &[&xid, &position])
                .await
                .and_then(|row| lag_from(&row))
                .map_err(err)?;
            let attempts: i32 = row.try_get(4).map_err(err)?;
            let parked: i64 = row.try_get(10).map_err(err)?;
            handlers.push(HandlerOverview {
                name: row.try_get(0).map_err(err)?,
                checkpoint,
                updated_at: row.try_get(3).map_err(err)?,
                lag,
                lease_held: row.try_get(9).map_err(err)?,
                attempts: u32::try_from(attempts).unwrap_or(0),
                failing_at: cursor_at(row, 7, 8).map_err(err)?,
                last_error: row.try_get(5).map_err(err)?,
                last_error_at: row.try_get(6).map_err(err)?,
                parked: u64::try_from(parked).unwrap_or(0),
            });
        }
        client.batch_execute("COMMIT").await.map_err(err)?;
        Ok(Some(handlers))
    }

    fn missing_schema(&self) -> AdminError {
        AdminError::MissingSchema {
            schema: self.inner.config.schema.clone(),
        }
    }
}

/// Opens the report's transaction ([`BEGIN_REPORT`]) if the schema has `tables`; otherwise ends
/// it and returns false.
async fn begin_report(
    client: &tokio_postgres::Client,
    schema: &str,
    tables: [&str; 2],
    operation: &'static str,
) -> Result<bool, dcb_core::Error> {
    let err = |e| db_error(operation, e, false);
    client.batch_execute(BEGIN_REPORT).await.map_err(err)?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL \
                AND to_regclass(format('%I.%I', $1::text, $3::text)) IS NOT NULL",
            &[&schema, &tables[0], &tables[1]],
        )
        .await
        .map_err(err)?
        .try_get(0)
        .map_err(err)?;
    if !exists {
        client.batch_execute("COMMIT").await.map_err(err)?;
    }
    Ok(exists)
}

/// A byte count (`int8`) from column `index`.
fn bytes(row: &Row, index: usize) -> Result<u64, tokio_postgres::Error> {
    let value: Option<i64> = row.try_get(index)?;
    Ok(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
}

/// A nullable cursor from the columns `tx` and `position`.
fn cursor_at(
    row: &Row,
    tx: usize,
    position: usize,
) -> Result<Option<Cursor>, tokio_postgres::Error> {
    let tx: Option<Xid8> = row.try_get(tx)?;
    let position: Option<i64> = row.try_get(position)?;
    Ok(match (tx, position) {
        (Some(tx), Some(position)) => Some(Cursor::new(tx.0, position)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use crate::{HandlerLag, PostgresEventStore, StoreConfig, SCHEMA_VERSION};
    use dcb_core::{EventStore, NewEvent};
    use std::time::Duration;

    async fn store() -> (PostgresEventStore, dcb_testkit::pg::TestSchema) {
        let schema = dcb_testkit::pg::TestSchema::new().await;
        let store = PostgresEventStore::connect(
            &schema.url,
            StoreConfig::default()
                .schema(schema.schema.clone())
                .auto_migrate(true),
        )
        .await
        .expect("store");
        (store, schema)
    }

    fn event(event_type: &str) -> NewEvent {
        NewEvent::builder(event_type)
            .tag("k", "v")
            .build()
            .expect("event")
    }

    #[tokio::test]
    async fn stats_count_and_measure_the_schema() {
        let (store, schema) = store().await;
        assert_eq!(
            store.schema_version().await.expect("version"),
            Some(SCHEMA_VERSION)
        );
        let empty = store.stats().await.expect("stats");
        assert_eq!((empty.events, empty.head, empty.commands), (0, None, 0));
        store
            .append(vec![event("A"), event("B")])
            .await
            .expect("append");
        let head = store.append(vec![event("C")]).await.expect("append");
        let stats = store.stats().await.expect("stats");
        assert_eq!(stats.schema, schema.schema);
        assert_eq!(stats.schema_version, SCHEMA_VERSION);
        assert_eq!(stats.events, 3);
        assert_eq!(stats.head, Some(head));
        assert!(stats.head_occurred_at.is_some());
        let events = stats
            .tables
            .iter()
            .find(|t| t.name == "events")
            .expect("events table");
        assert!(events.total_bytes >= events.table_bytes + events.index_bytes);
        assert!(stats
            .indexes
            .iter()
            .any(|i| i.name == "events_tags_idx" && i.table == "events" && i.bytes > 0));
        assert_eq!(
            stats.total_bytes,
            stats.tables.iter().map(|t| t.total_bytes).sum::<u64>()
        );
    }

    #[tokio::test]
    async fn handler_overviews_measure_lag_from_the_checkpoint() {
        let (store, _schema) = store().await;
        assert!(store.handlers().await.expect("handlers").is_empty());
        let first = store.append(vec![event("A")]).await.expect("append");
        store.append(vec![event("B")]).await.expect("append");
        tokio::time::sleep(Duration::from_millis(30)).await;
        let head = store.append(vec![event("C")]).await.expect("append");
        store
            .reset_handler("behind", Some(first))
            .await
            .expect("reset");
        store.reset_handler("fresh", None).await.expect("reset");
        store
            .reset_handler("done", Some(head))
            .await
            .expect("reset");
        let handlers = store.handlers().await.expect("handlers");
        let names: Vec<&str> = handlers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["behind", "done", "fresh"]);
        let behind = &handlers[0];
        assert_eq!(behind.checkpoint, Some(first));
        // Its oldest unprocessed event, B, was appended before the pause.
        assert_eq!(behind.lag.events, 2);
        assert!(behind.lag.seconds >= 0.025, "{behind:?}");
        assert!(!behind.lease_held);
        assert_eq!((behind.attempts, behind.parked), (0, 0));
        let done = &handlers[1];
        assert_eq!(done.lag, HandlerLag::default());
        let fresh = &handlers[2];
        assert_eq!(fresh.checkpoint, None);
        assert_eq!(fresh.lag.events, 3);
        assert!(fresh.lag.seconds >= behind.lag.seconds, "{fresh:?}");
        let one = store.handler_overview("behind").await.expect("overview");
        assert_eq!(one.map(|h| h.lag.events), Some(2));
        assert!(store
            .handler_overview("ghost")
            .await
            .expect("overview")
            .is_none());
    }
}
