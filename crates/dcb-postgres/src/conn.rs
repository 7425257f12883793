//! Pooled connections that are never returned to the pool in an unknown state, and the mapping
//! of database errors onto crablet's error kinds.
use dcb_core::{ConflictInfo, Error};
use deadpool_postgres::{Object, Pool};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// A pooled connection. While a multi-statement exchange is in flight it is marked busy; if it
/// is dropped busy (the caller's future was cancelled, a timeout fired), the connection may sit
/// inside an open transaction, so it is closed instead of going back to the pool.
pub(crate) struct Conn {
    object: Option<Object>,
    busy: AtomicBool,
}

impl Conn {
    pub(crate) async fn get(pool: &Pool, operation: &'static str) -> Result<Self, Error> {
        let object = pool.get().await.map_err(|e| Error::Storage {
            operation,
            message: format!("could not get a connection from the pool: {e}"),
            outcome_unknown: false,
            source: Some(Box::new(e)),
        })?;
        Ok(Self {
            object: Some(object),
            busy: AtomicBool::new(false),
        })
    }

    pub(crate) fn object(&self) -> &Object {
        // Only `drop` takes the object out.
        self.object.as_ref().expect("connection used after drop")
    }

    pub(crate) fn object_mut(&mut self) -> &mut Object {
        self.object.as_mut().expect("connection used after drop")
    }

    pub(crate) fn begin_exchange(&self) {
        self.busy.store(true, Ordering::Release);
    }

    pub(crate) fn end_exchange(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Ends an exchange whose statements ended with `errors`, unless one of them says the
    /// session is gone (closed, or a FATAL from the server, which closes it next, as after
    /// `pg_terminate_backend`). Then the connection stays marked and is discarded on drop: back
    /// in the pool, its client might not have noticed the close yet and would be handed out.
    pub(crate) fn end_exchange_after(&self, errors: &[Option<&tokio_postgres::Error>]) {
        if !errors.iter().flatten().any(|e| session_lost(e)) {
            self.end_exchange();
        }
    }
}

fn session_lost(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::Severity;
    err.is_closed()
        || err.as_db_error().is_some_and(|db| {
            matches!(
                db.parsed_severity(),
                Some(Severity::Fatal | Severity::Panic)
            )
        })
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.busy.load(Ordering::Acquire) {
            if let Some(object) = self.object.take() {
                let client = Object::take(object);
                // Ask the server to stop whatever it is doing; closing the socket alone would
                // leave a backend waiting on a lock until it next talks to the client.
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
            return Error::Conflict(ConflictInfo {
                conflicting: None,
                after: None,
            });
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
        return Error::Storage {
            operation,
            message,
            outcome_unknown: false,
            source: Some(Box::new(err)),
        };
    }
    Error::Storage {
        operation,
        message: err.to_string(),
        outcome_unknown: during_commit || err.is_closed(),
        source: Some(Box::new(err)),
    }
}
