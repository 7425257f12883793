//! A command handler's own rows in the command's transaction (`Decision::in_transaction`): on
//! PostgreSQL the events, the command record and the work's writes commit together or not at
//! all; the in-memory store refuses the work and writes nothing.

#[macro_use]
mod common;

use dcb_command::{handler_fn, Command, CommandError, CommandExecutor, Decision, HandlerError};
use dcb_core::{
    CommandRecord, Cursor, EventReader, EventReaderExt, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, StateProjector, TransactionWork,
};
use dcb_postgres::{transaction_work, IsolationLevel, PostgresEventStore, StoreConfig};
use dcb_testkit::pg::TestSchema;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Barrier, Notify};

struct Fixture {
    store: Arc<PostgresEventStore>,
    executor: CommandExecutor,
    schema: TestSchema,
    outbox: String,
}

impl Fixture {
    async fn new(config: impl FnOnce(StoreConfig) -> StoreConfig) -> Self {
        let schema = TestSchema::new().await;
        let config = config(
            StoreConfig::default()
                .schema(&schema.schema)
                .auto_migrate(true),
        );
        let store = Arc::new(
            PostgresEventStore::connect(&schema.url, config)
                .await
                .expect("store"),
        );
        let outbox = format!("\"{}\".outbox", schema.schema);
        schema
            .connect()
            .await
            .expect("admin")
            .batch_execute(&format!(
                "CREATE TABLE {outbox} (order_id text PRIMARY KEY, tx bigint NOT NULL, \
                 position bigint)"
            ))
            .await
            .expect("outbox table");
        let executor = CommandExecutor::new(store.clone());
        Self {
            store,
            executor,
            schema,
            outbox,
        }
    }

    async fn outbox_rows(&self) -> Vec<(String, i64, Option<i64>)> {
        let admin = self.schema.connect().await.expect("admin");
        admin
            .query(
                &format!(
                    "SELECT order_id, tx, position FROM {} ORDER BY order_id",
                    self.outbox
                ),
                &[],
            )
            .await
            .expect("outbox rows")
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }
}

fn order(id: &str) -> Query {
    Query::from(QueryItem::new().types(["OrderPlaced"]).tag("order_id", id))
}

/// Work that writes the outbox row of `order_id`, with the record it was given.
fn outbox_row(outbox: String, order_id: String) -> TransactionWork {
    transaction_work(move |client, record: &CommandRecord| {
        let tx = record.transaction_id as i64;
        let position = record.last_event.map(|c| c.position);
        Box::pin(async move {
            client
                .execute(
                    &format!("INSERT INTO {outbox} (order_id, tx, position) VALUES ($1, $2, $3)"),
                    &[&order_id, &tx, &position],
                )
                .await?;
            Ok(())
        })
    })
}

/// Places an order once (an existence check guards it) and writes its outbox row in the
/// command's transaction; `runs` counts the work's runs.
async fn place_order(
    fixture: &Fixture,
    order_id: &str,
    runs: Arc<AtomicUsize>,
) -> Result<dcb_command::CommandOutcome, CommandError<std::convert::Infallible>> {
    let outbox = fixture.outbox.clone();
    let handler = handler_fn(move |command: &Command<String>, reader| {
        let outbox = outbox.clone();
        let runs = runs.clone();
        Box::pin(async move {
            let id = command.payload.clone();
            let placed = reader.project(StateProjector::exists(order(&id))).await?;
            if placed.states {
                return Ok(Decision::nothing());
            }
            let event = NewEvent::builder("OrderPlaced")
                .tag("order_id", id.as_str())
                .build()?;
            let work = outbox_row(outbox, id);
            let counted = transaction_work(move |client, record| {
                runs.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { work.run(client, record).await.map_err(Into::into) })
            });
            Ok::<_, HandlerError>(
                Decision::append([event])
                    .guarded_by(placed.condition)
                    .in_transaction(counted),
            )
        })
    });
    fixture
        .executor
        .execute(Command::new("PlaceOrder", order_id.to_string()), &handler)
        .await
}

