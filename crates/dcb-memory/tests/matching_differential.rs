//! Differential property test: for random events × random queries × random read options, the
//! in-memory store's `query`, `query_stream` and `append_if` agree with a reference built on
//! `dcb_core::matches` over all events.

use dcb_core::{
    matches, AppendCondition, Direction, Event, EventReader, EventStore, NewEvent, Query,
    QueryItem, ReadOptions, Tag,
};
use dcb_memory::InMemoryEventStore;
use futures_util::StreamExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

const TYPES: [&str; 3] = ["A", "B", "C"];
const KEYS: [&str; 3] = ["x", "y", "z"];
const VALUES: [&str; 3] = ["1", "2", "a:b"];

fn tag() -> impl Strategy<Value = Tag> {
    (
        proptest::sample::select(KEYS.to_vec()),
        proptest::sample::select(VALUES.to_vec()),
    )
        .prop_map(|(k, v)| Tag::new(k, v))
}

fn new_event() -> impl Strategy<Value = NewEvent> {
    (
        proptest::sample::select(TYPES.to_vec()),
        proptest::collection::vec(tag(), 0..4),
    )
        .prop_map(|(t, tags)| {
            let mut unique: Vec<Tag> = Vec::new();
            for tag in tags {
                if !unique.contains(&tag) {
                    unique.push(tag);
                }
            }
            NewEvent::new(t, unique, serde_json::json!({}))
        })
}

fn query() -> impl Strategy<Value = Query> {
    let item = (
        proptest::sample::subsequence(TYPES.to_vec(), 0..=2),
        proptest::collection::vec(tag(), 0..3),
    )
        .prop_map(|(types, tags)| QueryItem::new().types(types).tags(tags));
    proptest::collection::vec(item, 1..4).prop_map(Query::from_items)
}

/// Indices into the stored events (or past the end) for `after` / `before`, a limit and a
/// direction.
fn options() -> impl Strategy<Value = (Option<usize>, Option<usize>, Option<usize>, bool)> {
    (
        proptest::option::of(0usize..45),
        proptest::option::of(0usize..45),
        proptest::option::of(1usize..12),
        any::<bool>(),
    )
}

fn reference(all: &[Event], query: &Query, options: &ReadOptions) -> Vec<Event> {
    let mut selected: Vec<Event> = all
        .iter()
        .filter(|e| matches(query, &e.event_type, &e.tags))
        .filter(|e| options.after.is_none_or(|a| e.cursor > a))
        .filter(|e| options.before.is_none_or(|b| e.cursor < b))
        .cloned()
        .collect();
    if options.direction == Direction::Backwards {
        selected.reverse();
    }
    selected.truncate(options.limit.unwrap_or(usize::MAX));
    selected
}

proptest! {
    #![proptest_config(Config {
        cases: 200,
        rng_seed: RngSeed::Fixed(0x0dcb_d1ff),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn memory_store_agrees_with_the_reference_matcher(
        events in proptest::collection::vec(new_event(), 0..40),
        split in 1usize..6,
        queries in proptest::collection::vec((query(), options()), 1..6),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            let store = InMemoryEventStore::new();
            for batch in events.chunks(split) {
                store.append(batch.to_vec()).await.expect("valid events append");
            }
            let mut all = store.query(&Query::all(), ReadOptions::default()).await.expect("read all");
            prop_assert_eq!(all.len(), events.len());
            let far = dcb_core::Cursor::new(i64::MAX as u64, i64::MAX);
            for (query, (after, before, limit, backwards)) in &queries {
                let cursor_at = |i: usize| all.get(i).map(|e| e.cursor).unwrap_or(far);
                let options = ReadOptions {
                    after: after.map(cursor_at),
                    before: before.map(cursor_at),
                    limit: *limit,
                    direction: if *backwards { Direction::Backwards } else { Direction::Forwards },
                };
                let expected = reference(&all, query, &options);
                let got = store.query(query, options).await.expect("query");
                prop_assert_eq!(&got, &expected, "query {:?} with {:?}", query, options);
                let streamed: Vec<Event> = store
                    .query_stream(query, options)
                    .map(|r| r.expect("stream item"))
                    .collect()
                    .await;
                prop_assert_eq!(&streamed, &expected, "query_stream {:?} with {:?}", query, options);

                // The condition check uses the same rule: conflict iff a match lies after `after`.
                let condition = AppendCondition::new(query.clone()).with_after(options.after);
                let should_conflict = all.iter().any(|e| {
                    condition.after.is_none_or(|a| e.cursor > a) && matches(query, &e.event_type, &e.tags)
                });
                let result = store.append_if(vec![NewEvent::new("Probe", vec![], serde_json::json!({}))], condition).await;
                prop_assert_eq!(result.is_err(), should_conflict, "append_if outcome for {:?} after {:?}: {:?}", query, options.after, result);
                if let Err(err) = result {
                    prop_assert!(err.is_conflict(), "only conflicts expected, got {:?}", err);
                }
                // A successful probe is part of the log for the next queries.
                all = store.query(&Query::all(), ReadOptions::default()).await.expect("read all");
            }
            Ok(())
        })?;
    }
}
