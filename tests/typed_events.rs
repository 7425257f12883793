//! The typed layer on both backends: derived events round-trip exactly, old payloads and old
//! type names are upcast on every read path, bad events fail with a typed error naming them,
//! named decision models fold in one read, and a newest-only projector decides safely under
//! concurrency.
mod support;

use crablet::command::{handler_fn, reject, Command, CommandError, Decision, HandlerError};
use crablet::{
    decode_all, tags, DecisionModel, DomainEvent, Error, EventReaderExt, EventStore, NewEvent,
    ProjectionStep, Query, QueryItem, ReadOptions, StateProjector, TagValue, TypedEvent, Upcasters,
};
use dcb_testkit::scenario::Scenario;
use futures_util::StreamExt;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Barrier;

/// An identifier of our own, tagged through its `TagValue` conversion.
#[derive(Debug, Clone, PartialEq)]
struct StudentId(String);

impl TagValue for StudentId {
    fn to_tag_value(&self) -> String {
        format!("student-{}", self.0)
    }
    fn from_tag_value(value: &str) -> Result<Self, String> {
        value
            .strip_prefix("student-")
            .map(|id| StudentId(id.to_string()))
            .ok_or_else(|| format!("{value:?} does not start with student-"))
    }
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct CourseDefined {
    #[crablet(tag)]
    course_id: String,
    capacity: u32,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(event_type = "StudentEnrolled", version = 2, upcasters = enrolled_upcasters)]
struct Enrolled {
    #[crablet(tag)]
    course_id: String,
    #[crablet(tag = "student_id")]
    student: StudentId,
    /// Added in version 2.
    credits: u8,
}

/// v1 had no credits (3 was the rule); before that the event was called StudentSubscribed.
fn enrolled_upcasters() -> Upcasters {
    Upcasters::new()
        .step("StudentEnrolled", 1, |mut data| {
            data["credits"] = json!(3);
            Ok(data)
        })
        .rename("StudentSubscribed", "StudentEnrolled")
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum CourseEvent {
    Defined(CourseDefined),
    Enrolled(Enrolled),
    CourseRenamed {
        #[crablet(tag)]
        course_id: String,
        #[serde(rename = "newTitle")]
        title: String,
        #[crablet(tag = "keyword")]
        keywords: Vec<String>,
        #[crablet(tag)]
        term: Option<u16>,
    },
    CourseClosed {
        #[crablet(tag)]
        course_id: String,
    },
}

fn defined(course: &str, capacity: u32) -> CourseEvent {
    CourseEvent::Defined(CourseDefined {
        course_id: course.into(),
        capacity,
    })
}

fn enrolled(course: &str, student: &str, credits: u8) -> CourseEvent {
    CourseEvent::Enrolled(Enrolled {
        course_id: course.into(),
        student: StudentId(student.into()),
        credits,
    })
}

async fn round_trip_is_exact(store: Arc<dyn EventStore>) {
    let events = vec![
        defined("c1", 30),
        enrolled("c1", "s1", 5),
        CourseEvent::CourseRenamed {
            course_id: "c1".into(),
            title: "Databases".into(),
            keywords: vec!["sql".into(), "storage".into()],
            term: Some(2026),
        },
        CourseEvent::CourseRenamed {
            course_id: "c1".into(),
            title: "Databases II".into(),
            keywords: vec![],
            term: None,
        },
        CourseEvent::CourseClosed {
            course_id: "c1".into(),
        },
    ];
    store
        .append(crablet::encode_all(&events).expect("encode"))
        .await
        .expect("append");

    // The dynamic view: exactly what the derive wrote.
    let raw = store
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("raw read");
    assert_eq!(raw[0].event_type, "CourseDefined");
    assert_eq!(raw[0].data, json!({ "capacity": 30 }));
    assert_eq!(raw[1].event_type, "StudentEnrolled");
    assert_eq!(
        raw[1].tags,
        tags!["course_id" => "c1", "student_id" => "student-s1"]
    );
    assert_eq!(raw[1].data, json!({ "credits": 5 }));
    assert_eq!(raw[1].metadata, Some(json!({ "schema_version": 2 })));
    assert_eq!(
        raw[2].tags,
        tags!["course_id" => "c1", "keyword" => "sql", "keyword" => "storage", "term" => 2026]
    );
    assert_eq!(raw[2].data, json!({ "newTitle": "Databases" }));
    assert_eq!(raw[3].tags, tags!["course_id" => "c1"]);
    assert_eq!(raw[4].data, json!({}));

    // The typed view: every value back as it was appended.
    let typed = store
        .query_typed::<CourseEvent>(&Query::of::<CourseEvent>(), ReadOptions::default())
        .await
        .expect("typed read");
    let decoded: Vec<CourseEvent> = typed.into_iter().map(|t| t.event).collect();
    assert_eq!(decoded, events);

    // Typed queries select by the types' names, here one variant's struct and a tag.
    let item = QueryItem::of::<Enrolled>().tag("student_id", "student-s1");
    let only = store
        .query_typed::<Enrolled>(&Query::from(item), ReadOptions::default())
        .await
        .expect("typed query");
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].event.credits, 5);
    // Some variants of an enum, by the kinds its derive generates.
    let renamed_or_enrolled =
        QueryItem::of_kinds([CourseEventKind::CourseRenamed, CourseEventKind::Enrolled])
            .expect("two kinds")
            .tag("course_id", "c1");
    assert_eq!(
        renamed_or_enrolled.types,
        ["CourseRenamed", "StudentEnrolled", "StudentSubscribed"]
    );
    let selected = store
        .query_typed::<CourseEvent>(&Query::from(renamed_or_enrolled), ReadOptions::default())
        .await
        .expect("query by kinds");
    let kinds: Vec<CourseEventKind> = selected.iter().map(|t| t.event.kind()).collect();
    assert_eq!(
        kinds,
        [
            CourseEventKind::Enrolled,
            CourseEventKind::CourseRenamed,
            CourseEventKind::CourseRenamed
        ]
    );
    assert_eq!(
        CourseEvent::read_types(),
        [
            "CourseDefined",
            "StudentEnrolled",
            "StudentSubscribed",
            "CourseRenamed",
            "CourseClosed"
        ]
    );
}

