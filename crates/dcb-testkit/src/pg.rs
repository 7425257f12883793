//! PostgreSQL for tests: find or start a server once per process, and hand out
//! isolated schemas ([`TestSchema`]) or whole databases ([`TestDb`]) that are
//! dropped again when the test is done.
//!
//! # Where the database comes from
//!
//! [`test_database`] provisions one server per test process, trying in order:
//!
//! 1. `DATABASE_URL`, if set (and not empty). If it is set but does not
//!    answer, provisioning fails with a clear error: it never silently falls
//!    back to something else.
//! 2. [`DEFAULT_URL`] (`postgres://postgres@localhost:5432/postgres`), if a
//!    server answers there within about 2 s (for example the one from the
//!    repository's `docker-compose.yml`).
//! 3. A disposable cluster started from the PostgreSQL server binaries on this
//!    machine ([`LocalCluster`]): `initdb` into a temporary directory, trust
//!    authentication, `fsync=off`, a free port on 127.0.0.1. When the tests run
//!    as root (PostgreSQL refuses to), the server runs as the `postgres` system
//!    user, or as a `crablet-pg` user created with `useradd`.
//! 4. `postgres:16` in Docker through `testcontainers`, if `docker info`
//!    succeeds.
//! 5. Otherwise [`ProvisionError::NoDatabase`], whose message lists what to
//!    set, install or start.
//!
//! # Cleanup
//!
//! [`TestSchema`] and [`TestDb`] drop their schema / database in `Drop`, on a
//! separate thread with its own small Tokio runtime (so it works from inside
//! any runtime), or earlier with their async `drop_now`.
//!
//! The server of steps 3 and 4 lives as long as the process. Values in a
//! `static` are never dropped, so the cleanup is registered with the C
//! library's `atexit(3)` (which runs when a test binary returns from `main`
//! or calls `std::process::exit`): it stops the local cluster (SIGQUIT, an
//! immediate shutdown) and removes its directory, or removes the container
//! (`docker rm --force`). A process killed by a signal runs no `atexit`
//! handler: the next local cluster start removes directories whose owner
//! process is gone, and containers carry the label `crablet.testkit=1`
//! (`docker rm -f $(docker ps -aq --filter label=crablet.testkit=1)`).
//! Schemas and databases named `crablet_t_*` that are more than an hour old
//! and whose creating process is gone are dropped the first time a process
//! provisions the server.

mod cleanup;
mod docker;
mod local;
mod standby;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};

pub use local::LocalCluster;
pub use standby::LocalStandby;

/// A primary and a streaming hot standby of it, both started from the local server binaries
/// for this test process (separate from the server [`test_database`] provisions).
#[derive(Debug)]
pub struct ReplicatedPair {
    /// The primary (replication works with `initdb`'s defaults).
    pub primary: LocalCluster,
    /// A hot standby streaming from `primary` through a replication slot. Shared by the
    /// process's tests: fault tests start their own with [`ReplicatedPair::new_standby`].
    pub standby: LocalStandby,
}

impl ReplicatedPair {
    /// Another standby of the same primary (its own slot and port), for tests that kill or
    /// pause it. Blocking for a second or two; dropped, it is stopped and removed.
    pub async fn new_standby(&'static self) -> LocalStandby {
        let primary = &self.primary;
        tokio::task::spawn_blocking(move || LocalStandby::start(primary))
            .await
            .unwrap_or_else(|e| panic!("dcb-testkit: the start task failed: {e}"))
            .unwrap_or_else(|e| panic!("dcb-testkit: could not start another standby: {e}"))
    }
}

static REPLICATED_PAIR: OnceCell<Option<ReplicatedPair>> = OnceCell::const_new();

