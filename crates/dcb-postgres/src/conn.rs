//! Pooled connections that are never returned to the pool in an unknown state, and the mapping
//! of database errors onto crablet's error kinds.
//!
//! Why an exchange that saw any error is never pooled: PostgreSQL can send an error the client
//! did not ask for. A `lock_timeout` (or a `statement_timeout` set by the application) whose
//! timer fires in the instant its statement ends leaves a cancel pending, and the server reports
//! it at its next interrupt check, possibly while idle, as an unsolicited error. tokio-postgres
//! hands that error to the next request on the connection and every later response to the
//! request after its own: a `COMMIT`'s reply is read by the next caller's `BEGIN`. So an error
//! says nothing certain about the statement it is attributed to until [`Conn::in_sync`] proves
//! the connection's responses line up with its requests.
use crate::server_error::ServerError;
use dcb_core::{ConflictInfo, Error};
use deadpool_postgres::{Object, Pool};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// No exchange in flight, every past one succeeded: the connection may go back to the pool.
const CLEAN: u8 = 0;
/// An exchange is in flight; dropped now, the server may still be working on it.
const IN_EXCHANGE: u8 = 1;
/// An exchange failed: the session may be inside a transaction, out of step with its client, or
/// closed. It is closed on drop and refuses further exchanges.
const POISONED: u8 = 2;

/// A query whose one row proves that a connection's replies line up with its requests.
const SYNC_PROBE: &str = "SELECT 'crablet:in-sync'";
/// How long [`Conn::in_sync`] waits for its probe.
const SYNC_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A pooled connection. Every exchange with the server is bracketed by
/// [`begin_exchange`](Self::begin_exchange) and [`end_exchange`](Self::end_exchange); a
/// connection whose exchange did not end cleanly (an error, a timeout, a cancelled future) is
/// closed instead of going back to the pool, so no later caller meets an open or aborted
/// transaction, a held lock, or a reply meant for someone else.
pub(crate) struct Conn {
    object: Option<Object>,
    state: AtomicU8,
}

impl Conn {
    pub(crate) async fn get(pool: &Pool, operation: &'static str) -> Result<Self, Error> {
        let object = pool.get().await.map_err(|e| Error::Storage {
            operation,
            message: format!("could not get a connection from the pool: {e}"),
            outcome_unknown: false,
            source: Some(Box::new(e)),
        })?;
        let status = pool.status();
        let pool_gauge = |state: &'static str, value: usize| {
            metrics::gauge!(dcb_core::store_metrics::POOL_CONNECTIONS, "state" => state)
                .set(value as f64);
        };
        pool_gauge("in_use", status.size.saturating_sub(status.available));
        pool_gauge("idle", status.available);
        pool_gauge("max", status.max_size);
        Ok(Self {
            object: Some(object),
            state: AtomicU8::new(CLEAN),
        })
    }

    pub(crate) fn object(&self) -> &Object {
        // Only `drop` takes the object out.
        self.object.as_ref().expect("connection used after drop")
    }

    pub(crate) fn object_mut(&mut self) -> &mut Object {
        self.object.as_mut().expect("connection used after drop")
    }

    /// Starts an exchange; refused on a connection whose earlier exchange did not end cleanly
    /// (a command session that already failed must not go on with a connection out of step).
    pub(crate) fn begin_exchange(&self, operation: &'static str) -> Result<(), Error> {
        match self
            .state
            .compare_exchange(CLEAN, IN_EXCHANGE, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(IN_EXCHANGE) => Err(Error::Storage {
                operation,
                message: "this connection is busy with another operation of the same command \
                          session (or one that was cancelled midway); await each before the next"
                    .into(),
                outcome_unknown: false,
                source: None,
            }),
            Err(_) => Err(Error::Storage {
                operation,
                message: "this connection is being discarded after an earlier failure on it; \
                          start a new command session"
                    .into(),
                outcome_unknown: false,
                source: None,
            }),
        }
    }

    /// Whether the connection may start an exchange.
    pub(crate) fn is_clean(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLEAN
    }

    /// Ends an exchange whose every statement succeeded.
    pub(crate) fn end_exchange(&self) {
        let _ =
            self.state
                .compare_exchange(IN_EXCHANGE, CLEAN, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Ends an exchange that failed: the connection is closed when dropped.
    pub(crate) fn fail_exchange(&self) {
        self.state.store(POISONED, Ordering::Release);
    }

    /// Whether the connection's replies still line up with its requests: a probe sent now gets
    /// its own row back. Only then do the errors of the exchange before it belong to the
    /// statements they were reported for. Called after a failed exchange, before saying that
    /// nothing was written.
    pub(crate) async fn in_sync(&self) -> bool {
        use tokio_postgres::SimpleQueryMessage;
        let Some(object) = self.object.as_ref() else {
            return false;
        };
        match tokio::time::timeout(SYNC_PROBE_TIMEOUT, object.simple_query(SYNC_PROBE)).await {
            Ok(Ok(messages)) => {
                let mut rows = messages.iter().filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(row.get(0)),
                    _ => None,
                });
                rows.next() == Some(Some("crablet:in-sync")) && rows.next().is_none()
            }
            _ => false,
        }
    }
}

impl Conn {
    /// Runs `exchange` (statements on this connection) as one exchange: the connection stays
    /// poolable only if it succeeds.
    pub(crate) async fn run<T>(
        &self,
        operation: &'static str,
        exchange: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.begin_exchange(operation)?;
        let result = exchange.await;
        match &result {
            Ok(_) => self.end_exchange(),
            Err(_) => self.fail_exchange(),
        }
        result
    }

