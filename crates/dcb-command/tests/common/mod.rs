//! Backend-agnostic scenarios of the command executor. Each takes a fresh, empty store and is
//! called from `memory.rs` and from `postgres.rs`.
#![allow(dead_code)]

use async_trait::async_trait;
use dcb_command::{
    handler_fn, reject, Command, CommandError, CommandExecutor, CommandHandler, CommandOutcome,
    Decision, HandlerError, HandlerResult, RetryPolicy,
};
use dcb_core::{
    AppendCondition, CommandFilter, CommandRecord, Event, EventReader, EventReaderExt, EventStore,
    NewEvent, Query, QueryItem, ReadOptions, StateProjector, Tag, ValidationKind,
};
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Barrier;

pub type Store = Arc<dyn EventStore>;

/// Expands to one multi-threaded tokio test per scenario, each calling `crate::store()` for a
/// fresh `(Arc<dyn EventStore>, guard)` and then the scenario of the same name.
#[macro_export]
macro_rules! backend_tests {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, _guard) = $crate::store().await;
                $crate::common::$case(store).await;
            }
        )*
    };
}

/// Expands [`backend_tests!`] for every scenario in this module.
#[macro_export]
macro_rules! all_backend_tests {
    () => {
        $crate::backend_tests!(
            success_records_command_with_its_events,
            business_rejection_is_returned_unchanged_and_writes_nothing,
            command_without_events_is_recorded,
            conflict_without_retry_writes_nothing,
            conflict_with_retry_succeeds_on_second_attempt,
            conflict_retry_gives_up_after_max_attempts,
            idempotent_sequential_replay,
            rejected_command_does_not_consume_its_id,
            idempotent_racing_same_id,
            idempotent_racing_same_id_guarded,
            invalid_command_writes_nothing,
            invalid_decision_rolls_back_everything,
            audit_query_by_type_and_time,
            handler_may_stream_through_the_session,
            conflict_raised_inside_the_handler_is_retried,
            conflict_raised_inside_the_handler_gives_up_after_max_attempts,
            conflict_raised_inside_the_handler_without_retry,
            undecodable_event_is_a_decode_error,
        );
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

pub async fn all_events(store: &dyn EventStore) -> Vec<Event> {
    store
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("reading all events")
}

pub async fn all_commands(store: &dyn EventStore) -> Vec<CommandRecord> {
    store
        .commands(&CommandFilter::default())
        .await
        .expect("listing commands")
}

pub async fn assert_store_empty(store: &dyn EventStore, context: &str) {
    let events = all_events(store).await;
    assert!(
        events.is_empty(),
        "{context}: events were written: {events:?}"
    );
    let commands = all_commands(store).await;
    assert!(
        commands.is_empty(),
        "{context}: commands were recorded: {commands:?}"
    );
}

fn course_query(course_id: &str) -> Query {
    Query::from(
        QueryItem::new()
            .types(["CourseDefined"])
            .tag("course_id", course_id),
    )
}

fn enrolled_query(course_id: &str) -> Query {
    Query::from(
        QueryItem::new()
            .types(["StudentEnrolled"])
            .tag("course_id", course_id),
    )
}

fn enrolled(course_id: &str, student_id: &str) -> NewEvent {
    NewEvent::builder("StudentEnrolled")
        .tag("course_id", course_id)
        .tag("student_id", student_id)
        .build()
        .expect("event")
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefineCourse {
    pub course_id: String,
    pub capacity: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CourseError {
    #[error("course {0} is already defined")]
    AlreadyDefined(String),
    #[error("capacity must be positive")]
    NoCapacity,
}

/// A handler written as a trait implementation; counts its runs.
#[derive(Default)]
pub struct DefineCourseHandler {
    pub runs: AtomicU32,
}

#[async_trait]
impl CommandHandler<DefineCourse> for DefineCourseHandler {
    type Error = CourseError;

    async fn handle(
        &self,
        command: &Command<DefineCourse>,
        reader: &dyn EventReader,
    ) -> HandlerResult<CourseError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let DefineCourse {
            course_id,
            capacity,
        } = &command.payload;
        if *capacity == 0 {
            return Err(reject(CourseError::NoCapacity));
        }
        let model = reader
            .project(StateProjector::exists(course_query(course_id)))
            .await?;
        if model.states {
            return Err(reject(CourseError::AlreadyDefined(course_id.clone())));
        }
        let event = NewEvent::builder("CourseDefined")
            .tag("course_id", course_id)
            .data(&json!({ "capacity": capacity }))
            .build()?;
        Ok(Decision::append([event]).guarded_by(model.condition))
    }
}

fn define(course_id: &str, capacity: u32) -> Command<DefineCourse> {
    Command::new(
        "DefineCourse",
        DefineCourse {
            course_id: course_id.into(),
            capacity,
        },
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct Enroll {
    pub course_id: String,
    pub student_id: String,
}

/// Enrolls a student on a decision guarded by the course's enrollment count. On its first
/// `interfere_runs` runs it appends a conflicting enrollment through the store itself (another
/// writer), between its read and the executor's commit.
pub struct InterferingEnroll {
    pub store: Store,
    pub interfere_runs: u32,
    pub runs: AtomicU32,
    /// The enrollment count each run saw.
    pub seen: std::sync::Mutex<Vec<u64>>,
}

impl InterferingEnroll {
    pub fn new(store: Store, interfere_runs: u32) -> Self {
        Self {
            store,
            interfere_runs,
            runs: AtomicU32::new(0),
            seen: std::sync::Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl CommandHandler<Enroll> for InterferingEnroll {
    type Error = CourseError;

    async fn handle(
        &self,
        command: &Command<Enroll>,
        reader: &dyn EventReader,
    ) -> HandlerResult<CourseError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let course = &command.payload.course_id;
        let model = reader
            .project(StateProjector::counter(enrolled_query(course)))
            .await?;
        self.seen.lock().expect("seen").push(model.states);
        if run <= self.interfere_runs {
            self.store
                .append(vec![enrolled(course, &format!("interloper-{run}"))])
                .await?;
        }
        Ok(
            Decision::append([enrolled(course, &command.payload.student_id)])
                .guarded_by(model.condition),
        )
    }
}

fn enroll(course_id: &str, student_id: &str) -> Command<Enroll> {
    Command::new(
        "Enroll",
        Enroll {
            course_id: course_id.into(),
            student_id: student_id.into(),
        },
    )
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(attempts)
        .initial_backoff(Duration::from_millis(2))
        .max_backoff(Duration::from_millis(20))
}

// ---------------------------------------------------------------------------------------------
// Scenarios

pub async fn success_records_command_with_its_events(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let handler = DefineCourseHandler::default();
    let metadata = json!({ "request_id": "req-1", "user": "alice" });
    let outcome = executor
        .execute(define("c1", 30).with_metadata(metadata.clone()), &handler)
        .await
        .expect("define c1");

    assert!(!outcome.replayed);
    assert_eq!(outcome.attempts, 1);
    let record = &outcome.record;
    assert_eq!(record.command_type, "DefineCourse");
    assert_eq!(record.data, json!({ "course_id": "c1", "capacity": 30 }));
    assert_eq!(record.metadata, Some(metadata));
    assert_eq!(record.id, None);

    let events = all_events(store.as_ref()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "CourseDefined");
    assert_eq!(events[0].data, json!({ "capacity": 30 }));
    assert_eq!(outcome.last_event(), Some(events[0].cursor));
    assert_eq!(record.transaction_id, events[0].cursor.transaction_id);

    let audit = executor
        .commands(&CommandFilter::default().command_type("DefineCourse"))
        .await
        .expect("audit");
    assert_eq!(audit, vec![outcome.record.clone()]);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}

pub async fn business_rejection_is_returned_unchanged_and_writes_nothing(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let handler = DefineCourseHandler::default();

    // A rejection before any read.
    let err = executor
        .execute(define("c1", 0), &handler)
        .await
        .expect_err("capacity 0 must be rejected");
    assert!(
        matches!(err, CommandError::Rejected(CourseError::NoCapacity)),
        "{err:?}"
    );
    assert!(err.is_rejected() && !err.is_conflict());
    assert_eq!(err.to_string(), "capacity must be positive");
    assert_store_empty(store.as_ref(), "after NoCapacity").await;

    // A rejection after a read, by a closure handler with a plain business error type.
    #[derive(Debug, thiserror::Error)]
    #[error("students may not enroll in {0}")]
    struct Closed(String);
    let closed = handler_fn(|command: &Command<Enroll>, reader| {
        Box::pin(async move {
            let model = reader
                .project(StateProjector::counter(enrolled_query(
                    &command.payload.course_id,
                )))
                .await?;
            assert_eq!(model.states, 0);
            Err::<Decision, _>(reject(Closed(command.payload.course_id.clone())))
        })
    });
    let err = executor
        .execute(enroll("c9", "s1").with_id("enroll-1"), &closed)
        .await
        .expect_err("closed course");
    match err.into_rejection() {
        Ok(Closed(course)) => assert_eq!(course, "c9"),
        Err(other) => panic!("expected the handler's own error, got {other:?}"),
    }
    assert_store_empty(store.as_ref(), "after Closed").await;

    // A store error inside a handler (`?` on a failed read) is a store error, never a
    // rejection: here an invalid (empty) query.
    let bad_read = handler_fn(|_: &Command<Enroll>, reader| {
        Box::pin(async move {
            reader
                .query(&Query::from_items([]), dcb_core::ReadOptions::default())
                .await?;
            Err::<Decision, _>(reject(Closed("unreachable".into())))
        })
    });
    let err = executor
        .execute(enroll("c9", "s1"), &bad_read)
        .await
        .expect_err("the read fails");
    assert!(
        matches!(&err, CommandError::Validation(v) if v.field.contains("query")),
        "a failed read must not come back as a rejection: {err:?}"
    );
    assert!(!err.is_rejected());
    assert_store_empty(store.as_ref(), "after a failed read").await;

    // The rejection after a successful definition: exactly one event and one record remain.
    executor
        .execute(define("c1", 10), &handler)
        .await
        .expect("define c1");
    let err = executor
        .execute(define("c1", 20), &handler)
        .await
        .expect_err("c1 exists");
    assert!(
        matches!(&err, CommandError::Rejected(CourseError::AlreadyDefined(id)) if id == "c1"),
        "{err:?}"
    );
    assert_eq!(all_events(store.as_ref()).await.len(), 1);
    assert_eq!(all_commands(store.as_ref()).await.len(), 1);
}

pub async fn command_without_events_is_recorded(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let noop = handler_fn(|_: &Command<serde_json::Value>, _| {
        Box::pin(async { Ok::<_, HandlerError>(Decision::nothing()) })
    });
    let outcome = executor
        .execute(
            Command::new("Touch", json!({ "n": 1 })).with_id("touch-1"),
            &noop,
        )
        .await
        .expect("touch");
    assert!(!outcome.replayed);
    assert_eq!(outcome.last_event(), None);
    assert!(all_events(store.as_ref()).await.is_empty());
    assert_eq!(
        all_commands(store.as_ref()).await,
        vec![outcome.record.clone()]
    );

    let again = executor
        .execute(
            Command::new("Touch", json!({ "n": 1 })).with_id("touch-1"),
            &noop,
        )
        .await
        .expect("touch again");
    assert!(again.replayed);
    assert_eq!(again.record, outcome.record);
    assert_eq!(all_commands(store.as_ref()).await.len(), 1);
}

pub async fn conflict_without_retry_writes_nothing(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    assert_eq!(
        executor.retry_policy().max_attempts(),
        1,
        "retries are off by default"
    );
    let handler = InterferingEnroll::new(store.clone(), 1);
    let err = executor
        .execute(enroll("c1", "s1").with_id("enroll-s1"), &handler)
        .await
        .expect_err("the interloper makes the decision stale");
    match &err {
        CommandError::Conflict { attempts, conflict } => {
            assert_eq!(*attempts, 1);
            assert_eq!(conflict.after, None, "the handler read an empty course");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(err.attempts(), Some(1));
    assert!(err.to_string().contains("after 1 attempt:"), "{err}");
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);

    let events = all_events(store.as_ref()).await;
    assert_eq!(events.len(), 1, "only the interloper's event: {events:?}");
    assert_eq!(events[0].tag("student_id"), Some("interloper-1"));
    assert!(all_commands(store.as_ref()).await.is_empty());
    assert_eq!(
        executor.find_command("enroll-s1").await.expect("find"),
        None
    );
}

pub async fn conflict_with_retry_succeeds_on_second_attempt(store: Store) {
    let executor = CommandExecutor::new(store.clone()).with_retry(fast_retry(3));
    let handler = InterferingEnroll::new(store.clone(), 1);
    let outcome = executor
        .execute(enroll("c1", "s1"), &handler)
        .await
        .expect("the second attempt decides on fresh state");
    assert!(!outcome.replayed);
    assert_eq!(outcome.attempts, 2);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 2);
    // The second run saw the interloper's enrollment.
    assert_eq!(*handler.seen.lock().expect("seen"), vec![0, 1]);

    let events = all_events(store.as_ref()).await;
    let students: Vec<_> = events.iter().filter_map(|e| e.tag("student_id")).collect();
    assert_eq!(students, vec!["interloper-1", "s1"]);
    assert_eq!(outcome.last_event(), Some(events[1].cursor));
    assert_eq!(all_commands(store.as_ref()).await, vec![outcome.record]);
}

pub async fn conflict_retry_gives_up_after_max_attempts(store: Store) {
    let executor = CommandExecutor::new(store.clone()).with_retry(fast_retry(3));
    let handler = InterferingEnroll::new(store.clone(), u32::MAX);
    let err = executor
        .execute(enroll("c1", "s1"), &handler)
        .await
        .expect_err("every attempt conflicts");
    assert!(err.is_conflict(), "{err:?}");
    assert_eq!(err.attempts(), Some(3));
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert_eq!(handler.runs.load(Ordering::SeqCst), 3);
    assert_eq!(*handler.seen.lock().expect("seen"), vec![0, 1, 2]);
    let events = all_events(store.as_ref()).await;
    assert!(
        events.iter().all(|e| e.tag("student_id") != Some("s1")),
        "s1 must not be enrolled: {events:?}"
    );
    assert_eq!(events.len(), 3);
    assert!(all_commands(store.as_ref()).await.is_empty());
}

pub async fn idempotent_sequential_replay(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let handler = DefineCourseHandler::default();
    let first = executor
        .execute(define("c1", 30).with_id("define-c1"), &handler)
        .await
        .expect("first");
    assert!(!first.replayed);
    assert_eq!(first.record.id.as_deref(), Some("define-c1"));

    // Same id again: the original outcome, the handler does not run, nothing is written (a
    // second run of the handler would even have rejected the command).
    let second = executor
        .execute(define("c1", 30).with_id("define-c1"), &handler)
        .await
        .expect("replay");
    assert!(second.replayed);
    assert_eq!(second.attempts, 0);
    assert_eq!(second.record, first.record);

    // The id is the key: a different payload under the same id also gets the original.
    let third = executor
        .execute(define("c2", 5).with_id("define-c1"), &handler)
        .await
        .expect("replay with other payload");
    assert!(third.replayed);
    assert_eq!(third.record, first.record);

    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    assert_eq!(all_events(store.as_ref()).await.len(), 1);
    assert_eq!(
        all_commands(store.as_ref()).await,
        vec![first.record.clone()]
    );
    assert_eq!(
        executor.find_command("define-c1").await.expect("find"),
        Some(first.record)
    );
}

pub async fn rejected_command_does_not_consume_its_id(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let handler = DefineCourseHandler::default();
    let err = executor
        .execute(define("c1", 0).with_id("define-c1"), &handler)
        .await
        .expect_err("rejected");
    assert!(err.is_rejected());
    let outcome = executor
        .execute(define("c1", 3).with_id("define-c1"), &handler)
        .await
        .expect("the id is still free");
    assert!(!outcome.replayed);
    assert_eq!(outcome.record.data["capacity"], 3);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 2);
}

const RACERS: usize = 16;

/// 16 executions of one command id, released together; every handler waits inside at a second
/// barrier, so all of them have checked the id and decided before the first commit.
async fn race_same_id(store: Store, guarded: bool) {
    let executor = Arc::new(CommandExecutor::new(store.clone()));
    let start = Arc::new(Barrier::new(RACERS));
    let decided = Arc::new(Barrier::new(RACERS));
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for task in 0..RACERS {
        let executor = executor.clone();
        let start = start.clone();
        let decided = decided.clone();
        let runs = runs.clone();
        tasks.push(tokio::spawn(async move {
            let handler = handler_fn(move |command: &Command<DefineCourse>, reader| {
                let decided = decided.clone();
                let runs = runs.clone();
                Box::pin(async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let model = reader
                        .project(StateProjector::exists(course_query(
                            &command.payload.course_id,
                        )))
                        .await?;
                    decided.wait().await;
                    let events = vec![
                        NewEvent::builder("CourseDefined")
                            .tag("course_id", &command.payload.course_id)
                            .data(&json!({ "task": task }))
                            .build()?,
                        NewEvent::builder("CourseCapacityChanged")
                            .tag("course_id", &command.payload.course_id)
                            .data(&json!({ "task": task }))
                            .build()?,
                    ];
                    let condition = guarded.then_some(model.condition);
                    Ok::<_, HandlerError>(Decision::append(events).guarded_by(condition))
                })
            });
            start.wait().await;
            let outcome = executor
                .execute(define("c-race", 10).with_id("define-c-race"), &handler)
                .await;
            (task, outcome)
        }));
    }
    let mut outcomes: Vec<(usize, CommandOutcome)> = Vec::new();
    for task in tasks {
        let (index, outcome) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("racers finish")
            .expect("racer task");
        outcomes.push((
            index,
            outcome.unwrap_or_else(|e| panic!("racer {index} failed: {e:?}")),
        ));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        RACERS as u32,
        "every racer decided"
    );
    let committed: Vec<_> = outcomes.iter().filter(|(_, o)| !o.replayed).collect();
    assert_eq!(
        committed.len(),
        1,
        "exactly one execution commits: {outcomes:?}"
    );
    let (winner, original) = committed[0];
    assert_eq!(original.attempts, 1);
    for (index, outcome) in &outcomes {
        assert_eq!(
            outcome.record, original.record,
            "racer {index} got another record"
        );
        if outcome.replayed {
            assert_eq!(outcome.attempts, 1, "racer {index} ran its handler once");
        }
    }
    let events = all_events(store.as_ref()).await;
    assert_eq!(events.len(), 2, "one set of events: {events:?}");
    assert!(events.iter().all(|e| e.data["task"] == json!(winner)));
    assert_eq!(original.last_event(), Some(events[1].cursor));
    assert_eq!(
        all_commands(store.as_ref()).await,
        vec![original.record.clone()]
    );
}

pub async fn idempotent_racing_same_id(store: Store) {
    race_same_id(store, false).await;
}

pub async fn idempotent_racing_same_id_guarded(store: Store) {
    // The losers' conditions fail too (the winner defined the course); they must still get the
    // original outcome, not a conflict.
    race_same_id(store, true).await;
}

pub async fn invalid_command_writes_nothing(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let runs = Arc::new(AtomicU32::new(0));
    let counting = {
        let runs = runs.clone();
        handler_fn(move |_: &Command<serde_json::Value>, _| {
            runs.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                let event = NewEvent::builder("Happened").tag("k", "v").build()?;
                Ok::<_, HandlerError>(Decision::append([event]))
            })
        })
    };
    let cases: Vec<(&str, Command<serde_json::Value>, ValidationKind)> = vec![
        (
            "NUL in data",
            Command::new("Do", json!({ "name": "a\u{0}b" })),
            ValidationKind::NulCharacter,
        ),
        (
            "NUL in metadata",
            Command::new("Do", json!({})).with_metadata(json!({ "user": "\u{0}" })),
            ValidationKind::NulCharacter,
        ),
        (
            "NUL in a data key",
            Command::new("Do", json!({ "a\u{0}": 1 })),
            ValidationKind::NulCharacter,
        ),
        (
            "empty type",
            Command::new("", json!({})),
            ValidationKind::EmptyEventType,
        ),
        (
            "type too long",
            Command::new("T".repeat(65), json!({})),
            ValidationKind::EventTypeTooLong,
        ),
        (
            "NUL in type",
            Command::new("Do\u{0}", json!({})),
            ValidationKind::NulCharacter,
        ),
        (
            "empty id",
            Command::new("Do", json!({})).with_id(""),
            ValidationKind::EmptyTagValue,
        ),
        (
            "NUL in id",
            Command::new("Do", json!({})).with_id("k\u{0}"),
            ValidationKind::NulCharacter,
        ),
    ];
    for (name, command, kind) in cases {
        let err = executor.execute(command, &counting).await.expect_err(name);
        let validation = err
            .as_validation()
            .unwrap_or_else(|| panic!("{name}: expected a validation error, got {err:?}"));
        assert_eq!(validation.kind, kind, "{name}: {validation:?}");
    }
    // A payload that does not serialize to JSON (a map with non-string keys).
    let unserializable: HashMap<(i32, i32), i32> = HashMap::from([((1, 2), 3)]);
    let typed = handler_fn(|_: &Command<HashMap<(i32, i32), i32>>, _| {
        Box::pin(async { Ok::<_, HandlerError>(Decision::nothing()) })
    });
    let err = executor
        .execute(Command::new("Map", unserializable), &typed)
        .await
        .expect_err("unserializable");
    assert_eq!(
        err.as_validation().map(|v| v.kind),
        Some(ValidationKind::NotSerializable),
        "{err:?}"
    );

    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "invalid commands are rejected before the handler"
    );
    assert_store_empty(store.as_ref(), "after invalid commands").await;
}

pub async fn invalid_decision_rolls_back_everything(store: Store) {
    let executor = CommandExecutor::new(store.clone()).with_retry(fast_retry(3));
    let decide = |decision: fn() -> Decision| {
        handler_fn(move |_: &Command<serde_json::Value>, _| {
            Box::pin(async move { Ok::<_, HandlerError>(decision()) })
        })
    };
    type Case = (&'static str, fn() -> Decision, ValidationKind);
    let cases: Vec<Case> = vec![
        (
            "NUL in the second event's data",
            || {
                Decision::append([
                    NewEvent::new("Good", vec![Tag::new("k", "v")], json!({})),
                    NewEvent::new("Bad", vec![], json!({ "s": "\u{0}" })),
                ])
            },
            ValidationKind::NulCharacter,
        ),
        (
            "duplicate tag",
            || {
                Decision::append([NewEvent::new(
                    "Bad",
                    vec![Tag::new("k", "1"), Tag::new("k", "1")],
                    json!({}),
                )])
            },
            ValidationKind::DuplicateTag,
        ),
        (
            "empty condition query",
            || {
                Decision::append([NewEvent::new("Good", vec![], json!({}))])
                    .guarded_by(AppendCondition::new(Query::from_items([])))
            },
            ValidationKind::EmptyQuery,
        ),
    ];
    for (name, decision, kind) in cases {
        let handler = decide(decision);
        let err = executor
            .execute(
                Command::new("Do", json!({ "case": name })).with_id(name),
                &handler,
            )
            .await
            .expect_err(name);
        assert_eq!(
            err.as_validation().map(|v| v.kind),
            Some(kind),
            "{name}: {err:?}"
        );
        assert_store_empty(store.as_ref(), name).await;
    }
}

pub async fn audit_query_by_type_and_time(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let define_handler = DefineCourseHandler::default();
    let enroll_handler = InterferingEnroll::new(store.clone(), 0);
    let start = SystemTime::now() - Duration::from_secs(1);
    let c1 = executor
        .execute(
            define("c1", 1).with_metadata(json!({ "user": "u1" })),
            &define_handler,
        )
        .await
        .expect("c1");
    let s1 = executor
        .execute(enroll("c1", "s1"), &enroll_handler)
        .await
        .expect("s1");
    let c2 = executor
        .execute(
            define("c2", 2).with_metadata(json!({ "user": "u2" })),
            &define_handler,
        )
        .await
        .expect("c2");
    let end = SystemTime::now() + Duration::from_secs(1);

    let list = |filter: CommandFilter| {
        let executor = executor.clone();
        async move { executor.commands(&filter).await.expect("commands") }
    };
    assert_eq!(
        list(CommandFilter::default()).await,
        vec![c1.record.clone(), s1.record.clone(), c2.record.clone()]
    );
    let defines = list(CommandFilter::default().command_type("DefineCourse")).await;
    assert_eq!(defines, vec![c1.record.clone(), c2.record.clone()]);
    assert_eq!(defines[1].metadata, Some(json!({ "user": "u2" })));
    assert_eq!(
        list(CommandFilter::default().command_type("Enroll")).await,
        vec![s1.record.clone()]
    );
    assert!(list(CommandFilter::default().command_type("Nope"))
        .await
        .is_empty());
    assert_eq!(
        list(
            CommandFilter::default()
                .command_type("DefineCourse")
                .limit(1)
        )
        .await,
        vec![c1.record.clone()]
    );
    assert_eq!(
        list(CommandFilter::default().between(start, end))
            .await
            .len(),
        3
    );
    let hour = Duration::from_secs(3600);
    assert!(list(CommandFilter::default().between(end, end + hour))
        .await
        .is_empty());
    assert!(list(CommandFilter::default().between(start - hour, start))
        .await
        .is_empty());
    // The window boundary splits the trail: `from` is inclusive, `to` exclusive.
    let mid = s1.record.occurred_at;
    let before_s1 = list(CommandFilter::default().between(start, mid)).await;
    let from_s1 = list(CommandFilter::default().between(mid, end)).await;
    assert_eq!(before_s1.len() + from_s1.len(), 3);
    assert!(from_s1.contains(&s1.record), "{from_s1:?}");
}

pub async fn handler_may_stream_through_the_session(store: Store) {
    use futures_util::StreamExt;
    store
        .append((1..=5).map(|n| enrolled("c1", &format!("s{n}"))).collect())
        .await
        .expect("seed");
    let executor = CommandExecutor::new(store.clone());
    let count = handler_fn(|command: &Command<String>, reader| {
        Box::pin(async move {
            let query = enrolled_query(&command.payload);
            let streamed: Vec<_> = reader
                .query_stream(&query, ReadOptions::default())
                .collect()
                .await;
            let streamed = streamed.into_iter().collect::<Result<Vec<_>, _>>()?;
            let read = reader.query(&query, ReadOptions::default()).await?;
            assert_eq!(streamed, read);
            let last = read.last().map(|e| e.cursor);
            let event = NewEvent::builder("EnrollmentsCounted")
                .tag("course_id", &command.payload)
                .data(&json!({ "count": read.len() }))
                .build()?;
            Ok::<_, HandlerError>(
                Decision::append([event]).guarded_by(AppendCondition::new(query).with_after(last)),
            )
        })
    });
    let outcome = executor
        .execute(Command::new("Count", "c1".to_string()), &count)
        .await
        .expect("count");
    let events = all_events(store.as_ref()).await;
    assert_eq!(events.len(), 6);
    assert_eq!(events[5].data, json!({ "count": 5 }));
    assert_eq!(outcome.last_event(), Some(events[5].cursor));
}

/// `commands` concurrent executions on their own boundaries, each reading through its session
/// and holding it across an await; all must finish (on PostgreSQL with a pool smaller than the
/// number of commands).
pub async fn many_concurrent_commands_complete(store: Store, commands: usize) {
    let executor = Arc::new(CommandExecutor::new(store.clone()).with_retry(fast_retry(5)));
    let handler = Arc::new(handler_fn(|command: &Command<DefineCourse>, reader| {
        Box::pin(async move {
            let model = reader
                .project(StateProjector::exists(course_query(
                    &command.payload.course_id,
                )))
                .await?;
            // Hold the session across an await, as a handler doing real work would.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let again = reader
                .query(
                    &course_query(&command.payload.course_id),
                    ReadOptions::default(),
                )
                .await?;
            assert!(again.is_empty() && !model.states);
            let event = NewEvent::builder("CourseDefined")
                .tag("course_id", &command.payload.course_id)
                .build()?;
            Ok::<_, HandlerError>(Decision::append([event]).guarded_by(model.condition))
        })
    }));
    let start = Arc::new(Barrier::new(commands));
    let tasks: Vec<_> = (0..commands)
        .map(|i| {
            let executor = executor.clone();
            let handler = handler.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                executor
                    .execute(
                        define(&format!("c{i}"), 1).with_id(format!("define-{i}")),
                        &*handler,
                    )
                    .await
            })
        })
        .collect();
    let all = futures_util::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every command finishes: the pool must not deadlock");
    for (i, result) in results.into_iter().enumerate() {
        let outcome = result
            .expect("task")
            .unwrap_or_else(|e| panic!("command {i} failed: {e:?}"));
        assert!(!outcome.replayed);
    }
    assert_eq!(all_events(store.as_ref()).await.len(), commands);
    assert_eq!(all_commands(store.as_ref()).await.len(), commands);
}

/// Enrolls with an `append_if` of its own, through the store, and returns nothing to append:
/// on its first `interfere_runs` runs another writer enrolls between its read and its append,
/// so its own append conflicts and the conflict leaves the handler with `?`.
pub struct SelfAppendingEnroll {
    pub store: Store,
    pub interfere_runs: u32,
    pub runs: AtomicU32,
}

#[async_trait]
impl CommandHandler<Enroll> for SelfAppendingEnroll {
    type Error = CourseError;

    async fn handle(
        &self,
        command: &Command<Enroll>,
        reader: &dyn EventReader,
    ) -> HandlerResult<CourseError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let course = &command.payload.course_id;
        let model = reader
            .project(StateProjector::counter(enrolled_query(course)))
            .await?;
        if run <= self.interfere_runs {
            self.store
                .append(vec![enrolled(course, &format!("interloper-{run}"))])
                .await?;
        }
        self.store
            .append_if(
                vec![enrolled(course, &command.payload.student_id)],
                model.condition,
            )
            .await?;
        Ok(Decision::nothing())
    }
}

