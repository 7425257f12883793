//! The append path: locks, the checking insert and the commit, and what a failure of any of
//! them says about the outcome.
//!
//! "Nothing was written" is only ever said when it is certain: an error of a statement before
//! the commit, reported by the server on a connection proven in step with its client
//! ([`Conn::in_sync`]). A failed or unanswered commit, or an error the server did not send, is
//! an unknown outcome (`Error::Storage { outcome_unknown: true, .. }`). See docs/design.md,
//! "Timeouts and cancellation".
use crate::config::IsolationLevel;
use crate::conn::{
    commit_certainly_failed, db_error, db_error_with_timeout, is_server_reply, outcome_unknown,
    Conn,
};
use crate::keys::LockSet;
use crate::sql::{self, AppendParts};
use crate::store::{prepare, PostgresEventStore};
use crate::xid8::Xid8;
use dcb_core::{
    validate_command, validate_condition, validate_events, AppendCondition, CommandRecord,
    ConflictInfo, Cursor, Error, NewCommand, NewEvent,
};
use futures_util::TryStreamExt;
use postgres_types::ToSql;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use tokio_postgres::Row;

/// How many times an append whose transaction failed to serialize (only under REPEATABLE READ
/// or SERIALIZABLE; nothing was written) is run again before the failure is reported.
const SERIALIZATION_RETRIES: usize = 8;

/// The outcome of one append statement.
pub(crate) enum AppendOutcome {
    Written {
        transaction_id: u64,
        last_event: Option<Cursor>,
        occurred_at: Option<SystemTime>,
    },
    Conflict(Cursor),
    Duplicate,
}

/// The longest a client waits for an exchange bounded server-side by `timeout`
/// (`lock_timeout`): the timeout plus a grace of the same length, at least 250 ms and at most
/// 2 s, so that the server's certain answer normally arrives first.
pub(crate) fn client_deadline(timeout: Duration) -> Duration {
    timeout + timeout.clamp(Duration::from_millis(250), Duration::from_secs(2))
}

/// How an append is sent, by what it must check and the isolation level.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Protocol {
    /// One autocommit statement that locks, then inserts: nothing to check, and the session's
    /// `lock_timeout` is the append timeout (stores built by `connect`).
    OneStatement,
    /// `BEGIN`, the lock statement, the checking insert, `COMMIT`, pipelined in one round trip;
    /// transaction-scoped locks. Under READ COMMITTED the insert's snapshot is taken after the
    /// lock waits; at the stricter levels only appends without anything to check use it.
    Transaction,
    /// For a check under REPEATABLE READ or SERIALIZABLE, whose transaction snapshot would be
    /// taken by its first statement: session-scoped locks taken first, in a transaction of their
    /// own (round trip one), then the checking transaction and the unlock (round trip two).
    SessionLocks,
}

impl PostgresEventStore {
    /// Whether condition probes may read the recent window (see [`sql::AppendParts::windows`]).
    pub(crate) fn recent_windows(&self) -> bool {
        self.inner.config.append_isolation != IsolationLevel::Serializable
    }

    pub(crate) fn protocol(&self, checks: bool) -> Protocol {
        let inner = &self.inner;
        match (checks, inner.config.append_isolation) {
            (false, _) if inner.session_timeout => Protocol::OneStatement,
            (true, IsolationLevel::RepeatableRead | IsolationLevel::Serializable) => {
                Protocol::SessionLocks
            }
            _ => Protocol::Transaction,
        }
    }