/// Version 1 enrollments and StudentSubscribed events, appended by the dynamic API, as old code
/// wrote them.
async fn append_old_events(store: &dyn EventStore) {
    let v1 = NewEvent::builder("StudentEnrolled")
        .tag("course_id", "c1")
        .tag("student_id", "student-s1")
        .build()
        .expect("v1");
    let older = NewEvent::builder("StudentSubscribed")
        .tag("course_id", "c1")
        .tag("student_id", "student-s2")
        .build()
        .expect("older");
    store
        .append(vec![defined("c1", 10).encode().expect("encode"), v1, older])
        .await
        .expect("append old events");
    store
        .append(vec![enrolled("c1", "s3", 6).encode().expect("encode")])
        .await
        .expect("append a v2 event");
}

fn expected_after_upcasting() -> Vec<CourseEvent> {
    vec![
        defined("c1", 10),
        enrolled("c1", "s1", 3),
        enrolled("c1", "s2", 3),
        enrolled("c1", "s3", 6),
    ]
}

async fn old_events_are_upcast_on_every_read_path(store: Arc<dyn EventStore>) {
    append_old_events(store.as_ref()).await;
    let query = Query::from(QueryItem::of::<CourseEvent>().tag("course_id", "c1"));
    let expected = expected_after_upcasting();
    let events = |typed: Vec<TypedEvent<CourseEvent>>| -> Vec<CourseEvent> {
        typed.into_iter().map(|t| t.event).collect()
    };

    // query
    let read = store
        .query_typed::<CourseEvent>(&query, ReadOptions::default())
        .await
        .expect("query");
    assert_eq!(events(read), expected, "query_typed");

    // stream
    let streamed: Vec<TypedEvent<CourseEvent>> = store
        .query_stream_typed::<CourseEvent>(&query, ReadOptions::default())
        .map(|item| item.expect("stream item"))
        .collect()
        .await;
    assert_eq!(events(streamed), expected, "query_stream_typed");

    // project and project_stream, with a typed projector
    let credits = || {
        StateProjector::typed(query.clone(), 0_u32, |sum, event: &CourseEvent| {
            if let CourseEvent::Enrolled(e) = event {
                *sum += u32::from(e.credits);
            }
        })
    };
    let projected = store.project(credits()).await.expect("project");
    assert_eq!(projected.states, 12);
    let mut steps = store.project_stream(credits(), 1);
    let mut done = None;
    while let Some(step) = steps.next().await {
        if let ProjectionStep::Done(projection) = step.expect("step") {
            done = Some(projection.states);
        }
    }
    assert_eq!(done, Some(12), "project_stream");

    // subscriptions
    let subscription = crablet::decode_stream::<CourseEvent>(crablet::subscribe(
        store.clone(),
        &query,
        None,
        crablet::SubscribeOptions::default(),
    ));
    let seen: Vec<CourseEvent> = subscription
        .take(4)
        .map(|item| item.expect("subscription item").event)
        .collect()
        .await;
    assert_eq!(seen, expected, "subscription");

    // handlers receive raw batches: decode_all
    let batch = store
        .query(&query, ReadOptions::default())
        .await
        .expect("raw batch");
    assert_eq!(
        decode_all::<CourseEvent>(&batch).expect("decode_all"),
        expected
    );

    // command handlers read through their session
    let count = handler_fn(|_: &Command<()>, reader| {
        Box::pin(async move {
            let query = Query::of::<Enrolled>();
            let read = reader
                .query_typed::<Enrolled>(&query, ReadOptions::default())
                .await?;
            let credits: Vec<u8> = read.iter().map(|t| t.event.credits).collect();
            assert_eq!(credits, [3, 3, 6]);
            Ok::<_, HandlerError>(Decision::nothing())
        })
    });
    Scenario::on(store.clone())
        .when_command(Command::new("Count", ()), &count)
        .await
        .then_nothing()
        .await;
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(event_type = "StudentEnrolled")]
struct EnrolledV1Only {
    #[crablet(tag)]
    course_id: String,
}

