//! Validation: every invalid input is rejected with the right kind and writes nothing.

use super::support::*;
use super::Factory;
use dcb_core::{
    AppendCondition, Event, EventStore, NewCommand, NewEvent, Query, ReadOptions, Tag,
    ValidationKind, MAX_JSON_DEPTH,
};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A store holding two events, and its contents.
async fn seeded(factory: Factory<'_>) -> (Store, Vec<Event>) {
    let store = factory.new_store().await;
    append(
        &*store,
        vec![ev("Seed", &[("k", "v")]), ev("Seed", &[("k", "w")])],
        "seeding",
    )
    .await;
    let before = all_events(&*store).await;
    (store, before)
}

/// Asserts that `events` are rejected with `kind` by `append` and by `append_if` (with a
/// condition that would pass), leaving the store unchanged.
async fn rejects(
    store: &dyn EventStore,
    before: &[Event],
    events: Vec<NewEvent>,
    kind: ValidationKind,
    what: &str,
) {
    expect_validation(
        store.append(events.clone()).await,
        kind,
        &format!("append: {what}"),
    );
    assert_unchanged(store, before, &format!("append: {what}")).await;
    let passing = AppendCondition::new(Query::types(["NeverAppended"]));
    expect_validation(
        store.append_if(events, passing).await,
        kind,
        &format!("append_if: {what}"),
    );
    assert_unchanged(store, before, &format!("append_if: {what}")).await;
}

/// Accepts `events` (the boundary cases that must pass).
async fn accepts(store: &dyn EventStore, events: Vec<NewEvent>, what: &str) {
    let expected = events.clone();
    let before = all_events(store).await.len();
    append(store, events, what).await;
    let after = all_events(store).await;
    assert_eq!(
        after.len(),
        before + expected.len(),
        "{what}: all events must be written"
    );
    for (stored, sent) in after[before..].iter().zip(&expected) {
        assert_eq!(
            stored.event_type, sent.event_type,
            "{what}: type must round-trip"
        );
        assert_eq!(stored.tags, sent.tags, "{what}: tags must round-trip");
    }
}

/// Event types: empty and over 64 characters are rejected; 64 characters (also multi-byte) pass.
pub async fn validation_event_type(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    rejects(
        &*store,
        &before,
        vec![ev("", &[])],
        ValidationKind::EmptyEventType,
        "empty type",
    )
    .await;
    let long = "T".repeat(65);
    rejects(
        &*store,
        &before,
        vec![ev(&long, &[])],
        ValidationKind::EventTypeTooLong,
        "65-character type",
    )
    .await;
    let long_unicode = "é".repeat(65);
    rejects(
        &*store,
        &before,
        vec![ev(&long_unicode, &[])],
        ValidationKind::EventTypeTooLong,
        "65 two-byte characters",
    )
    .await;
    accepts(&*store, vec![ev(&"T".repeat(64), &[])], "64-character type").await;
    accepts(
        &*store,
        vec![ev(&"é".repeat(64), &[]), ev(&"🦀".repeat(64), &[])],
        "64 multi-byte characters",
    )
    .await;
    accepts(
        &*store,
        vec![ev("Type with spaces, \"quotes\" and :colons:", &[])],
        "type with punctuation",
    )
    .await;
}

/// Tags: empty key or value, `:` in a key and duplicate keys are rejected; `:` in values passes.
pub async fn validation_tags(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[("", "v")])],
        ValidationKind::EmptyTagKey,
        "empty tag key",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[("k", "")])],
        ValidationKind::EmptyTagValue,
        "empty tag value",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[("a:b", "v")])],
        ValidationKind::ReservedCharacter,
        "':' in tag key",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[(":", "v")])],
        ValidationKind::ReservedCharacter,
        "tag key ':'",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[("k", "1"), ("other", "x"), ("k", "1")])],
        ValidationKind::DuplicateTag,
        "identical duplicate tags",
    )
    .await;
    accepts(
        &*store,
        vec![ev("E", &[("k", "1"), ("other", "x"), ("k", "2")])],
        "several values for one tag key",
    )
    .await;
    accepts(
        &*store,
        vec![ev("E", &[("k", "a:b"), ("url", "http://x:80/")])],
        "':' in tag values",
    )
    .await;
    accepts(
        &*store,
        vec![ev("E", &[("k", "1"), ("K", "2")])],
        "keys differing in case",
    )
    .await;
}

