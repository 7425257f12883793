//! A store session: one PostgreSQL transaction in which the application runs its own
//! statements and appends events, committed or rolled back as one.
//!
//! The invariant every writer keeps (docs/design.md, "The append transaction") is that it takes
//! its lock keys before its transaction has an id. A session takes keys whenever an append
//! needs keys it does not hold yet, and only while the transaction has no id (nothing written
//! yet, by the session or by the application); once it has one, an append is allowed only on
//! keys the session already holds. Otherwise the session's events could commit with an id
//! below events that a cursor follower or a check has already passed.
use crate::append::single_cursor;
use crate::conn::{db_error, Conn};
use crate::keys::LockSet;
use crate::sql;
use crate::store::{event_from_row, prepare, within, PostgresEventStore};
use dcb_core::{
    validate_condition, validate_events, validate_query, validate_read_options, AppendCondition,
    Cursor, Error, Event, NewEvent, Query, ReadOptions,
};
use std::collections::BTreeMap;

/// The session's lock statement: takes the keys only while the transaction has no id and runs
/// under READ COMMITTED (the filter is evaluated before each row's lock), and says which.
const SESSION_LOCK: &str = "SELECT pg_current_xact_id_if_assigned() IS NULL, \
     current_setting('transaction_isolation'), \
     (SELECT count(*) FROM (SELECT CASE WHEN u.x THEN pg_advisory_xact_lock(u.k) \
                                        ELSE pg_advisory_xact_lock_shared(u.k) END \
                            FROM unnest($1::int8[], $2::bool[]) AS u(k, x) \
                            WHERE pg_current_xact_id_if_assigned() IS NULL \
                              AND current_setting('transaction_isolation') = 'read committed') l)";

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// A statement of the session failed, timed out or was abandoned by a dropped future (the
    /// state is set before each exchange and cleared after it succeeds): the transaction is
    /// aborted, or may still run the abandoned statement, and can only roll back.
    Failed,
}

/// One PostgreSQL transaction shared by the application's own statements and the store's
/// appends and reads: all of it commits, or none of it.
///
/// Opened by [`PostgresEventStore::begin_session`] on a connection of the store's pool, under
/// READ COMMITTED. Run your own statements with [`client`](Self::client); append with
/// [`append`](Self::append) and [`append_if`](Self::append_if) any number of times; read with
/// [`query`](Self::query), which sees the session's own appends; then [`commit`](Self::commit)
/// or [`rollback`](Self::rollback). Dropping an open session (or a timeout) closes its
/// connection, which rolls it back and releases its locks.
///
/// **Order the work: appends first, or reserve.** The store's guarantees need every writer to
/// take its lock keys before its transaction gets an id, i.e. before its first write. A session
/// therefore takes the keys of an append when the append needs them, but only while neither the
/// session nor the application has written yet; after that, an append whose keys the session
/// does not already hold is refused with [`Error::Session`] (nothing written by it, the session
/// still usable). To write your own rows first, declare the session's boundaries up front with
/// [`reserve_events`](Self::reserve_events) and [`reserve_query`](Self::reserve_query).
///
/// Keys are held until the session ends: readers and conditional appends of the same
/// boundaries wait for it (disjoint boundaries do not), so keep sessions short.
///
/// ```no_run
/// # async fn demo(store: dcb_postgres::PostgresEventStore) -> dcb_core::Result<()> {
/// use dcb_core::{AppendCondition, NewEvent, Query};
/// let paid = NewEvent::builder("OrderPaid").tag("order", "o1").build()?;
/// let mut session = store.begin_session().await?;
/// let cursor = session
///     .append_if(vec![paid], AppendCondition::new(Query::types(["OrderPaid"])))
///     .await?;
/// // The application's own row, in the same transaction.
/// session
///     .client()
///     .execute("INSERT INTO outbox (topic, cursor) VALUES ('paid', $1)", &[&cursor.to_string()])
///     .await
///     .map_err(|e| dcb_core::Error::Storage {
///         operation: "outbox",
///         message: e.to_string(),
///         outcome_unknown: false,
///         source: Some(Box::new(e)),
///     })?;
/// session.commit().await?;
/// # Ok(()) }
/// ```
pub struct StoreSession {
    store: PostgresEventStore,
    conn: Conn,
    /// Keys held, and whether exclusively.
    held: BTreeMap<i64, bool>,
    appended: bool,
    state: State,
}

impl std::fmt::Debug for StoreSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSession")
            .field("keys_held", &self.held.len())
            .field("appended", &self.appended)
            .field("state", &self.state)
            .finish()
    }
}

impl PostgresEventStore {
    /// Opens a [`StoreSession`]: a transaction (READ COMMITTED) on a connection of the pool,
    /// held until the session commits, rolls back or is dropped.
    #[tracing::instrument(name = "pg.begin_session", skip(self))]
    pub async fn begin_session(&self) -> Result<StoreSession, Error> {
        let operation = "begin_session";
        let conn = Conn::get(&self.inner.pool, operation).await?;
        // Until the session ends cleanly, dropping the connection closes it (rolling back).
        conn.begin_exchange(operation)?;
        let timeout = self.inner.config.append_timeout;
        within(timeout, operation, async {
            conn.object()
                .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                .await
                .map_err(|e| db_error(operation, e, false))
        })
        .await?;
        Ok(StoreSession {
            store: self.clone(),
            conn,
            held: BTreeMap::new(),
            appended: false,
            state: State::Open,
        })
    }
}

