//! `PostgresEventStore::health`: is the store usable, and is every durable handler keeping up?
use crate::conn::Conn;
use crate::lag::{lag_from, lag_params, lag_sql, HandlerLag};
use crate::migrate::SCHEMA_VERSION;
use crate::store::PostgresEventStore;
use dcb_core::Cursor;
use std::time::Duration;

/// What [`PostgresEventStore::health`] found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// Whether the database answered.
    pub reachable: bool,
    /// The schema's version, when it could be read.
    pub schema_version: Option<i32>,
    /// Every durable handler that ever ran on the schema.
    pub handlers: Vec<HandlerHealth>,
    /// What is wrong, one readable line each; empty when healthy.
    pub problems: Vec<String>,
}

impl Health {
    /// True when the store is reachable, at the schema version this library needs, and no
    /// handler is stuck.
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One durable handler in a [`Health`] report.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HandlerHealth {
    /// The handler's name.
    pub name: String,
    /// Its committed checkpoint.
    pub checkpoint: Option<Cursor>,
    /// How far behind it is.
    pub lag: HandlerLag,
    /// Whether some instance holds its lease (is running it).
    pub lease_held: bool,
    /// Consecutive failed attempts at its current batch.
    pub attempts: u32,
    /// Its last error, if its current batch failed.
    pub last_error: Option<String>,
    /// Whether its oldest unprocessed event is older than the threshold given to `health`.
    pub stuck: bool,
}

impl PostgresEventStore {
    /// Checks that the database answers, that the schema is at [`SCHEMA_VERSION`], and that no
    /// durable handler has left an event unprocessed for longer than `stuck_after` (stopped,
    /// failing or too slow). Never fails: what is wrong is in [`Health::problems`].
    ///
    /// ```no_run
    /// # async fn demo(store: dcb_postgres::PostgresEventStore) {
    /// let health = store.health(std::time::Duration::from_secs(60)).await;
    /// if !health.is_healthy() {
    ///     eprintln!("crablet: {}", health.problems.join("; "));
    /// }
    /// # }
    /// ```
    #[tracing::instrument(name = "pg.health", skip(self))]
    pub async fn health(&self, stuck_after: Duration) -> Health {
        let mut health = Health {
            reachable: false,
            schema_version: None,
            handlers: Vec::new(),
            problems: Vec::new(),
        };
        if let Err(problem) = self.check_health(stuck_after, &mut health).await {
            health.problems.push(problem);
        }
        health
    }

    async fn check_health(&self, stuck_after: Duration, health: &mut Health) -> Result<(), String> {
        let schema = &self.inner.schema;
        let conn = Conn::get(&self.inner.pool, "health")
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        // A dropped health check must not hand back a connection with a reply in flight.
        conn.begin_exchange("health").map_err(|e| e.to_string())?;
        let client = conn.object();
        let unreachable = |e: tokio_postgres::Error| format!("unreachable: {e}");
        let exists: bool = client
            .query_one(
                "SELECT to_regclass(format('%I.schema_version', $1::text)) IS NOT NULL",
                &[&self.inner.config.schema],
            )
            .await
            .map_err(unreachable)?
            .get(0);
        health.reachable = true;
        if !exists {
            return Err(format!(
                "no crablet schema {:?}: run `crablet migrate`",
                self.inner.config.schema
            ));
        }
        let version: i32 = client
            .query_one(
                &format!("SELECT coalesce(max(version), 0) FROM {schema}.schema_version"),
                &[],
            )
            .await
            .map_err(|e| format!("reading the schema version failed: {e}"))?
            .get(0);
        health.schema_version = Some(version);
        if version != SCHEMA_VERSION {
            health.problems.push(format!(
                "schema {:?} is at version {version}, this library needs {SCHEMA_VERSION}",
                self.inner.config.schema
            ));
        }
        let names = client
            .query(
                &format!("SELECT handler_name FROM {schema}.handler_checkpoints ORDER BY 1"),
                &[],
            )
            .await
            .map_err(|e| format!("listing the handlers failed: {e}"))?;
        conn.end_exchange();
        drop(conn);
        let mut records = Vec::with_capacity(names.len());
        for row in names {
            let name: String = row.get(0);
            match self.handler_status(&name).await {
                Ok(Some(record)) => records.push(record),
                Ok(None) => {}
                Err(e) => return Err(format!("reading handler {name} failed: {e}")),
            }
        }
        let conn = Conn::get(&self.inner.pool, "health")
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        conn.begin_exchange("health").map_err(|e| e.to_string())?;
        let client = conn.object();
        let lag_stmt = client
            .prepare(&lag_sql(schema))
            .await
            .map_err(|e| format!("measuring handler lag failed: {e}"))?;
        for record in records {
            let name = record.name.clone();
            let (xid, position) = lag_params(record.checkpoint);
            let lag = client
                .query_one(&lag_stmt, &[&xid, &position])
                .await
                .and_then(|row| lag_from(&row))
                .map_err(|e| format!("measuring the lag of handler {name} failed: {e}"))?;
            let stuck = lag.events > 0 && lag.seconds > stuck_after.as_secs_f64();
            if stuck {
                health.problems.push(format!(
                    "handler {name} is stuck: {} event(s) behind, the oldest {:.0} s old{}{}",
                    lag.events,
                    lag.seconds,
                    if record.lease_held {
                        ""
                    } else {
                        ", and no instance runs it"
                    },
                    record
                        .last_error
                        .as_deref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ));
            }
            health.handlers.push(HandlerHealth {
                name,
                checkpoint: record.checkpoint,
                lag,
                lease_held: record.lease_held,
                attempts: record.attempts,
                last_error: record.last_error,
                stuck,
            });
        }
        conn.end_exchange();
        Ok(())
    }
}