    /// Runs one append on `conn`: locks, then the checking insert, then commit. Bounded by
    /// `append_timeout` on the server (lock waits) and by [`client_deadline`] on the client.
    pub(crate) async fn append_on(
        &self,
        conn: &Conn,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
        command: Option<&NewCommand>,
    ) -> Result<AppendOutcome, Error> {
        let inner = &self.inner;
        // Fewer items, fewer probes and keys (projectors on one entity share its tags).
        let simplified = condition.map(|c| c.simplified());
        let condition = simplified.as_ref();
        let lock = self.append_locks(&events, condition, command);
        let protocol = self.protocol(condition.is_some() || command.is_some());
        let parts = AppendParts {
            condition,
            command,
            lock: (protocol == Protocol::OneStatement).then(|| lock.clone()),
            windows: self.recent_windows(),
        };
        let stmt = sql::append(&inner.schema, events, parts);
        let begin = self.begin_append(condition);
        let rows = self.run_append(conn, protocol, begin, &stmt, &lock).await?;
        self.outcome(rows)
    }

    /// The lock keys of an append (sorted, with their modes): shared for the events, exclusive
    /// for the (simplified) condition's query and the command's idempotency id.
    pub(crate) fn append_locks(
        &self,
        events: &[NewEvent],
        condition: Option<&AppendCondition>,
        command: Option<&NewCommand>,
    ) -> (Vec<i64>, Vec<bool>) {
        let keys = &self.inner.keys;
        let mut locks = LockSet::default();
        keys.add_event_keys(&mut locks, events);
        if let Some(condition) = condition {
            keys.add_query_keys(&mut locks, &condition.fail_if_events_match);
        }
        if let Some(id) = command.and_then(|c| c.id.as_deref()) {
            keys.add_command_key(&mut locks, id);
        }
        locks.into_params()
    }

