//! The application's own statements, run inside a command's transaction.
use crate::{CommandRecord, Error};
use futures_util::future::BoxFuture;
use std::any::{type_name, Any, TypeId};
use std::fmt;

/// What the application's work fails with: any error, kept as it is so that the caller can
/// downcast it.
pub type WorkError = Box<dyn std::error::Error + Send + Sync + 'static>;

type RunFn = Box<
    dyn for<'a> FnOnce(
            &'a (dyn Any + Send + Sync),
            &'a CommandRecord,
        ) -> BoxFuture<'a, Result<(), WorkError>>
        + Send,
>;

/// The application's own statements (an outbox row, a read model, a uniqueness table), run by
/// a backend inside the transaction that commits a command's events and audit record, so that
/// all of it commits or none of it does.
///
/// The work is written against the backend's connection type `C` (on PostgreSQL,
/// `tokio_postgres::Client`, which `dcb_postgres::transaction_work` names for you) and gets the
/// command's record as written (its transaction id and last event's cursor). A backend runs it
/// after the events are inserted and the condition has held, and before the commit; a backend
/// with another connection type, or none, refuses it with [`Error::Session`] and writes
/// nothing. If the work fails, the transaction rolls back and the backend reports
/// [`Error::TransactionWork`] with the work's error.
///
/// ```
/// use dcb_core::{CommandRecord, TransactionWork};
///
/// struct Connection; // a backend's connection type
/// let work = TransactionWork::new(|_connection: &Connection, record: &CommandRecord| {
///     let last = record.last_event;
///     Box::pin(async move {
///         println!("the command's last event: {last:?}");
///         Ok(())
///     })
/// });
/// assert!(work.connection_type().ends_with("Connection"));
/// ```
pub struct TransactionWork {
    run: RunFn,
    connection: TypeId,
    connection_type: &'static str,
}

impl TransactionWork {
    /// Work written against connection type `C`.
    pub fn new<C, F>(work: F) -> Self
    where
        C: Any + Send + Sync,
        F: for<'a> FnOnce(&'a C, &'a CommandRecord) -> BoxFuture<'a, Result<(), WorkError>>
            + Send
            + 'static,
    {
        let run: RunFn = Box::new(move |connection, record| {
            match (connection as &dyn Any).downcast_ref::<C>() {
                Some(connection) => work(connection, record),
                // Checked by `run` before this is called.
                None => Box::pin(async { Err("connection type mismatch".into()) }),
            }
        });
        Self {
            run,
            connection: TypeId::of::<C>(),
            connection_type: type_name::<C>(),
        }
    }

    /// The name of the connection type the work expects.
    pub fn connection_type(&self) -> &'static str {
        self.connection_type
    }

    /// Runs the work on `connection` (for backends). Fails with [`Error::Session`] if the work
    /// expects another connection type, and with [`Error::TransactionWork`] if the work fails.
    pub async fn run<C: Any + Send + Sync>(
        self,
        connection: &C,
        record: &CommandRecord,
    ) -> Result<(), Error> {
        if TypeId::of::<C>() != self.connection {
            return Err(self.refused(&format!(
                "this store's transaction is a `{}`",
                type_name::<C>()
            )));
        }
        (self.run)(connection, record)
            .await
            .map_err(|source| Error::TransactionWork { source })
    }

    /// The error a backend returns for work it cannot run; `why` says what the backend has
    /// instead (e.g. "the in-memory store has no database transaction").
    pub fn refused(&self, why: &str) -> Error {
        Error::Session {
            operation: "command commit",
            reason: format!(
                "the decision carries work for a `{}` transaction, but {why}; nothing was \
                 written. Run the command on a store of that backend, or leave the work out",
                self.connection_type
            ),
        }
    }
}

impl fmt::Debug for TransactionWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionWork")
            .field("connection_type", &self.connection_type)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CommandRecord {
        CommandRecord {
            id: None,
            command_type: "Test".into(),
            data: serde_json::Value::Null,
            metadata: None,
            transaction_id: 7,
            last_event: None,
            occurred_at: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[tokio::test]
    async fn runs_on_its_connection_type_and_passes_the_record() {
        let work = TransactionWork::new(|connection: &String, record: &CommandRecord| {
            let seen = format!("{connection}:{}", record.transaction_id);
            Box::pin(async move {
                assert_eq!(seen, "conn:7");
                Ok(())
            })
        });
        work.run(&"conn".to_string(), &record()).await.unwrap();
    }

    #[tokio::test]
    async fn another_connection_type_is_refused() {
        let work = TransactionWork::new(|_: &String, _: &CommandRecord| Box::pin(async { Ok(()) }));
        let err = work.run(&42_u32, &record()).await.unwrap_err();
        assert!(matches!(err, Error::Session { .. }), "{err}");
        assert!(err.to_string().contains("u32"), "{err}");
    }

    #[tokio::test]
    async fn a_failure_is_kept_for_the_caller() {
        #[derive(Debug, thiserror::Error)]
        #[error("outbox full")]
        struct OutboxFull;
        let work = TransactionWork::new(|_: &String, _: &CommandRecord| {
            Box::pin(async { Err(OutboxFull.into()) })
        });
        match work.run(&String::new(), &record()).await {
            Err(Error::TransactionWork { source }) => assert!(source.is::<OutboxFull>()),
            other => panic!("expected the work's error, got {other:?}"),
        }
    }
}
