//! Both backends for the facade's integration tests: every test body is an
//! `async fn(Arc<dyn EventStore>)`, run once on the in-memory store and once on PostgreSQL.
#![allow(dead_code)]

use crablet::postgres::{PostgresEventStore, StoreConfig};
use crablet::EventStore;
use dcb_testkit::pg::TestSchema;
use std::sync::Arc;

/// A fresh in-memory store.
pub fn memory() -> Arc<dyn EventStore> {
    Arc::new(crablet::memory::InMemoryEventStore::new())
}

/// A fresh PostgreSQL store in a schema of its own, dropped with the returned guard.
pub async fn postgres() -> (Arc<dyn EventStore>, TestSchema) {
    let schema = TestSchema::new().await;
    let store = PostgresEventStore::connect(
        &schema.url,
        StoreConfig::default()
            .schema(schema.schema.clone())
            .auto_migrate(true),
    )
    .await
    .expect("connect the test store");
    (Arc::new(store), schema)
}

/// Expands to a `memory` and a `postgres` module with one `#[tokio::test]` per named test
/// body, each calling it with a fresh store of that backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::memory()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let (store, _schema) = $crate::support::postgres().await;
                    super::$name(store).await;
                }
            )*
        }
    };
}