/// The process's [`ReplicatedPair`], started on first use (a few seconds), or `None` with a
/// notice on stderr when the PostgreSQL server binaries (`initdb`, `pg_ctl`, `pg_basebackup`)
/// are not installed: tests that need a real standby then skip.
///
/// # Panics
///
/// If the binaries exist but the primary or the standby cannot be started (a skip would hide
/// a broken setup).
pub async fn replicated_pair() -> Option<&'static ReplicatedPair> {
    REPLICATED_PAIR
        .get_or_init(|| async {
            let Some(bin_dir) = LocalCluster::find_replication_bin_dir() else {
                eprintln!(
                    "dcb-testkit: SKIPPED: no PostgreSQL server binaries (initdb, pg_ctl, \
                     pg_basebackup) found on PATH or in the usual install directories; \
                     install the PostgreSQL server package to run the hot-standby tests"
                );
                return None;
            };
            let started = tokio::task::spawn_blocking(move || {
                let primary = LocalCluster::start_with(&bin_dir)?;
                let standby = LocalStandby::start(&primary)?;
                Ok::<_, ProvisionError>(ReplicatedPair { primary, standby })
            })
            .await;
            match started {
                Ok(Ok(pair)) => {
                    // A commit returns once its WAL is written, as in production, so that
                    // the standby can have it: with `synchronous_commit = off` (the local
                    // cluster's default) the WAL writer sends it up to 200 ms later.
                    let client = connect(pair.primary.url())
                        .await
                        .unwrap_or_else(|e| panic!("dcb-testkit: the primary: {e}"));
                    for statement in [
                        "ALTER SYSTEM SET synchronous_commit = on",
                        "SELECT pg_reload_conf()",
                    ] {
                        client
                            .batch_execute(statement)
                            .await
                            .unwrap_or_else(|e| panic!("dcb-testkit: {statement}: {e}"));
                    }
                    Some(pair)
                }
                Ok(Err(e)) => panic!("dcb-testkit: could not start a primary and a standby: {e}"),
                Err(e) => panic!("dcb-testkit: the start task failed: {e}"),
            }
        })
        .await
        .as_ref()
}

/// The URL tried when `DATABASE_URL` is not set.
pub const DEFAULT_URL: &str = "postgres://postgres@localhost:5432/postgres";

/// Prefix of every schema and database created by this module.
pub const NAME_PREFIX: &str = "crablet_t_";

/// How long a connection attempt may take while probing for a server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the test database came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `DATABASE_URL` environment variable.
    EnvVar,
    /// A server already answering at [`DEFAULT_URL`].
    DefaultUrl,
    /// A disposable cluster started from local server binaries.
    LocalCluster,
    /// A `postgres:16` container started through Docker.
    Docker,
}

/// The PostgreSQL server that tests of this process use.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// Connection URL of a database in which tests may create schemas (and,
    /// with [`TestDb`], databases).
    pub url: String,
    /// Where it came from.
    pub source: Source,
}

/// Why no test database could be provided.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProvisionError {
    /// `DATABASE_URL` is set but nothing usable answers there.
    #[error(
        "DATABASE_URL is set to {url:?} but PostgreSQL does not answer there: {reason}. \
         Start that server, correct DATABASE_URL, or unset it to let the testkit find or \
         start a PostgreSQL by itself."
    )]
    DatabaseUrlUnreachable {
        /// The value of `DATABASE_URL`.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Starting a cluster from local server binaries failed.
    #[error("could not start a disposable PostgreSQL from the local server binaries: {0}")]
    LocalCluster(String),
    /// Starting the Docker container failed.
    #[error("could not start PostgreSQL in Docker: {0}")]
    Docker(String),
    /// Nothing worked; the message says what was tried and what to do.
    #[error(
        "no PostgreSQL server is available for the tests.\nTried:\n{}\n\
         Do one of these:\n\
         \x20 - set DATABASE_URL to a server where the user may create schemas and databases, \
         e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres\n\
         \x20 - install the PostgreSQL server binaries (initdb, pg_ctl), e.g. \
         `apt-get install postgresql` (Debian/Ubuntu), `dnf install postgresql-server` \
         (Fedora), `brew install postgresql@16` (macOS); the testkit starts its own \
         throw-away cluster with them\n\
         \x20 - start Docker; the testkit then runs postgres:16 through testcontainers\n\
         \x20 - or run `docker compose up -d` in the repository root (postgres:17 on \
         localhost:5432)",
        attempts.iter().map(|a| format!("  - {a}")).collect::<Vec<_>>().join("\n")
    )]
    NoDatabase {
        /// One line per source tried, with why it was not used.
        attempts: Vec<String>,
    },
    /// A statement against the test server failed.
    #[error("test database operation failed: {0}")]
    Database(String),
}

