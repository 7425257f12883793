//! Group commit: concurrent `append`/`append_if` calls of one store share a transaction.
//!
//! A call joins a queue; a flusher task takes whatever is queued (at most `group_commit_max`
//! calls) and commits it as one transaction, so a lone caller never waits for company and many
//! callers pay one commit per group instead of one each. More flushers, up to
//! `group_commit_flushers`, start while a full group waits; and whenever queued calls see no
//! flusher make progress for [`STALL`] (a group stuck on a lock), another starts, up to the
//! pool's size, so one stuck group never holds up the rest of the store. The calls of
//! a group take effect in queue order. A call whose condition matches an event of an earlier
//! call of the group stays for the next group: one statement's checks cannot see its own
//! inserts, and deferring it keeps the serial order exact (it then conflicts exactly as if the
//! calls had run one after the other). Each call
//! keeps its own outcome and its own deadline; a call still queued when its deadline passes (or
//! whose future was dropped) is taken out and certainly wrote nothing.
//!
//! The flush runs in a task of its own, so a caller's cancelled future never cuts a shared
//! transaction short.
use crate::append::{client_deadline, Protocol};
use crate::conn::{outcome_unknown, Conn};
use crate::group_queue::{abandon, Call, CallShape, Pending, QUEUED};
use crate::keys::LockSet;
use crate::server_error::ServerError;
use crate::sql::{self, GroupPart};
use crate::store::PostgresEventStore;
use crate::xid8::Xid8;
use dcb_core::{matches, AppendCondition, ConflictInfo, Cursor, Error, NewEvent};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

/// How long queued calls wait with no flusher making progress before another flusher starts
/// (up to the pool's size): a group stuck on a lock (another store's transaction, a brake)
/// must not hold up every other append of the store. Ordinary flushes take a few
/// milliseconds, so under load this adds no flushers.
const STALL: Duration = Duration::from_millis(20);

impl PostgresEventStore {
    /// Whether appends of this store go through group commit.
    pub(crate) fn groups_enabled(&self) -> bool {
        self.inner.config.group_commit_max > 1
    }

