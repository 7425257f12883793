//! Append conditions: every combination of `after` and matching events.

use super::support::*;
use super::Factory;
use dcb_core::{AppendCommand, AppendCondition, Cursor, Error, Query};

fn course(id: &str) -> Query {
    q(&["CourseDefined"], &[("course_id", id)])
}

/// A condition over an empty store (with or without `after`) succeeds.
pub async fn condition_on_empty_store_succeeds(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let cursor = append_if_ok(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")),
        "first definition of c1",
    )
    .await;
    let other = factory.new_store().await;
    append_if_ok(
        &*other,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        AppendCondition::new(Query::all()).with_after(Some(CURSOR_MIN)),
        "Query::all after the minimal cursor on an empty store",
    )
    .await;
    let all = all_events(&*store).await;
    assert_eq!(all.len(), 1, "one event written");
    assert_eq!(
        all[0].cursor, cursor,
        "the returned cursor is the written event's"
    );
}

/// Without `after`, any matching event anywhere in the log conflicts.
pub async fn condition_without_after_conflicts_with_any_match(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1",
    )
    .await;
    // Unrelated events after the match do not hide it.
    append(
        &*store,
        (0..5)
            .map(|_| ev("Noise", &[("course_id", "c1")]))
            .collect(),
        "noise",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")),
        "second definition of c1 without after",
    )
    .await;
    // The same condition on another course passes.
    append_if_ok(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c2")])],
        AppendCondition::new(course("c2")),
        "first definition of c2",
    )
    .await;
}

/// `after` equal to the last matching event's cursor succeeds (the bound is exclusive).
pub async fn condition_after_last_match_succeeds(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1",
    )
    .await;
    let last_match = append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1 again",
    )
    .await;
    append_if_ok(
        &*store,
        vec![ev("CourseUpdated", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")).with_after(Some(last_match)),
        "after = last match",
    )
    .await;
}

/// `after` below the last matching event conflicts, whether it names a match or not.
pub async fn condition_after_below_last_match_conflicts(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let first = append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1",
    )
    .await;
    let between = append(
        &*store,
        vec![ev("Other", &[("course_id", "c1")])],
        "unrelated",
    )
    .await;
    append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1 again",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("CourseUpdated", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")).with_after(Some(first)),
        "after = an earlier match",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("CourseUpdated", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")).with_after(Some(between)),
        "after = a non-matching event below the last match",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("CourseUpdated", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")).with_after(Some(CURSOR_MIN)),
        "after = the minimal cursor",
    )
    .await;
}