async fn bad_events_fail_with_a_typed_error_naming_them(store: Arc<dyn EventStore>) {
    let cursor = store
        .append(vec![NewEvent::builder("CourseDefined")
            .tag("course_id", "c1")
            .data(&json!({ "capacity": "thirty" }))
            .build()
            .expect("event")])
        .await
        .expect("append");
    let decode = |result: Result<Vec<TypedEvent<CourseDefined>>, Error>| match result {
        Err(Error::Decode(err)) => *err,
        other => panic!("expected a decode error, got {other:?}"),
    };
    let err = decode(
        store
            .query_typed::<CourseDefined>(&Query::all(), ReadOptions::default())
            .await,
    );
    assert_eq!(err.cursor, cursor);
    assert_eq!(err.event_type, "CourseDefined");
    assert!(err.target.ends_with("CourseDefined"), "{}", err.target);
    assert!(
        matches!(&err.kind, crablet::DecodeErrorKind::Payload { reason } if reason.contains("capacity") || reason.contains("thirty") || reason.contains("invalid type")),
        "{err}"
    );
    assert!(err.to_string().contains(&cursor.to_string()), "{err}");

    // An event of another type, a missing tag, a tag that does not parse, a newer version.
    let others = vec![
        NewEvent::builder("Unrelated").build().expect("event"),
        NewEvent::builder("StudentEnrolled")
            .tag("course_id", "c1")
            .data(&json!({ "credits": 4 }))
            .metadata(&json!({ "schema_version": 2 }))
            .build()
            .expect("event"),
        NewEvent::builder("StudentEnrolled")
            .tag("course_id", "c1")
            .tag("student_id", "s9")
            .data(&json!({ "credits": 4 }))
            .metadata(&json!({ "schema_version": 2 }))
            .build()
            .expect("event"),
        NewEvent::builder("StudentEnrolled")
            .tag("course_id", "c1")
            .tag("student_id", "student-s9")
            .data(&json!({ "credits": 4 }))
            .metadata(&json!({ "schema_version": 3 }))
            .build()
            .expect("event"),
    ];
    store.append(others).await.expect("append others");
    let raw = store
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("raw");
    let kinds: Vec<crablet::DecodeErrorKind> = raw[1..]
        .iter()
        .map(|event| match Enrolled::decode(event) {
            Err(Error::Decode(err)) => {
                assert_eq!(err.cursor, event.cursor);
                err.kind
            }
            other => panic!("expected a decode error, got {other:?}"),
        })
        .collect();
    assert!(
        matches!(&kinds[0], crablet::DecodeErrorKind::UnknownType { expected } if expected == &["StudentEnrolled".to_string()]),
        "{kinds:?}"
    );
    assert!(
        matches!(&kinds[1], crablet::DecodeErrorKind::MissingTag { key } if key == "student_id")
    );
    assert!(matches!(&kinds[2], crablet::DecodeErrorKind::BadTag { value, .. } if value == "s9"));
    assert!(matches!(
        &kinds[3],
        crablet::DecodeErrorKind::NewerVersion {
            found: 3,
            current: 2
        }
    ));
    // A version-2 event read by a type that only knows version 1 has no way down.
    assert!(matches!(
        EnrolledV1Only::decode(&raw[2]),
        Err(Error::Decode(err)) if matches!(err.kind, crablet::DecodeErrorKind::NewerVersion { found: 2, current: 1 })
    ));

    // Metadata: merged with the version, which it may not set itself.
    let with_metadata = enrolled("c1", "s1", 1)
        .encode_with_metadata(json!({ "user": "alice" }))
        .expect("metadata");
    assert_eq!(
        with_metadata.metadata,
        Some(json!({ "user": "alice", "schema_version": 2 }))
    );
    let reserved = enrolled("c1", "s1", 1).encode_with_metadata(json!({ "schema_version": 7 }));
    assert!(
        matches!(reserved, Err(Error::Validation(_))),
        "{reserved:?}"
    );
}