    /// Appends through group commit (validated input).
    pub(crate) async fn append_grouped(
        &self,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<Cursor, Error> {
        let inner = &self.inner;
        let (tx, rx) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let pending = Pending {
            events,
            condition: condition.map(|c| c.simplified()),
            state: state.clone(),
            reply: tx,
        };
        let spawn = {
            let mut queue = inner.groups.lock();
            queue.waiting.push_back(pending);
            let limit = inner
                .config
                .group_commit_flushers
                .min(inner.pool.status().max_size.max(1));
            // A lone call starts a flusher at once; more flushers join only while a full group
            // waits, so groups grow as large as the load makes them (measured on 2 cores, 16
            // clients: 1.00x raw-insert with one flusher, 0.89x with two, 0.70x with eight).
            let full = queue.waiting.len() >= inner.config.group_commit_max;
            let due = queue.flushers == 0 || (queue.flushers < limit && full);
            if due {
                queue.flushers += 1;
                queue.progress = Some(Instant::now());
            }
            due
        };
        if spawn {
            self.spawn_flusher();
        }
        let deadline = client_deadline(inner.config.append_timeout);
        let give_up = Instant::now() + deadline;
        let mut rx = rx;
        let answer = loop {
            let wake = give_up.min(Instant::now() + STALL);
            match tokio::time::timeout_at(wake, &mut rx).await {
                Ok(answer) => break Some(answer),
                Err(_) if Instant::now() >= give_up => break None,
                Err(_) => {
                    if state.load(Ordering::Acquire) == QUEUED {
                        self.unstall();
                    }
                }
            }
        };
        match answer {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(outcome_unknown(
                "append",
                "the group commit carrying this append ended without an answer",
                None,
            )),
            None if abandon(&state) => Err(Error::Timeout {
                operation: "append",
                timeout: inner.config.append_timeout,
            }),
            None => Err(outcome_unknown(
                "append",
                format!("no answer from the group commit carrying this append within {deadline:?}"),
                None,
            )),
        }
    }

    /// Starts another flusher if calls are queued, no flusher made progress for [`STALL`] and
    /// the pool has room for one more.
    fn unstall(&self) {
        let inner = &self.inner;
        {
            let mut queue = inner.groups.lock();
            let quiet = queue.progress.is_none_or(|at| at.elapsed() >= STALL);
            let room = queue.flushers < inner.pool.status().max_size.max(1);
            if !(quiet && room && !queue.waiting.is_empty()) {
                return;
            }
            tracing::debug!(
                flushers = queue.flushers,
                "group commit stalled; starting another flusher"
            );
            queue.flushers += 1;
            queue.progress = Some(Instant::now());
        }
        self.spawn_flusher();
    }

    /// Spawns a flusher already counted in `Queue::flushers`.
    fn spawn_flusher(&self) {
        let store = self.clone();
        tokio::spawn(
            async move { store.flush_groups().await }
                .instrument(tracing::debug_span!("pg.group_commit")),
        );
    }

    /// A flusher: commits groups while calls are queued, then ends.
    async fn flush_groups(self) {
        loop {
            let group = self.next_group();
            if group.is_empty() {
                return;
            }
            let (replies, calls): (Vec<_>, Vec<_>) = group
                .into_iter()
                .map(|p| (p.reply, (p.events, p.condition)))
                .unzip();
            metrics::histogram!(dcb_core::store_metrics::GROUP_COMMIT_CALLS)
                .record(calls.len() as f64);
            let results = self.commit_group(calls).await;
            let shared = replies.len() > 1;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            // After a shared group (a sign of load), let the callers just answered run (on
            // this worker too) before taking the next group: most of them append again at
            // once, and join it instead of waiting behind a group of one (measured at 16
            // clients: 12.4-13.5 k -> 14.8-19.1 k events/s). Not after a group of one: a lone
            // caller would pay the yield on every append (measured: 0.59x -> 0.51x
            // raw-insert at 1 client).
            if shared {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Takes the next group off the queue; when it is empty, the flusher is counted out under
    /// the same lock, so a call queued meanwhile starts a new one.
    fn next_group(&self) -> Vec<Pending> {
        let inner = &self.inner;
        let mut queue = inner.groups.lock();
        let mut group: Vec<Pending> =
            Vec::with_capacity(queue.waiting.len().min(inner.config.group_commit_max));
        let mut events = 0;
        while let Some(next) = queue.waiting.front() {
            if group.len() >= inner.config.group_commit_max {
                break;
            }
            let depends = next.condition.as_ref().is_some_and(|c| {
                group
                    .iter()
                    .flat_map(|p| &p.events)
                    .any(|e| matches(&c.fail_if_events_match, &e.event_type, &e.tags))
            });
            let too_big =
                !group.is_empty() && events + next.events.len() > inner.config.max_batch_size;
            if depends || too_big {
                break;
            }
            let Some(next) = queue.waiting.pop_front() else {
                break;
            };
            if next.take() {
                events += next.events.len();
                group.push(next);
            }
        }
        if group.is_empty() {
            queue.flushers = queue.flushers.saturating_sub(1);
        } else {
            queue.progress = Some(Instant::now());
        }
        group
    }

    /// Commits `group` in one transaction; one result per call, in order.
    async fn commit_group(&self, mut group: Vec<Call>) -> Vec<Result<Cursor, Error>> {
        let conn = match Conn::get(&self.inner.pool, "append").await {
            Ok(conn) => conn,
            Err(err) => return group.iter().map(|_| Err(share(&err))).collect(),
        };
        if group.len() == 1 {
            // Alone, the call takes the single-call path and its specialized statement.
            if let Some((events, condition)) = group.pop() {
                let outcome = self
                    .append_on(&conn, events, condition.as_ref(), None)
                    .await;
                return vec![
                    outcome.and_then(|o| crate::append::single_cursor(o, condition.as_ref()))
                ];
            }
        }
        let calls = group.len();
        match self.run_group(&conn, group, false).await {
            Ok(results) => results,
            Err(err) => (0..calls).map(|_| Err(share(&err))).collect(),
        }
    }

    /// Runs `group` as one transaction: one result per call, in order. With `all_or_nothing`
    /// (a multi-command append) nothing is inserted if any call conflicts; the conflicting
    /// calls get their conflicts and the others an error saying they wrote nothing.
    pub(crate) async fn run_group(
        &self,
        conn: &Conn,
        group: Vec<Call>,
        all_or_nothing: bool,
    ) -> Result<Vec<Result<Cursor, Error>>, Error> {
        let any_condition = group.iter().any(|p| p.1.is_some());
        // Without a condition, the group is one autocommit statement that takes its locks
        // first (as a single unconditional append): nothing to check, so no snapshot needs to
        // follow the lock wait.
        let protocol = self.protocol(any_condition);
        let one_statement = protocol == Protocol::OneStatement;
        let begin = self.begin_append_for(group.iter().filter_map(|p| p.1.as_ref()));
        let (lock, stmt, shapes) = self.group_statement(group, all_or_nothing, one_statement);
        let rows = self.run_append(conn, protocol, begin, &stmt, &lock).await?;
        let results = self.group_results(&rows, &shapes, all_or_nothing)?;
        if results.iter().any(Result::is_ok) {
            self.inner.changes.committed();
        }
        Ok(results)
    }

    /// The lock parameters (taken first, in a statement of their own, or with `one_statement`
    /// by the insert itself: only for a group without conditions) and the checking insert of
    /// `group`: the keys of every call, merged and sorted (escalated past the group limit).
    /// The events move into the statement; the shapes are what [`group_results`]
    /// (Self::group_results) reads its rows with.
    pub(crate) fn group_statement(
        &self,
        group: Vec<Call>,
        all_or_nothing: bool,
        one_statement: bool,
    ) -> ((Vec<i64>, Vec<bool>), sql::Statement, Vec<CallShape>) {
        let inner = &self.inner;
        // Room for every call's keys up front, exactly what each call reserves, so the set
        // never regrows (short by one per call, it doubled on the last: measured 267 -> 112
        // bytes per coalesced event).
        let room = group
            .iter()
            .map(|(events, condition)| {
                inner.keys.event_keys_room(events)
                    + condition.as_ref().map_or(0, |c| {
                        crate::keys::KeySpace::query_keys_room(&c.fail_if_events_match)
                    })
            })
            .sum();
        let mut locks = LockSet::with_capacity(room);
        for pending in &group {
            // Per call, so each stays within `max_lock_keys` on its own.
            inner.keys.add_event_keys(&mut locks, &pending.0);
            if let Some(c) = &pending.1 {
                inner
                    .keys
                    .add_query_keys(&mut locks, &c.fail_if_events_match);
            }
        }
        if locks.len() > inner.keys.max_group_keys() {
            locks = inner.keys.escalated();
        }
        let shapes = group
            .iter()
            .map(|p| CallShape {
                events: p.0.len(),
                condition: p.1.as_ref().map(|c| c.after),
            })
            .collect();
        let lock = locks.into_params();
        let inline = (one_statement && group.iter().all(|p| p.1.is_none())).then(|| lock.clone());
        let (events, conditions): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let parts: Vec<GroupPart<'_>> = events
            .into_iter()
            .zip(&conditions)
            .map(|(events, condition)| GroupPart {
                events,
                condition: condition.as_ref(),
            })
            .collect();
        let stmt = sql::append_group(
            &inner.schema,
            parts,
            all_or_nothing,
            inline,
            self.recent_windows(),
        );
        (lock, stmt, shapes)
    }

    /// Each call's result from the rows of [`group_statement`](Self::group_statement)'s insert.
    pub(crate) fn group_results(
        &self,
        rows: &[tokio_postgres::Row],
        group: &[CallShape],
        all_or_nothing: bool,
    ) -> Result<Vec<Result<Cursor, Error>>, Error> {
        let unreadable = |e| {
            outcome_unknown(
                "append",
                "the group commit committed but its reply could not be read",
                Some(e),
            )
        };
        let mut conflicts: Vec<Option<Cursor>> = vec![None; group.len()];
        let mut written: Vec<Cursor> = Vec::new();
        for row in rows {
            let kind: &str = row.try_get(0).map_err(unreadable)?;
            let part: Option<i32> = row.try_get(1).map_err(unreadable)?;
            let tx: Xid8 = row.try_get(2).map_err(unreadable)?;
            let position: i64 = row.try_get(3).map_err(unreadable)?;
            let cursor = Cursor::new(tx.0, position);
            match (kind, part.and_then(|p| usize::try_from(p).ok())) {
                ("conflict", Some(p)) if p < group.len() => conflicts[p] = Some(cursor),
                ("event", _) => written.push(cursor),
                _ => {
                    return Err(outcome_unknown(
                        "append",
                        format!("the group commit returned an unexpected row {kind:?}"),
                        None,
                    ))
                }
            }
        }
        // The inserted events are those of the calls without a conflict, in call order.
        let any_conflict = conflicts.iter().any(Option::is_some);
        let expected: usize = group
            .iter()
            .zip(&conflicts)
            .filter(|(_, c)| c.is_none() && !(all_or_nothing && any_conflict))
            .map(|(p, _)| p.events)
            .sum();
        if expected != written.len() {
            return Err(outcome_unknown(
                "append",
                format!(
                    "the group commit stored {} events where {expected} were expected",
                    written.len()
                ),
                None,
            ));
        }
        // Positions are drawn in insert order, which is call order.
        written.sort_unstable();
        let mut next = written.into_iter();
        Ok(group
            .iter()
            .zip(conflicts)
            .map(|(pending, conflict)| match conflict {
                Some(conflicting) => Err(Error::Conflict(ConflictInfo::new(
                    Some(conflicting),
                    pending.condition.flatten(),
                ))),
                None => next
                    .by_ref()
                    .take(pending.events)
                    .last()
                    .ok_or_else(|| Error::Storage {
                        operation: "append",
                        message: "the append wrote no event".into(),
                        outcome_unknown: false,
                        source: None,
                    }),
            })
            .collect())
    }
}

/// The same failure for every call of a group (errors are not `Clone`: a server's report is
/// shared as its [`ServerError`], any other source is kept as text in the message).
fn share(err: &Error) -> Error {
    match err {
        Error::Conflict(info) => Error::Conflict(info.clone()),
        Error::Timeout { operation, timeout } => Error::Timeout {
            operation,
            timeout: *timeout,
        },
        Error::Storage {
            operation,
            message,
            outcome_unknown,
            source,
        } => match source
            .as_deref()
            .and_then(|s| s.downcast_ref::<ServerError>())
        {
            // The server's report is shared as it is: SQLSTATE, table and constraint stay
            // readable (a missing partition is told by them).
            Some(server) => Error::Storage {
                operation,
                message: message.clone(),
                outcome_unknown: *outcome_unknown,
                source: Some(Box::new(server.clone())),
            },
            None => Error::Storage {
                operation,
                message: match source {
                    Some(source) => {
                        format!("{message} ({})", dcb_core::runner::error_chain(&**source))
                    }
                    None => message.clone(),
                },
                outcome_unknown: *outcome_unknown,
                source: None,
            },
        },
        Error::Schema { message } => Error::Schema {
            message: message.clone(),
        },
        other => Error::Storage {
            operation: "append",
            message: other.to_string(),
            outcome_unknown: false,
            source: None,
        },
    }
}