impl StoreSession {
    /// The session's connection, inside its transaction: run the application's own statements
    /// here (`execute`, `query`, prepared statements, ...). Do not end the transaction with
    /// `COMMIT` or `ROLLBACK` statements, or change its isolation level: use
    /// [`commit`](Self::commit) and [`rollback`](Self::rollback). A failing statement aborts
    /// the whole session, as in any PostgreSQL transaction.
    pub fn client(&self) -> &tokio_postgres::Client {
        self.conn.object()
    }

    /// Takes the keys an append of `events` needs, so that it may come after the session's
    /// own writes. Must be called before the session writes anything.
    pub async fn reserve_events(&mut self, events: &[NewEvent]) -> Result<(), Error> {
        validate_events(events, &self.store.limits())?;
        let mut locks = LockSet::default();
        self.store.inner.keys.add_event_keys(&mut locks, events);
        self.acquire("reserve_events", locks).await
    }

    /// Takes the keys a condition on `query` needs (exclusively), so that an
    /// [`append_if`](Self::append_if) on it may come after the session's own writes; readers
    /// and conditional appends of the boundary wait for the session from now on. Must be called
    /// before the session writes anything.
    pub async fn reserve_query(&mut self, query: &Query) -> Result<(), Error> {
        validate_query(query)?;
        let mut locks = LockSet::default();
        self.store
            .inner
            .keys
            .add_query_keys(&mut locks, &query.simplified());
        self.acquire("reserve_query", locks).await
    }

    /// Appends `events` in the session; they become visible to others when it commits. Returns
    /// the cursor of the last one.
    #[tracing::instrument(name = "pg.session.append", skip_all, fields(events = events.len()))]
    pub async fn append(&mut self, events: Vec<NewEvent>) -> Result<Cursor, Error> {
        self.append_checked("append", events, None).await
    }

    /// Appends `events` unless an event matching `condition` exists after its cursor
    /// (committed by anyone, or appended earlier in this session): exactly as
    /// [`EventStore::append_if`](dcb_core::EventStore::append_if), inside the session. A
    /// conflict writes nothing and leaves the session usable.
    #[tracing::instrument(name = "pg.session.append_if", skip_all, fields(events = events.len()))]
    pub async fn append_if(
        &mut self,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<Cursor, Error> {
        self.append_checked("append_if", events, Some(&condition))
            .await
    }

    /// A fenced read inside the session: what [`EventReader::query`](dcb_core::EventReader::query)
    /// returns, plus the session's own appends.
    #[tracing::instrument(name = "pg.session.query", skip_all)]
    pub async fn query(
        &mut self,
        query: &Query,
        options: ReadOptions,
    ) -> Result<Vec<Event>, Error> {
        let operation = "session.query";
        validate_query(query)?;
        validate_read_options(&options)?;
        self.usable(operation)?;
        let store = self.store.clone();
        let query = query.simplified();
        let stmt = sql::read_visible(&store.inner.schema, &query, &options, true);
        let (keys, exclusive) = store.fence_params(&query);
        self.state = State::Failed;
        let client = self.conn.object();
        let exchange = async {
            let fence = prepare(client, &store.inner.fence_sql, operation).await?;
            let read = prepare(client, &stmt.sql, operation).await?;
            let fence_params: [&(dyn postgres_types::ToSql + Sync); 2] = [&keys, &exclusive];
            let params = stmt.param_refs();
            let (fenced, rows) = tokio::join!(
                client.query(&fence, &fence_params),
                client.query(&read, &params)
            );
            fenced.map_err(|e| db_error(operation, e, false))?;
            let rows = rows.map_err(|e| db_error(operation, e, false))?;
            rows.iter()
                .map(event_from_row)
                .collect::<Result<Vec<_>, _>>()
        };
        let result = within(store.inner.config.query_timeout, operation, exchange).await;
        self.settle(result)
    }

    /// Commits the session: the application's statements and the session's events together,
    /// or, on an error, none of them. An error with `outcome_unknown` (the connection was lost
    /// during the commit) means either may have happened.
    #[tracing::instrument(name = "pg.session.commit", skip_all)]
    pub async fn commit(self) -> Result<(), Error> {
        let operation = "session.commit";
        self.usable(operation)?;
        let client = self.conn.object();
        // The probe fails if the transaction is aborted (a failed statement of the application):
        // PostgreSQL answers a COMMIT of an aborted transaction by rolling back, without error.
        let (probe, commit) = tokio::join!(
            client.batch_execute("SELECT 1"),
            client.batch_execute("COMMIT")
        );
        if let Err(err) = probe {
            // A server's error: the transaction was aborted, and the COMMIT rolled it back.
            // Without one, the connection failed with the COMMIT already sent.
            let certain = err.as_db_error().is_some() && commit.is_ok();
            return Err(db_error(operation, err, !certain));
        }
        match commit {
            Ok(()) => {
                self.conn.end_exchange();
                if self.appended {
                    self.store.inner.changes.committed();
                }
                Ok(())
            }
            Err(err) => {
                // A failure the server reports for the COMMIT (a deferred constraint, a
                // serialization failure) is a rollback; a lost connection leaves it unknown.
                let certain = err.as_db_error().is_some();
                Err(db_error(operation, err, !certain))
            }
        }
    }

    /// Rolls the session back: nothing of it stays, and its locks are released. (A session
    /// whose statement failed or timed out is closed instead, which rolls it back as well.)
    #[tracing::instrument(name = "pg.session.rollback", skip_all)]
    pub async fn rollback(self) -> Result<(), Error> {
        let operation = "session.rollback";
        if self.state == State::Failed {
            return Ok(());
        }
        self.conn
            .object()
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| db_error(operation, e, false))?;
        self.conn.end_exchange();
        Ok(())
    }

