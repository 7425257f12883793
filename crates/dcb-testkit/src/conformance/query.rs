//! Query semantics: OR of items, OR of types, AND of tags, cursor bounds, limit, direction,
//! and streaming.

use super::support::*;
use super::Factory;
use dcb_core::{
    Cursor, Event, EventStore, NewEvent, Query, QueryItem, ReadOptions, ValidationKind,
};
use futures_util::StreamExt;

/// Appends the course fixture (payload `n` = index below) in four transactions and returns all
/// events as read back.
///
/// | n | type              | tags                        |
/// |---|-------------------|-----------------------------|
/// | 0 | CourseDefined     | course_id=c1                |
/// | 1 | CourseDefined     | course_id=c2                |
/// | 2 | StudentEnrolled   | course_id=c1, student_id=s1 |
/// | 3 | StudentEnrolled   | course_id=c2, student_id=s1 |
/// | 4 | StudentEnrolled   | student_id=s2, course_id=c1 |
/// | 5 | StudentLeft       | course_id=c1, student_id=s1 |
/// | 6 | CourseRenamed     | course_id=c1                |
/// | 7 | StudentRegistered | student_id=s1               |
/// | 8 | Untagged          |                             |
async fn seed(store: &dyn EventStore) -> Vec<Event> {
    let batches: Vec<Vec<NewEvent>> = vec![
        vec![
            evn(0, "CourseDefined", &[("course_id", "c1")]),
            evn(1, "CourseDefined", &[("course_id", "c2")]),
        ],
        vec![
            evn(
                2,
                "StudentEnrolled",
                &[("course_id", "c1"), ("student_id", "s1")],
            ),
            evn(
                3,
                "StudentEnrolled",
                &[("course_id", "c2"), ("student_id", "s1")],
            ),
            evn(
                4,
                "StudentEnrolled",
                &[("student_id", "s2"), ("course_id", "c1")],
            ),
        ],
        vec![evn(
            5,
            "StudentLeft",
            &[("course_id", "c1"), ("student_id", "s1")],
        )],
        vec![
            evn(6, "CourseRenamed", &[("course_id", "c1")]),
            evn(7, "StudentRegistered", &[("student_id", "s1")]),
            evn(8, "Untagged", &[]),
        ],
    ];
    for batch in batches {
        append(store, batch, "seeding the course fixture").await;
    }
    let all = all_events(store).await;
    assert_eq!(
        ns(&all),
        (0..9).collect::<Vec<_>>(),
        "the fixture must read back in append order"
    );
    all
}

/// Asserts that `query` returns exactly the events numbered `expected`, and that this equals the
/// reference matcher's answer.
async fn expect(store: &dyn EventStore, all: &[Event], query: Query, expected: &[i64], what: &str) {
    let got = read(store, &query, ReadOptions::default(), what).await;
    assert_eq!(
        ns(&got),
        expected,
        "{what}: query {query:?} returned the wrong events"
    );
    assert_eq!(
        got,
        reference(all, &query),
        "{what}: the store disagrees with dcb_core::matches for {query:?}"
    );
}

/// Two items are OR-ed: an event matching either is returned, once, in cursor order.
pub async fn query_or_of_items(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    expect(
        &*store,
        &all,
        Query::from_items([
            item(&["CourseDefined"], &[("course_id", "c2")]),
            item(&["StudentRegistered"], &[]),
        ]),
        &[1, 7],
        "items on different types",
    )
    .await;
    expect(
        &*store,
        &all,
        Query::from_items([
            item(&[], &[("student_id", "s2")]),
            item(&[], &[("course_id", "c2")]),
        ]),
        &[1, 3, 4],
        "items on different tags",
    )
    .await;
    // Event 2 matches both items; it must come back exactly once.
    expect(
        &*store,
        &all,
        Query::from_items([
            item(&["StudentEnrolled"], &[("course_id", "c1")]),
            item(&[], &[("student_id", "s1"), ("course_id", "c1")]),
        ]),
        &[2, 4, 5],
        "overlapping items",
    )
    .await;
    // Items sharing their tags, with and without types, and an item another covers: a store
    // may merge them (dcb_core::Query::simplified) but must return the same events.
    expect(
        &*store,
        &all,
        Query::from_items([
            item(&["CourseDefined"], &[("course_id", "c1")]),
            item(&["StudentLeft"], &[("course_id", "c1")]),
            item(
                &["StudentLeft"],
                &[("student_id", "s1"), ("course_id", "c1")],
            ),
            item(&["CourseRenamed", "CourseDefined"], &[("course_id", "c1")]),
        ]),
        &[0, 5, 6],
        "items sharing tags, one covered by another",
    )
    .await;
    expect(
        &*store,
        &all,
        Query::from_items([
            item(&["CourseDefined"], &[("course_id", "c2")]),
            item(&[], &[("course_id", "c2")]),
        ]),
        &[1, 3],
        "a typed and an untyped item on the same tags",
    )
    .await;
    expect(
        &*store,
        &all,
        Query::from_items([item(&["Nope"], &[]), item(&["Untagged"], &[])]),
        &[8],
        "one item matches nothing",
    )
    .await;
}

