//! The executor scenarios on PostgreSQL, plus what only PostgreSQL can show: a failure inside
//! the commit transaction rolls the events back, and more concurrent commands than pooled
//! connections all finish.
//!
//! The server comes from `dcb_testkit::pg::test_database()` (`DATABASE_URL`, else
//! `postgres://postgres@localhost:5432/postgres`, else a disposable local cluster); every test
//! gets its own schema, dropped when the test ends.

#[macro_use]
mod common;

use dcb_command::{handler_fn, Command, CommandError, CommandExecutor, Decision};
use dcb_core::{EventStore, NewEvent};
use dcb_postgres::{PostgresEventStore, StoreConfig};
use dcb_testkit::pg::TestSchema;
use serde_json::json;
use std::sync::Arc;

async fn store_with(
    config: impl FnOnce(StoreConfig) -> StoreConfig,
) -> (Arc<dyn EventStore>, TestSchema) {
    let schema = TestSchema::new().await;
    let config = config(
        StoreConfig::default()
            .schema(&schema.schema)
            .auto_migrate(true),
    );
    let store = PostgresEventStore::connect(&schema.url, config)
        .await
        .unwrap_or_else(|e| panic!("connecting to {} failed: {e}", schema.url));
    (Arc::new(store), schema)
}

async fn store() -> (Arc<dyn EventStore>, TestSchema) {
    store_with(|config| config).await
}

all_backend_tests!();

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_commands_complete_with_a_small_pool() {
    let (store, _schema) = store_with(|config| config.pool_size(2)).await;
    common::many_concurrent_commands_complete(store, 32).await;
}

/// Installs a trigger that fails every insert of a command of type `Explode` (before the row is
/// written, in the same statement as the events insert) and a deferred constraint trigger that
/// fails commands of type `ExplodeAtCommit` at COMMIT, after events and command row were
/// inserted.
async fn install_failing_triggers(schema: &TestSchema) {
    let client = schema.connect().await.expect("connect");
    let s = &schema.schema;
    client
        .batch_execute(&format!(
            r#"
            CREATE FUNCTION "{s}".fail_command() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'command % rejected by the test trigger', NEW.type;
            END $$;
            CREATE TRIGGER explode BEFORE INSERT ON "{s}".commands
                FOR EACH ROW WHEN (NEW.type = 'Explode') EXECUTE FUNCTION "{s}".fail_command();
            CREATE CONSTRAINT TRIGGER explode_at_commit AFTER INSERT ON "{s}".commands
                DEFERRABLE INITIALLY DEFERRED
                FOR EACH ROW WHEN (NEW.type = 'ExplodeAtCommit') EXECUTE FUNCTION "{s}".fail_command();
            "#
        ))
        .await
        .expect("install triggers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failure_inside_the_commit_transaction_rolls_back_the_events() {
    let (store, schema) = store().await;
    install_failing_triggers(&schema).await;
    let executor = CommandExecutor::new(store.clone());
    let two_events = handler_fn(|command: &Command<serde_json::Value>, _| {
        Box::pin(async move {
            let events = (0..2)
                .map(|n| {
                    NewEvent::builder("Exploded")
                        .tag("command", &command.command_type)
                        .data(&json!({ "n": n }))
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, dcb_command::HandlerError>(Decision::append(events))
        })
    });

    for command_type in ["Explode", "ExplodeAtCommit"] {
        let err = executor
            .execute(
                Command::new(command_type, json!({})).with_id(command_type),
                &two_events,
            )
            .await
            .expect_err(command_type);
        match &err {
            CommandError::Store(dcb_core::Error::Storage {
                message,
                outcome_unknown,
                ..
            }) => {
                assert!(
                    message.contains("rejected by the test trigger"),
                    "{message}"
                );
                assert!(
                    !outcome_unknown,
                    "a server-reported failure is certain: {err:?}"
                );
            }
            other => panic!("{command_type}: expected a storage error, got {other:?}"),
        }
        common::assert_store_empty(store.as_ref(), command_type).await;
    }

    // Nothing was consumed and the pool's connections still work.
    let outcome = executor
        .execute(
            Command::new("Fine", json!({})).with_id("Explode"),
            &two_events,
        )
        .await
        .expect("a normal command after the failures");
    assert!(!outcome.replayed);
    assert_eq!(common::all_events(store.as_ref()).await.len(), 2);
    assert_eq!(common::all_commands(store.as_ref()).await.len(), 1);
}