/// NUL characters are rejected in types, tag keys and values, data and metadata (also nested
/// and in object keys).
pub async fn validation_nul_characters(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    let nul = ValidationKind::NulCharacter;
    rejects(
        &*store,
        &before,
        vec![ev("Ty\0pe", &[])],
        nul,
        "NUL in type",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[("k\0", "v")])],
        nul,
        "NUL in tag key",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[("k", "\0")])],
        nul,
        "NUL as tag value",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![ev("E", &[("k", "a\0b")])],
        nul,
        "NUL in tag value",
    )
    .await;
    let data = |data| NewEvent::new("E", vec![], data);
    rejects(
        &*store,
        &before,
        vec![data(json!("a\u{0}b"))],
        nul,
        "NUL in string data",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![data(json!({ "k": "a\u{0}" }))],
        nul,
        "NUL in a data field",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![data(json!({ "k\u{0}": 1 }))],
        nul,
        "NUL in a data key",
    )
    .await;
    rejects(
        &*store,
        &before,
        vec![data(json!({ "a": [1, { "b": ["\u{0}"] }] }))],
        nul,
        "NUL nested in data",
    )
    .await;
    let mut with_meta = ev("E", &[]);
    with_meta.metadata = Some(json!({ "user": "x\u{0}y" }));
    rejects(&*store, &before, vec![with_meta], nul, "NUL in metadata").await;
    let mut meta_key = ev("E", &[]);
    meta_key.metadata = Some(json!({ "\u{0}": true }));
    rejects(
        &*store,
        &before,
        vec![meta_key],
        nul,
        "NUL in a metadata key",
    )
    .await;
    // Other control characters are fine.
    accepts(
        &*store,
        vec![ev("E", &[("k", "tab\there\u{1}\u{7f}")])],
        "control characters other than NUL",
    )
    .await;
}

/// Empty appends and batches above the default maximum (1000) are rejected.
pub async fn validation_batch_size_and_empty_append(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    rejects(
        &*store,
        &before,
        vec![],
        ValidationKind::EmptyAppend,
        "empty append",
    )
    .await;
    let too_many: Vec<NewEvent> = (0..1001).map(|i| evn(i, "Bulk", &[])).collect();
    rejects(
        &*store,
        &before,
        too_many,
        ValidationKind::BatchTooLarge,
        "1001 events",
    )
    .await;
}

/// Conditions: an empty query and invalid types or tags in the condition are rejected.
pub async fn validation_condition(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    let cases: Vec<(Query, ValidationKind, &str)> = vec![
        (
            Query::default(),
            ValidationKind::EmptyQuery,
            "empty condition query",
        ),
        (
            Query::types([""]),
            ValidationKind::EmptyEventType,
            "empty type in condition",
        ),
        (
            Query::types(["T".repeat(65)]),
            ValidationKind::EventTypeTooLong,
            "65-character type in condition",
        ),
        (
            Query::tags([Tag::new("", "v")]),
            ValidationKind::EmptyTagKey,
            "empty tag key in condition",
        ),
        (
            Query::tags([Tag::new("k", "")]),
            ValidationKind::EmptyTagValue,
            "empty tag value in condition",
        ),
        (
            Query::tags([Tag::new("a:b", "v")]),
            ValidationKind::ReservedCharacter,
            "':' in condition tag key",
        ),
        (
            Query::tags([Tag::new("k", "v\0")]),
            ValidationKind::NulCharacter,
            "NUL in condition tag value",
        ),
        (
            Query::from_items([item(&["Fine"], &[]), item(&["Bad\0"], &[])]),
            ValidationKind::NulCharacter,
            "NUL in the second condition item",
        ),
    ];
    for (query, kind, what) in cases {
        for after in [None, before.last().map(|e| e.cursor)] {
            let condition = AppendCondition::new(query.clone()).with_after(after);
            expect_validation(
                store.append_if(vec![ev("E", &[])], condition).await,
                kind,
                what,
            );
            assert_unchanged(&*store, &before, what).await;
        }
    }
}