/// `after` above the last matching event (here: a later unrelated event) succeeds.
pub async fn condition_after_above_last_match_succeeds(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1",
    )
    .await;
    let later = append(&*store, vec![ev("Unrelated", &[("x", "y")])], "unrelated").await;
    append(&*store, vec![ev("Unrelated", &[("x", "z")])], "unrelated 2").await;
    append_if_ok(
        &*store,
        vec![ev("CourseUpdated", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")).with_after(Some(later)),
        "after = a later unrelated event",
    )
    .await;
    append_if_ok(
        &*store,
        vec![ev("CourseUpdated", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")).with_after(Some(CURSOR_FAR)),
        "after = a cursor above every event",
    )
    .await;
}

/// Events after `after` that do not match the query do not conflict.
pub async fn condition_ignores_non_matching_events_after_cursor(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let at = append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1",
    )
    .await;
    append(
        &*store,
        vec![
            ev("CourseDefined", &[("course_id", "c2")]), // other tag value
            ev("CourseRenamed", &[("course_id", "c1")]), // other type
            ev("StudentEnrolled", &[("student_id", "c1")]), // same value, other key
            ev("CourseDefined", &[]),                    // no tags
            ev("CourseDefined", &[("course", "c1")]),    // other key
        ],
        "non-matching events",
    )
    .await;
    append_if_ok(
        &*store,
        vec![ev("CourseUpdated", &[("course_id", "c1")])],
        AppendCondition::new(course("c1")).with_after(Some(at)),
        "only non-matching events after the cursor",
    )
    .await;
}

/// With several items, a match on the second item alone fails the append.
pub async fn condition_multi_item_second_item_matches_conflicts(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let start = append(&*store, vec![ev("Start", &[])], "start").await;
    append(
        &*store,
        vec![ev(
            "StudentEnrolled",
            &[("student_id", "s1"), ("course_id", "c9")],
        )],
        "s1",
    )
    .await;
    let condition = |after| {
        AppendCondition::new(Query::from_items([
            item(&["CourseDefined"], &[("course_id", "c1")]),
            item(&["StudentEnrolled"], &[("student_id", "s1")]),
            item(&["Never"], &[]),
        ]))
        .with_after(after)
    };
    append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        condition(None),
        "second item matches, no after",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        condition(Some(start)),
        "second item matches after start",
    )
    .await;
    let now = all_events(&*store).await.last().map(|e| e.cursor);
    append_if_ok(
        &*store,
        vec![ev("X", &[])],
        condition(now),
        "no item matches after the last event",
    )
    .await;
}

/// Items that share their tags (a decision model's projectors on one entity) or that another
/// item covers still each conflict: a store may merge them, never lose one.
pub async fn condition_items_sharing_tags_each_conflict(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let start = append(&*store, vec![ev("Start", &[])], "start").await;
    let condition = |after| {
        AppendCondition::new(Query::from_items([
            item(&["CourseDefined"], &[("course_id", "c1")]),
            item(&["StudentEnrolled", "StudentLeft"], &[("course_id", "c1")]),
            item(
                &["StudentLeft"],
                &[("course_id", "c1"), ("student_id", "s1")],
            ),
            item(
                &["CourseRenamed"],
                &[("course_id", "c1"), ("student_id", "s1")],
            ),
        ]))
        .with_after(after)
    };
    append_if_ok(
        &*store,
        vec![ev("X", &[("course_id", "c1")])],
        condition(Some(start)),
        "no item matches yet",
    )
    .await;
    let before = all_events(&*store).await.last().map(|e| e.cursor);
    // Matches only the second item's second type.
    append(
        &*store,
        vec![ev(
            "StudentLeft",
            &[("course_id", "c1"), ("student_id", "s2")],
        )],
        "s2 left",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        condition(before),
        "the second type of an item sharing its tags with the first",
    )
    .await;
    let before = all_events(&*store).await.last().map(|e| e.cursor);
    // Matches only the last item (not covered: its type is nowhere else).
    append(
        &*store,
        vec![ev(
            "CourseRenamed",
            &[("course_id", "c1"), ("student_id", "s1")],
        )],
        "renamed, tagged with s1",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        condition(before),
        "an item with more tags and its own type",
    )
    .await;
    let now = all_events(&*store).await.last().map(|e| e.cursor);
    append_if_ok(
        &*store,
        vec![ev("X", &[])],
        condition(now),
        "no item matches after the last event",
    )
    .await;
}

/// A condition requiring more tags than the event carries does not match it.
pub async fn condition_tags_superset_of_event_tags_does_not_conflict(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(
        &*store,
        vec![ev("StudentEnrolled", &[("course_id", "c1")])],
        "event with one tag",
    )
    .await;
    append_if_ok(
        &*store,
        vec![ev("X", &[])],
        AppendCondition::new(q(
            &["StudentEnrolled"],
            &[("course_id", "c1"), ("student_id", "s1")],
        )),
        "condition tags are a superset of the event's",
    )
    .await;
    append_if_ok(
        &*store,
        vec![ev("X", &[])],
        AppendCondition::new(q(&[], &[("course_id", "c1"), ("student_id", "s1")])),
        "tag-only condition with a superset of the event's tags",
    )
    .await;
}

/// A condition requiring a subset of the event's tags matches it.
pub async fn condition_tags_subset_of_event_tags_conflicts(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(
        &*store,
        vec![ev(
            "StudentEnrolled",
            &[("course_id", "c1"), ("student_id", "s1"), ("term", "t1")],
        )],
        "event with three tags",
    )
    .await;
    for pairs in [
        vec![("course_id", "c1")],
        vec![("student_id", "s1"), ("course_id", "c1")],
        vec![("term", "t1"), ("student_id", "s1"), ("course_id", "c1")],
    ] {
        append_if_conflicts(
            &*store,
            vec![ev("X", &[])],
            AppendCondition::new(q(&["StudentEnrolled"], &pairs)),
            &format!("condition tags {pairs:?} are a subset of the event's"),
        )
        .await;
    }
}

/// A condition with only types matches by type, whatever the tags.
pub async fn condition_type_only(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let first = append(&*store, vec![ev("Other", &[("k", "v")])], "other").await;
    append_if_ok(
        &*store,
        vec![ev("X", &[])],
        AppendCondition::new(Query::types(["Configured"])),
        "no Configured event yet",
    )
    .await;
    append(
        &*store,
        vec![ev("Configured", &[("k", "anything")])],
        "configured",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        AppendCondition::new(Query::types(["Configured", "Nope"])).with_after(Some(first)),
        "a Configured event after the cursor",
    )
    .await;
}

/// A `Query::all()` condition fails on any event after `after`.
pub async fn condition_query_all(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append_if_ok(
        &*store,
        vec![ev("First", &[])],
        AppendCondition::new(Query::all()),
        "Query::all on an empty store",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        AppendCondition::new(Query::all()),
        "Query::all, no after",
    )
    .await;
    let last = append(&*store, vec![ev("Second", &[("a", "b")])], "second").await;
    append_if_ok(
        &*store,
        vec![ev("Third", &[])],
        AppendCondition::new(Query::all()).with_after(Some(last)),
        "Query::all after the last event",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        AppendCondition::new(Query::all()).with_after(Some(last)),
        "Query::all after an event that is no longer the last",
    )
    .await;
}

/// A conflict reports the condition's `after` and, when the backend names one, a conflicting
/// event that really matches and lies after `after`.
pub async fn condition_conflict_reports_info(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let first = append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1",
    )
    .await;
    append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "c1 again",
    )
    .await;
    let err = append_if_conflicts(
        &*store,
        vec![ev("X", &[])],
        AppendCondition::new(course("c1")).with_after(Some(first)),
        "conflict info",
    )
    .await;
    let Error::Conflict(info) = err else {
        panic!("expected Error::Conflict, got {err:?}")
    };
    assert_eq!(
        info.after,
        Some(first),
        "ConflictInfo::after must be the condition's after"
    );
    if let Some(conflicting) = info.conflicting {
        let all = all_events(&*store).await;
        let event = all
            .iter()
            .find(|e| e.cursor == conflicting)
            .unwrap_or_else(|| {
                panic!("ConflictInfo::conflicting {conflicting} names no stored event")
            });
        assert!(
            conflicting > first,
            "the conflicting event must lie after the condition's cursor"
        );
        assert!(
            dcb_core::matches(&course("c1"), &event.event_type, &event.tags),
            "the conflicting event must match the condition: {event:?}"
        );
    }
}

