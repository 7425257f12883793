//! Multi-command appends (`EventStore::append_batch`): one transaction, all or nothing, commands
//! in order, the failing command named; racing batches on shared boundaries, one winner.

use super::support::*;
use super::Factory;
use dcb_core::{AppendCommand, AppendCondition, Error, ValidationKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

fn booked(n: i64, slot: &str) -> dcb_core::NewEvent {
    evn(n, "Booked", &[("slot", slot)])
}

fn free(slot: &str) -> AppendCondition {
    AppendCondition::new(q(&["Booked"], &[("slot", slot)]))
}

fn book(n: i64, slot: &str) -> AppendCommand {
    AppendCommand::new(vec![booked(n, slot)]).only_if(free(slot))
}

/// Clean commands all commit in one transaction, in order; each gets its last event's cursor.
pub async fn batch_commits_every_command_in_one_transaction(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let commands = vec![
        book(1, "a"),
        AppendCommand::new(vec![booked(2, "b"), booked(3, "b")]),
        book(4, "c"),
    ];
    let cursors = store
        .append_batch(commands)
        .await
        .unwrap_or_else(|err| panic!("three clean commands must commit: {err}"));
    let log = all_events(&*store).await;
    assert_eq!(ns(&log), [1, 2, 3, 4], "every event, in command order");
    assert_eq!(
        cursors,
        [log[0].cursor, log[2].cursor, log[3].cursor],
        "each command's last cursor"
    );
    assert!(
        log.iter()
            .all(|e| e.cursor.transaction_id == log[0].cursor.transaction_id),
        "one transaction"
    );
}

/// One command whose condition fails stops the whole batch; the error names it and the stored
/// event it met; nothing is written.
pub async fn batch_with_a_stale_command_writes_nothing_and_names_it(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let taken = append(&*store, vec![booked(0, "b")], "seed").await;
    let before = all_events(&*store).await;
    let commands = vec![book(1, "a"), book(2, "b"), book(3, "c")];
    match store.append_batch(commands).await {
        Err(Error::Conflict(info)) => {
            assert_eq!(info.command, Some(1), "the second command failed: {info}");
            assert_eq!(info.conflicting, Some(taken), "{info}");
            assert_eq!(info.earlier_command, None, "{info}");
        }
        other => panic!("a batch with a stale command must conflict: {other:?}"),
    }
    assert_unchanged(&*store, &before, "a conflicting batch").await;
}

/// A command whose condition matches events of an earlier command of the batch conflicts, as if
/// the commands had been appended one after the other; nothing is written.
pub async fn batch_command_depending_on_an_earlier_one_conflicts(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let commands = vec![book(1, "a"), book(2, "b"), book(3, "a")];
    match store.append_batch(commands).await {
        Err(Error::Conflict(info)) => {
            assert_eq!(
                (info.command, info.earlier_command),
                (Some(2), Some(0)),
                "{info}"
            );
        }
        other => panic!("two bookings of one slot in a batch must conflict: {other:?}"),
    }
    assert!(all_events(&*store).await.is_empty(), "nothing written");
}

/// Invalid input anywhere in the batch is named by its command; nothing is written.
pub async fn batch_with_invalid_input_writes_nothing(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let bad = AppendCommand::new(vec![ev("", &[])]);
    let err = store
        .append_batch(vec![book(1, "a"), bad])
        .await
        .expect_err("an invalid event type must be rejected");
    match &err {
        Error::Validation(v) => assert!(v.field.starts_with("commands[1].events[0]"), "{v}"),
        other => panic!("expected a validation error, got {other:?}"),
    }
    let empty = store
        .append_batch(vec![book(2, "b"), AppendCommand::new(Vec::new())])
        .await
        .expect_err("an empty command must be rejected");
    assert!(matches!(&empty, Error::Validation(v) if v.kind == ValidationKind::EmptyAppend));
    assert!(store.append_batch(Vec::new()).await.is_err(), "no commands");
    assert!(all_events(&*store).await.is_empty(), "nothing written");
}

/// Barrier-synchronized batches that share one slot (each also books a slot of its own): exactly
/// one batch wins per round, and no slot is ever booked twice.
pub async fn batch_racers_on_a_shared_boundary_one_winner(factory: Factory<'_>) {
    let store = factory.new_store().await;
    const RACERS: usize = 6;
    for round in 0..5 {
        let barrier = Arc::new(Barrier::new(RACERS));
        let tasks = (0..RACERS)
            .map(|racer| {
                let store = store.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let shared = format!("shared-{round}");
                    let own = format!("own-{round}-{racer}");
                    let n = (round * RACERS + racer) as i64;
                    barrier.wait().await;
                    store
                        .append_batch(vec![book(n, &own), book(n, &shared)])
                        .await
                })
            })
            .collect::<Vec<_>>();
        let results = join_tasks(tasks, Duration::from_secs(30), "racing batches").await;
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            wins, 1,
            "round {round}: exactly one batch wins: {results:?}"
        );
        for result in &results {
            if let Err(err) = result {
                assert!(err.is_conflict(), "losers conflict: {err}");
            }
        }
    }
    let log = all_events(&*store).await;
    assert_eq!(
        log.len(),
        10,
        "two events per winning batch, none of the losers'"
    );
}
