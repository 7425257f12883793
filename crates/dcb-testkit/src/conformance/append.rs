//! Unconditional appends: returned cursors, ordering, transactions, atomicity.

use super::support::*;
use super::Factory;
use dcb_core::{AppendCondition, NewEvent, Query, ValidationKind};
use serde_json::json;

/// `append` returns the cursor of the batch's last event, as reads report it.
pub async fn append_returns_cursor_of_last_event(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let first = append(&*store, vec![evn(0, "A", &[])], "single event").await;
    let all = all_events(&*store).await;
    assert_eq!(all.len(), 1, "one event stored");
    assert_eq!(
        all[0].cursor, first,
        "append must return the cursor of the event it wrote"
    );

    let last = append(
        &*store,
        vec![evn(1, "A", &[]), evn(2, "B", &[]), evn(3, "C", &[])],
        "batch of three",
    )
    .await;
    let all = all_events(&*store).await;
    assert_eq!(
        ns(&all),
        [0, 1, 2, 3],
        "batch events are stored in batch order"
    );
    assert_eq!(
        all[3].cursor, last,
        "append must return the cursor of the batch's last event"
    );

    let conditional = append_if_ok(
        &*store,
        vec![evn(4, "D", &[]), evn(5, "D", &[])],
        AppendCondition::new(Query::types(["D"])),
        "conditional batch",
    )
    .await;
    let all = all_events(&*store).await;
    assert_eq!(
        all[5].cursor, conditional,
        "append_if must return the cursor of the batch's last event"
    );
}

/// Cursors strictly increase in read order, across and within transactions.
pub async fn append_cursors_strictly_increase(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let mut returned = Vec::new();
    let mut n = 0;
    for size in [1, 5, 1, 17, 2, 1, 50] {
        let events = (0..size)
            .map(|_| {
                n += 1;
                evn(
                    n,
                    if n % 2 == 0 { "Even" } else { "Odd" },
                    &[("size", &size.to_string())],
                )
            })
            .collect();
        returned.push(append(&*store, events, "appending batches").await);
    }
    assert!(
        returned.windows(2).all(|w| w[0] < w[1]),
        "cursors returned by sequential appends must strictly increase: {returned:?}"
    );
    let all = all_events(&*store).await;
    assert_eq!(
        ns(&all),
        (1..=n).collect::<Vec<_>>(),
        "events read back in append order"
    );
    for pair in all.windows(2) {
        assert!(
            pair[0].cursor < pair[1].cursor,
            "cursors must strictly increase in read order: {} then {}",
            pair[0].cursor,
            pair[1].cursor
        );
    }
    for cursor in &returned {
        assert!(
            all.iter().any(|e| e.cursor == *cursor),
            "returned cursor {cursor} must be the cursor of a stored event"
        );
    }
    // Filtered reads keep the order.
    let odd = read(&*store, &Query::types(["Odd"]), Default::default(), "odd").await;
    assert!(
        odd.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "filtered reads are in cursor order"
    );
}

/// All events of one append share a transaction id; sequential appends have increasing ones.
pub async fn append_batch_shares_transaction_id(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let a = append(
        &*store,
        (0..3).map(|i| evn(i, "A", &[])).collect(),
        "batch a",
    )
    .await;
    let b = append(
        &*store,
        (3..7).map(|i| evn(i, "B", &[])).collect(),
        "batch b",
    )
    .await;
    let c = append_if_ok(
        &*store,
        (7..9).map(|i| evn(i, "C", &[])).collect(),
        AppendCondition::new(Query::types(["C"])),
        "batch c",
    )
    .await;
    let all = all_events(&*store).await;
    assert_eq!(all.len(), 9, "nine events stored");
    let tx = |range: std::ops::Range<usize>| -> Vec<u64> {
        all[range].iter().map(|e| e.cursor.transaction_id).collect()
    };
    for (name, range, returned) in [("a", 0..3, a), ("b", 3..7, b), ("c", 7..9, c)] {
        let ids = tx(range.clone());
        assert!(
            ids.iter().all(|id| *id == returned.transaction_id),
            "every event of batch {name} must carry the batch's transaction id {}: {ids:?}",
            returned.transaction_id
        );
        let positions: Vec<i64> = all[range].iter().map(|e| e.cursor.position).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "positions inside batch {name} must strictly increase: {positions:?}"
        );
    }
    assert!(
        a.transaction_id < b.transaction_id && b.transaction_id < c.transaction_id,
        "sequential appends must get increasing transaction ids: {a} {b} {c}"
    );
}

/// A batch whose third event is invalid writes nothing, with `append` and with `append_if`.
pub async fn append_batch_with_invalid_event_writes_nothing(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(&*store, vec![evn(0, "Existing", &[("k", "v")])], "seed").await;
    let before = all_events(&*store).await;
    let batch = || {
        vec![
            evn(1, "Fine", &[("k", "v")]),
            evn(2, "Fine", &[("k", "w")]),
            evn(3, "", &[("k", "v")]),
            evn(4, "Fine", &[]),
        ]
    };
    expect_validation(
        store.append(batch()).await,
        ValidationKind::EmptyEventType,
        "append with invalid event #3",
    );
    assert_unchanged(&*store, &before, "append with invalid event #3").await;
    expect_validation(
        store
            .append_if(batch(), AppendCondition::new(Query::types(["Nothing"])))
            .await,
        ValidationKind::EmptyEventType,
        "append_if with invalid event #3",
    );
    assert_unchanged(&*store, &before, "append_if with invalid event #3").await;
    let mut late = batch();
    late[2] = NewEvent::new(
        "Fine",
        tags(&[("k", "v")]),
        json!({ "bad": "nul\u{0}inside" }),
    );
    expect_validation(
        store.append(late).await,
        ValidationKind::NulCharacter,
        "append with NUL in event #3's data",
    );
    assert_unchanged(&*store, &before, "append with NUL in event #3's data").await;
    // The store still works afterwards.
    append(&*store, vec![evn(5, "Fine", &[])], "append after failures").await;
    assert_eq!(
        ns(&all_events(&*store).await),
        [0, 5],
        "only valid appends are stored"
    );
}

/// A batch of exactly the default maximum (1000 events) is accepted atomically.
pub async fn append_accepts_batch_at_max_size(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let events: Vec<NewEvent> = (0..1000)
        .map(|i| evn(i, "Bulk", &[("i", &i.to_string())]))
        .collect();
    let last = append(&*store, events, "batch of 1000").await;
    let all = all_events(&*store).await;
    assert_eq!(all.len(), 1000, "all 1000 events stored");
    assert_eq!(ns(&all), (0..1000).collect::<Vec<_>>(), "in batch order");
    assert_eq!(
        all[999].cursor, last,
        "the returned cursor is the 1000th event's"
    );
    assert!(
        all.iter()
            .all(|e| e.cursor.transaction_id == last.transaction_id),
        "one transaction for the whole batch"
    );
}