static TEST_DATABASE: OnceCell<Result<TestDatabase, ProvisionError>> = OnceCell::const_new();

/// The test server of this process, provisioned on first use (see the
/// [module documentation](self) for the order of sources).
///
/// The outcome, success or failure, is computed once per process and then
/// returned to every caller.
pub async fn test_database() -> Result<&'static TestDatabase, ProvisionError> {
    let outcome = TEST_DATABASE
        .get_or_init(|| async {
            let env_url = std::env::var("DATABASE_URL")
                .ok()
                .filter(|url| !url.trim().is_empty());
            let db = provision(env_url, DEFAULT_URL).await?;
            sweep_stale_objects(&db.url).await;
            Ok(db)
        })
        .await;
    match outcome {
        Ok(db) => Ok(db),
        Err(e) => Err(e.clone()),
    }
}

/// Provisioning proper; `default_url` is a parameter so that tests can
/// force the later steps.
async fn provision(
    env_url: Option<String>,
    default_url: &str,
) -> Result<TestDatabase, ProvisionError> {
    if let Some(url) = env_url {
        // A server that was just started may need a moment: try for ~6 s.
        let mut reason = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            match probe(&url).await {
                Ok(()) => {
                    return Ok(TestDatabase {
                        url,
                        source: Source::EnvVar,
                    })
                }
                Err(e) => reason = e,
            }
        }
        return Err(ProvisionError::DatabaseUrlUnreachable { url, reason });
    }

    let mut attempts = vec!["DATABASE_URL: not set".to_owned()];
    match probe(default_url).await {
        Ok(()) => {
            return Ok(TestDatabase {
                url: default_url.to_owned(),
                source: Source::DefaultUrl,
            })
        }
        Err(e) => attempts.push(format!("{default_url}: {e}")),
    }

    match LocalCluster::find_bin_dir() {
        None => attempts.push(
            "local PostgreSQL server binaries: no initdb and pg_ctl found on PATH or in the \
             usual install directories"
                .to_owned(),
        ),
        Some(bin_dir) => {
            let started = tokio::task::spawn_blocking(move || LocalCluster::start_with(&bin_dir))
                .await
                .map_err(|e| ProvisionError::LocalCluster(format!("start task failed: {e}")))
                .and_then(|r| r);
            match started {
                Ok(cluster) => match probe(cluster.url()).await {
                    Ok(()) => {
                        let url = cluster.url().to_owned();
                        keep_for_process(cluster);
                        return Ok(TestDatabase {
                            url,
                            source: Source::LocalCluster,
                        });
                    }
                    Err(e) => attempts.push(format!(
                        "local cluster: started but does not answer at {}: {e}",
                        cluster.url()
                    )),
                },
                Err(e) => attempts.push(e.to_string()),
            }
        }
    }

    if tokio::task::spawn_blocking(docker::docker_available)
        .await
        .unwrap_or(false)
    {
        match docker::start_container().await {
            Ok(url) => {
                // The entrypoint may still be settling: give it ~30 s.
                let mut last = String::new();
                for _ in 0..60 {
                    match probe(&url).await {
                        Ok(()) => {
                            return Ok(TestDatabase {
                                url,
                                source: Source::Docker,
                            })
                        }
                        Err(e) => last = e,
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                attempts.push(format!(
                    "Docker: container started but {url} does not answer: {last}"
                ));
            }
            Err(e) => attempts.push(e.to_string()),
        }
    } else {
        attempts.push("Docker: `docker info` failed (no Docker engine running)".to_owned());
    }

    Err(ProvisionError::NoDatabase { attempts })
}

/// Keeps a provisioned cluster alive until the process exits; its `atexit`
/// registration then stops it (a `static` is never dropped).
fn keep_for_process(cluster: LocalCluster) {
    static CLUSTERS: std::sync::Mutex<Vec<LocalCluster>> = std::sync::Mutex::new(Vec::new());
    CLUSTERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(cluster);
}

/// Connects to `url` with a short timeout and runs `SELECT 1`.
async fn probe(url: &str) -> Result<(), String> {
    let client = connect_with_timeout(url, PROBE_TIMEOUT).await?;
    client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| pg_error(&e))
}

