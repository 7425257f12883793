//! Conditional appends under barrier-synchronized concurrency.
//!
//! Every task gets the same `Arc<dyn EventStore>`; barriers line the racers up so that their
//! decisions are all taken before any of them appends.

use super::support::*;
use super::Factory;
use dcb_core::{
    matches, AppendCondition, Cursor, Error, Event, EventReaderExt, NewEvent, Query, QueryItem,
    StateProjector,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// How long any concurrency case may take before it is declared hung.
const HANG: Duration = Duration::from_secs(300);

fn is_conflict<T: std::fmt::Debug>(result: &Result<T, Error>, context: &str) -> bool {
    match result {
        Ok(_) => false,
        Err(Error::Conflict(_)) => true,
        Err(other) => panic!("{context}: expected Ok or Error::Conflict, got {other:?}"),
    }
}

/// 16 racers × 20 rounds: all decide on the same empty boundary, wait on a barrier, then
/// `append_if`. Exactly one wins per round; the others get `Error::Conflict`.
pub async fn concurrent_single_boundary_one_winner_per_round(factory: Factory<'_>) {
    const RACERS: usize = 16;
    const ROUNDS: usize = 20;
    let store = factory.new_store().await;
    let barrier = Arc::new(Barrier::new(RACERS));
    let course = |round: usize| {
        q(
            &["CourseDefined"],
            &[("course_id", &format!("round-{round}"))],
        )
    };
    let mut handles = Vec::new();
    for racer in 0..RACERS {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut won = Vec::with_capacity(ROUNDS);
            for round in 0..ROUNDS {
                let decision = store
                    .project(StateProjector::exists(course(round)))
                    .await
                    .unwrap_or_else(|err| {
                        panic!("racer {racer} round {round}: project failed: {err}")
                    });
                assert!(
                    !decision.states,
                    "racer {racer} round {round}: the course must not exist before the barrier"
                );
                barrier.wait().await;
                let event = NewEvent::new(
                    "CourseDefined",
                    tags(&[("course_id", &format!("round-{round}"))]),
                    json!({ "racer": racer }),
                );
                let result = store.append_if(vec![event], decision.condition).await;
                let context = format!("racer {racer} round {round}");
                won.push(if is_conflict(&result, &context) {
                    None
                } else {
                    result.ok()
                });
            }
            won
        }));
    }
    let outcomes = join_tasks(handles, HANG, "single-boundary racers").await;
    for round in 0..ROUNDS {
        let winners: Vec<(usize, Cursor)> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(racer, rounds)| rounds[round].map(|c| (racer, c)))
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one of {RACERS} racers must win, winners: {winners:?}"
        );
        let stored = read(
            &*store,
            &course(round),
            Default::default(),
            "reading a round",
        )
        .await;
        assert_eq!(
            stored.len(),
            1,
            "round {round}: exactly one event must be stored, got {stored:?}"
        );
        assert_eq!(
            stored[0].cursor, winners[0].1,
            "round {round}: the stored event is the winner's"
        );
        assert_eq!(
            stored[0].data["racer"],
            json!(winners[0].0),
            "round {round}: the stored event names the winner"
        );
    }
    assert_eq!(
        all_events(&*store).await.len(),
        ROUNDS,
        "one event per round in total"
    );
}