/// Several types in one item are OR-ed.
pub async fn query_or_of_types_within_item(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    expect(
        &*store,
        &all,
        q(&["StudentEnrolled", "StudentLeft"], &[("course_id", "c1")]),
        &[2, 4, 5],
        "two types with a tag",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&["CourseDefined", "CourseRenamed"], &[]),
        &[0, 1, 6],
        "two types",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&["Nope", "Untagged"], &[]),
        &[8],
        "an unknown type among the types",
    )
    .await;
}

/// Several tags in one item are AND-ed.
pub async fn query_and_of_tags(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    expect(
        &*store,
        &all,
        q(&[], &[("course_id", "c1"), ("student_id", "s1")]),
        &[2, 5],
        "two tags",
    )
    .await;
    // Tag order in the query is irrelevant, and so is the order on the event (event 4).
    expect(
        &*store,
        &all,
        q(&[], &[("student_id", "s2"), ("course_id", "c1")]),
        &[4],
        "two tags reversed",
    )
    .await;
    expect(
        &*store,
        &all,
        q(
            &["StudentEnrolled"],
            &[("course_id", "c1"), ("student_id", "s1")],
        ),
        &[2],
        "type and two tags",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&[], &[("course_id", "c2"), ("student_id", "s2")]),
        &[],
        "no event has both",
    )
    .await;
    // Same key twice with different values: no event can carry both.
    expect(
        &*store,
        &all,
        q(&[], &[("course_id", "c1"), ("course_id", "c2")]),
        &[],
        "same key twice",
    )
    .await;
}

/// Events carrying more tags than the item requires still match.
pub async fn query_extra_event_tags_still_match(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    expect(
        &*store,
        &all,
        q(&[], &[("course_id", "c1")]),
        &[0, 2, 4, 5, 6],
        "one tag",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&[], &[("student_id", "s1")]),
        &[2, 3, 5, 7],
        "one student tag",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&["StudentEnrolled"], &[("course_id", "c1")]),
        &[2, 4],
        "type and one tag",
    )
    .await;
}

/// `Query::all()` returns every event once, also combined with other items.
pub async fn query_all_matches_everything_once(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    let every: Vec<i64> = (0..9).collect();
    expect(&*store, &all, Query::all(), &every, "Query::all").await;
    expect(
        &*store,
        &all,
        Query::all().or(item(&["CourseDefined"], &[])),
        &every,
        "all OR a type",
    )
    .await;
    expect(
        &*store,
        &all,
        Query::from_items([item(&["Untagged"], &[]), QueryItem::new()]),
        &every,
        "a type OR an empty item",
    )
    .await;
    assert!(
        Query::all().is_match_all(),
        "Query::all must report is_match_all"
    );
}

/// An item with only types matches those types with any tags (also none).
pub async fn query_item_with_only_types(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    expect(
        &*store,
        &all,
        Query::types(["StudentEnrolled"]),
        &[2, 3, 4],
        "one type",
    )
    .await;
    expect(
        &*store,
        &all,
        Query::types(["Untagged"]),
        &[8],
        "an event without tags",
    )
    .await;
    expect(
        &*store,
        &all,
        Query::types(["StudentRegistered", "Untagged"]),
        &[7, 8],
        "two types",
    )
    .await;
}

/// An item with only tags matches any type carrying those tags.
pub async fn query_item_with_only_tags(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    expect(
        &*store,
        &all,
        Query::tags(tags(&[("course_id", "c2")])),
        &[1, 3],
        "a tag across types",
    )
    .await;
    expect(
        &*store,
        &all,
        Query::tags(tags(&[("student_id", "s1"), ("course_id", "c2")])),
        &[3],
        "two tags across types",
    )
    .await;
}