/// Opens a connection to `url` (without TLS), spawning its connection task
/// on the current Tokio runtime.
pub async fn connect(url: &str) -> Result<Client, ProvisionError> {
    connect_with_timeout(url, Duration::from_secs(10))
        .await
        .map_err(ProvisionError::Database)
}

async fn connect_with_timeout(url: &str, timeout: Duration) -> Result<Client, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| pg_error(&e))?;
    config.connect_timeout(timeout);
    let connecting = config.connect(NoTls);
    let (client, connection) =
        tokio::time::timeout(timeout + Duration::from_millis(500), connecting)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
            .map_err(|e| pg_error(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A `tokio_postgres::Error` with its causes (its `Display` alone often
/// says only "error connecting to server").
fn pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

static NAME_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh name `crablet_t_<unix seconds>_<pid>_<counter>_<random>`: unique
/// across processes and machines, and tells the stale-object sweep its age
/// and owner.
fn unique_name() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{NAME_PREFIX}{secs}_{}_{}_{:08x}",
        std::process::id(),
        NAME_COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// Parses `(created unix seconds, pid)` out of a name made by [`unique_name`].
fn parse_name(name: &str) -> Option<(u64, u32)> {
    let mut parts = name.strip_prefix(NAME_PREFIX)?.split('_');
    let secs = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    Some((secs, pid))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Drops `crablet_t_*` schemas and databases older than an hour whose
/// creating process no longer runs here. Best effort, errors are ignored.
async fn sweep_stale_objects(url: &str) {
    let Ok(client) = connect_with_timeout(url, PROBE_TIMEOUT).await else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stale = |name: &str| match parse_name(name) {
        Some((secs, pid)) => {
            now.saturating_sub(secs) > 3600
                && !cleanup::pid_alive(libc::pid_t::try_from(pid).unwrap_or(0))
        }
        None => false,
    };
    let pattern = "crablet\\_t\\_%";
    if let Ok(rows) = client
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1",
            &[&pattern],
        )
        .await
    {
        for row in rows {
            let name: String = row.get(0);
            if stale(&name) {
                let _ = client
                    .batch_execute(&format!(
                        "DROP SCHEMA IF EXISTS {} CASCADE",
                        quote_ident(&name)
                    ))
                    .await;
            }
        }
    }
    let force = server_supports_force(&client).await;
    if let Ok(rows) = client
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE $1",
            &[&pattern],
        )
        .await
    {
        for row in rows {
            let name: String = row.get(0);
            if stale(&name) {
                let _ = client.batch_execute(&drop_database_sql(&name, force)).await;
            }
        }
    }
}

async fn server_supports_force(client: &Client) -> bool {
    // DROP DATABASE ... WITH (FORCE) exists since PostgreSQL 13.
    match client.query_one("SHOW server_version_num", &[]).await {
        Ok(row) => row
            .get::<_, String>(0)
            .parse::<u32>()
            .map(|v| v >= 130000)
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn drop_database_sql(name: &str, force: bool) -> String {
    if force {
        format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name))
    } else {
        format!("DROP DATABASE IF EXISTS {}", quote_ident(name))
    }
}

/// Runs `work` to completion on a new thread with its own current-thread
/// Tokio runtime and waits for it. Usable from `Drop`, inside or outside a
/// runtime. Failures are reported on stderr (a destructor cannot return them).
fn run_on_own_thread<F, Fut>(what: &str, work: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), ProvisionError>>,
{
    let spawned = std::thread::Builder::new()
        .name("crablet-testkit-cleanup".into())
        .spawn(move || -> Result<(), ProvisionError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ProvisionError::Database(format!("could not build a runtime: {e}")))?;
            runtime.block_on(work())
        });
    let outcome = match spawned {
        Ok(handle) => handle
            .join()
            .unwrap_or_else(|_| Err(ProvisionError::Database("cleanup thread panicked".into()))),
        Err(e) => Err(ProvisionError::Database(format!(
            "could not spawn a cleanup thread: {e}"
        ))),
    };
    if let Err(e) = outcome {
        eprintln!("dcb-testkit: could not {what}: {e}");
    }
}