/// 16 clients each loop `project` → `append_if` on their own boundary for `duration`: no
/// conflicts at all, every decision sees exactly the client's own successful appends, and each
/// client's final count equals its successes.
pub async fn concurrent_disjoint_boundaries_never_conflict(
    factory: Factory<'_>,
    duration: Duration,
) {
    const CLIENTS: usize = 16;
    let store = factory.new_store().await;
    // Some shared history, so boundaries are not trivially at the log's start.
    append(
        &*store,
        (0..20)
            .map(|i| evn(i, "Setup", &[("client", "none")]))
            .collect(),
        "setup",
    )
    .await;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    // One deadline for all: a client scheduled late runs shorter, it does not extend the test.
    let deadline = Instant::now() + duration;
    let mut handles = Vec::new();
    for client in 0..CLIENTS {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let name = format!("client-{client}");
            let boundary = || {
                (
                    StateProjector::counter(q(&["Tick"], &[("client", &name)])),
                    StateProjector::exists(q(&["Closed"], &[("client", &name)])),
                )
            };
            barrier.wait().await;
            let (mut successes, mut conflicts) = (0_u64, 0_u64);
            // At least one round each, however late a client starts.
            loop {
                let decision = store
                    .project(boundary())
                    .await
                    .unwrap_or_else(|err| panic!("{name}: project failed: {err}"));
                let (count, closed) = decision.states;
                assert_eq!(
                    count, successes,
                    "{name}: the decision must see exactly this client's {successes} successful appends"
                );
                assert!(!closed, "{name}: nobody closes the boundary");
                let event = NewEvent::new("Tick", tags(&[("client", &name)]), json!({ "n": successes }));
                let result = store.append_if(vec![event], decision.condition).await;
                if is_conflict(&result, &name) {
                    conflicts += 1;
                } else {
                    successes += 1;
                }
                if Instant::now() >= deadline {
                    break;
                }
                // Let the other clients interleave even if the store never awaits anything.
                tokio::task::yield_now().await;
            }
            (name, successes, conflicts)
        }));
    }
    let results = join_tasks(handles, duration + HANG, "disjoint clients").await;
    let total_conflicts: u64 = results.iter().map(|r| r.2).sum();
    assert_eq!(
        total_conflicts, 0,
        "disjoint boundaries must never conflict; (client, successes, conflicts): {results:?}"
    );
    for (name, successes, _) in &results {
        assert!(
            *successes > 0,
            "{name} made no progress in {duration:?}: {results:?}"
        );
        let stored = read(
            &*store,
            &q(&["Tick"], &[("client", name)]),
            Default::default(),
            name,
        )
        .await;
        assert_eq!(
            stored.len() as u64,
            *successes,
            "{name}: stored ticks must equal successful appends"
        );
        let ns: Vec<u64> = stored
            .iter()
            .map(|e| e.data["n"].as_u64().unwrap_or(u64::MAX))
            .collect();
        assert_eq!(
            ns,
            (0..*successes).collect::<Vec<_>>(),
            "{name}: ticks stored in decision order"
        );
    }
}