/// Unknown types, unknown tag values and differently-cased values match nothing.
pub async fn query_without_match_is_empty(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    expect(&*store, &all, Query::types(["Nope"]), &[], "unknown type").await;
    expect(
        &*store,
        &all,
        Query::types(["coursedefined"]),
        &[],
        "type with other case",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&[], &[("course_id", "C1")]),
        &[],
        "tag value with other case",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&[], &[("Course_id", "c1")]),
        &[],
        "tag key with other case",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&[], &[("course_id", "c")]),
        &[],
        "tag value prefix",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&[], &[("course", "c1")]),
        &[],
        "tag key prefix",
    )
    .await;
    expect(
        &*store,
        &all,
        q(&["CourseDefined"], &[("student_id", "s1")]),
        &[],
        "type and tag never together",
    )
    .await;
    let empty = factory.new_store().await;
    let got = read(
        &*empty,
        &Query::all(),
        ReadOptions::default(),
        "empty store",
    )
    .await;
    assert!(got.is_empty(), "a fresh store must be empty, got {got:?}");
}

/// A query without items is rejected with `EmptyQuery`, by `query` and by `query_stream`.
pub async fn query_empty_is_rejected(factory: Factory<'_>) {
    let store = factory.new_store().await;
    seed(&*store).await;
    let result = store.query(&Query::default(), ReadOptions::default()).await;
    expect_validation(
        result,
        ValidationKind::EmptyQuery,
        "query with an empty Query",
    );
    let items: Vec<_> = store
        .query_stream(&Query::default(), ReadOptions::default())
        .collect()
        .await;
    assert!(
        matches!(items.first(), Some(Err(_))),
        "query_stream with an empty Query must yield an error first, got {items:?}"
    );
    assert!(
        items.iter().all(Result::is_err),
        "query_stream with an empty Query must yield no events: {items:?}"
    );
    let first = items.into_iter().next().map(|r| r.map(|_| ()));
    expect_validation(
        first.unwrap_or(Ok(())),
        ValidationKind::EmptyQuery,
        "query_stream with an empty Query",
    );
}

/// `after` is exclusive and works with cursors that name no event.
pub async fn query_after_is_exclusive(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    for (i, event) in all.iter().enumerate() {
        let got = read(
            &*store,
            &Query::all(),
            ReadOptions::default().after(event.cursor),
            "after",
        )
        .await;
        assert_eq!(
            ns(&got),
            ((i as i64 + 1)..9).collect::<Vec<_>>(),
            "after {} (event {i}) must return exactly the events following it",
            event.cursor
        );
    }
    let got = read(
        &*store,
        &Query::all(),
        ReadOptions::default().after(CURSOR_MIN),
        "after min",
    )
    .await;
    assert_eq!(got.len(), 9, "after {CURSOR_MIN} must return every event");
    let got = read(
        &*store,
        &Query::all(),
        ReadOptions::default().after(CURSOR_FAR),
        "after far",
    )
    .await;
    assert!(
        got.is_empty(),
        "after {CURSOR_FAR} must return nothing, got {got:?}"
    );
    // With a filtering query: after event 2 (a match), the matches that follow.
    let query = q(&[], &[("course_id", "c1")]);
    let got = read(
        &*store,
        &query,
        ReadOptions::default().after(all[2].cursor),
        "after with query",
    )
    .await;
    assert_eq!(ns(&got), [4, 5, 6], "after event 2 with course_id=c1");
    // After a non-matching event (3) between matches.
    let got = read(
        &*store,
        &query,
        ReadOptions::default().after(all[3].cursor),
        "after non-match",
    )
    .await;
    assert_eq!(
        ns(&got),
        [4, 5, 6],
        "after event 3 (not matching) with course_id=c1"
    );
}

/// `before` is exclusive.
pub async fn query_before_is_exclusive(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    for (i, event) in all.iter().enumerate() {
        let got = read(
            &*store,
            &Query::all(),
            ReadOptions::default().before(event.cursor),
            "before",
        )
        .await;
        assert_eq!(
            ns(&got),
            (0..i as i64).collect::<Vec<_>>(),
            "before {} (event {i}) must return exactly the events preceding it",
            event.cursor
        );
    }
    let got = read(
        &*store,
        &Query::all(),
        ReadOptions::default().before(CURSOR_FAR),
        "before far",
    )
    .await;
    assert_eq!(got.len(), 9, "before {CURSOR_FAR} must return every event");
    let got = read(
        &*store,
        &Query::all(),
        ReadOptions::default().before(CURSOR_MIN),
        "before min",
    )
    .await;
    assert!(
        got.is_empty(),
        "before {CURSOR_MIN} must return nothing, got {got:?}"
    );
}