/// Sets timeouts so that cleanup never hangs behind a lock held by a
/// forgotten transaction.
async fn cleanup_client(url: &str) -> Result<Client, ProvisionError> {
    let client = connect(url).await?;
    client
        .batch_execute("SET lock_timeout = '20s'; SET statement_timeout = '60s'")
        .await
        .map_err(|e| ProvisionError::Database(pg_error(&e)))?;
    Ok(client)
}

/// A uniquely named, empty schema in the test database, dropped (`DROP SCHEMA
/// ... CASCADE`) when this value is dropped.
///
/// ```no_run
/// # async fn demo() {
/// let schema = dcb_testkit::pg::TestSchema::new().await;
/// let client = schema.connect().await.expect("connect");
/// client.batch_execute("CREATE TABLE t (x int)").await.expect("create"); // lands in the schema
/// # }
/// ```
#[derive(Debug)]
pub struct TestSchema {
    /// URL of the database that holds the schema (it does not select the
    /// schema; see [`TestSchema::search_path_url`]).
    pub url: String,
    /// The schema's name (`crablet_t_...`; needs no quoting).
    pub schema: String,
    dropped: bool,
}

impl TestSchema {
    /// Creates a schema in the process's [`test_database`].
    ///
    /// # Panics
    ///
    /// If no test database can be provisioned or the schema cannot be
    /// created; the message says why. Use [`TestSchema::try_new`] to handle
    /// that instead.
    pub async fn new() -> Self {
        match Self::try_new().await {
            Ok(schema) => schema,
            Err(e) => panic!("dcb-testkit: could not create a test schema: {e}"),
        }
    }

    /// Creates a schema in the process's [`test_database`].
    pub async fn try_new() -> Result<Self, ProvisionError> {
        let db = test_database().await?;
        Self::create_in(&db.url).await
    }

    /// Creates a schema in the database at `url`.
    pub async fn create_in(url: &str) -> Result<Self, ProvisionError> {
        let schema = unique_name();
        let client = connect(url).await?;
        client
            .batch_execute(&format!("CREATE SCHEMA {}", quote_ident(&schema)))
            .await
            .map_err(|e| {
                ProvisionError::Database(format!("CREATE SCHEMA {schema}: {}", pg_error(&e)))
            })?;
        Ok(TestSchema {
            url: url.to_owned(),
            schema,
            dropped: false,
        })
    }

    /// [`TestSchema::url`] with the connection option
    /// `options=-csearch_path=<schema>`, so that every connection made with
    /// it (by `tokio-postgres`, `deadpool-postgres` or `psql`) uses the schema
    /// for unqualified names.
    pub fn search_path_url(&self) -> String {
        with_search_path(&self.url, &self.schema)
    }

    /// A new connection whose `search_path` is the schema.
    pub async fn connect(&self) -> Result<Client, ProvisionError> {
        connect(&self.search_path_url()).await
    }

    /// Drops the schema now (instead of in `Drop`) and reports failure.
    pub async fn drop_now(mut self) -> Result<(), ProvisionError> {
        self.dropped = true;
        drop_schema(self.url.clone(), self.schema.clone()).await
    }
}

async fn drop_schema(url: String, schema: String) -> Result<(), ProvisionError> {
    let client = cleanup_client(&url).await?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&schema)
        ))
        .await
        .map_err(|e| ProvisionError::Database(format!("DROP SCHEMA {schema}: {}", pg_error(&e))))
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        self.dropped = true;
        let (url, schema) = (self.url.clone(), self.schema.clone());
        run_on_own_thread(&format!("drop test schema {}", self.schema), move || {
            drop_schema(url, schema)
        });
    }
}