/// A named decision model: the same read and condition as the tuple it replaces.
#[derive(DecisionModel)]
struct Subscription {
    course: StateProjector<Option<CourseDefined>>,
    enrolled: StateProjector<u64>,
    already: StateProjector<bool>,
}

fn subscription(course: &str, student: &str) -> Subscription {
    let enrolled = QueryItem::of::<Enrolled>().tag("course_id", course);
    Subscription {
        course: StateProjector::last_typed(
            QueryItem::of::<CourseDefined>().tag("course_id", course),
        ),
        enrolled: StateProjector::counter(Query::from(enrolled.clone())),
        already: StateProjector::exists(Query::from(
            enrolled.tag("student_id", StudentId(student.into()).to_tag_value()),
        )),
    }
}

async fn named_decision_model_folds_in_one_read(store: Arc<dyn EventStore>) {
    store
        .append(
            crablet::encode_all(&[defined("c1", 2), enrolled("c1", "s1", 3), defined("c2", 9)])
                .expect("encode"),
        )
        .await
        .expect("append");
    let model = store
        .project(subscription("c1", "s2"))
        .await
        .expect("project");
    let SubscriptionState {
        course,
        enrolled: count,
        already,
    } = model.states;
    assert_eq!(course.map(|c| c.capacity), Some(2));
    assert_eq!((count, already), (1, false));
    assert_eq!(
        model.events_read, 2,
        "one read of the model's combined query"
    );

    let tuple = {
        let Subscription {
            course,
            enrolled,
            already,
        } = subscription("c1", "s2");
        store
            .project((course, enrolled, already))
            .await
            .expect("tuple")
    };
    assert_eq!(tuple.condition, model.condition);

    // The condition protects every field: an enrollment into c1 conflicts, one into c2 not.
    let decision = crablet::encode_all(&[enrolled("c1", "s2", 3)]).expect("encode");
    store
        .append(vec![enrolled("c2", "s7", 3).encode().expect("encode")])
        .await
        .expect("c2");
    store
        .append_if(decision.clone(), model.condition.clone())
        .await
        .expect("an append outside the boundary does not conflict");
    let again = store.append_if(decision, model.condition).await;
    assert!(again.expect_err("stale").is_conflict());
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct InvoiceCreated {
    #[crablet(tag)]
    invoice_number: u64,
}

/// The next invoice number: only the newest invoice matters, read backwards with limit 1.
async fn next_invoice_number(store: &dyn EventStore) -> Result<(), Error> {
    let newest = store
        .project(StateProjector::<Option<InvoiceCreated>>::last_typed(
            Query::of::<InvoiceCreated>(),
        ))
        .await?;
    assert!(
        newest.events_read <= 1,
        "a newest-only projector reads one event"
    );
    let next = newest.states.map_or(1, |last| last.invoice_number + 1);
    let invoice = InvoiceCreated {
        invoice_number: next,
    };
    store
        .append_if(vec![invoice.encode()?], newest.condition)
        .await
        .map(|_| ())
}

async fn newest_only_decisions_stay_consistent_under_concurrency(store: Arc<dyn EventStore>) {
    const WRITERS: usize = 8;
    const ROUNDS: usize = 5;
    for _ in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(WRITERS));
        let mut tasks = Vec::new();
        for _ in 0..WRITERS {
            let (store, barrier) = (store.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                next_invoice_number(store.as_ref()).await
            }));
        }
        let mut won = 0;
        for task in tasks {
            match task.await.expect("task") {
                Ok(()) => won += 1,
                Err(err) => assert!(err.is_conflict(), "{err}"),
            }
        }
        assert!(won >= 1, "some writer of every round wins");
    }
    let invoices = store
        .query_typed::<InvoiceCreated>(&Query::of::<InvoiceCreated>(), ReadOptions::default())
        .await
        .expect("invoices");
    let numbers: Vec<u64> = invoices.iter().map(|i| i.event.invoice_number).collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "invoice numbers are gapless and unique");
}