/// Reads: invalid types or tags in a query are rejected by `query` and `query_stream`.
pub async fn validation_query(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    let cases: Vec<(Query, ValidationKind, &str)> = vec![
        (
            Query::types([""]),
            ValidationKind::EmptyEventType,
            "empty type",
        ),
        (
            Query::types(["T".repeat(65)]),
            ValidationKind::EventTypeTooLong,
            "65-character type",
        ),
        (
            Query::tags([Tag::new("", "v")]),
            ValidationKind::EmptyTagKey,
            "empty tag key",
        ),
        (
            Query::tags([Tag::new("k", "")]),
            ValidationKind::EmptyTagValue,
            "empty tag value",
        ),
        (
            Query::tags([Tag::new("k:x", "v")]),
            ValidationKind::ReservedCharacter,
            "':' in tag key",
        ),
        (
            Query::tags([Tag::new("k", "\0")]),
            ValidationKind::NulCharacter,
            "NUL in tag value",
        ),
    ];
    for (query, kind, what) in cases {
        expect_validation(
            store.query(&query, ReadOptions::default()).await,
            kind,
            &format!("query: {what}"),
        );
        let first = store
            .query_stream(&query, ReadOptions::default())
            .next()
            .await;
        expect_validation(
            first.map(|r| r.map(|e| e.cursor)).unwrap_or_else(|| {
                panic!("query_stream: {what}: the stream must yield an error, it was empty")
            }),
            kind,
            &format!("query_stream: {what}"),
        );
    }
    // A valid tag value with ':' is a plain read.
    let got = read(
        &*store,
        &Query::tags([Tag::new("k", "v:w")]),
        ReadOptions::default(),
        "':' in value",
    )
    .await;
    assert!(got.is_empty(), "no event carries k=v:w: {got:?}");
    assert_unchanged(&*store, &before, "reads").await;
}

/// Invalid events are reported as validation errors even when the condition would conflict.
pub async fn validation_before_condition_check(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    let conflicting = AppendCondition::new(Query::types(["Seed"]));
    expect_validation(
        store
            .append_if(vec![ev("", &[])], conflicting.clone())
            .await,
        ValidationKind::EmptyEventType,
        "invalid event with a conflicting condition",
    );
    assert_unchanged(
        &*store,
        &before,
        "invalid event with a conflicting condition",
    )
    .await;
    expect_validation(
        store.append_if(vec![], conflicting).await,
        ValidationKind::EmptyAppend,
        "empty append with a conflicting condition",
    );
    assert_unchanged(
        &*store,
        &before,
        "empty append with a conflicting condition",
    )
    .await;
}

/// `depth` levels of arrays (or of objects with key `"k"`) around `inner`, built without
/// recursion (`json!` would serialize the inner value again).
fn nested(depth: usize, objects: bool, inner: Value) -> Value {
    (0..depth).fold(inner, |v, _| {
        if objects {
            Value::Object(std::iter::once(("k".to_string(), v)).collect())
        } else {
            Value::Array(vec![v])
        }
    })
}