/// `after` and `before` together select the open interval between them.
pub async fn query_after_and_before_together(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    let options = ReadOptions::default()
        .after(all[1].cursor)
        .before(all[6].cursor);
    let got = read(&*store, &Query::all(), options, "between").await;
    assert_eq!(
        ns(&got),
        [2, 3, 4, 5],
        "between events 1 and 6 (both exclusive)"
    );
    let got = read(
        &*store,
        &Query::types(["StudentEnrolled"]),
        options,
        "between with type",
    )
    .await;
    assert_eq!(
        ns(&got),
        [2, 3, 4],
        "StudentEnrolled between events 1 and 6"
    );
    let adjacent = ReadOptions::default()
        .after(all[3].cursor)
        .before(all[4].cursor);
    let got = read(&*store, &Query::all(), adjacent, "adjacent").await;
    assert!(
        got.is_empty(),
        "nothing lies strictly between adjacent events 3 and 4: {got:?}"
    );
    let same = ReadOptions::default()
        .after(all[3].cursor)
        .before(all[3].cursor);
    let got = read(&*store, &Query::all(), same, "same").await;
    assert!(got.is_empty(), "after = before selects nothing: {got:?}");
    let inverted = ReadOptions::default()
        .after(all[6].cursor)
        .before(all[2].cursor);
    let got = read(&*store, &Query::all(), inverted, "inverted").await;
    assert!(got.is_empty(), "after > before selects nothing: {got:?}");
    let backwards = options.backwards();
    let got = read(&*store, &Query::all(), backwards, "between backwards").await;
    assert_eq!(
        ns(&got),
        [5, 4, 3, 2],
        "between events 1 and 6, newest first"
    );
}

/// `limit` returns the first matches in reading order.
pub async fn query_limit(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    let limited = |n| ReadOptions::default().limit(n);
    assert_eq!(
        ns(&read(&*store, &Query::all(), limited(1), "limit 1").await),
        [0],
        "limit 1"
    );
    assert_eq!(
        ns(&read(&*store, &Query::all(), limited(3), "limit 3").await),
        [0, 1, 2],
        "limit 3"
    );
    assert_eq!(
        ns(&read(&*store, &Query::all(), limited(9), "limit 9").await).len(),
        9,
        "limit = count"
    );
    assert_eq!(
        ns(&read(&*store, &Query::all(), limited(100), "limit 100").await).len(),
        9,
        "limit > count"
    );
    let query = q(&[], &[("course_id", "c1")]);
    assert_eq!(
        ns(&read(&*store, &query, limited(2), "limit query").await),
        [0, 2],
        "limit applies to matches"
    );
    let after = limited(2).after(all[2].cursor);
    assert_eq!(
        ns(&read(&*store, &query, after, "limit after").await),
        [4, 5],
        "limit after a cursor"
    );
}

/// A zero limit is rejected with `InvalidReadOption` (use `None` for no limit).
pub async fn query_limit_zero_is_rejected(factory: Factory<'_>) {
    let store = factory.new_store().await;
    seed(&*store).await;
    let result = store
        .query(&Query::all(), ReadOptions::default().limit(0))
        .await;
    expect_validation(
        result,
        ValidationKind::InvalidReadOption,
        "query with limit 0",
    );
    let items: Vec<_> = store
        .query_stream(&Query::all(), ReadOptions::default().limit(0))
        .collect()
        .await;
    let first = items.into_iter().next().map(|r| r.map(|_| ()));
    expect_validation(
        first.unwrap_or(Ok(())),
        ValidationKind::InvalidReadOption,
        "query_stream with limit 0",
    );
}

