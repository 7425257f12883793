//! A command's commit with the application's own statements in its transaction
//! ([`TransactionWork`]): the events, the command record and the work's writes commit together
//! or not at all.
//!
//! The pipelined commit (append.rs) cannot wait for the work between its insert and its
//! `COMMIT`, so this path takes three round trips: open, lock and insert (exactly the
//! statements of the pipelined commit, the locks still before the transaction's id); then the
//! work; then a check that the transaction is still the command's and open, and the `COMMIT`.
//! Every failure before the `COMMIT` was sent is certain (nothing was written); a failed
//! `COMMIT` is classified as in append.rs.
use crate::append::{client_deadline, command_outcome, read_outcome, AppendOutcome, Protocol};
use crate::conn::{
    commit_certainly_failed, db_error, db_error_with_timeout, outcome_unknown, Conn,
};
use crate::sql::{self, AppendParts};
use crate::store::{prepare, PostgresEventStore};
use dcb_core::{
    AppendCondition, CommandRecord, Error, NewCommand, NewEvent, TransactionWork, WorkError,
};
use postgres_types::ToSql;
use std::future::Future;
use std::time::Duration;
use tokio_postgres::{Row, Statement};

const OPERATION: &str = "command";

/// The prepared probe and, under session locks, the unlock.
type Finishing = (Statement, Option<Statement>);

/// Whether the session is still in the command's transaction (by its id); fails in an aborted
/// transaction.
const STILL_OURS: &str = "SELECT pg_current_xact_id_if_assigned()::text::int8 = $1";

/// Builds [`TransactionWork`] for the PostgreSQL store: `work` gets the command session's
/// connection, inside the command's transaction, and the command's record as written (its
/// transaction id and last event). Return `Ok(())` to commit; an error rolls everything back
/// and comes back as `CommandError::TransactionWork` (`?` on a `tokio_postgres` error works).
///
/// Run only statements: never `COMMIT`, `ROLLBACK` or a change of isolation level (the commit
/// detects a transaction ended by the work and reports it). The command's lock keys are held
/// while the work runs, and its statements wait for locks at most `append_timeout` (the
/// transaction's `lock_timeout`); keep it short.
///
/// ```no_run
/// use dcb_command::{handler_fn, Command, CommandExecutor, Decision, HandlerError};
/// use dcb_core::NewEvent;
/// use std::sync::Arc;
///
/// # async fn demo(store: dcb_postgres::PostgresEventStore) -> Result<(), Box<dyn std::error::Error>> {
/// let place_order = handler_fn(|command: &Command<String>, _reader| {
///     Box::pin(async move {
///         let order = command.payload.clone();
///         let placed = NewEvent::builder("OrderPlaced").tag("order_id", order.as_str()).build()?;
///         // The outbox row commits with the event, or neither does.
///         let outbox = dcb_postgres::transaction_work(move |client, record| {
///             Box::pin(async move {
///                 client
///                     .execute(
///                         "INSERT INTO outbox (topic, body, tx) VALUES ('orders', $1, $2)",
///                         &[&order, &(record.transaction_id as i64)],
///                     )
///                     .await?;
///                 Ok(())
///             })
///         });
///         Ok::<_, HandlerError>(Decision::append([placed]).in_transaction(outbox))
///     })
/// });
/// let executor = CommandExecutor::new(Arc::new(store));
/// executor.execute(Command::new("PlaceOrder", "o1".to_string()), &place_order).await?;
/// # Ok(()) }
/// ```
pub fn transaction_work<F>(work: F) -> TransactionWork
where
    F: for<'a> FnOnce(
            &'a tokio_postgres::Client,
            &'a CommandRecord,
        ) -> futures_util::future::BoxFuture<'a, Result<(), WorkError>>
        + Send
        + 'static,
{
    TransactionWork::new(work)
}