/// JSON in data and metadata may nest arrays and objects `MAX_JSON_DEPTH` levels deep; such
/// events read back equal through `query` and `query_stream`. One level more (an empty container
/// counts), the 200 levels PostgreSQL would store but not return, and 10,000 levels (which must
/// not overflow the stack) are rejected with `JsonTooDeep`, writing nothing; commands too.
pub async fn validation_json_depth(factory: Factory<'_>) {
    let (store, before) = seeded(factory).await;
    let too_deep = ValidationKind::JsonTooDeep;
    let event = |data: Value, metadata: Option<Value>| {
        let mut event = NewEvent::new("Deep", vec![], data);
        event.metadata = metadata;
        event
    };
    for objects in [false, true] {
        let shape = if objects { "objects" } else { "arrays" };
        let at_limit = nested(MAX_JSON_DEPTH, objects, json!("bottom"));
        rejects(
            &*store,
            &before,
            vec![event(nested(MAX_JSON_DEPTH + 1, objects, json!(1)), None)],
            too_deep,
            &format!("data: {} levels of {shape}", MAX_JSON_DEPTH + 1),
        )
        .await;
        rejects(
            &*store,
            &before,
            vec![event(nested(MAX_JSON_DEPTH, objects, json!([])), None)],
            too_deep,
            &format!("data: {MAX_JSON_DEPTH} levels of {shape} around an empty array"),
        )
        .await;
        rejects(
            &*store,
            &before,
            vec![
                event(at_limit.clone(), None),
                event(json!({}), Some(nested(200, objects, json!(null)))),
            ],
            too_deep,
            &format!("metadata of the second event: 200 levels of {shape}"),
        )
        .await;
        // 10,000 levels: built twice, never cloned (Value's clone and drop recurse).
        let deep = || vec![event(nested(10_000, objects, json!(1)), None)];
        expect_validation(
            store.append(deep()).await,
            too_deep,
            &format!("append: 10,000 levels of {shape}"),
        );
        expect_validation(
            store
                .append_if(
                    deep(),
                    AppendCondition::new(Query::types(["NeverAppended"])),
                )
                .await,
            too_deep,
            &format!("append_if: 10,000 levels of {shape}"),
        );
        assert_unchanged(&*store, &before, "10,000 levels").await;

        let mut session = store
            .command_session()
            .await
            .unwrap_or_else(|err| panic!("command_session failed: {err}"));
        let command = NewCommand {
            command_type: "Deep".into(),
            data: json!({}),
            metadata: Some(nested(MAX_JSON_DEPTH + 1, objects, json!(1))),
            id: None,
        };
        expect_validation(
            session.commit(&command, vec![ev("E", &[])], None).await,
            too_deep,
            &format!("command metadata: {} levels of {shape}", MAX_JSON_DEPTH + 1),
        );
        let command = NewCommand {
            data: nested(200, objects, json!(1)),
            metadata: None,
            ..command
        };
        expect_validation(
            session.commit(&command, vec![], None).await,
            too_deep,
            &format!("command data: 200 levels of {shape}"),
        );
        drop(session);
        assert_unchanged(&*store, &before, "deep commands").await;
    }
    let commands = store
        .commands(&dcb_core::CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("listing commands failed: {err}"));
    assert!(commands.is_empty(), "no deep command was recorded");

    // At the limit: accepted, and every read path returns it equal.
    let arrays = nested(MAX_JSON_DEPTH, false, json!("bottom"));
    let objects = nested(MAX_JSON_DEPTH, true, json!(1.5));
    let mixed = (0..MAX_JSON_DEPTH).fold(json!(null), |v, i| {
        if i % 2 == 0 {
            Value::Array(vec![json!(i), v])
        } else {
            Value::Object(std::iter::once((format!("level{i}"), v)).collect())
        }
    });
    let sent = vec![
        event(arrays.clone(), Some(objects.clone())),
        event(mixed.clone(), Some(arrays.clone())),
    ];
    append(&*store, sent.clone(), "JSON at MAX_JSON_DEPTH").await;
    let read_back = read(
        &*store,
        &Query::types(["Deep"]),
        ReadOptions::default(),
        "deep",
    )
    .await;
    let streamed: Vec<Event> = store
        .query_stream(&Query::types(["Deep"]), ReadOptions::default())
        .map(|item| item.unwrap_or_else(|err| panic!("streaming deep events failed: {err}")))
        .collect()
        .await;
    for (how, events) in [("query", read_back), ("query_stream", streamed)] {
        assert_eq!(events.len(), 2, "{how}: both deep events read");
        for (stored, sent) in events.iter().zip(&sent) {
            assert!(
                stored.data == sent.data && stored.metadata == sent.metadata,
                "{how}: JSON {MAX_JSON_DEPTH} levels deep must read back equal"
            );
        }
    }
}
