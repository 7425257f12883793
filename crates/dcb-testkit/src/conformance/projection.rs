//! Decision models: routing, projector shapes, the returned condition and streaming folds.

use super::support::*;
use super::Factory;
use dcb_core::{
    Cursor, Event, EventReaderExt, EventStore, NewEvent, ProjectionStep, Query, StateProjector,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CourseDefined {
    course_id: String,
    capacity: u32,
}

/// A projector that records the cursors it was fed.
fn recorder(query: Query) -> StateProjector<Vec<Cursor>> {
    StateProjector::new(query, Vec::new(), |seen: &mut Vec<Cursor>, e: &Event| {
        seen.push(e.cursor)
    })
}

fn defined(course: &str, capacity: u32) -> NewEvent {
    NewEvent::builder("CourseDefined")
        .tag("course_id", course)
        .data(&CourseDefined {
            course_id: course.into(),
            capacity,
        })
        .build()
        .expect("CourseDefined serializes")
}

fn enrolled(course: &str, student: &str) -> NewEvent {
    ev(
        "StudentEnrolled",
        &[("course_id", course), ("student_id", student)],
    )
}

/// A small university: two courses, enrollments, noise.
async fn university(store: &dyn EventStore) -> Vec<Event> {
    append(store, vec![defined("c1", 10), defined("c2", 20)], "courses").await;
    append(
        store,
        vec![
            enrolled("c1", "s1"),
            enrolled("c1", "s2"),
            enrolled("c2", "s1"),
        ],
        "enrollments",
    )
    .await;
    append(
        store,
        vec![ev("Noise", &[("course_id", "c1")]), ev("Noise", &[])],
        "noise",
    )
    .await;
    append(store, vec![defined("c1", 12)], "c1 capacity changed").await;
    append(
        store,
        vec![enrolled("c1", "s3"), ev("Unrelated", &[("x", "y")])],
        "more",
    )
    .await;
    all_events(store).await
}

fn cursors_matching(all: &[Event], query: &Query) -> Vec<Cursor> {
    reference(all, query).iter().map(|e| e.cursor).collect()
}

/// Every projector sees exactly the events its query matches, though all share one read.
pub async fn projection_routes_events_by_query(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = university(&*store).await;
    let queries = [
        q(&["CourseDefined"], &[("course_id", "c1")]),
        q(&["StudentEnrolled"], &[("student_id", "s1")]),
        q(&[], &[("course_id", "c1")]),
    ];
    let projection = store
        .project((
            recorder(queries[0].clone()),
            recorder(queries[1].clone()),
            recorder(queries[2].clone()),
        ))
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    let (a, b, c) = projection.states;
    assert_eq!(
        a,
        cursors_matching(&all, &queries[0]),
        "projector 0 must see exactly its matches"
    );
    assert_eq!(
        b,
        cursors_matching(&all, &queries[1]),
        "projector 1 must see exactly its matches"
    );
    assert_eq!(
        c,
        cursors_matching(&all, &queries[2]),
        "projector 2 must see exactly its matches"
    );
    assert_eq!(a.len(), 2, "two CourseDefined c1");
    assert_eq!(b.len(), 2, "s1 enrolled twice");
    assert_eq!(c.len(), 6, "six events tagged course_id=c1");
    let union = Query::union(&queries);
    assert_eq!(
        projection.events_read,
        reference(&all, &union).len() as u64,
        "one read of the union: events_read counts each event once"
    );
}

/// A tuple of three projectors with different state types.
pub async fn projection_tuple_of_three_typed_projectors(factory: Factory<'_>) {
    let store = factory.new_store().await;
    university(&*store).await;
    let course = q(&["CourseDefined"], &[("course_id", "c1")]);
    let enrollments = q(&["StudentEnrolled"], &[("course_id", "c1")]);
    let s9 = q(
        &["StudentEnrolled"],
        &[("course_id", "c1"), ("student_id", "s9")],
    );
    let projection = store
        .project((
            StateProjector::<Option<CourseDefined>>::last_data(course),
            StateProjector::counter(enrollments),
            StateProjector::exists(s9),
        ))
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    let (definition, count, s9_enrolled) = projection.states;
    assert_eq!(
        definition,
        Some(CourseDefined {
            course_id: "c1".into(),
            capacity: 12
        }),
        "last_data holds the last CourseDefined of c1"
    );
    assert_eq!(count, 3, "three enrollments in c1");
    assert!(!s9_enrolled, "s9 is not enrolled");
}

/// `Vec` and `BTreeMap` sets of projectors built at run time.
pub async fn projection_vec_and_btreemap(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let all = university(&*store).await;
    let students = ["s1", "s2", "s3", "s4"];
    let per_student: Vec<StateProjector<u64>> = students
        .iter()
        .map(|s| StateProjector::counter(q(&["StudentEnrolled"], &[("student_id", s)])))
        .collect();
    let projection = store
        .project(per_student)
        .await
        .unwrap_or_else(|err| panic!("project Vec failed: {err}"));
    assert_eq!(
        projection.states,
        vec![2, 1, 1, 0],
        "enrollments per student, in Vec order"
    );

    let per_course: BTreeMap<String, StateProjector<Vec<Cursor>>> = ["c1", "c2", "c3"]
        .iter()
        .map(|c| (c.to_string(), recorder(q(&[], &[("course_id", c)]))))
        .collect();
    let projection = store
        .project(per_course)
        .await
        .unwrap_or_else(|err| panic!("project BTreeMap failed: {err}"));
    assert_eq!(projection.states.len(), 3, "one state per key");
    for course in ["c1", "c2", "c3"] {
        assert_eq!(
            projection.states[course],
            cursors_matching(&all, &q(&[], &[("course_id", course)])),
            "BTreeMap projector {course} must see exactly its matches"
        );
    }
    assert!(projection.states["c3"].is_empty(), "c3 has no events");
}

/// counter, exists, last and last_data, on empty and non-empty selections.
pub async fn projection_builtin_projectors(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let empty = store
        .project((
            StateProjector::counter(Query::all()),
            StateProjector::exists(Query::all()),
            StateProjector::last(Query::all()),
            StateProjector::<Option<CourseDefined>>::last_data(Query::types(["CourseDefined"])),
        ))
        .await
        .unwrap_or_else(|err| panic!("project on an empty store failed: {err}"));
    assert_eq!(empty.states.0, 0, "counter starts at 0");
    assert!(!empty.states.1, "exists starts false");
    assert!(empty.states.2.is_none(), "last starts None");
    assert!(empty.states.3.is_none(), "last_data starts None");
    assert_eq!(empty.events_read, 0, "nothing read");
    assert_eq!(empty.cursor, None, "no cursor on an empty store");

    let all = university(&*store).await;
    let full = store
        .project((
            StateProjector::counter(Query::types(["StudentEnrolled"])),
            StateProjector::exists(q(&["StudentEnrolled"], &[("student_id", "s3")])),
            StateProjector::last(q(&[], &[("course_id", "c1")])),
            StateProjector::<Option<CourseDefined>>::last_data(q(
                &["CourseDefined"],
                &[("course_id", "c2")],
            )),
        ))
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    assert_eq!(full.states.0, 4, "four enrollments");
    assert!(full.states.1, "s3 is enrolled");
    let last_c1 = reference(&all, &q(&[], &[("course_id", "c1")])).pop();
    assert_eq!(
        full.states.2, last_c1,
        "last holds the last event tagged c1"
    );
    assert_eq!(
        full.states.3,
        Some(CourseDefined {
            course_id: "c2".into(),
            capacity: 20
        }),
        "last_data deserializes the payload"
    );
    // A payload that does not deserialize aborts the projection with a validation error.
    let broken = store
        .project(StateProjector::<Option<CourseDefined>>::last_data(
            Query::types(["Noise"]),
        ))
        .await;
    assert!(
        matches!(&broken, Err(err) if err.is_validation()),
        "last_data over payloads of another shape must fail with a validation error: {broken:?}"
    );
}

/// The condition's query is the union of the projector queries and its `after` the cursor of
/// the last event read (not the last event in the store); `None` on an empty store.
pub async fn projection_condition_is_union_after_last_read_event(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let course = q(&["CourseDefined"], &[("course_id", "c1")]);
    let enrollments = q(&["StudentEnrolled"], &[("course_id", "c1")]);
    let projectors = || {
        (
            StateProjector::exists(course.clone()),
            StateProjector::counter(enrollments.clone()),
            StateProjector::exists(course.clone()),
        )
    };
    let empty = store
        .project(projectors())
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    let union = Query::union([&course, &enrollments, &course]);
    assert_eq!(
        union.items.len(),
        2,
        "identical items appear once in a union"
    );
    assert_eq!(
        empty.condition.fail_if_events_match, union,
        "the condition's query is the union"
    );
    assert_eq!(
        empty.condition.after, None,
        "after is None on an empty store"
    );

    let all = university(&*store).await;
    let projection = store
        .project(projectors())
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    let relevant = reference(&all, &union);
    let last_relevant = relevant.last().map(|e| e.cursor);
    assert_eq!(
        projection.condition.fail_if_events_match, union,
        "the condition's query is the union"
    );
    assert_eq!(
        projection.condition.after, last_relevant,
        "after is the last read event's cursor"
    );
    assert_eq!(
        projection.cursor, last_relevant,
        "Projection::cursor is the last read event's cursor"
    );
    assert_ne!(
        projection.condition.after,
        all.last().map(|e| e.cursor),
        "the fixture ends with an irrelevant event, so after must not be the store's last cursor"
    );
    assert_eq!(
        projection.events_read,
        relevant.len() as u64,
        "events_read counts the union's matches"
    );
    assert_eq!(projection.states, (true, 3, true), "states");
}

/// The returned condition admits the decision when nothing relevant changed, rejects it after a
/// relevant append, and admits it after irrelevant appends.
pub async fn projection_condition_protects_decision(factory: Factory<'_>) {
    let store = factory.new_store().await;
    university(&*store).await;
    let decide = || {
        (
            StateProjector::<Option<CourseDefined>>::last_data(q(
                &["CourseDefined"],
                &[("course_id", "c1")],
            )),
            StateProjector::counter(q(&["StudentEnrolled"], &[("course_id", "c1")])),
            StateProjector::exists(q(&["StudentEnrolled"], &[("student_id", "s4")])),
        )
    };
    // Nothing changed: the decision is admitted.
    let decision = store
        .project(decide())
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    assert_eq!(decision.states.1, 3, "three enrollments");
    append_if_ok(
        &*store,
        vec![enrolled("c1", "s4")],
        decision.condition,
        "unchanged boundary",
    )
    .await;

    // A relevant append after the decision: rejected, for each item of the union.
    let relevant: [NewEvent; 3] = [defined("c1", 1), enrolled("c1", "s9"), enrolled("c7", "s4")];
    for event in relevant {
        let decision = store
            .project(decide())
            .await
            .unwrap_or_else(|err| panic!("project failed: {err}"));
        let shown = format!("{event:?}");
        append(&*store, vec![event], "relevant append").await;
        append_if_conflicts(
            &*store,
            vec![enrolled("c1", "s5")],
            decision.condition,
            &format!("after relevant {shown}"),
        )
        .await;
    }

    // Irrelevant appends after the decision: admitted.
    let decision = store
        .project(decide())
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    append(
        &*store,
        vec![
            defined("c2", 1),
            enrolled("c2", "s5"),
            ev("StudentEnrolled", &[("student_id", "s5")]),
            ev("CourseDefined", &[("course", "c1")]),
            ev("Noise", &[("course_id", "c1"), ("student_id", "s4")]),
        ],
        "irrelevant appends",
    )
    .await;
    append_if_ok(
        &*store,
        vec![enrolled("c1", "s5")],
        decision.condition.clone(),
        "after irrelevant appends",
    )
    .await;
    // The same condition once more: our own append is relevant now.
    append_if_conflicts(
        &*store,
        vec![enrolled("c1", "s6")],
        decision.condition,
        "reusing a consumed condition",
    )
    .await;
}

/// `project_stream` yields Progress every N events, then Done with the same states and
/// condition as `project`.
pub async fn project_stream_progress_then_done(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let events: Vec<NewEvent> = (0..35)
        .map(|i| evn(i, "Tick", &[("clock", "a")]))
        .chain((0..10).map(|i| evn(100 + i, "Tick", &[("clock", "b")])))
        .collect();
    append(&*store, events, "ticks").await;
    let projectors = || {
        (
            StateProjector::counter(q(&["Tick"], &[("clock", "a")])),
            StateProjector::last(q(&["Tick"], &[("clock", "a")])),
            StateProjector::exists(Query::types(["Tock"])),
        )
    };
    let expected = store
        .project(projectors())
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    let steps: Vec<_> = store.project_stream(projectors(), 10).collect().await;
    let all = all_events(&*store).await;
    assert_eq!(
        steps.len(),
        4,
        "35 events at progress_every=10: 3 Progress and 1 Done, got {}",
        steps.len()
    );
    for (i, step) in steps.iter().take(3).enumerate() {
        match step {
            Ok(ProjectionStep::Progress {
                events_read,
                cursor,
            }) => {
                let n = (i as u64 + 1) * 10;
                assert_eq!(*events_read, n, "progress step {i} reports events read");
                assert_eq!(
                    *cursor,
                    all[n as usize - 1].cursor,
                    "progress step {i} reports the last folded cursor"
                );
            }
            other => panic!("step {i} must be Progress, got {other:?}"),
        }
    }
    match steps.last() {
        Some(Ok(ProjectionStep::Done(done))) => {
            assert_eq!(
                done.states, expected.states,
                "Done holds the same states as project"
            );
            assert_eq!(
                done.condition, expected.condition,
                "Done holds the same condition as project"
            );
            assert_eq!(
                done.cursor, expected.cursor,
                "Done holds the same cursor as project"
            );
            assert_eq!(done.events_read, 35, "35 events folded");
            assert_eq!(done.states.0, 35, "35 ticks counted");
        }
        other => panic!("the last step must be Done, got {other:?}"),
    }
    // An empty query is reported as an error item.
    let failing: Vec<_> = store
        .project_stream(StateProjector::counter(Query::default()), 10)
        .collect()
        .await;
    assert!(
        matches!(failing.as_slice(), [Err(err)] if err.is_validation()),
        "project_stream with an empty query must yield one validation error, got {failing:?}"
    );
    // Streaming over an empty selection yields just Done.
    let none: Vec<_> = store
        .project_stream(StateProjector::counter(Query::types(["Nope"])), 10)
        .collect()
        .await;
    assert!(
        matches!(none.as_slice(), [Ok(ProjectionStep::Done(done))] if done.states == 0 && done.cursor.is_none()),
        "project_stream over nothing yields one Done with cursor None, got {none:?}"
    );
}