/// 16 clients try to enroll 16 distinct students into one course of capacity 5; each decides on
/// (capacity, enrollment count, own enrollment), so conditions overlap but differ. Exactly 5
/// enrollments are stored, never more. Repeated for several courses.
pub async fn concurrent_capacity_never_overbooked(factory: Factory<'_>) {
    const CLIENTS: usize = 16;
    const CAPACITY: u64 = 5;
    const COURSES: usize = 6;
    let store = factory.new_store().await;
    for c in 0..COURSES {
        let course = format!("course-{c}");
        append(
            &*store,
            vec![NewEvent::new(
                "CourseDefined",
                tags(&[("course_id", &course)]),
                json!({ "capacity": CAPACITY }),
            )],
            "defining the course",
        )
        .await;
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let mut handles = Vec::new();
        for s in 0..CLIENTS {
            let store = store.clone();
            let barrier = barrier.clone();
            let course = course.clone();
            handles.push(tokio::spawn(async move {
                let student = format!("student-{s}");
                let projectors = || {
                    (
                        StateProjector::new(
                            q(&["CourseDefined"], &[("course_id", &course)]),
                            0_u64,
                            |cap: &mut u64, e: &Event| {
                                *cap = e.data["capacity"].as_u64().unwrap_or(0)
                            },
                        ),
                        StateProjector::counter(q(&["StudentEnrolled"], &[("course_id", &course)])),
                        StateProjector::exists(q(
                            &["StudentEnrolled"],
                            &[("course_id", &course), ("student_id", &student)],
                        )),
                    )
                };
                barrier.wait().await;
                for attempt in 0..200 {
                    let decision = store
                        .project(projectors())
                        .await
                        .unwrap_or_else(|err| panic!("{student}: project failed: {err}"));
                    let (capacity, count, already) = decision.states;
                    assert_eq!(capacity, CAPACITY, "{student}: the course's capacity");
                    assert!(
                        count <= capacity,
                        "{student} saw {count} enrollments in a course of {capacity}"
                    );
                    assert!(
                        !already,
                        "{student} is enrolled only by itself, and it would have stopped"
                    );
                    if count >= capacity {
                        return (student, false, attempt);
                    }
                    let event = NewEvent::new(
                        "StudentEnrolled",
                        tags(&[("course_id", &course), ("student_id", &student)]),
                        json!({}),
                    );
                    let result = store.append_if(vec![event], decision.condition).await;
                    if !is_conflict(&result, &student) {
                        return (student, true, attempt);
                    }
                }
                panic!("{student} neither enrolled nor saw a full course in 200 attempts")
            }));
        }
        let results = join_tasks(handles, HANG, "enrolling clients").await;
        let enrolled: BTreeSet<String> = results
            .iter()
            .filter(|r| r.1)
            .map(|r| r.0.clone())
            .collect();
        assert_eq!(
            enrolled.len() as u64,
            CAPACITY,
            "{course}: exactly {CAPACITY} clients must succeed: {results:?}"
        );
        let stored = read(
            &*store,
            &q(&["StudentEnrolled"], &[("course_id", &course)]),
            Default::default(),
            &course,
        )
        .await;
        assert_eq!(
            stored.len() as u64,
            CAPACITY,
            "{course}: exactly {CAPACITY} enrollments must be stored (no overbooking)"
        );
        let stored_students: BTreeSet<String> = stored
            .iter()
            .filter_map(|e| e.tag("student_id").map(str::to_string))
            .collect();
        assert_eq!(
            stored_students, enrolled,
            "{course}: the stored students are the successful clients"
        );
    }
}