    /// After a failed exchange whose transaction the server is known to have ended (its
    /// `COMMIT` or autocommit statement was answered) and whose session locks were released:
    /// if the connection is in step ([`in_sync`](Self::in_sync)), it is clean again and may be
    /// used and pooled.
    pub(crate) async fn recover(&self) -> bool {
        if !self.in_sync().await {
            return false;
        }
        self.state
            .compare_exchange(POISONED, CLEAN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) == CLEAN {
            return;
        }
        if let Some(object) = self.object.take() {
            let client = Object::take(object);
            // Ask the server to stop whatever it may still be doing (an exchange abandoned by a
            // timeout or a dropped future); closing the socket alone would leave a backend
            // waiting on a lock until it next talks to the client.
            let token = client.cancel_token();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = token.cancel_query(tokio_postgres::NoTls).await;
                });
            }
            drop(client);
        }
    }
}

/// Whether `err` is a reply of the server to a statement that it ran (rather than a lost
/// connection, a reply the client could not parse, or one out of step).
pub(crate) fn is_server_reply(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some()
}

/// Whether a failed `COMMIT` certainly rolled back. A `COMMIT` fails before anything is durable
/// (a deferred constraint, a serialization failure, a deadlock) except for what can arrive at
/// any moment: a cancel (`57014`, `55P03`: possibly pending from another statement, even sent
/// unasked after the commit) or the end of the session (`FATAL`, `PANIC`).
pub(crate) fn commit_certainly_failed(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::Severity;
    err.as_db_error().is_some_and(|db| {
        let code = db.code();
        *code != SqlState::QUERY_CANCELED
            && *code != SqlState::LOCK_NOT_AVAILABLE
            && !matches!(
                db.parsed_severity(),
                Some(Severity::Fatal | Severity::Panic)
            )
    })
}

/// The error of an append whose commit may or may not have happened.
pub(crate) fn outcome_unknown(
    operation: &'static str,
    what: impl std::fmt::Display,
    source: Option<tokio_postgres::Error>,
) -> Error {
    Error::Storage {
        operation,
        message: format!(
            "{what}; the commit may have been applied or not: read the log (or look the command \
             up by its id) before retrying"
        ),
        outcome_unknown: true,
        source: source.map(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
    }
}

/// Maps a tokio-postgres error; `during_commit` marks failures whose outcome is unknown.
pub(crate) fn db_error(
    operation: &'static str,
    err: tokio_postgres::Error,
    during_commit: bool,
) -> Error {
    db_error_with_timeout(operation, err, during_commit, None)
}

pub(crate) fn db_error_with_timeout(
    operation: &'static str,
    err: tokio_postgres::Error,
    during_commit: bool,
    timeout: Option<Duration>,
) -> Error {
    if let Some(db) = err.as_db_error() {
        let code = db.code();
        if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE {
            if let Some(timeout) = timeout {
                return Error::Timeout { operation, timeout };
            }
        }
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return Error::Conflict(ConflictInfo::new(None, None));
        }
        if *code == SqlState::INVALID_SCHEMA_NAME
            || *code == SqlState::UNDEFINED_TABLE
            || *code == SqlState::UNDEFINED_FUNCTION
        {
            return Error::Schema {
                message: format!(
                    "{} (SQLSTATE {}): the crablet schema is missing or incomplete; run \
                     PostgresEventStore::migrate()",
                    db.message(),
                    code.code()
                ),
            };
        }
        let message = format!("{} (SQLSTATE {})", db.message(), code.code());
        // A commit's cancel or lost session says nothing certain (see commit_certainly_failed).
        let outcome_unknown = during_commit && !commit_certainly_failed(&err);
        let source: Box<dyn std::error::Error + Send + Sync> = match ServerError::from_postgres(err)
        {
            Ok(server) => Box::new(server),
            Err(err) => Box::new(err),
        };
        return Error::Storage {
            operation,
            message,
            outcome_unknown,
            source: Some(source),
        };
    }
    Error::Storage {
        operation,
        message: err.to_string(),
        outcome_unknown: during_commit || err.is_closed(),
        source: Some(Box::new(err)),
    }
}

/// A pool of sessions for crablet's own statements: their default `lock_timeout` is
/// `lock_timeout`, with no statement timeout and no JIT (docs/design.md, "Timeouts and
/// cancellation"), appended to the URL's options so that they win. `connect_timeout`, when
/// given, also bounds creating and recycling a pooled connection. `field` names the setting a
/// pool error is reported on.
pub(crate) fn session_pool(
    mut pg_config: tokio_postgres::Config,
    lock_timeout: Duration,
    size: usize,
    connect_timeout: Option<Duration>,
    field: &'static str,
) -> Result<deadpool_postgres::Pool, Error> {
    use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
    let options = format!(
        "{} -c jit=off -c statement_timeout=0 -c lock_timeout={}",
        pg_config.get_options().unwrap_or_default(),
        lock_timeout.as_millis()
    );
    pg_config.options(options.trim_start());
    let manager = deadpool_postgres::Manager::from_config(
        pg_config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(connect_timeout)
        .recycle_timeout(connect_timeout)
        .build()
        .map_err(|e| Error::Config {
            field,
            reason: e.to_string(),
        })
}