fn self_appending(store: &Store, interfere_runs: u32) -> SelfAppendingEnroll {
    SelfAppendingEnroll {
        store: store.clone(),
        interfere_runs,
        runs: AtomicU32::new(0),
    }
}

pub async fn conflict_raised_inside_the_handler_is_retried(store: Store) {
    let executor = CommandExecutor::new(store.clone()).with_retry(fast_retry(3));
    let handler = self_appending(&store, 1);
    let outcome = executor
        .execute(enroll("c1", "s1"), &handler)
        .await
        .expect("the second run appends on fresh state");
    assert_eq!(outcome.attempts, 2);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 2);
    let events = all_events(store.as_ref()).await;
    let students: Vec<_> = events.iter().filter_map(|e| e.tag("student_id")).collect();
    assert_eq!(students, vec!["interloper-1", "s1"]);
}

pub async fn conflict_raised_inside_the_handler_gives_up_after_max_attempts(store: Store) {
    let executor = CommandExecutor::new(store.clone()).with_retry(fast_retry(3));
    let handler = self_appending(&store, u32::MAX);
    let err = executor
        .execute(enroll("c1", "s1"), &handler)
        .await
        .expect_err("every run conflicts");
    assert!(err.is_conflict(), "{err:?}");
    assert_eq!(err.attempts(), Some(3));
    assert_eq!(handler.runs.load(Ordering::SeqCst), 3);
    assert!(all_commands(store.as_ref()).await.is_empty());
}