/// A fresh, uniquely named database on the test server, for tests that need
/// database-level isolation; dropped (`WITH (FORCE)` on PostgreSQL 13+) when
/// this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// URL of the new database.
    pub url: String,
    /// The database's name (`crablet_t_...`; needs no quoting).
    pub name: String,
    admin_url: String,
    dropped: bool,
}

impl TestDb {
    /// Creates a database on the server of the process's [`test_database`].
    ///
    /// # Panics
    ///
    /// If no test database can be provisioned or the database cannot be
    /// created; the message says why. Use [`TestDb::try_new`] to handle that
    /// instead.
    pub async fn new() -> Self {
        match Self::try_new().await {
            Ok(db) => db,
            Err(e) => panic!("dcb-testkit: could not create a test database: {e}"),
        }
    }

    /// Creates a database on the server of the process's [`test_database`].
    pub async fn try_new() -> Result<Self, ProvisionError> {
        let db = test_database().await?;
        Self::create_from(&db.url).await
    }

    /// Creates a database with the connection `admin_url` (whose user needs
    /// the CREATEDB privilege).
    pub async fn create_from(admin_url: &str) -> Result<Self, ProvisionError> {
        let name = unique_name();
        let client = connect(admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .map_err(|e| {
                ProvisionError::Database(format!("CREATE DATABASE {name}: {}", pg_error(&e)))
            })?;
        Ok(TestDb {
            url: with_dbname(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
            dropped: false,
        })
    }

    /// A new connection to the database.
    pub async fn connect(&self) -> Result<Client, ProvisionError> {
        connect(&self.url).await
    }

    /// Drops the database now (instead of in `Drop`) and reports failure.
    pub async fn drop_now(mut self) -> Result<(), ProvisionError> {
        self.dropped = true;
        drop_database(self.admin_url.clone(), self.name.clone()).await
    }
}

async fn drop_database(admin_url: String, name: String) -> Result<(), ProvisionError> {
    let client = cleanup_client(&admin_url).await?;
    let force = server_supports_force(&client).await;
    if !force {
        let _ = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await;
    }
    client
        .batch_execute(&drop_database_sql(&name, force))
        .await
        .map_err(|e| ProvisionError::Database(format!("DROP DATABASE {name}: {}", pg_error(&e))))
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        self.dropped = true;
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        run_on_own_thread(&format!("drop test database {}", self.name), move || {
            drop_database(url, name)
        });
    }
}

/// `url` with its database replaced by `dbname`. Handles URLs
/// (`postgres://…/db?…`) and `key=value` connection strings.
fn with_dbname(url: &str, dbname: &str) -> String {
    match split_url(url) {
        Some((scheme, authority, query)) => match query {
            Some(q) => format!("{scheme}{authority}/{dbname}?{q}"),
            None => format!("{scheme}{authority}/{dbname}"),
        },
        // In key=value strings a later key overrides an earlier one.
        None => format!("{url} dbname={dbname}"),
    }
}

/// `url` plus `options=-csearch_path=<schema>`.
fn with_search_path(url: &str, schema: &str) -> String {
    match split_url(url) {
        Some(_) => {
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}options=-csearch_path%3D{schema}")
        }
        None => format!("{url} options='-csearch_path={schema}'"),
    }
}