/// An unconditional append of a matching event defeats a conditional append whose decision was
/// taken before it: sequentially always, and when racing, the conditional append may only win if
/// its event lands before the unconditional one.
pub async fn concurrent_unconditional_writer_beats_stale_decision(factory: Factory<'_>) {
    let store = factory.new_store().await;
    // Sequential: decide, someone writes a matching event without condition, then append_if.
    let boundary = q(&["SeatReserved"], &[("seat", "1A")]);
    let decision = store
        .project(StateProjector::exists(boundary.clone()))
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    assert!(!decision.states, "seat 1A is free");
    let unconditional = append(
        &*store,
        vec![ev("SeatReserved", &[("seat", "1A"), ("by", "walk-in")])],
        "unconditional",
    )
    .await;
    append_if_conflicts(
        &*store,
        vec![ev("SeatReserved", &[("seat", "1A"), ("by", "online")])],
        decision.condition,
        "append_if on a decision older than an unconditional matching append",
    )
    .await;
    let stored = read(&*store, &boundary, Default::default(), "seat 1A").await;
    assert_eq!(
        stored.len(),
        1,
        "only the unconditional reservation is stored"
    );
    assert_eq!(
        stored[0].cursor, unconditional,
        "the stored reservation is the unconditional one"
    );

    // Racing: per round, PAIRS deciders each decide on their own seat, then a barrier releases
    // them together with PAIRS unconditional writers, each reserving one of those seats.
    const ROUNDS: usize = 20;
    const PAIRS: usize = 8;
    let barrier = Arc::new(Barrier::new(2 * PAIRS));
    let seat = |round: usize, pair: usize| format!("seat-{round}-{pair}");
    // handles[2 * pair] is the pair's writer, handles[2 * pair + 1] its decider.
    let mut handles = Vec::new();
    for pair in 0..PAIRS {
        let (store_w, barrier_w) = (store.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            let mut cursors = Vec::new();
            for round in 0..ROUNDS {
                barrier_w.wait().await;
                let event = ev(
                    "SeatReserved",
                    &[("seat", &seat(round, pair)), ("by", "walk-in")],
                );
                let cursor = store_w
                    .append(vec![event])
                    .await
                    .unwrap_or_else(|err| panic!("writer {pair} round {round} failed: {err}"));
                cursors.push(Some(cursor));
            }
            cursors
        }));
        let (store_d, barrier_d) = (store.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for round in 0..ROUNDS {
                let boundary = q(&["SeatReserved"], &[("seat", &seat(round, pair))]);
                let decision = store_d
                    .project(StateProjector::exists(boundary))
                    .await
                    .unwrap_or_else(|err| {
                        panic!("decider {pair} round {round}: project failed: {err}")
                    });
                assert!(
                    !decision.states,
                    "decider {pair} round {round}: the seat is free when deciding"
                );
                barrier_d.wait().await;
                let event = ev(
                    "SeatReserved",
                    &[("seat", &seat(round, pair)), ("by", "online")],
                );
                let result = store_d.append_if(vec![event], decision.condition).await;
                let context = format!("decider {pair} round {round}");
                outcomes.push(if is_conflict(&result, &context) {
                    None
                } else {
                    result.ok()
                });
            }
            outcomes
        }));
    }
    let joined = join_tasks(handles, HANG, "writers vs deciders").await;
    let writes: Vec<&Vec<Option<Cursor>>> = joined.iter().step_by(2).collect();
    let outcomes: Vec<&Vec<Option<Cursor>>> = joined.iter().skip(1).step_by(2).collect();
    let (mut won, mut lost) = (0, 0);
    for pair in 0..PAIRS {
        for round in 0..ROUNDS {
            let write = writes[pair][round]
                .unwrap_or_else(|| panic!("writer {pair} round {round} has no cursor"));
            let stored = read(
                &*store,
                &q(&["SeatReserved"], &[("seat", &seat(round, pair))]),
                Default::default(),
                "round",
            )
            .await;
            assert!(
                stored.iter().any(|e| e.cursor == write),
                "pair {pair} round {round}: the unconditional reservation must be stored"
            );
            match outcomes[pair][round] {
                Some(conditional) => {
                    won += 1;
                    assert!(
                        conditional < write,
                        "pair {pair} round {round}: the conditional append succeeded at {conditional} although the \
                         matching unconditional event {write} lies before it (its decision was stale)"
                    );
                    assert_eq!(
                        stored.len(),
                        2,
                        "pair {pair} round {round}: both reservations stored"
                    );
                    assert_eq!(
                        stored[0].cursor, conditional,
                        "pair {pair} round {round}: the online one comes first"
                    );
                }
                None => {
                    lost += 1;
                    assert_eq!(
                        stored.len(),
                        1,
                        "pair {pair} round {round}: only the unconditional reservation is stored"
                    )
                }
            }
        }
    }
    assert_eq!(won + lost, ROUNDS * PAIRS, "every race has an outcome");
}

/// One post-hoc operation: its id, batch size, condition and outcome (`Err` = conflict).
type OpOutcome = (String, usize, Option<AppendCondition>, Result<Cursor, ()>);

/// Parameters of [`concurrent_post_hoc_validator_with`].
#[derive(Debug, Clone, Copy)]
pub struct PostHocParams {
    /// Concurrent clients.
    pub clients: usize,
    /// Operations per client.
    pub ops_per_client: usize,
    /// Seed of the clients' random choices (client `i` uses `seed + i`).
    pub seed: u64,
}

impl Default for PostHocParams {
    fn default() -> Self {
        Self {
            clients: 8,
            ops_per_client: 60,
            seed: 0x0dcb_2026,
        }
    }
}

/// [`concurrent_post_hoc_validator_with`] with 8 clients × 60 operations.
pub async fn concurrent_post_hoc_validator(factory: Factory<'_>) {
    concurrent_post_hoc_validator_with(factory, PostHocParams::default()).await
}

