//! Reads on hot standbys: the standbys' pools, their health (reachable, in recovery, lag), the
//! choice of the node a read runs on, and waiting until a standby shows a write.
//!
//! Why a standby read is filtered by its own xmin horizon instead of fenced like a primary
//! read: `docs/scale-out.md`, "Gap safety on a standby".
use crate::conn::{db_error, Conn};
use crate::replica::{ReadFrom, ReplicaConfig, StandbyFallback};
use crate::store::PostgresEventStore;
use dcb_core::{Cursor, Error, StandbyError, StandbyProblem};
use deadpool_postgres::Pool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The first statement of a read transaction on a standby, in place of the primary's
/// `fence()`: records the snapshot `h:h:` for the horizon `h = pg_snapshot_xmin` of the
/// standby's current snapshot, so the read that follows (`pg_visible_in_snapshot(transaction_id,
/// fence)`, unchanged) returns exactly the events of transactions below the horizon, every one
/// of which has ended. Returns the recorded snapshot (its `xmax` is the horizon).
pub(crate) const HORIZON_SQL: &str =
    "SELECT set_config('crablet.fence', h || ':' || h || ':', true) \
     FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS h) AS horizon";

/// Whether the standby's reads include the event at a cursor: its transaction is below the
/// standby's horizon.
const VISIBLE_SQL: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8";

/// How often a read-your-writes wait asks the standby again.
const WAIT_POLL: Duration = Duration::from_millis(5);

/// How many times a standby read cancelled by a conflict with recovery is read again there.
const RECOVERY_RETRIES: usize = 4;

/// A store's standbys.
pub(crate) struct Standbys {
    pub(crate) config: ReplicaConfig,
    nodes: Vec<Node>,
    next: AtomicUsize,
}

/// One standby.
pub(crate) struct Node {
    /// `host:port`, for messages (never the URL: it may hold a password).
    pub(crate) name: String,
    pub(crate) pool: Pool,
    health: tokio::sync::Mutex<Health>,
}

#[derive(Default)]
struct Health {
    checked: Option<Instant>,
    verdict: Option<Verdict>,
    /// The last check that found the standby's replay at the primary's WAL position.
    caught_up: Option<Instant>,
}

/// What a standby reports of its replay.
struct Replay {
    lsn: i64,
    /// Time since the commit of the last transaction it replayed (by its clock against the
    /// primary's commit timestamps).
    since_last_commit: Option<Duration>,
}

#[derive(Clone, Debug)]
enum Verdict {
    Serving,
    Lagging(Duration),
    Unreachable(String),
}

/// The route of a store view: where its reads go, and which write they must see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) read_from: Option<ReadFrom>,
    pub(crate) seeing: Option<Cursor>,
}

impl Standbys {
    /// Pools for `config`'s standbys (no connection is opened yet: a standby that is down when
    /// the store starts only makes reads fall back or fail).
    pub(crate) fn new(config: ReplicaConfig, query_timeout: Duration) -> Result<Self, Error> {
        config.validate()?;
        let mut nodes = Vec::with_capacity(config.standby_urls.len());
        for url in &config.standby_urls {
            let mut pg: tokio_postgres::Config = url.parse().map_err(|e| Error::Config {
                field: "standby_urls",
                reason: format!("not a valid PostgreSQL connection string: {e}"),
            })?;
            let name = node_name(&pg);
            pg.connect_timeout(config.connect_timeout);
            let pool = crate::conn::session_pool(
                pg,
                query_timeout,
                config.pool_size,
                Some(config.connect_timeout),
                "standby_urls",
            )?;
            nodes.push(Node {
                name,
                pool,
                health: tokio::sync::Mutex::new(Health::default()),
            });
        }
        Ok(Self {
            config,
            nodes,
            next: AtomicUsize::new(0),
        })
    }
}