    /// Runs an append statement under `protocol` on `conn`, bounded by [`client_deadline`], and
    /// again (same statement) while it fails to serialize under a stricter isolation level.
    pub(crate) async fn run_append(
        &self,
        conn: &Conn,
        protocol: Protocol,
        begin: &str,
        stmt: &sql::Statement,
        lock: &(Vec<i64>, Vec<bool>),
    ) -> Result<Vec<Row>, Error> {
        let inner = &self.inner;
        let deadline = client_deadline(inner.config.append_timeout);
        // Set once a statement that can write was handed to the connection.
        let write_sent = AtomicBool::new(false);
        let retries = match inner.config.append_isolation {
            IsolationLevel::ReadCommitted => 0,
            _ => SERIALIZATION_RETRIES,
        };
        let give_up = tokio::time::Instant::now() + deadline;
        let mut attempt = 0;
        loop {
            let exchange = self.append_exchange(conn, protocol, begin, stmt, lock, &write_sent);
            let result = match tokio::time::timeout_at(give_up, exchange).await {
                Ok(result) => result,
                // Dropped mid-exchange, the connection is closed and its query cancelled.
                Err(_) if write_sent.load(Ordering::Acquire) => {
                    return Err(outcome_unknown(
                        "append",
                        format!("no reply from PostgreSQL within {deadline:?}"),
                        None,
                    ))
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        operation: "append",
                        timeout: inner.config.append_timeout,
                    })
                }
            };
            match result {
                // Under REPEATABLE READ or SERIALIZABLE, a transaction that failed to serialize
                // wrote nothing and is run again (the advisory locks make the check exact, so
                // this is never a conflict of the append's own boundary).
                Err(Error::Conflict(ConflictInfo {
                    conflicting: None, ..
                })) if attempt < retries && conn.is_clean() => {
                    attempt += 1;
                    write_sent.store(false, Ordering::Release);
                    tracing::debug!(attempt, "append failed to serialize; running it again");
                }
                other => return other,
            }
        }
    }

    async fn append_exchange(
        &self,
        conn: &Conn,
        protocol: Protocol,
        begin: &str,
        stmt: &sql::Statement,
        lock: &(Vec<i64>, Vec<bool>),
        write_sent: &AtomicBool,
    ) -> Result<Vec<Row>, Error> {
        let inner = &self.inner;
        let timeout = Some(inner.config.append_timeout);
        conn.begin_exchange("append")?;
        let client = conn.object();
        if protocol == Protocol::OneStatement {
            let append_stmt = prepare(client, &stmt.sql, "append").await?;
            let params = stmt.param_refs();
            write_sent.store(true, Ordering::Release);
            return match query_rows(client, &append_stmt, &params, stmt.rows).await {
                Ok(rows) => {
                    conn.end_exchange();
                    Ok(rows)
                }
                // The statement is its own commit: only a server's error, on a connection in
                // step, says it rolled back.
                Err(err) => {
                    conn.fail_exchange();
                    if is_server_reply(&err) && conn.recover().await {
                        Err(db_error_with_timeout("append", err, false, timeout))
                    } else {
                        Err(outcome_unknown(
                            "append",
                            "the append statement failed",
                            Some(err),
                        ))
                    }
                }
            };
        }
        let (keys, exclusive) = lock;
        let lock_params: [&(dyn ToSql + Sync); 2] = [keys, exclusive];
        let append_stmt = prepare(client, &stmt.sql, "append").await?;
        let params = stmt.param_refs();
        if protocol == Protocol::SessionLocks {
            let lock_stmt = prepare(client, &inner.session_lock_sql, "append").await?;
            let (opened, locked, committed) = tokio::join!(
                client.batch_execute(&inner.begin_session_lock),
                client.query_one(&lock_stmt, &lock_params),
                client.batch_execute("COMMIT"),
            );
            let holder = opened
                .and(locked)
                .and_then(|row| committed.map(|()| row))
                .and_then(|row| row.try_get::<_, i32>(1));
            let holder = match holder {
                Ok(pid) => pid,
                Err(err) => {
                    // Nothing that writes was sent. Closing the connection releases whatever
                    // session locks were granted.
                    conn.fail_exchange();
                    return Err(db_error_with_timeout("append", err, false, timeout));
                }
            };
            let unlock_stmt = prepare(client, &inner.session_unlock_sql, "append").await?;
            let begin = format!("{begin}; {}", sql::same_backend_guard(holder));
            write_sent.store(true, Ordering::Release);
            let (begin, rows, commit, unlocked) = tokio::join!(
                client.batch_execute(&begin),
                query_rows(client, &append_stmt, &params, stmt.rows),
                client.batch_execute("COMMIT"),
                client.query_one(&unlock_stmt, &lock_params),
            );
            // Every key released: none stays held by this session once it is pooled.
            let unlocked = matches!(unlocked.map(|row| row.try_get::<_, bool>(0)), Ok(Ok(true)));
            return self
                .settle(conn, [begin, Ok(())], rows, commit, unlocked)
                .await;
        }
        let lock_stmt = prepare(client, &inner.lock_sql, "append").await?;
        write_sent.store(true, Ordering::Release);
        let (begin, locked, rows, commit) = tokio::join!(
            client.batch_execute(begin),
            client.execute(&lock_stmt, &lock_params),
            query_rows(client, &append_stmt, &params, stmt.rows),
            client.batch_execute("COMMIT"),
        );
        self.settle(conn, [begin, locked.map(|_| ())], rows, commit, true)
            .await
    }

    /// What an append transaction's replies say: `before` are the statements ahead of the
    /// checking insert, `after` whether the one behind its `COMMIT` (the unlock of session
    /// locks) released everything.
    async fn settle(
        &self,
        conn: &Conn,
        before: [Result<(), tokio_postgres::Error>; 2],
        rows: Result<Vec<Row>, tokio_postgres::Error>,
        commit: Result<(), tokio_postgres::Error>,
        after: bool,
    ) -> Result<Vec<Row>, Error> {
        let timeout = Some(self.inner.config.append_timeout);
        let [begin, locked] = before;
        if begin.is_ok() && locked.is_ok() && commit.is_ok() {
            if let Ok(rows) = rows {
                // Every reply in order and the COMMIT answered: written. Without a clean
                // unlock, the session may still hold keys: it is closed, not pooled.
                if after {
                    conn.end_exchange();
                } else {
                    conn.fail_exchange();
                }
                return Ok(rows);
            }
        }
        conn.fail_exchange();
        if let Err(err) = commit {
            // A failure the commit itself reports is a certain rollback; a cancel or the end
            // of the session may have been reported after the commit.
            return if commit_certainly_failed(&err) && after && conn.recover().await {
                Err(db_error("append", err, false))
            } else {
                Err(outcome_unknown("append", "the commit failed", Some(err)))
            };
        }
        let rows_err = match rows {
            // The insert ran although a statement before it failed: it may have run outside
            // the transaction. Never reported by a server in step with its client.
            Ok(_) => {
                let failed = begin.err().or(locked.err());
                return Err(outcome_unknown(
                    "append",
                    "the append transaction's replies are inconsistent",
                    failed,
                ));
            }
            Err(err) => err,
        };
        // The COMMIT was answered, so the transaction ended; it rolled back because a statement
        // before it failed, if the server really sent that failure for that statement.
        let first = begin.err().or(locked.err()).unwrap_or(rows_err);
        let in_sync = if after {
            conn.recover().await
        } else {
            conn.in_sync().await
        };
        if is_server_reply(&first) && in_sync {
            Err(db_error_with_timeout("append", first, false, timeout))
        } else {
            Err(outcome_unknown(
                "append",
                "the append transaction failed",
                Some(first),
            ))
        }
    }

    pub(crate) fn outcome(&self, rows: Vec<Row>) -> Result<AppendOutcome, Error> {
        let outcome = read_outcome(rows)?;
        if matches!(outcome, AppendOutcome::Written { .. }) {
            self.inner.changes.committed();
        }
        Ok(outcome)
    }

    pub(crate) async fn append_checked(
        &self,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Cursor, Error> {
        if let Err(err) = validate_events(&events, &self.limits()) {
            // Rejected payloads may nest too deep to drop the ordinary way.
            dcb_core::discard_events(events);
            return Err(err);
        }
        if let Some(condition) = condition {
            validate_condition(condition)?;
        }
        if self.groups_enabled() {
            return self.append_grouped(events, condition).await;
        }
        // Boxed: the future of a whole append exchange is large, and every append's future
        // (itself boxed by `async_trait`) would otherwise carry its size.
        Box::pin(self.append_alone(events, condition)).await
    }

    /// An append in a transaction of its own (group commit off).
    async fn append_alone(
        &self,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Cursor, Error> {
        let conn = Conn::get(&self.inner.pool, "append").await?;
        let outcome = self.append_on(&conn, events, condition, None).await?;
        single_cursor(outcome, condition)
    }

    /// Appends `events` and records `command` in one transaction (the command layer's commit).
    pub(crate) async fn commit_on(
        &self,
        conn: &Conn,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Option<CommandRecord>, Error> {
        let events = self.validate_commit(command, events, condition)?;
        let outcome = self
            .append_on(conn, events, condition, Some(command))
            .await?;
        command_outcome(outcome, command, condition)
    }

    /// Validates a command's commit; on an error the events are dropped safely.
    pub(crate) fn validate_commit(
        &self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Vec<NewEvent>, Error> {
        let checked = validate_command(command)
            .and_then(|()| {
                if events.is_empty() {
                    Ok(())
                } else {
                    validate_events(&events, &self.limits())
                }
            })
            .and_then(|()| condition.map_or(Ok(()), validate_condition));
        match checked {
            Ok(()) => Ok(events),
            Err(err) => {
                // Rejected payloads may nest too deep to drop the ordinary way.
                dcb_core::discard_events(events);
                Err(err)
            }
        }
    }
}

/// A command commit's result from its append outcome: the record, `None` for a duplicate, or
/// the conflict.
pub(crate) fn command_outcome(
    outcome: AppendOutcome,
    command: &NewCommand,
    condition: Option<&AppendCondition>,
) -> Result<Option<CommandRecord>, Error> {
    match outcome {
        AppendOutcome::Written {
            transaction_id,
            last_event,
            occurred_at,
        } => Ok(Some(CommandRecord {
            id: command.id.clone(),
            command_type: command.command_type.clone(),
            data: command.data.clone(),
            metadata: command.metadata.clone(),
            transaction_id,
            last_event,
            occurred_at: occurred_at.unwrap_or_else(SystemTime::now),
        })),
        AppendOutcome::Conflict(conflicting) => Err(Error::Conflict(ConflictInfo::new(
            Some(conflicting),
            condition.and_then(|c| c.after),
        ))),
        AppendOutcome::Duplicate => Ok(None),
    }
}

/// The result of a plain append (no command) from its outcome.
pub(crate) fn single_cursor(
    outcome: AppendOutcome,
    condition: Option<&AppendCondition>,
) -> Result<Cursor, Error> {
    match outcome {
        AppendOutcome::Written {
            last_event: Some(cursor),
            ..
        } => Ok(cursor),
        AppendOutcome::Conflict(conflicting) => Err(Error::Conflict(ConflictInfo::new(
            Some(conflicting),
            condition.and_then(|c| c.after),
        ))),
        _ => Err(Error::Storage {
            operation: "append",
            message: "the append wrote no event".into(),
            outcome_unknown: false,
            source: None,
        }),
    }
}

/// What an append statement's rows say (the statement ran; the caller knows whether its
/// transaction committed).
pub(crate) fn read_outcome(rows: Vec<Row>) -> Result<AppendOutcome, Error> {
    let mut written: Option<(u64, Option<Cursor>, Option<SystemTime>)> = None;
    let mut conflict = None;
    // The transaction committed; a row that cannot be read changes nothing about that.
    let unreadable = |e| {
        outcome_unknown(
            "append",
            "the append committed but its reply could not be read",
            Some(e),
        )
    };
    for row in &rows {
        let kind: &str = row.try_get(0).map_err(unreadable)?;
        let tx: Xid8 = row.try_get(1).map_err(unreadable)?;
        let position: Option<i64> = row.try_get(2).map_err(unreadable)?;
        let occurred_at: Option<SystemTime> = row.try_get(3).map_err(unreadable)?;
        match kind {
            "conflict" => conflict = Some(Cursor::new(tx.0, position.unwrap_or(0))),
            // An already recorded command wins over a conflict: the retry gets the original.
            "duplicate" => return Ok(AppendOutcome::Duplicate),
            "event" => {
                // One row for the last event, or one per event (the caller keeps the last).
                let entry = written.get_or_insert((tx.0, None, occurred_at));
                let cursor = position.map(|p| Cursor::new(tx.0, p));
                entry.1 = entry.1.max(cursor);
            }
            _ => {
                let entry = written.get_or_insert((tx.0, None, occurred_at));
                entry.2 = occurred_at;
            }
        }
    }
    if let Some(conflicting) = conflict {
        return Ok(AppendOutcome::Conflict(conflicting));
    }
    match written {
        Some((transaction_id, last_event, occurred_at)) => Ok(AppendOutcome::Written {
            transaction_id,
            last_event,
            occurred_at,
        }),
        None => Err(Error::Storage {
            operation: "append",
            message: "the append statement reported nothing".into(),
            outcome_unknown: false,
            source: None,
        }),
    }
}

/// `client.query`, with the rows collected into a vector sized for `expected` of them (an
/// append returns one row per event: growing the vector row by row cost a few hundred bytes
/// per appended event). Sends the query when first polled, as `query` does, so it pipelines.
async fn query_rows(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    expected: usize,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stream = client.query_raw(statement, params.iter().copied()).await?;
    futures_util::pin_mut!(stream);
    let mut rows = Vec::with_capacity(expected);
    while let Some(row) = stream.try_next().await? {
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_waits_longer_than_the_server_and_not_much_longer() {
        let ms = Duration::from_millis;
        assert_eq!(client_deadline(ms(1)), ms(251));
        assert_eq!(client_deadline(ms(500)), ms(1000));
        assert_eq!(
            client_deadline(Duration::from_secs(10)),
            Duration::from_secs(12)
        );
    }
}