/// A match is found however many unrelated events follow the cursor, before or after it:
/// backends may check the events right after the cursor first (PostgreSQL reads a window of
/// them), so the counts straddle such a window's size.
pub async fn condition_finds_matches_beyond_many_events_after_cursor(factory: Factory<'_>) {
    let store = factory.new_store().await;
    for n in [0usize, 1, 63, 64, 65, 200] {
        let id = format!("c{n}");
        let boundary = || {
            Query::from_items([
                item(&["CourseDefined"], &[("course_id", &id)]),
                item(&["CourseClosed"], &[]),
            ])
        };
        let noise = |n: usize| -> Vec<_> {
            (0..n)
                .map(|i| ev("StudentEnrolled", &[("student_id", &format!("s{i}"))]))
                .collect()
        };
        let at = append(
            &*store,
            vec![ev("CourseDefined", &[("course_id", &id)])],
            "definition",
        )
        .await;
        if n > 0 {
            append(&*store, noise(n), "noise after the cursor").await;
        }
        // Only unrelated events after the cursor: no conflict.
        append_if_ok(
            &*store,
            vec![ev("CourseRenamed", &[("course_id", &id)])],
            AppendCondition::new(boundary()).with_after(Some(at)),
            &format!("{n} unrelated events after the cursor"),
        )
        .await;
        // A match behind them, then more noise: the condition sees it.
        append(
            &*store,
            vec![ev("CourseDefined", &[("course_id", &id)])],
            "a second definition",
        )
        .await;
        if n > 0 {
            append(&*store, noise(n), "noise after the match").await;
        }
        append_if_conflicts(
            &*store,
            vec![ev("CourseRenamed", &[("course_id", &id)])],
            AppendCondition::new(boundary()).with_after(Some(at)),
            &format!("a match behind {n} unrelated events"),
        )
        .await;
        // The same in a multi-command append: a clean command beside the stale one.
        let fresh = format!("fresh{n}");
        let commands = vec![
            AppendCommand::new(vec![ev("CourseDefined", &[("course_id", &fresh)])]).only_if(
                AppendCondition::new(q(&["CourseDefined"], &[("course_id", &fresh)]))
                    .with_after(Some(at)),
            ),
            AppendCommand::new(vec![ev("CourseRenamed", &[("course_id", &id)])])
                .only_if(AppendCondition::new(boundary()).with_after(Some(at))),
        ];
        match store.append_batch(commands).await {
            Err(Error::Conflict(info)) => {
                assert_eq!(info.command, Some(1), "the stale command is named: {info}")
            }
            other => panic!("a batch with a match behind {n} events must conflict: {other:?}"),
        }
    }
}