/// Backwards reads return newest first; limit and bounds apply in that order.
pub async fn query_backwards(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = seed(&*store).await;
    let back = ReadOptions::default().backwards();
    assert_eq!(
        ns(&read(&*store, &Query::all(), back, "backwards").await),
        (0..9).rev().collect::<Vec<_>>(),
        "backwards returns every event newest first"
    );
    assert_eq!(
        ns(&read(&*store, &Query::all(), back.limit(2), "backwards limit").await),
        [8, 7],
        "the 2 newest"
    );
    let query = q(&[], &[("course_id", "c1")]);
    assert_eq!(
        ns(&read(&*store, &query, back, "backwards query").await),
        [6, 5, 4, 2, 0],
        "matches newest first"
    );
    assert_eq!(
        ns(&read(
            &*store,
            &query,
            back.before(all[5].cursor).limit(2),
            "backwards before"
        )
        .await),
        [4, 2],
        "the 2 newest matches before event 5"
    );
    assert_eq!(
        ns(&read(
            &*store,
            &query,
            back.after(all[2].cursor),
            "backwards after"
        )
        .await),
        [6, 5, 4],
        "matches after event 2, newest first"
    );
    assert_eq!(
        ns(&read(
            &*store,
            &Query::all(),
            back.before(all[0].cursor),
            "backwards before first"
        )
        .await),
        Vec::<i64>::new(),
        "nothing before the first event"
    );
}

/// `query_stream` returns the same events as `query`, also across many chunks, with limits,
/// bounds and backwards.
pub async fn query_stream_equals_query(factory: Factory<'_>) {
    let store = factory.new_store().await;
    // 700 events in 7 transactions; every third is a `Tick` of parity-tagged streams.
    for batch in 0..7 {
        let events = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                let ty = if n % 3 == 0 { "Tick" } else { "Tock" };
                let parity = if n % 2 == 0 { "even" } else { "odd" };
                evn(n, ty, &[("parity", parity), ("batch", &batch.to_string())])
            })
            .collect();
        append(&*store, events, "seeding 700 events").await;
    }
    let all = all_events(&*store).await;
    assert_eq!(all.len(), 700, "700 events must be stored");
    let queries = [
        Query::all(),
        Query::types(["Tick"]),
        q(&["Tock"], &[("parity", "even")]),
        Query::from_items([item(&["Tick"], &[]), item(&[], &[("batch", "6")])]),
        Query::types(["Nope"]),
    ];
    let mid = all[350].cursor;
    let options = [
        ReadOptions::default(),
        ReadOptions::default().limit(1),
        ReadOptions::default().limit(300),
        ReadOptions::default().limit(699),
        ReadOptions::default().limit(5000),
        ReadOptions::default().backwards(),
        ReadOptions::default().backwards().limit(600),
        ReadOptions::default().after(mid),
        ReadOptions::default().before(mid).backwards(),
        ReadOptions::default()
            .after(all[10].cursor)
            .before(all[690].cursor)
            .limit(400),
        ReadOptions::default()
            .after(all[10].cursor)
            .before(all[690].cursor)
            .backwards()
            .limit(400),
    ];
    for query in &queries {
        for options in options {
            let listed = read(&*store, query, options, "query").await;
            let streamed: Vec<Event> = store
                .query_stream(query, options)
                .map(|r| {
                    r.unwrap_or_else(|err| {
                        panic!("query_stream {query:?} {options:?} failed: {err}")
                    })
                })
                .collect()
                .await;
            assert_eq!(
                ns(&streamed),
                ns(&listed),
                "query_stream must return what query returns for {query:?} with {options:?}"
            );
            assert_eq!(
                streamed, listed,
                "query_stream events must equal query events"
            );
            let mut expected = reference(&all, query);
            if let Some(after) = options.after {
                expected.retain(|e| e.cursor > after);
            }
            if let Some(before) = options.before {
                expected.retain(|e| e.cursor < before);
            }
            if options.direction == dcb_core::Direction::Backwards {
                expected.reverse();
            }
            expected.truncate(options.limit.unwrap_or(usize::MAX));
            assert_eq!(
                ns(&listed),
                ns(&expected),
                "query {query:?} with {options:?} disagrees with the reference"
            );
        }
    }
    // A stream continues past events appended while it is being consumed, or stops before
    // them; either way it never repeats or reorders events.
    let mut stream = store.query_stream(&Query::all(), ReadOptions::default());
    let mut seen: Vec<Cursor> = Vec::new();
    while let Some(item) = stream.next().await {
        let event = item.unwrap_or_else(|err| panic!("stream failed: {err}"));
        if seen.len() == 300 {
            append(
                &*store,
                vec![evn(700, "Late", &[])],
                "appending during a stream",
            )
            .await;
        }
        if let Some(last) = seen.last() {
            assert!(
                *last < event.cursor,
                "stream cursors must strictly increase: {last} then {}",
                event.cursor
            );
        }
        seen.push(event.cursor);
    }
    assert!(
        seen.len() >= 700,
        "the stream must return at least the 700 events present at its start"
    );
}