const TYPES: [&str; 3] = ["A", "B", "C"];
const TAGS: [(&str, &str); 5] = [("x", "1"), ("x", "2"), ("y", "1"), ("y", "2"), ("z", "1")];

fn random_tags(rng: &mut StdRng, max: usize) -> Vec<dcb_core::Tag> {
    let mut chosen: Vec<dcb_core::Tag> = Vec::new();
    for _ in 0..rng.gen_range(0..=max) {
        let (k, v) = TAGS[rng.gen_range(0..TAGS.len())];
        if !chosen.iter().any(|t| t.key == k && t.value == v) {
            chosen.push(dcb_core::Tag::new(k, v));
        }
    }
    chosen
}

fn random_item(rng: &mut StdRng) -> QueryItem {
    loop {
        let mut types: Vec<&str> = TYPES.to_vec();
        types.shuffle(rng);
        types.truncate(rng.gen_range(0..=2));
        let item = QueryItem::new().types(types).tags(random_tags(rng, 2));
        // Match-all items are allowed, but rarely.
        if !item.is_match_all() || rng.gen_bool(0.05) {
            return item;
        }
    }
}

fn random_event(rng: &mut StdRng, op: &str, condition: Option<&AppendCondition>) -> NewEvent {
    let mut event = NewEvent::new(
        TYPES[rng.gen_range(0..TYPES.len())],
        random_tags(rng, 2),
        json!({ "op": op }),
    );
    event.metadata = Some(json!({
        "op": op,
        "condition": condition.map(|c| serde_json::to_value(c).unwrap_or_else(|err| panic!("condition serializes: {err}"))),
    }));
    event
}