impl PostgresEventStore {
    /// Commits `command` with `events` (if `condition` holds) and runs `work` in the same
    /// transaction before the commit. `None` for a duplicate command id.
    pub(crate) async fn commit_with_work_on(
        &self,
        conn: &Conn,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
        work: TransactionWork,
    ) -> Result<Option<CommandRecord>, Error> {
        let events = self.validate_commit(command, events, condition)?;
        let simplified = condition.map(|c| c.simplified());
        let checked = simplified.as_ref();
        let lock = self.append_locks(&events, checked, Some(command));
        let session_locks = self.protocol(true) == Protocol::SessionLocks;
        let begin = self.begin_append(checked).to_owned();
        let parts = AppendParts {
            condition: checked,
            command: Some(command),
            lock: None,
            windows: self.recent_windows(),
        };
        let stmt = sql::append(&self.inner.schema, events, parts);
        let timeout = self.inner.config.append_timeout;

        conn.begin_exchange(OPERATION)?;
        // Until the exchange ends cleanly, dropping the connection closes it (rolling back).
        let opened = bounded(
            timeout,
            self.open(conn, session_locks, &begin, &stmt, &lock),
        )
        .await;
        let outcome = match opened.and_then(|rows| read_outcome(rows).map_err(not_committed)) {
            Ok(outcome) => outcome,
            Err(err) => {
                conn.fail_exchange();
                return Err(err);
            }
        };
        // A conflict or a duplicate: nothing to commit, and the work does not run.
        let written = matches!(outcome, AppendOutcome::Written { .. });
        let record = command_outcome(outcome, command, condition);
        let record = match record {
            Ok(Some(record)) if written => record,
            other => {
                self.roll_back(conn, session_locks).await;
                return other;
            }
        };
        // The last round trip's statements are parsed now: in a transaction the work aborted,
        // PostgreSQL would refuse to parse them, but it does run them (and fail them) there.
        let finishing = bounded(timeout, self.prepare_finish(conn, session_locks)).await;
        let finishing = match finishing {
            Ok(statements) => statements,
            Err(err) => {
                conn.fail_exchange();
                return Err(err);
            }
        };
        let client: &tokio_postgres::Client = conn.object();
        if let Err(err) = work.run(client, &record).await {
            self.roll_back(conn, session_locks).await;
            return Err(err);
        }
        // The COMMIT is sent: from here on, no reply in time is an unknown outcome.
        let committed = tokio::time::timeout(
            client_deadline(timeout),
            self.finish(conn, finishing, &record, &lock),
        )
        .await
        .unwrap_or_else(|_| {
            Err(outcome_unknown(
                OPERATION,
                format!(
                    "no reply to the commit within {:?}",
                    client_deadline(timeout)
                ),
                None,
            ))
        });
        match committed {
            Ok(()) => {
                self.inner.changes.committed();
                Ok(Some(record))
            }
            Err(err) => {
                conn.fail_exchange();
                Err(err)
            }
        }
    }

    /// Round trip one (two under session locks): opens the transaction, takes the keys before
    /// it has an id, and runs the checking insert with the command record.
    async fn open(
        &self,
        conn: &Conn,
        session_locks: bool,
        begin: &str,
        stmt: &sql::Statement,
        lock: &(Vec<i64>, Vec<bool>),
    ) -> Result<Vec<Row>, Error> {
        let inner = &self.inner;
        let timeout = Some(inner.config.append_timeout);
        let failed = |err| db_error_with_timeout(OPERATION, err, false, timeout);
        let client = conn.object();
        let lock_params: [&(dyn ToSql + Sync); 2] = [&lock.0, &lock.1];
        let append_stmt = prepare(client, &stmt.sql, OPERATION).await?;
        let params = stmt.param_refs();
        if session_locks {
            let lock_stmt = prepare(client, &inner.session_lock_sql, OPERATION).await?;
            let (opened, locked, committed) = tokio::join!(
                client.batch_execute(&inner.begin_session_lock),
                client.query_one(&lock_stmt, &lock_params),
                client.batch_execute("COMMIT"),
            );
            let holder: i32 = opened
                .and(locked)
                .and_then(|row| committed.map(|()| row))
                .and_then(|row| row.try_get(1))
                .map_err(failed)?;
            let begin = format!("{begin}; {}", sql::same_backend_guard(holder));
            let (begun, rows) = tokio::join!(
                client.batch_execute(&begin),
                client.query(&append_stmt, &params)
            );
            begun.map_err(failed)?;
            return rows.map_err(failed);
        }
        let lock_stmt = prepare(client, &inner.lock_sql, OPERATION).await?;
        let (begun, locked, rows) = tokio::join!(
            client.batch_execute(begin),
            client.execute(&lock_stmt, &lock_params),
            client.query(&append_stmt, &params),
        );
        begun.map_err(failed)?;
        locked.map_err(failed)?;
        rows.map_err(failed)
    }

