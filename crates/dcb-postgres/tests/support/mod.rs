//! Shared helpers of the PostgreSQL integration tests: a store per test in its own schema.
#![allow(dead_code)]

use async_trait::async_trait;
use dcb_postgres::{PostgresEventStore, StoreConfig};
use dcb_testkit::pg::TestSchema;
use std::sync::{Arc, Mutex};

/// A store in a fresh schema; the schema is dropped with this value.
pub struct TestStore {
    pub store: PostgresEventStore,
    pub schema: TestSchema,
}

impl std::ops::Deref for TestStore {
    type Target = PostgresEventStore;
    fn deref(&self) -> &PostgresEventStore {
        &self.store
    }
}

impl TestStore {
    /// A plain connection to the test database (for faults, triggers, open transactions).
    pub async fn admin(&self) -> tokio_postgres::Client {
        dcb_testkit::pg::connect(&self.schema.url)
            .await
            .expect("admin connection")
    }

    /// The quoted schema name for raw SQL.
    pub fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.schema.schema)
    }
}

/// Makes every insert of an event of type `Slow` wait on advisory lock `lock`, AFTER the
/// inserting transaction got its id: a writer stuck mid-append, as long as the returned
/// connection holds the lock (release it with `pg_advisory_unlock(lock)` or by dropping it).
pub async fn install_brake(ts: &TestStore, lock: i64) -> tokio_postgres::Client {
    install_brake_at(&ts.schema.url, &ts.schema.schema, lock).await
}

/// [`install_brake`] on the store in `schema` of the server at `url` (a primary of a
/// replicated pair, say).
pub async fn install_brake_at(url: &str, schema: &str, lock: i64) -> tokio_postgres::Client {
    let connect = || async {
        dcb_testkit::pg::connect(url)
            .await
            .expect("admin connection")
    };
    connect()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION \"{schema}\".brake() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.type = 'Slow' THEN PERFORM pg_advisory_xact_lock({lock}); END IF; RETURN NEW; END $$; \
             CREATE TRIGGER brake AFTER INSERT ON \"{schema}\".events FOR EACH ROW EXECUTE FUNCTION \"{schema}\".brake();",
        ))
        .await
        .expect("install brake");
    let brake = connect().await;
    brake
        .batch_execute(&format!("SELECT pg_advisory_lock({lock})"))
        .await
        .expect("hold brake");
    brake
}