/// The commands of one multi-command append keep their own cursors, however far apart: an
/// event between one command's cursor and a later command's cursor conflicts only with the
/// first. With 300 unrelated events between and after, too many for one look at the recent
/// events, the matches are still found.
pub async fn condition_cursors_of_one_batch_stay_their_own(factory: Factory<'_>) {
    let store = factory.new_store().await;
    for n in [0usize, 10, 300] {
        let (a, b) = (format!("a{n}"), format!("b{n}"));
        let defined = |id: &str| q(&["CourseDefined"], &[("course_id", id)]);
        let noise = |n: usize| -> Vec<_> {
            (0..n)
                .map(|i| ev("StudentEnrolled", &[("student_id", &format!("s{i}"))]))
                .collect()
        };
        let early = append(
            &*store,
            vec![ev("CourseDefined", &[("course_id", &a)])],
            "a's definition",
        )
        .await;
        if n > 0 {
            append(&*store, noise(n), "noise after a").await;
        }
        let late = append(
            &*store,
            vec![ev("CourseDefined", &[("course_id", &b)])],
            "b's definition",
        )
        .await;
        if n > 0 {
            append(&*store, noise(n), "noise after b").await;
        }
        let batch = |after_a: Cursor, after_b: Cursor| {
            vec![
                AppendCommand::new(vec![ev("CourseRenamed", &[("course_id", &a)])])
                    .only_if(AppendCondition::new(defined(&a)).with_after(Some(after_a))),
                AppendCommand::new(vec![ev("CourseRenamed", &[("course_id", &b)])])
                    .only_if(AppendCondition::new(defined(&b)).with_after(Some(after_b))),
            ]
        };
        // b's definition lies after a's cursor but not after b's: both commands are clean.
        store
            .append_batch(batch(early, late))
            .await
            .unwrap_or_else(|e| panic!("cursors {n} events apart, nothing after either: {e}"));
        // With b's cursor before its definition, the second command conflicts.
        match store.append_batch(batch(early, early)).await {
            Err(Error::Conflict(info)) => assert_eq!(info.command, Some(1), "{info}"),
            other => panic!("b's definition after b's cursor ({n} apart): {other:?}"),
        }
        // A new definition of a after both cursors: the first command conflicts.
        let renamed = append(
            &*store,
            vec![ev("CourseDefined", &[("course_id", &a)])],
            "a defined again",
        )
        .await;
        match store.append_batch(batch(early, renamed)).await {
            Err(Error::Conflict(info)) => assert_eq!(info.command, Some(0), "{info}"),
            other => panic!("a defined again after a's cursor ({n} apart): {other:?}"),
        }
    }
}