    /// The last round trip: checks that the transaction is still the command's (the work
    /// neither ended it nor had a statement fail, which would make PostgreSQL answer `COMMIT`
    /// with a rollback), commits, and releases session locks.
    async fn finish(
        &self,
        conn: &Conn,
        (probe, unlock_stmt): Finishing,
        record: &CommandRecord,
        lock: &(Vec<i64>, Vec<bool>),
    ) -> Result<(), Error> {
        let client = conn.object();
        let lock_params: [&(dyn ToSql + Sync); 2] = [&lock.0, &lock.1];
        let transaction_id = i64::try_from(record.transaction_id).unwrap_or(-1);
        let probe_params: [&(dyn ToSql + Sync); 1] = [&transaction_id];
        // Pipelined: every statement is prepared, so they are sent in this order at once.
        let (still_ours, commit, unlocked) = tokio::join!(
            client.query_one(&probe, &probe_params),
            client.batch_execute("COMMIT"),
            async {
                match &unlock_stmt {
                    Some(unlock) => client
                        .query_one(unlock, &lock_params)
                        .await
                        .and_then(|row| row.try_get::<_, bool>(0)),
                    None => Ok(true),
                }
            }
        );
        match still_ours {
            Ok(row) => {
                if !matches!(row.try_get::<_, Option<bool>>(0), Ok(Some(true))) {
                    return Err(outcome_unknown(
                        OPERATION,
                        "the transaction work ended the command's transaction itself (COMMIT or \
                         ROLLBACK): the events may or may not be stored; never end the \
                         transaction inside the work",
                        None,
                    ));
                }
            }
            // An aborted transaction: a statement of the work failed and the work went on.
            // PostgreSQL answers the COMMIT with a rollback.
            Err(err) if err.as_db_error().is_some() && commit.is_ok() => {
                return Err(Error::TransactionWork {
                    source: Box::new(err),
                })
            }
            Err(err) => return Err(outcome_unknown(OPERATION, "the commit failed", Some(err))),
        }
        if let Err(err) = commit {
            return Err(if commit_certainly_failed(&err) {
                db_error(OPERATION, err, false)
            } else {
                outcome_unknown(OPERATION, "the commit failed", Some(err))
            });
        }
        // Committed; the connection is pooled again only without session locks left behind.
        if matches!(unlocked, Ok(true)) {
            conn.end_exchange();
        } else {
            conn.fail_exchange();
        }
        Ok(())
    }

    /// Prepares the last round trip's statements: the probe, and the unlock of session locks.
    async fn prepare_finish(&self, conn: &Conn, session_locks: bool) -> Result<Finishing, Error> {
        let client = conn.object();
        let probe = prepare(client, STILL_OURS, OPERATION).await?;
        let unlock = match session_locks {
            true => Some(prepare(client, &self.inner.session_unlock_sql, OPERATION).await?),
            false => None,
        };
        Ok((probe, unlock))
    }

    /// Rolls back a transaction that wrote nothing durable yet. Under session locks, or when
    /// the rollback fails, the connection is closed instead (which rolls back and releases
    /// every lock).
    async fn roll_back(&self, conn: &Conn, session_locks: bool) {
        if session_locks {
            conn.fail_exchange();
            return;
        }
        let rolled_back = tokio::time::timeout(
            Duration::from_secs(2),
            conn.object().batch_execute("ROLLBACK"),
        )
        .await;
        if matches!(rolled_back, Ok(Ok(()))) {
            conn.end_exchange();
        } else {
            conn.fail_exchange();
        }
    }
}

/// Bounds one of this path's exchanges on the client like an append (`append_timeout` plus a
/// grace); nothing is committed before the last one, so a timeout there is the only unknown.
async fn bounded<T>(
    timeout: Duration,
    exchange: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(client_deadline(timeout), exchange)
        .await
        .unwrap_or(Err(Error::Timeout {
            operation: OPERATION,
            timeout,
        }))
}

/// An error of this path before its `COMMIT` was sent: nothing was committed, whatever it says.
fn not_committed(err: Error) -> Error {
    match err {
        Error::Storage {
            operation, source, ..
        } => Error::Storage {
            operation,
            message: "the checking insert's reply could not be read; nothing was committed".into(),
            outcome_unknown: false,
            source,
        },
        other => other,
    }
}