fn node_name(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

impl PostgresEventStore {
    /// A view of this store whose reads go to a standby (per the store's fallback policy when
    /// none can serve them). Writes, conditions and sessions still go to the primary. On a
    /// store without standbys, reads stay on the primary.
    ///
    /// ```no_run
    /// use dcb_core::{EventReader, Query, ReadOptions};
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> dcb_core::Result<()> {
    /// let report = store.on_standby().query(&Query::all(), ReadOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub fn on_standby(&self) -> Self {
        let mut view = self.clone();
        view.route.read_from = Some(ReadFrom::Standby);
        view
    }

    /// A view of this store whose reads go to the primary, whatever
    /// [`ReplicaConfig::default_read`] says.
    pub fn on_primary(&self) -> Self {
        let mut view = self.clone();
        view.route.read_from = Some(ReadFrom::Primary);
        view
    }

    /// A view whose standby reads first wait (up to [`ReplicaConfig::replay_wait_timeout`])
    /// until the standby they run on shows the event at `cursor` (read-your-writes: pass the
    /// cursor an append returned). Past the timeout the read falls back to the primary or
    /// fails with [`StandbyProblem::NotReplayed`], per [`ReplicaConfig::fallback`]. Reads on
    /// the primary see every committed write anyway.
    ///
    /// ```no_run
    /// use dcb_core::{EventReader, EventStore, NewEvent, Query, ReadOptions};
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) -> dcb_core::Result<()> {
    /// let cursor = store.append(vec![NewEvent::builder("CartOpened").tag("cart_id", "c1").build()?]).await?;
    /// let events = store.on_standby().seeing(cursor).query(&Query::all(), ReadOptions::default()).await?;
    /// assert!(events.iter().any(|e| e.cursor == cursor));
    /// # Ok(()) }
    /// ```
    pub fn seeing(&self, cursor: Cursor) -> Self {
        let mut view = self.clone();
        view.route.seeing = Some(match view.route.seeing {
            Some(seen) if seen > cursor => seen,
            _ => cursor,
        });
        view
    }

    /// Where this view's reads go: the view's own route, else the store's default.
    pub fn read_from(&self) -> ReadFrom {
        match &self.inner.standbys {
            None => ReadFrom::Primary,
            Some(standbys) => self.route.read_from.unwrap_or(standbys.config.default_read),
        }
    }

    /// Waits until every reachable standby shows the event at `cursor` to its reads, or fails
    /// with [`StandbyProblem::NotReplayed`] after `timeout`. Returns at once on a store without
    /// standbys. Unreachable standbys are skipped (reads there fall back or fail anyway).
    #[tracing::instrument(name = "pg.wait_for_standby", skip_all, fields(%cursor))]
    pub async fn wait_for_standby(&self, cursor: Cursor, timeout: Duration) -> Result<(), Error> {
        let Some(standbys) = &self.inner.standbys else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        for node in &standbys.nodes {
            match self.wait_visible(node, cursor, deadline).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(standby_error(
                        "wait_for_standby",
                        StandbyProblem::NotReplayed { cursor, timeout },
                    ))
                }
                Err(e) => {
                    tracing::debug!(standby = %node.name, error = %e, "standby skipped by wait_for_standby");
                    self.mark_unreachable(node, e.to_string()).await;
                }
            }
        }
        Ok(())
    }

    /// The standby a read of this view runs on, or `None` for the primary (no standby routing,
    /// or none can serve and the policy falls back).
    pub(crate) async fn standby_for_read(
        &self,
        operation: &'static str,
    ) -> Result<Option<&Node>, Error> {
        let Some(standbys) = &self.inner.standbys else {
            return Ok(None);
        };
        if self.read_from() == ReadFrom::Primary {
            return Ok(None);
        }
        let count = standbys.nodes.len();
        let start = standbys.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut problem = None;
        for i in 0..count {
            let node = &standbys.nodes[(start + i) % count];
            match self.verdict(node).await {
                Verdict::Serving => return Ok(Some(node)),
                Verdict::Lagging(lag) => {
                    problem = Some(match problem {
                        Some(StandbyProblem::Lagging { lag: least, .. }) if least < lag => {
                            StandbyProblem::Lagging {
                                lag: least,
                                max_lag: standbys.config.max_lag,
                            }
                        }
                        _ => StandbyProblem::Lagging {
                            lag,
                            max_lag: standbys.config.max_lag,
                        },
                    })
                }
                Verdict::Unreachable(reason) if problem.is_none() => {
                    problem = Some(StandbyProblem::Unreachable {
                        reason: format!("{}: {reason}", node.name),
                    })
                }
                Verdict::Unreachable(_) => {}
            }
        }
        let problem = problem.unwrap_or(StandbyProblem::Unreachable {
            reason: "no standby".into(),
        });
        self.no_standby(operation, problem).map(|()| None)
    }

    /// Under the fallback policy, `Ok` (read on the primary); otherwise the error.
    fn no_standby(&self, operation: &'static str, problem: StandbyProblem) -> Result<(), Error> {
        let fallback = self
            .inner
            .standbys
            .as_ref()
            .map(|s| s.config.fallback)
            .unwrap_or_default();
        let error = standby_error(operation, problem);
        match fallback {
            StandbyFallback::FallBackToPrimary => {
                tracing::warn!(error = %error, "reading on the primary instead");
                metrics::counter!(dcb_core::store_metrics::STANDBY_FALLBACKS, "operation" => operation)
                    .increment(1);
                Ok(())
            }
            StandbyFallback::Fail => Err(error),
        }
    }

    /// After a read on `node` failed with `error`: the standby to run it on instead, when the
    /// node itself failed (a lost connection, a timeout) and another standby serves (at most
    /// once per standby of the store, counted in `failovers`); otherwise as
    /// [`after_standby_error`](Self::after_standby_error): `Ok(None)` to run it on the primary,
    /// or the error. The failed node counts as unreachable until its next check.
    pub(crate) async fn failover(
        &self,
        node: &Node,
        operation: &'static str,
        error: Error,
        failovers: &mut usize,
    ) -> Result<Option<&Node>, Error> {
        let count = self.inner.standbys.as_ref().map_or(0, |s| s.nodes.len());
        if matches!(error, Error::Storage { .. } | Error::Timeout { .. }) && *failovers + 1 < count
        {
            *failovers += 1;
            let reason = format!("{}: {error}", node.name);
            tracing::debug!(standby = %node.name, %error, "standby read failed; trying another standby");
            self.mark_unreachable(node, reason).await;
            return self.standby_for_read(operation).await;
        }
        self.after_standby_error(node, operation, error)
            .await
            .map(|()| None)
    }

    /// After a read on `node` failed with `error`: `Ok` when the read is to be run on the
    /// primary instead (the node failed and the policy falls back, or the node did not show
    /// the write the read asked to see in time), else the error to report. A node that failed
    /// counts as unreachable until its next check.
    pub(crate) async fn after_standby_error(
        &self,
        node: &Node,
        operation: &'static str,
        error: Error,
    ) -> Result<(), Error> {
        match error {
            Error::Standby(StandbyError { problem, .. }) => self.no_standby(operation, problem),
            Error::Storage { .. } | Error::Timeout { .. } => {
                let reason = format!("{}: {error}", node.name);
                self.mark_unreachable(node, reason.clone()).await;
                self.no_standby(operation, StandbyProblem::Unreachable { reason })
            }
            // Cancelled by recovery conflicts again and again: the node is up, the read
            // can still be served elsewhere.
            Error::Conflict(dcb_core::ConflictInfo {
                conflicting: None, ..
            }) => self.no_standby(
                operation,
                StandbyProblem::Unreachable {
                    reason: format!(
                        "{}: the read was cancelled by conflicts with recovery {} times \
                         (set hot_standby_feedback = on on the standby)",
                        node.name,
                        RECOVERY_RETRIES + 1
                    ),
                },
            ),
            other => Err(other),
        }
    }

    /// A connection to `node` for a read, after waiting until the node shows the view's
    /// `seeing` cursor. Fails with `Error::Standby(NotReplayed)` when it does not in time.
    pub(crate) async fn standby_conn(
        &self,
        node: &Node,
        operation: &'static str,
    ) -> Result<Conn, Error> {
        let conn = Conn::get(&node.pool, operation).await?;
        if let (Some(cursor), Some(standbys)) = (self.route.seeing, &self.inner.standbys) {
            let timeout = standbys.config.replay_wait_timeout;
            let deadline = Instant::now() + timeout;
            if !self
                .wait_visible_on(&conn, cursor, deadline, operation)
                .await?
            {
                return Err(standby_error(
                    operation,
                    StandbyProblem::NotReplayed { cursor, timeout },
                ));
            }
        }
        Ok(conn)
    }

    /// Runs `read` on a standby connection, again (up to a few times) when the standby
    /// cancelled it for a conflict with recovery (SQLSTATE 40001: replay had to remove rows
    /// the read's snapshot could still see; `hot_standby_feedback = on` makes it rare).
    pub(crate) async fn on_standby_retrying<T, F, Fut>(
        &self,
        node: &Node,
        operation: &'static str,
        read: F,
    ) -> Result<T, Error>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut attempt = 0;
        loop {
            let conn = self.standby_conn(node, operation).await?;
            match read(conn).await {
                Err(Error::Conflict(dcb_core::ConflictInfo {
                    conflicting: None, ..
                })) if attempt < RECOVERY_RETRIES => {
                    attempt += 1;
                    tracing::debug!(standby = %node.name, attempt, "standby read cancelled by recovery; reading again");
                }
                other => return other,
            }
        }
    }

    async fn wait_visible(
        &self,
        node: &Node,
        cursor: Cursor,
        deadline: Instant,
    ) -> Result<bool, Error> {
        let conn = Conn::get(&node.pool, "wait_for_standby").await?;
        self.wait_visible_on(&conn, cursor, deadline, "wait_for_standby")
            .await
    }

    /// Polls the standby of `conn` until its horizon is above `cursor`'s transaction (its reads
    /// include the event) or `deadline` passes (`Ok(false)`).
    async fn wait_visible_on(
        &self,
        conn: &Conn,
        cursor: Cursor,
        deadline: Instant,
        operation: &'static str,
    ) -> Result<bool, Error> {
        let tx = cursor.transaction_id.to_string();
        let poll = async {
            let client = conn.object();
            let stmt = crate::store::prepare(client, VISIBLE_SQL, operation).await?;
            loop {
                let row = client
                    .query_one(&stmt, &[&tx])
                    .await
                    .map_err(|e| db_error(operation, e, false))?;
                let visible: bool = row.try_get(0).map_err(|e| db_error(operation, e, false))?;
                if visible {
                    return Ok(true);
                }
                if Instant::now() + WAIT_POLL > deadline {
                    return Ok(false);
                }
                tokio::time::sleep(WAIT_POLL).await;
            }
        };
        // A standby that stops answering must not hold the read past its deadline.
        let bounded = async {
            tokio::time::timeout_at(deadline + Duration::from_millis(500), poll)
                .await
                .unwrap_or(Ok(false))
        };
        conn.run(operation, bounded).await
    }

    async fn mark_unreachable(&self, node: &Node, reason: String) {
        let mut health = node.health.lock().await;
        health.checked = Some(Instant::now());
        health.verdict = Some(Verdict::Unreachable(reason));
    }

    /// The node's health, checked again when the last check is older than
    /// `lag_check_interval`.
    async fn verdict(&self, node: &Node) -> Verdict {
        let Some(standbys) = &self.inner.standbys else {
            return Verdict::Serving;
        };
        let config = &standbys.config;
        let mut health = node.health.lock().await;
        if let (Some(at), Some(verdict)) = (health.checked, &health.verdict) {
            if at.elapsed() < config.lag_check_interval {
                return verdict.clone();
            }
        }
        let (primary, replayed) = tokio::join!(
            crate::store::within(config.connect_timeout, "standby_check", self.primary_lsn()),
            crate::store::within(config.connect_timeout, "standby_check", replay_state(node)),
        );
        let now = Instant::now();
        let verdict = match replayed {
            Err(e) => Verdict::Unreachable(e.to_string()),
            Ok(None) => Verdict::Unreachable(
                "is not in recovery (promoted?): it is no standby of this primary any more".into(),
            ),
            Ok(Some(replay)) => {
                let lag = match primary {
                    // Caught up with what the primary has written: no lag, whatever the time
                    // since the last commit.
                    Ok(lsn) if replay.lsn >= lsn => {
                        health.caught_up = Some(now);
                        Duration::ZERO
                    }
                    // Behind: at most the time since the last replayed commit, and at most
                    // the time since the standby was last seen caught up. Both bound the lag
                    // from above, so a standby beyond `max_lag` is never taken for a fresh
                    // one (an idle primary's first write can make a standby look lagging for
                    // one check interval: a read falls back once, nothing is read stale).
                    Ok(_) => {
                        let since_caught_up = health.caught_up.map(|at| now.duration_since(at));
                        match (replay.since_last_commit, since_caught_up) {
                            (Some(a), Some(b)) => a.min(b),
                            (Some(a), None) => a,
                            (None, Some(b)) => b,
                            (None, None) => Duration::ZERO,
                        }
                    }
                    // The primary did not answer: the lag cannot be told; reads on the
                    // standby go on (writes fail on their own).
                    Err(_) => Duration::ZERO,
                };
                if lag > config.max_lag {
                    Verdict::Lagging(lag)
                } else {
                    Verdict::Serving
                }
            }
        };
        health.checked = Some(now);
        health.verdict = Some(verdict.clone());
        verdict
    }

    async fn primary_lsn(&self) -> Result<i64, Error> {
        let conn = Conn::get(&self.inner.pool, "standby_check").await?;
        let read = async {
            let row = conn
                .object()
                .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
                .await
                .map_err(|e| db_error("standby_check", e, false))?;
            row.try_get(0)
                .map_err(|e| db_error("standby_check", e, false))
        };
        conn.run("standby_check", read).await
    }
}