async fn events_of(store: &PostgresEventStore, id: &str) -> Vec<dcb_core::Event> {
    store
        .query(&order(id), ReadOptions::default())
        .await
        .expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_record_and_the_works_rows_commit_together() {
    let fixture = Fixture::new(|c| c).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let outcome = place_order(&fixture, "o1", runs.clone())
        .await
        .expect("placed");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let events = events_of(&fixture.store, "o1").await;
    assert_eq!(events.len(), 1);
    // The work saw the record as committed: its transaction and last event.
    let last: Cursor = outcome.last_event().expect("an event");
    assert_eq!(last, events[0].cursor);
    assert_eq!(
        fixture.outbox_rows().await,
        vec![(
            "o1".to_string(),
            outcome.record.transaction_id as i64,
            Some(last.position)
        )]
    );
    let commands = fixture
        .executor
        .commands(&Default::default())
        .await
        .expect("commands");
    assert_eq!(commands.len(), 1);

    // The second placement decides nothing (the order exists): no work in its decision.
    place_order(&fixture, "o1", runs.clone())
        .await
        .expect("second");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(fixture.outbox_rows().await.len(), 1);
}

#[derive(Debug, thiserror::Error)]
#[error("the outbox refuses {0}")]
struct OutboxRefused(String);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_work_writes_nothing_and_releases_the_boundary() {
    let fixture = Fixture::new(|c| c).await;
    let outbox = fixture.outbox.clone();
    let refuse = handler_fn(move |command: &Command<String>, reader| {
        let outbox = outbox.clone();
        Box::pin(async move {
            let id = command.payload.clone();
            let placed = reader.project(StateProjector::exists(order(&id))).await?;
            let event = NewEvent::builder("OrderPlaced")
                .tag("order_id", id.as_str())
                .build()?;
            // Writes its row, then refuses: the row must go with the rest.
            let work = transaction_work(move |client, _record| {
                Box::pin(async move {
                    client
                        .execute(
                            &format!("INSERT INTO {outbox} (order_id, tx) VALUES ($1, 0)"),
                            &[&id],
                        )
                        .await?;
                    Err(OutboxRefused(id).into())
                })
            });
            Ok::<_, HandlerError>(
                Decision::append([event])
                    .guarded_by(placed.condition)
                    .in_transaction(work),
            )
        })
    });
    let err = fixture
        .executor
        .execute(
            Command::new("PlaceOrder", "o1".to_string()).with_id("refused-1"),
            &refuse,
        )
        .await
        .expect_err("refused");
    match &err {
        CommandError::TransactionWork(source) => {
            let refused = source
                .downcast_ref::<OutboxRefused>()
                .expect("the work's error");
            assert_eq!(refused.0, "o1");
        }
        other => panic!("expected the work's failure, got {other:?}"),
    }
    assert!(events_of(&fixture.store, "o1").await.is_empty());
    assert!(fixture.outbox_rows().await.is_empty());
    assert!(fixture
        .executor
        .commands(&Default::default())
        .await
        .expect("commands")
        .is_empty());

    // Its keys were released with the rollback: the same boundary commits at once, and the
    // failed command's id was not consumed.
    let runs = Arc::new(AtomicUsize::new(0));
    tokio::time::timeout(
        Duration::from_secs(5),
        place_order(&fixture, "o1", runs.clone()),
    )
    .await
    .expect("not blocked")
    .expect("placed after the failure");
    assert_eq!(fixture.outbox_rows().await.len(), 1);
}

/// Executes a command appending one `OrderPlaced` of `o1` with the work `make_work` builds.
async fn execute_with_work(
    fixture: &Fixture,
    make_work: fn() -> TransactionWork,
) -> Result<dcb_command::CommandOutcome, CommandError<std::convert::Infallible>> {
    let handler = handler_fn(move |_: &Command<()>, _| {
        Box::pin(async move {
            let event = NewEvent::builder("OrderPlaced")
                .tag("order_id", "o1")
                .build()?;
            Ok::<_, HandlerError>(Decision::append([event]).in_transaction(make_work()))
        })
    });
    fixture
        .executor
        .execute(Command::new("PlaceOrder", ()), &handler)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_statement_the_work_swallowed_still_rolls_back() {
    let fixture = Fixture::new(|c| c).await;
    let swallowing = || {
        transaction_work(|client, _| {
            Box::pin(async move {
                // Fails and aborts the transaction; the work ignores it.
                let _ = client.execute("SELECT 1/0", &[]).await;
                Ok(())
            })
        })
    };
    let err = execute_with_work(&fixture, swallowing)
        .await
        .expect_err("aborted transaction");
    match &err {
        CommandError::TransactionWork(source) => {
            assert!(
                source.is::<dcb_postgres::tokio_postgres::Error>(),
                "{source}"
            )
        }
        other => panic!("expected the work's failure, got {other:?}"),
    }
    assert!(events_of(&fixture.store, "o1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_work_that_ends_the_transaction_is_reported_as_unknown() {
    let fixture = Fixture::new(|c| c).await;
    let committing = || {
        transaction_work(|client, _| {
            Box::pin(async move {
                client.batch_execute("COMMIT").await?;
                Ok(())
            })
        })
    };
    let err = execute_with_work(&fixture, committing)
        .await
        .expect_err("ended by the work");
    match &err {
        CommandError::Store(dcb_core::Error::Storage {
            outcome_unknown, ..
        }) => assert!(outcome_unknown, "{err}"),
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_and_replays_do_not_run_the_work() {
    let fixture = Fixture::new(|c| c).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let outbox = fixture.outbox.clone();
    let interloper = fixture.store.clone();
    let counted = runs.clone();
    // Decides, then an unconditional writer of the boundary slips in before the commit.
    let stale = handler_fn(move |command: &Command<String>, reader| {
        let (outbox, interloper, runs) = (outbox.clone(), interloper.clone(), counted.clone());
        Box::pin(async move {
            let id = command.payload.clone();
            let placed = reader.project(StateProjector::exists(order(&id))).await?;
            let event = NewEvent::builder("OrderPlaced")
                .tag("order_id", id.as_str())
                .build()?;
            interloper.append(vec![event.clone()]).await?;
            let work = outbox_row(outbox, id);
            let work = transaction_work(move |client, record| {
                runs.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { work.run(client, record).await.map_err(Into::into) })
            });
            Ok::<_, HandlerError>(
                Decision::append([event])
                    .guarded_by(placed.condition)
                    .in_transaction(work),
            )
        })
    });
    let err = fixture
        .executor
        .execute(Command::new("PlaceOrder", "o1".to_string()), &stale)
        .await
        .expect_err("conflict");
    assert!(err.is_conflict(), "{err:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!(fixture.outbox_rows().await.is_empty());

    // A replay of a recorded id runs neither the handler's work nor writes anything.
    let once = |id: &'static str| Command::new("PlaceOrder", id.to_string()).with_id("once");
    let placing = Arc::new(AtomicUsize::new(0));
    let place = {
        let outbox = fixture.outbox.clone();
        let placing = placing.clone();
        handler_fn(move |command: &Command<String>, _| {
            let (outbox, placing) = (outbox.clone(), placing.clone());
            Box::pin(async move {
                let id = command.payload.clone();
                let event = NewEvent::builder("OrderPlaced")
                    .tag("order_id", id.as_str())
                    .build()?;
                let work = outbox_row(outbox, id);
                let work = transaction_work(move |client, record| {
                    placing.fetch_add(1, Ordering::SeqCst);
                    Box::pin(async move { work.run(client, record).await.map_err(Into::into) })
                });
                Ok::<_, HandlerError>(Decision::append([event]).in_transaction(work))
            })
        })
    };
    let first = fixture
        .executor
        .execute(once("o2"), &place)
        .await
        .expect("first");
    let again = fixture
        .executor
        .execute(once("o2"), &place)
        .await
        .expect("replay");
    assert!(again.replayed);
    assert_eq!(again.record, first.record);
    assert_eq!(placing.load(Ordering::SeqCst), 1);
    assert_eq!(fixture.outbox_rows().await.len(), 1);
}

/// Racers that all decided on an empty boundary, released together by a barrier: exactly one
/// commits its events and its row, at every append isolation level (REPEATABLE READ and
/// SERIALIZABLE take the keys as session locks first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_commands_with_work_have_one_winner() {
    for isolation in [
        IsolationLevel::ReadCommitted,
        IsolationLevel::RepeatableRead,
        IsolationLevel::Serializable,
    ] {
        let fixture = Arc::new(Fixture::new(|c| c.append_isolation(isolation)).await);
        const RACERS: usize = 8;
        let barrier = Arc::new(Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|n| {
                let (fixture, barrier) = (fixture.clone(), barrier.clone());
                tokio::spawn(async move {
                    let outbox = fixture.outbox.clone();
                    let handler = handler_fn(move |_: &Command<()>, reader| {
                        let (outbox, barrier) = (outbox.clone(), barrier.clone());
                        Box::pin(async move {
                            let placed =
                                reader.project(StateProjector::exists(order("hot"))).await?;
                            assert!(!placed.states, "every racer decides on an empty boundary");
                            barrier.wait().await;
                            let event = NewEvent::builder("OrderPlaced")
                                .tag("order_id", "hot")
                                .build()?;
                            // Rows of distinct keys: only the condition can stop a second one.
                            let work = outbox_row(outbox, format!("hot-{n}"));
                            Ok::<_, HandlerError>(
                                Decision::append([event])
                                    .guarded_by(placed.condition)
                                    .in_transaction(work),
                            )
                        })
                    });
                    fixture
                        .executor
                        .execute(Command::new("PlaceOrder", ()), &handler)
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            match task.await.expect("task") {
                Ok(_) => won += 1,
                Err(err) => assert!(err.is_conflict(), "{isolation:?}: {err:?}"),
            }
        }
        assert_eq!(won, 1, "{isolation:?}");
        assert_eq!(events_of(&fixture.store, "hot").await.len(), 1);
        assert_eq!(fixture.outbox_rows().await.len(), 1, "{isolation:?}");
    }
}

/// While a command's work runs (its transaction has an id and holds the command's keys), a
/// reader of its boundary waits and then sees the event (no skip), and an append to another
/// boundary is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_work_holds_its_boundary_only() {
    let fixture = Arc::new(Fixture::new(|c| c).await);
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let slow = {
        let (entered, release) = (entered.clone(), release.clone());
        handler_fn(move |_: &Command<()>, reader| {
            let (entered, release) = (entered.clone(), release.clone());
            Box::pin(async move {
                let placed = reader
                    .project(StateProjector::exists(order("slow")))
                    .await?;
                let event = NewEvent::builder("OrderPlaced")
                    .tag("order_id", "slow")
                    .build()?;
                let work = transaction_work(move |_client, _| {
                    Box::pin(async move {
                        entered.notify_one();
                        release.notified().await;
                        Ok(())
                    })
                });
                Ok::<_, HandlerError>(
                    Decision::append([event])
                        .guarded_by(placed.condition)
                        .in_transaction(work),
                )
            })
        })
    };
    let command = {
        let fixture = fixture.clone();
        tokio::spawn(async move {
            fixture
                .executor
                .execute(Command::new("PlaceOrder", ()), &slow)
                .await
        })
    };
    entered.notified().await;

    // Another boundary: not blocked.
    tokio::time::timeout(
        Duration::from_secs(5),
        fixture.store.append(vec![NewEvent::builder("OrderPlaced")
            .tag("order_id", "other")
            .build()
            .expect("event")]),
    )
    .await
    .expect("a disjoint append is not held up")
    .expect("disjoint append");

    // The boundary's reader, started while the event is inserted but not committed.
    let reader = {
        let store = fixture.store.clone();
        tokio::spawn(async move { events_of(&store, "slow").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.notify_one();
    let outcome = command.await.expect("task").expect("committed");
    let seen = reader.await.expect("reader");
    assert_eq!(
        seen.iter().map(|e| e.cursor).collect::<Vec<_>>(),
        vec![outcome.last_event().expect("event")],
        "a read that overlapped the work waited for it"
    );
}

#[tokio::test]
async fn the_memory_store_refuses_work_and_writes_nothing() {
    let store: Arc<dyn EventStore> = Arc::new(dcb_memory::InMemoryEventStore::new());
    let executor = CommandExecutor::new(store.clone());
    let seen = Arc::new(Mutex::new(false));
    let flag = seen.clone();
    let handler = handler_fn(move |_: &Command<()>, _| {
        let flag = flag.clone();
        Box::pin(async move {
            let event = NewEvent::builder("OrderPlaced")
                .tag("order_id", "o1")
                .build()?;
            let work = transaction_work(move |_, _| {
                *flag.lock().expect("flag") = true;
                Box::pin(async { Ok(()) })
            });
            Ok::<_, HandlerError>(Decision::append([event]).in_transaction(work))
        })
    });
    let err = executor
        .execute(Command::new("PlaceOrder", ()).with_id("m1"), &handler)
        .await
        .expect_err("refused");
    match &err {
        CommandError::Store(dcb_core::Error::Session { reason, .. }) => {
            assert!(reason.contains("tokio_postgres::"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!*seen.lock().expect("flag"));
    common::assert_store_empty(store.as_ref(), "memory").await;
}

/// An execution dropped while its work runs (a caller's timeout) leaves nothing: the
/// connection is closed, which rolls the transaction back and frees the boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_execution_dropped_during_its_work_leaves_nothing() {
    let fixture = Fixture::new(|c| c).await;
    let outbox = fixture.outbox.clone();
    let stuck = handler_fn(move |_: &Command<()>, reader| {
        let outbox = outbox.clone();
        Box::pin(async move {
            let placed = reader.project(StateProjector::exists(order("o1"))).await?;
            let event = NewEvent::builder("OrderPlaced")
                .tag("order_id", "o1")
                .build()?;
            let row = outbox_row(outbox, "o1".into());
            let work = transaction_work(move |client, record| {
                Box::pin(async move {
                    row.run(client, record).await?;
                    std::future::pending::<()>().await;
                    Ok(())
                })
            });
            Ok::<_, HandlerError>(
                Decision::append([event])
                    .guarded_by(placed.condition)
                    .in_transaction(work),
            )
        })
    });
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        fixture
            .executor
            .execute(Command::new("PlaceOrder", ()).with_id("stuck"), &stuck),
    )
    .await;
    assert!(dropped.is_err(), "the work never finishes");

    let runs = Arc::new(AtomicUsize::new(0));
    tokio::time::timeout(Duration::from_secs(5), place_order(&fixture, "o1", runs))
        .await
        .expect("the boundary was freed")
        .expect("placed");
    assert_eq!(events_of(&fixture.store, "o1").await.len(), 1);
    assert_eq!(fixture.outbox_rows().await.len(), 1);
    assert_eq!(
        fixture
            .executor
            .commands(&Default::default())
            .await
            .expect("commands")
            .len(),
        1,
        "the dropped command was not recorded"
    );
}