/// Waits until a writer waits for the brake's advisory lock `lock` on the server at `url`
/// (about 5 s at most).
pub async fn wait_until_stuck(url: &str, lock: i64) {
    let admin = dcb_testkit::pg::connect(url)
        .await
        .expect("admin connection");
    for _ in 0..250 {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                 AND objid = $1::int8::oid AND NOT granted",
                &[&lock],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the Slow writer never got stuck on the brake");
}

/// A store in a fresh schema built by `from_pool` on a pool the test made, whose sessions keep
/// the server's defaults.
pub async fn test_store_from_pool(config: StoreConfig) -> TestStore {
    let schema = TestSchema::new().await;
    let pg_config: tokio_postgres::Config = schema.url.parse().expect("test url");
    let manager = deadpool_postgres::Manager::new(pg_config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(8)
        .build()
        .expect("pool");
    let store = PostgresEventStore::from_pool(
        pool,
        config.schema(schema.schema.clone()).auto_migrate(true),
    )
    .await
    .expect("store from pool");
    TestStore { store, schema }
}

pub async fn test_store(config: StoreConfig) -> TestStore {
    let schema = TestSchema::new().await;
    let store = PostgresEventStore::connect(
        &schema.url,
        config.schema(schema.schema.clone()).auto_migrate(true),
    )
    .await
    .expect("connect test store");
    TestStore { store, schema }
}

/// The conformance factory: each store gets its own schema, dropped when the factory is.
#[derive(Default)]
pub struct PgFactory {
    config: StoreConfig,
    from_pool: bool,
    partition: Option<dcb_postgres::PartitionConfig>,
    schemas: Mutex<Vec<TestSchema>>,
}

impl PgFactory {
    pub fn with_config(config: StoreConfig) -> Self {
        Self {
            config,
            from_pool: false,
            partition: None,
            schemas: Mutex::default(),
        }
    }

    /// Stores partitioned with `partition` right after their migration.
    pub fn partitioned(partition: dcb_postgres::PartitionConfig) -> Self {
        Self {
            partition: Some(partition),
            ..Self::default()
        }
    }

    /// Stores built by `from_pool` on a pool of the test's own.
    pub fn from_pool() -> Self {
        Self {
            from_pool: true,
            ..Self::default()
        }
    }
}

#[async_trait]
impl dcb_testkit::StoreFactory for PgFactory {
    async fn new_store(&self) -> Arc<dyn dcb_core::EventStore> {
        let TestStore { store, schema } = if self.from_pool {
            test_store_from_pool(self.config.clone()).await
        } else {
            test_store(self.config.clone()).await
        };
        if let Some(partition) = self.partition {
            store
                .partition(partition)
                .await
                .expect("partition test store");
        }
        self.schemas.lock().expect("schemas").push(schema);
        Arc::new(store)
    }
}

/// A store whose every append, conditional append and read runs in a store session of its own
/// (begin, the call, commit; rolled back on a conflict): the conformance suite through
/// sessions.
pub struct SessionStore(pub PostgresEventStore);

#[async_trait]
impl dcb_core::EventReader for SessionStore {
    async fn query(
        &self,
        query: &dcb_core::Query,
        options: dcb_core::ReadOptions,
    ) -> Result<Vec<dcb_core::Event>, dcb_core::Error> {
        let mut session = self.0.begin_session().await?;
        let events = session.query(query, options).await?;
        session.rollback().await?;
        Ok(events)
    }

    fn query_stream(
        &self,
        query: &dcb_core::Query,
        options: dcb_core::ReadOptions,
    ) -> dcb_core::EventStream {
        self.0.query_stream(query, options)
    }

    fn projection_permit(&self) -> Result<dcb_core::ProjectionPermit, dcb_core::Error> {
        self.0.projection_permit()
    }

    fn change_feed(&self) -> Option<dcb_core::ChangeFeed> {
        self.0.change_feed()
    }
}

#[async_trait]
impl dcb_core::EventStore for SessionStore {
    async fn append(
        &self,
        events: Vec<dcb_core::NewEvent>,
    ) -> Result<dcb_core::Cursor, dcb_core::Error> {
        let mut session = self.0.begin_session().await?;
        let cursor = session.append(events).await?;
        session.commit().await?;
        Ok(cursor)
    }

    async fn append_if(
        &self,
        events: Vec<dcb_core::NewEvent>,
        condition: dcb_core::AppendCondition,
    ) -> Result<dcb_core::Cursor, dcb_core::Error> {
        let mut session = self.0.begin_session().await?;
        match session.append_if(events, condition).await {
            Ok(cursor) => {
                session.commit().await?;
                Ok(cursor)
            }
            Err(err) => {
                session.rollback().await?;
                Err(err)
            }
        }
    }

    async fn append_batch(
        &self,
        commands: Vec<dcb_core::AppendCommand>,
    ) -> Result<Vec<dcb_core::Cursor>, dcb_core::Error> {
        self.0.append_batch(commands).await
    }

    async fn command_session(&self) -> Result<Box<dyn dcb_core::CommandSession>, dcb_core::Error> {
        self.0.command_session().await
    }

    async fn commands(
        &self,
        filter: &dcb_core::CommandFilter,
    ) -> Result<Vec<dcb_core::CommandRecord>, dcb_core::Error> {
        self.0.commands(filter).await
    }
}

/// Stores whose appends and reads run through [`SessionStore`].
#[derive(Default)]
pub struct SessionFactory {
    schemas: Mutex<Vec<TestSchema>>,
}

#[async_trait]
impl dcb_testkit::StoreFactory for SessionFactory {
    async fn new_store(&self) -> Arc<dyn dcb_core::EventStore> {
        let TestStore { store, schema } = test_store(StoreConfig::default()).await;
        self.schemas.lock().expect("schemas").push(schema);
        Arc::new(SessionStore(store))
    }
}