/// The standby's replay position, `None` when it is not in recovery.
async fn replay_state(node: &Node) -> Result<Option<Replay>, Error> {
    let conn = Conn::get(&node.pool, "standby_check").await?;
    let read = async {
        let row = conn
            .object()
            .query_one(
                "SELECT CASE WHEN pg_is_in_recovery() \
                 THEN (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 END, \
                 EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8",
                &[],
            )
            .await
            .map_err(|e| db_error("standby_check", e, false))?;
        let lsn: Option<i64> = row
            .try_get(0)
            .map_err(|e| db_error("standby_check", e, false))?;
        let since: Option<f64> = row
            .try_get(1)
            .map_err(|e| db_error("standby_check", e, false))?;
        Ok(lsn.map(|lsn| Replay {
            lsn,
            since_last_commit: since.map(|s| Duration::from_secs_f64(s.max(0.0))),
        }))
    };
    conn.run("standby_check", read).await
}

fn standby_error(operation: &'static str, problem: StandbyProblem) -> Error {
    Error::Standby(StandbyError { operation, problem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_horizon_statement_records_the_snapshot_h_h_for_the_read_after_it() {
        let schema = dcb_testkit::pg::TestSchema::new().await;
        let client = dcb_testkit::pg::connect(&schema.url).await.expect("client");
        client.batch_execute("BEGIN").await.expect("begin");
        let recorded: String = client
            .query_one(HORIZON_SQL, &[])
            .await
            .expect("horizon")
            .get(0);
        let setting: String = client
            .query_one("SELECT current_setting('crablet.fence')", &[])
            .await
            .expect("setting")
            .get(0);
        let xmin: String = client
            .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
            .await
            .expect("xmin")
            .get(0);
        client.batch_execute("ROLLBACK").await.expect("rollback");
        assert_eq!(recorded, setting);
        let parts: Vec<&str> = recorded.split(':').collect();
        assert_eq!(parts.len(), 3, "{recorded}");
        assert_eq!(parts[0], parts[1], "xmin = xmax: {recorded}");
        assert_eq!(parts[2], "", "no in-flight list: {recorded}");
        let horizon: u64 = parts[0].parse().expect("number");
        let now: u64 = xmin.parse().expect("number");
        assert!(horizon <= now, "{horizon} > {now}");
        assert_eq!(
            crate::store::snapshot_xmax(&recorded).expect("xmax"),
            horizon
        );
    }

    #[test]
    fn standby_reads_never_ask_for_serializable() {
        use crate::config::IsolationLevel;
        let begin = "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY; SET LOCAL x = 1";
        assert_eq!(
            crate::store::standby_begin(begin, IsolationLevel::Serializable),
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL x = 1"
        );
        let rc = "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY";
        assert_eq!(
            crate::store::standby_begin(rc, IsolationLevel::ReadCommitted),
            rc
        );
    }
}