/// Post-hoc validation: clients append concurrently with random queries and conditions drawn
/// from a small pool of types and tags (so they collide); every event records in its metadata
/// the condition it relied on. Afterwards the whole log is replayed with [`dcb_core::matches`]:
/// for every conditionally appended event, no event matching its recorded query may lie strictly
/// between its recorded `after` and itself (events of its own batch excepted). Also checks that
/// every successful append is stored exactly as returned, every conflicting one left nothing, and
/// every conflict was justified by a matching event after its `after`.
pub async fn concurrent_post_hoc_validator_with(factory: Factory<'_>, params: PostHocParams) {
    let store = factory.new_store().await;
    let barrier = Arc::new(Barrier::new(params.clients));
    let mut handles = Vec::new();
    for client in 0..params.clients {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(params.seed.wrapping_add(client as u64));
            let mut outcomes: Vec<OpOutcome> = Vec::new();
            let mut stale: Option<AppendCondition> = None;
            barrier.wait().await;
            for op in 0..params.ops_per_client {
                let id = format!("{client}-{op}");
                let size = if rng.gen_bool(0.25) { 2 } else { 1 };
                let roll: f64 = rng.gen();
                let condition = if roll < 0.1 {
                    None
                } else {
                    let items: Vec<QueryItem> = (0..rng.gen_range(1..=2))
                        .map(|_| random_item(&mut rng))
                        .collect();
                    let query = Query::from_items(items);
                    let decision = store
                        .project(StateProjector::counter(query.clone()))
                        .await
                        .unwrap_or_else(|err| {
                            panic!("client {client} op {op}: project failed: {err}")
                        });
                    let fresh = decision.condition;
                    let chosen = if roll < 0.2 {
                        AppendCondition::new(query) // no after: fail on any match
                    } else if roll < 0.3 && stale.is_some() {
                        stale.clone().unwrap_or(fresh.clone()) // an older decision
                    } else {
                        fresh.clone()
                    };
                    stale = Some(fresh);
                    if rng.gen_bool(0.5) {
                        tokio::task::yield_now().await;
                    }
                    Some(chosen)
                };
                let events: Vec<NewEvent> = (0..size)
                    .map(|_| random_event(&mut rng, &id, condition.as_ref()))
                    .collect();
                let result = match &condition {
                    None => store.append(events).await,
                    Some(c) => store.append_if(events, c.clone()).await,
                };
                let context = format!("client {client} op {op}");
                let outcome = if is_conflict(&result, &context) {
                    assert!(
                        condition.is_some(),
                        "{context}: an unconditional append cannot conflict"
                    );
                    Err(())
                } else {
                    Ok(result.unwrap_or_else(|err| panic!("{context}: {err}")))
                };
                outcomes.push((id, size, condition, outcome));
            }
            outcomes
        }));
    }
    let outcomes: Vec<_> = join_tasks(handles, HANG, "post-hoc clients")
        .await
        .into_iter()
        .flatten()
        .collect();
    let all = all_events(&*store).await;

    let mut by_op: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in &all {
        let op = event.data["op"]
            .as_str()
            .unwrap_or_else(|| panic!("event {} has no op", event.cursor));
        by_op.entry(op).or_default().push(event);
    }
    let (mut ok, mut conflicts) = (0, 0);
    for (op, size, condition, outcome) in &outcomes {
        let stored = by_op.get(op.as_str()).cloned().unwrap_or_default();
        match outcome {
            Ok(cursor) => {
                ok += 1;
                assert_eq!(
                    stored.len(),
                    *size,
                    "op {op}: a successful append must store its {size} events"
                );
                assert_eq!(
                    stored.last().map(|e| e.cursor),
                    Some(*cursor),
                    "op {op}: returned cursor is its last event's"
                );
                assert!(
                    stored
                        .iter()
                        .all(|e| e.cursor.transaction_id == cursor.transaction_id),
                    "op {op}: one transaction per append"
                );
            }
            Err(()) => {
                conflicts += 1;
                assert!(
                    stored.is_empty(),
                    "op {op}: a conflicting append must store nothing, found {stored:?}"
                );
                let condition = condition
                    .as_ref()
                    .unwrap_or_else(|| panic!("op {op}: conflict without condition"));
                let justified = all.iter().any(|e| {
                    condition.after.is_none_or(|after| e.cursor > after)
                        && matches(&condition.fail_if_events_match, &e.event_type, &e.tags)
                });
                assert!(
                    justified,
                    "op {op}: conflict without any event matching {condition:?} after its cursor"
                );
            }
        }
    }
    assert_eq!(
        all.len(),
        outcomes
            .iter()
            .filter(|o| o.3.is_ok())
            .map(|o| o.1)
            .sum::<usize>(),
        "no stray events"
    );
    assert!(ok > 0, "some appends must succeed");

    // The replay: every recorded condition really held at the event's position in the log.
    let mut checked = 0;
    for (index, event) in all.iter().enumerate() {
        let recorded = &event
            .metadata
            .as_ref()
            .unwrap_or_else(|| panic!("event {} lost its metadata", event.cursor))["condition"];
        if recorded.is_null() {
            continue;
        }
        let condition: AppendCondition =
            serde_json::from_value(recorded.clone()).unwrap_or_else(|err| {
                panic!(
                    "event {}: recorded condition does not parse: {err}",
                    event.cursor
                )
            });
        checked += 1;
        let violation = all[..index].iter().find(|other| {
            condition.after.is_none_or(|after| other.cursor > after)
                && other.cursor.transaction_id != event.cursor.transaction_id
                && matches(
                    &condition.fail_if_events_match,
                    &other.event_type,
                    &other.tags,
                )
        });
        if let Some(other) = violation {
            panic!(
                "DCB violation: event {} ({} {:?}, op {}) was appended under {:?}, but event {} ({} {:?}, op {}) \
                 matches that query and lies between the condition's cursor and the event",
                event.cursor,
                event.event_type,
                event.tags,
                event.data["op"],
                condition,
                other.cursor,
                other.event_type,
                other.tags,
                other.data["op"],
            );
        }
    }
    assert!(checked > 0, "some conditional appends must have succeeded to be checked ({ok} ok, {conflicts} conflicts)");
}