    async fn append_checked(
        &mut self,
        operation: &'static str,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Cursor, Error> {
        if let Err(err) = validate_events(&events, &self.store.limits()) {
            dcb_core::discard_events(events);
            return Err(err);
        }
        if let Some(condition) = condition {
            validate_condition(condition)?;
        }
        self.usable(operation)?;
        let store = self.store.clone();
        let simplified = condition.map(|c| c.simplified());
        let condition = simplified.as_ref();
        let mut locks = LockSet::default();
        store.inner.keys.add_event_keys(&mut locks, &events);
        if let Some(condition) = condition {
            store
                .inner
                .keys
                .add_query_keys(&mut locks, &condition.fail_if_events_match);
        }
        self.acquire(operation, locks).await?;
        let stmt = sql::append(
            &store.inner.schema,
            events,
            sql::AppendParts {
                condition,
                command: None,
                lock: None,
                // Sessions run under READ COMMITTED.
                windows: true,
            },
        );
        self.state = State::Failed;
        let client = self.conn.object();
        let exchange = async {
            let prepared = prepare(client, &stmt.sql, operation).await?;
            client
                .query(&prepared, &stmt.param_refs())
                .await
                .map_err(|e| db_error(operation, e, false))
        };
        let rows = within(store.inner.config.append_timeout, operation, exchange).await;
        let rows = self.settle(rows)?;
        let cursor = single_cursor(store.outcome(rows)?, condition)?;
        self.appended = true;
        Ok(cursor)
    }

    /// Makes sure the session holds `locks`: takes the missing ones while the transaction has
    /// no id, refuses otherwise.
    async fn acquire(&mut self, operation: &'static str, locks: LockSet) -> Result<(), Error> {
        self.usable(operation)?;
        let (keys, exclusive) = locks.into_params();
        let missing = keys
            .iter()
            .zip(&exclusive)
            .any(|(key, x)| !self.held.get(key).is_some_and(|held| *held || !x));
        if !missing {
            return Ok(());
        }
        self.state = State::Failed;
        let client = self.conn.object();
        let exchange = async {
            let prepared = prepare(client, SESSION_LOCK, operation).await?;
            client
                .query_one(&prepared, &[&keys, &exclusive])
                .await
                .map_err(|e| db_error(operation, e, false))
        };
        let row = within(self.store.inner.config.append_timeout, operation, exchange).await;
        let row = self.settle(row)?;
        let fresh: bool = row.try_get(0).map_err(|e| db_error(operation, e, false))?;
        let isolation: String = row.try_get(1).map_err(|e| db_error(operation, e, false))?;
        if isolation != "read committed" {
            return Err(Error::Session {
                operation,
                reason: format!(
                    "the session's transaction runs at {isolation}, where a check's snapshot \
                     predates its lock waits; sessions run under READ COMMITTED: do not change \
                     the isolation level"
                ),
            });
        }
        if !fresh {
            return Err(Error::Session {
                operation,
                reason: "it needs lock keys the session does not hold, and the session's \
                         transaction already wrote (it has a transaction id): taking keys now \
                         could let a cursor follower skip the session's events. Append before \
                         the session's own writes, or reserve the boundaries first \
                         (reserve_events, reserve_query)"
                    .into(),
            });
        }
        for (key, x) in keys.into_iter().zip(exclusive) {
            let held = self.held.entry(key).or_insert(x);
            *held |= x;
        }
        Ok(())
    }

    fn usable(&self, operation: &'static str) -> Result<(), Error> {
        match self.state {
            State::Open => Ok(()),
            State::Failed => Err(Error::Storage {
                operation,
                message: "an earlier statement of this session failed, so its transaction is \
                          aborted: roll it back (or drop it) and start a new session"
                    .into(),
                outcome_unknown: false,
                source: None,
            }),
        }
    }

    /// Ends an exchange: a failed one aborts the transaction (or leaves the connection out of
    /// step, after a timeout), so the session stays failed and can only end; dropping it
    /// closes the connection.
    fn settle<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        match &result {
            Ok(_) => self.state = State::Open,
            Err(_) => self.conn.fail_exchange(),
        }
        result
    }
}
