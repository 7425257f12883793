//! Embedded, versioned migrations and the schema version check.
use crate::conn::db_error;
use dcb_core::Error;
use tokio_postgres::Client;

/// The schema version this library reads and writes.
pub const SCHEMA_VERSION: i32 = 6;

/// The migrations, in order; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../sql/001_init.sql"),
    include_str!("../../../sql/002_handlers.sql"),
    include_str!("../../../sql/003_fence.sql"),
    include_str!("../../../sql/004_parked.sql"),
    include_str!("../../../sql/005_replay_requests.sql"),
    include_str!("../../../sql/006_command_ids.sql"),
];

/// Applies the missing migrations in one transaction, serialized across processes by an
/// advisory lock on the schema name, so concurrent `migrate()` calls are safe.
pub(crate) async fn migrate(client: &mut Client, schema: &str, quoted: &str) -> Result<(), Error> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_error("migrate", e, false))?;
    // The store's sessions default to the append timeout for lock waits; a migration waits for
    // another one, and for readers of the tables it alters, as long as they take.
    tx.batch_execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
        .await
        .map_err(|e| db_error("migrate", e, false))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('crablet/migrate/' || $1, 0))",
        &[&schema],
    )
    .await
    .map_err(|e| db_error("migrate", e, false))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}; \
         CREATE TABLE IF NOT EXISTS {quoted}.schema_version (\
            version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await
    .map_err(|e| db_error("migrate", e, false))?;
    let current: i32 = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {quoted}.schema_version"),
            &[],
        )
        .await
        .map_err(|e| db_error("migrate", e, false))?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(newer_schema(schema, current));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as i32 + 1;
        tracing::info!(schema, version, "applying crablet migration");
        tx.batch_execute(&migration.replace("__SCHEMA__", quoted))
            .await
            .map_err(|e| db_error("migrate", e, false))?;
        tx.execute(
            &format!("INSERT INTO {quoted}.schema_version (version) VALUES ($1)"),
            &[&version],
        )
        .await
        .map_err(|e| db_error("migrate", e, false))?;
    }
    tx.commit().await.map_err(|e| db_error("migrate", e, true))
}

fn newer_schema(schema: &str, found: i32) -> Error {
    Error::Schema {
        message: format!(
            "schema {schema:?} is at version {found}, newer than this library's version \
             {SCHEMA_VERSION}; upgrade crablet"
        ),
    }
}

/// Fails with a clear [`Error::Schema`] unless the schema exists at exactly [`SCHEMA_VERSION`].
pub(crate) async fn check_version(
    client: &Client,
    schema: &str,
    quoted: &str,
) -> Result<(), Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.schema_version', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(|e| db_error("connect", e, false))?
        .get(0);
    if !exists {
        return Err(Error::Schema {
            message: format!(
                "no crablet schema in {schema:?}: run PostgresEventStore::migrate() or set \
                 StoreConfig::auto_migrate"
            ),
        });
    }
    let found: i32 = client
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {quoted}.schema_version"),
            &[],
        )
        .await
        .map_err(|e| db_error("connect", e, false))?
        .get(0);
    match found {
        SCHEMA_VERSION => Ok(()),
        f if f > SCHEMA_VERSION => Err(newer_schema(schema, f)),
        f => Err(Error::Schema {
            message: format!(
                "schema {schema:?} is at version {f} but this library needs version \
                 {SCHEMA_VERSION}: run PostgresEventStore::migrate()"
            ),
        }),
    }
}