pub async fn conflict_raised_inside_the_handler_without_retry(store: Store) {
    let executor = CommandExecutor::new(store.clone());
    let handler = self_appending(&store, u32::MAX);
    let err = executor
        .execute(enroll("c1", "s1"), &handler)
        .await
        .expect_err("the one run conflicts");
    assert_eq!(err.attempts(), Some(1), "{err:?}");
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}

/// A typed event with a `capacity`, decoded by hand (this crate does not use the derive).
#[derive(Debug)]
struct Capacity(u64);

impl dcb_core::DomainEvent for Capacity {
    fn event_types() -> Vec<&'static str> {
        vec!["CourseDefined"]
    }

    fn event_type(&self) -> &'static str {
        "CourseDefined"
    }

    fn schema_version(&self) -> u32 {
        1
    }

    fn encode(&self) -> Result<NewEvent, dcb_core::Error> {
        Ok(NewEvent::new(
            "CourseDefined",
            vec![],
            json!({ "capacity": self.0 }),
        ))
    }

    fn decode_view(view: dcb_core::EventView<'_>) -> Result<Self, dcb_core::DecodeErrorKind> {
        view.data["capacity"].as_u64().map(Capacity).ok_or_else(|| {
            dcb_core::DecodeErrorKind::Payload {
                reason: "no capacity".into(),
            }
        })
    }
}

pub async fn undecodable_event_is_a_decode_error(store: Store) {
    let bad = NewEvent::new(
        "CourseDefined",
        vec![Tag::new("course_id", "c1")],
        json!({}),
    );
    let cursor = store.append(vec![bad]).await.expect("append");
    let read_capacity = handler_fn(|_: &Command<()>, reader| {
        Box::pin(async move {
            let query = Query::types(["CourseDefined"]);
            reader
                .query_typed::<Capacity>(&query, ReadOptions::default())
                .await?;
            Ok::<_, HandlerError>(Decision::nothing())
        })
    });
    let executor = CommandExecutor::new(store.clone()).with_retry(fast_retry(3));
    let err = executor
        .execute(Command::new("ReadCapacity", ()), &read_capacity)
        .await
        .expect_err("the event does not decode");
    let decode = err.as_decode().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(decode.cursor, cursor);
    assert_eq!(decode.event_type, "CourseDefined");
    assert!(err.to_string().contains("no capacity"), "{err}");
    assert!(all_commands(store.as_ref()).await.is_empty());
}