/// `(scheme, authority, query)` of a `postgres://` / `postgresql://` URL.
fn split_url(url: &str) -> Option<(&str, &str, Option<&str>)> {
    let scheme_len = ["postgresql://", "postgres://"]
        .iter()
        .find(|scheme| url.starts_with(**scheme))?
        .len();
    let (scheme, rest) = url.split_at(scheme_len);
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    Some((scheme, authority, query))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exists(query: &str, name: &str) -> bool {
        let db = test_database().await.expect("test database");
        let client = connect(&db.url).await.expect("connect");
        let row = client
            .query_one(query, &[&name])
            .await
            .expect("existence query");
        row.get(0)
    }

    #[tokio::test]
    async fn provisions_a_working_database() {
        let db = test_database().await.expect("test database");
        let client = connect(&db.url).await.expect("connect");
        let row = client
            .query_one("SELECT 1::int4", &[])
            .await
            .expect("SELECT 1");
        assert_eq!(row.get::<_, i32>(0), 1);
        // Provisioned once: the same instance every time.
        let again = test_database().await.expect("test database");
        assert!(std::ptr::eq(db, again));
    }

    #[tokio::test]
    async fn schema_is_created_isolated_and_dropped() {
        let schema = TestSchema::new().await;
        assert!(schema.schema.starts_with(NAME_PREFIX));
        let client = schema.connect().await.expect("connect");
        let path: String = client
            .query_one("SHOW search_path", &[])
            .await
            .expect("search_path")
            .get(0);
        assert_eq!(path, schema.schema);
        client
            .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
            .await
            .expect("create table in schema");
        let in_schema: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 't'",
                &[&schema.schema],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(in_schema, 1);
        drop(client);

        let name = schema.schema.clone();
        let query = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)";
        assert!(exists(query, &name).await);
        drop(schema); // Drop from inside a runtime
        assert!(!exists(query, &name).await, "schema {name} left behind");

        let other = TestSchema::new().await;
        let name = other.schema.clone();
        other.drop_now().await.expect("drop_now");
        assert!(!exists(query, &name).await, "schema {name} left behind");
    }

    #[tokio::test]
    async fn schemas_are_unique() {
        let a = TestSchema::new().await;
        let b = TestSchema::new().await;
        assert_ne!(a.schema, b.schema);
    }

    #[tokio::test]
    async fn database_is_created_and_dropped_even_while_connected() {
        let db = TestDb::new().await;
        let client = db.connect().await.expect("connect to the new database");
        let current: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .expect("current_database")
            .get(0);
        assert_eq!(current, db.name);
        let name = db.name.clone();
        let query = "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)";
        assert!(exists(query, &name).await);
        drop(db); // `client` is still connected: WITH (FORCE) ends it
        assert!(!exists(query, &name).await, "database {name} left behind");
        drop(client);
    }

    #[tokio::test]
    async fn unreachable_database_url_is_a_clear_error() {
        let url = "postgres://postgres@127.0.0.1:1/postgres".to_owned();
        let err = provision(Some(url.clone()), DEFAULT_URL)
            .await
            .expect_err("must fail");
        assert!(matches!(err, ProvisionError::DatabaseUrlUnreachable { .. }));
        let message = err.to_string();
        assert!(
            message.contains("DATABASE_URL") && message.contains(&url),
            "{message}"
        );
    }

    #[tokio::test]
    async fn falls_back_to_a_local_cluster_when_no_server_answers() {
        // Nothing listens on port 1: step 2 fails, step 3 starts a cluster
        // (stopped by the atexit handler when this test process exits).
        let db = provision(None, "postgres://postgres@127.0.0.1:1/postgres")
            .await
            .expect("fallback to a local cluster");
        assert_eq!(db.source, Source::LocalCluster);
        let schema = TestSchema::create_in(&db.url)
            .await
            .expect("schema in local cluster");
        let client = schema.connect().await.expect("connect");
        client
            .batch_execute("CREATE TABLE t (x int)")
            .await
            .expect("create table");
        drop(client);
        schema.drop_now().await.expect("drop schema");
    }

    #[test]
    fn no_database_message_says_what_to_do() {
        let message = ProvisionError::NoDatabase {
            attempts: vec!["DATABASE_URL: not set".into()],
        }
        .to_string();
        for needle in [
            "DATABASE_URL",
            "apt-get install postgresql",
            "Docker",
            "docker compose up -d",
        ] {
            assert!(message.contains(needle), "{needle} missing from: {message}");
        }
    }

    #[tokio::test]
    async fn local_cluster_starts_answers_and_stops() {
        assert!(
            LocalCluster::find_bin_dir().is_some(),
            "this test needs PostgreSQL server binaries (initdb, pg_ctl)"
        );
        let cluster = tokio::task::spawn_blocking(LocalCluster::start)
            .await
            .expect("start task")
            .expect("start a local cluster");
        assert!(cluster.port() > 0);
        let client = connect(cluster.url())
            .await
            .expect("connect to the local cluster");
        let row = client
            .query_one("SELECT 1::int4", &[])
            .await
            .expect("SELECT 1");
        assert_eq!(row.get::<_, i32>(0), 1);
        let fsync: String = client
            .query_one("SHOW fsync", &[])
            .await
            .expect("fsync")
            .get(0);
        assert_eq!(fsync, "off");
        drop(client);

        let data_dir = cluster.data_dir().to_owned();
        let root = data_dir.parent().expect("root dir").to_owned();
        let pid = cleanup::postmaster_pid(&data_dir).expect("postmaster.pid");
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .expect("stop task")
            .expect("stop the local cluster");
        assert!(!cleanup::pid_alive(pid), "postmaster {pid} still running");
        assert!(!root.exists(), "{} left behind", root.display());
    }

    const ATEXIT_CHILD: &str = "CRABLET_TESTKIT_ATEXIT_CHILD";

    /// Helper for `local_cluster_is_removed_at_process_exit`: does nothing
    /// unless run as its child process.
    #[test]
    fn atexit_child_helper() {
        if std::env::var_os(ATEXIT_CHILD).is_none() {
            return;
        }
        let cluster = LocalCluster::start().expect("start a local cluster");
        let pid = cleanup::postmaster_pid(cluster.data_dir()).expect("postmaster.pid");
        println!("CHILD_DATA_DIR={}", cluster.data_dir().display());
        println!("CHILD_POSTMASTER={pid}");
        // Never dropped: only the atexit handler can clean up.
        std::mem::forget(cluster);
    }

    #[test]
    fn local_cluster_is_removed_at_process_exit() {
        let exe = std::env::current_exe().expect("current test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", "pg::tests::atexit_child_helper", "--nocapture"])
            .env(ATEXIT_CHILD, "1")
            .output()
            .expect("run the child test process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |key: &str| {
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .unwrap_or_else(|| panic!("{key} missing from child output: {stdout}"))
                .to_owned()
        };
        let data_dir = std::path::PathBuf::from(field("CHILD_DATA_DIR="));
        let pid: libc::pid_t = field("CHILD_POSTMASTER=").parse().expect("pid");
        assert!(
            !cleanup::pid_alive(pid),
            "postmaster {pid} survived its process"
        );
        let root = data_dir.parent().expect("root dir");
        assert!(!root.exists(), "{} left behind", root.display());
    }

    #[test]
    fn names_are_parseable_and_fit_postgres_limits() {
        let name = unique_name();
        assert!(name.len() < 63, "{name}");
        let (secs, pid) = parse_name(&name).expect("parse");
        assert_eq!(pid, std::process::id());
        assert!(secs > 1_600_000_000);
        assert_eq!(parse_name("crablet_t_x"), None);
        assert_eq!(parse_name("other"), None);
    }

    #[test]
    fn url_rewriting() {
        assert_eq!(
            with_dbname("postgres://postgres@localhost:5432/postgres", "x"),
            "postgres://postgres@localhost:5432/x"
        );
        assert_eq!(
            with_dbname("postgresql://u:p@h/db?sslmode=disable", "x"),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://h", "x"), "postgres://h/x");
        assert_eq!(with_dbname("host=h user=u", "x"), "host=h user=u dbname=x");
        assert_eq!(
            with_search_path("postgres://h/db", "s"),
            "postgres://h/db?options=-csearch_path%3Ds"
        );
        assert_eq!(
            with_search_path("postgres://h/db?a=b", "s"),
            "postgres://h/db?a=b&options=-csearch_path%3Ds"
        );
        assert_eq!(
            with_search_path("host=h", "s"),
            "host=h options='-csearch_path=s'"
        );
        let config: tokio_postgres::Config = with_search_path("postgres://h/db", "s")
            .parse()
            .expect("parse");
        assert_eq!(config.get_options(), Some("-csearch_path=s"));
    }
}