#[derive(Debug, thiserror::Error)]
#[error("course {0} is full")]
struct CourseFull(String);

async fn given_when_then_on_commands(store: Arc<dyn EventStore>) {
    let subscribe = handler_fn(|command: &Command<(String, String)>, reader| {
        Box::pin(async move {
            let (course, student) = &command.payload;
            let model = reader.project(subscription(course, student)).await?;
            let capacity = model.states.course.map_or(0, |c| c.capacity);
            if model.states.enrolled >= u64::from(capacity) {
                return Err(reject(CourseFull(course.clone())));
            }
            let event = enrolled(course, student, 3);
            Ok::<_, HandlerError<CourseFull>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    });
    let command = |course: &str, student: &str| {
        Command::new("Subscribe", (course.to_string(), student.to_string()))
    };
    let history = [defined("c1", 1)];
    Scenario::on(store.clone())
        .given_typed(&history)
        .await
        .when_command(command("c1", "s1"), &subscribe)
        .await
        .then_typed(&[enrolled("c1", "s1", 3)])
        .await;
    let err = Scenario::on(store.clone())
        .given_typed(&[defined("c2", 1), enrolled("c2", "s1", 3)])
        .await
        .when_command(command("c2", "s2"), &subscribe)
        .await
        .then_error("course c2 is full")
        .await;
    assert!(matches!(err, CommandError::Rejected(CourseFull(_))));
}

/// Rooms were once reserved with `places`; they are booked with `seats` now, still at
/// version 1: a rename that reshapes without a new version.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(upcasters = booked_upcasters)]
struct RoomBooked {
    #[crablet(tag)]
    room: String,
    seats: u32,
}

fn booked_upcasters() -> Upcasters {
    Upcasters::new().rename_with("RoomReserved", "RoomBooked", |mut data| {
        let places = data["places"].take();
        Ok(json!({ "seats": places }))
    })
}

/// The same change written as a step on the old name: the step yields version 2.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(event_type = "RoomBooked", upcasters = stepped_upcasters)]
struct RoomBookedByStep {
    #[crablet(tag)]
    room: String,
    seats: u32,
}

fn stepped_upcasters() -> Upcasters {
    Upcasters::new()
        .step("RoomReserved", 1, |mut data| {
            let places = data["places"].take();
            Ok(json!({ "seats": places }))
        })
        .rename("RoomReserved", "RoomBooked")
}

async fn a_rename_can_reshape_without_a_new_version(store: Arc<dyn EventStore>) {
    let old = NewEvent::builder("RoomReserved")
        .tag("room", "r1")
        .data(&json!({ "places": 12 }))
        .build()
        .expect("event");
    let new = RoomBooked {
        room: "r2".into(),
        seats: 4,
    };
    store
        .append(vec![old, new.encode().expect("encode")])
        .await
        .expect("append");
    let booked = store
        .query_typed::<RoomBooked>(&Query::of::<RoomBooked>(), ReadOptions::default())
        .await
        .expect("both decode");
    let booked: Vec<RoomBooked> = booked.into_iter().map(|e| e.event).collect();
    assert_eq!(
        booked,
        [
            RoomBooked {
                room: "r1".into(),
                seats: 12
            },
            new
        ]
    );
    // The step on the old name overshoots, and the error says so rather than asking for newer
    // code.
    let err = store
        .query_typed::<RoomBookedByStep>(&Query::types(["RoomReserved"]), ReadOptions::default())
        .await
        .expect_err("the step yields version 2");
    let Error::Decode(err) = err else {
        panic!("expected a decode error, got {err:?}")
    };
    assert_eq!(
        err.kind,
        crablet::DecodeErrorKind::UpcastPastCurrent {
            stored: 1,
            reached: 2,
            current: 1
        }
    );
    assert!(err.to_string().contains("rename_with"), "{err}");
    assert!(!err.to_string().contains("deploy"), "{err}");
}

async fn no_kinds_is_refused_and_one_kind_selects_it(store: Arc<dyn EventStore>) {
    store
        .append(crablet::encode_all(&[defined("c1", 3), enrolled("c1", "s1", 3)]).expect("encode"))
        .await
        .expect("append");
    let err = QueryItem::of_kinds(Vec::<CourseEventKind>::new()).expect_err("no kinds");
    assert_eq!(
        err.as_validation().expect("validation").kind,
        crablet::ValidationKind::EmptyQuery
    );
    let item = QueryItem::of_kinds([CourseEventKind::Defined]).expect("one kind");
    let events = store
        .query_typed::<CourseEvent>(&Query::from(item), ReadOptions::default())
        .await
        .expect("query");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, defined("c1", 3));
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct TemperatureRecorded {
    #[crablet(tag)]
    sensor: String,
    celsius: f64,
}

async fn non_finite_floats_write_nothing(store: Arc<dyn EventStore>) {
    // The command's payload says whether the sensor failed; the handler then computes NaN.
    let record = handler_fn(|command: &Command<bool>, _reader| {
        Box::pin(async move {
            let failed = command.payload;
            let event = TemperatureRecorded {
                sensor: "t1".into(),
                celsius: if failed { f64::NAN } else { 21.5 },
            };
            Ok::<_, HandlerError>(Decision::append_typed(&[event])?)
        })
    });
    let executor = crablet::command::CommandExecutor::new(store.clone());
    executor
        .execute(Command::new("Record", false), &record)
        .await
        .expect("a finite temperature is recorded");
    let err = executor
        .execute(Command::new("Record", true), &record)
        .await
        .expect_err("NaN has no JSON");
    let validation = err.as_validation().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(validation.kind, crablet::ValidationKind::NonFiniteFloat);
    assert!(validation.message.contains("TemperatureRecorded"), "{err}");
    let all = store
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(all.len(), 1, "only the finite one: {all:?}");
    assert_eq!(all[0].data, json!({ "celsius": 21.5 }));
}

async fn vec_tag_values_must_be_distinct_and_non_empty(store: Arc<dyn EventStore>) {
    let renamed = |keywords: &[&str]| CourseEvent::CourseRenamed {
        course_id: "c1".into(),
        title: "Databases".into(),
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
        term: None,
    };
    for (keywords, kind) in [
        (&["sql", "sql"][..], crablet::ValidationKind::DuplicateTag),
        (&["sql", ""][..], crablet::ValidationKind::EmptyTagValue),
    ] {
        let event = renamed(keywords)
            .encode()
            .expect("encoding does not check tags");
        let err = store.append(vec![event]).await.expect_err("invalid tags");
        let validation = err.as_validation().unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(validation.kind, kind, "{keywords:?}: {err}");
        assert!(validation.field.starts_with("events[0].tags[2]"), "{err}");
    }
    let all = store
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("read");
    assert!(all.is_empty(), "nothing was written: {all:?}");
    // No values at all is fine: no tag of that key.
    store
        .append(vec![renamed(&[]).encode().expect("encode")])
        .await
        .expect("no keywords");
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct Heartbeat;

async fn unit_events_read_back_exactly_the_empty_object(store: Arc<dyn EventStore>) {
    store
        .append(vec![
            Heartbeat.encode().expect("encode"),
            NewEvent::new("Heartbeat", vec![], json!(null)),
        ])
        .await
        .expect("append");
    let query = Query::of::<Heartbeat>();
    let first = store
        .query_typed::<Heartbeat>(&query, ReadOptions::default().limit(1))
        .await
        .expect("the encoded heartbeat decodes");
    assert_eq!(first[0].event, Heartbeat);
    let err = store
        .query_typed::<Heartbeat>(&query, ReadOptions::default())
        .await
        .expect_err("a null payload is not a Heartbeat's");
    assert!(
        err.to_string().contains(
            "Heartbeat has no payload fields, so its payload is the empty object {}, not null"
        ),
        "{err}"
    );
}

async fn scenario_checks_only_what_when_appended(store: Arc<dyn EventStore>) {
    let noise = || {
        NewEvent::builder("Noise")
            .tag("source", "elsewhere")
            .build()
            .expect("noise")
    };
    // Another writer appends while the when step runs, before and after its own append.
    let other = store.clone();
    Scenario::on(store.clone())
        .given_typed(&[defined("c9", 1)])
        .await
        .when(|store| async move {
            other.append(vec![noise()]).await?;
            let cursor = store
                .append(crablet::encode_all(&[enrolled("c9", "s1", 3)])?)
                .await?;
            other.append(vec![noise(), noise()]).await?;
            Ok::<_, Error>(cursor)
        })
        .await
        .then_typed(&[enrolled("c9", "s1", 3)])
        .await;

    // A command whose handler lets another writer append between its read and its commit.
    let other = store.clone();
    let noisy = handler_fn(move |command: &Command<String>, _reader| {
        let other = other.clone();
        Box::pin(async move {
            other.append(vec![noise()]).await?;
            Ok::<_, HandlerError>(Decision::append_typed(&[defined(&command.payload, 2)])?)
        })
    });
    Scenario::on(store.clone())
        .when_command(Command::new("Define", "c10".to_string()), &noisy)
        .await
        .then_typed(&[defined("c10", 2)])
        .await;
    let err = Scenario::on(store.clone())
        .when(|_| async move {
            store.append(vec![noise()]).await?;
            Err::<(), _>(Error::Config {
                field: "test",
                reason: "the when step failed".into(),
            })
        })
        .await
        .then_error_where(|err| matches!(err, Error::Config { .. }), "a config error")
        .await;
    assert!(err.to_string().contains("the when step failed"));
}

on_both_backends!(
    round_trip_is_exact,
    old_events_are_upcast_on_every_read_path,
    bad_events_fail_with_a_typed_error_naming_them,
    named_decision_model_folds_in_one_read,
    newest_only_decisions_stay_consistent_under_concurrency,
    given_when_then_on_commands,
    a_rename_can_reshape_without_a_new_version,
    no_kinds_is_refused_and_one_kind_selects_it,
    non_finite_floats_write_nothing,
    vec_tag_values_must_be_distinct_and_non_empty,
    unit_events_read_back_exactly_the_empty_object,
    scenario_checks_only_what_when_appended,
);
