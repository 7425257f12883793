//! A decision model: several projectors folded in one read, and the condition that read returns.
//!
//! To enroll a student in a course we need three facts: the course's capacity, how many students
//! are enrolled, and whether this student already is. Three projectors, a tuple, ONE read of the
//! union of their queries. `project` returns the three states and an `AppendCondition` (that
//! union, after the last event read); appending with it succeeds only if nothing relevant to any
//! of the three facts was appended since.
//!
//! The decision is written twice, and both versions run side by side on the same log:
//! - with the dynamic API: event types and tags spelled as strings (`QueryItem::new().types(..)`),
//!   the course's payload deserialized by `last_data`, the states a tuple `(course, count,
//!   already)`;
//! - with typed events (`#[derive(DomainEvent)]` structs `CourseDefined` and `StudentEnrolled`,
//!   the ids as tag fields, queried with `QueryItem::of::<T>()`) and a named decision model
//!   (`#[derive(DecisionModel)] struct EnrollmentDecision`), whose states come back as the
//!   generated struct `EnrollmentDecisionState` with one named field per projector.
//!
//! At every decision the example projects both and checks that they give the same states and
//! the same append condition (same query items, same cursor): a named decision model is folded
//! in one read with one condition, exactly like the tuple. The typed `StudentEnrolled` also
//! encodes to the very event the dynamic builder makes.
//!
//! The example shows the three outcomes:
//! 1. nobody interferes: the append succeeds;
//! 2. an unrelated writer (another course) slips in: the append still succeeds, because the
//!    consistency boundary is only what the decision read;
//! 3. a relevant writer (an enrollment into the same course) slips in: the append fails with a
//!    conflict and writes nothing; deciding again on fresh state refuses the enrollment, since
//!    the course is now full. Without the condition the course would have been overbooked. The
//!    typed model's condition, being the same, conflicts the same way.
//!
//! ```text
//! cargo run --example decision_model
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example decision_model
//! ```
mod common;

use common::{check, AnyError};
use crablet::{
    DecisionModel, DomainEvent, EventReaderExt, EventStore, NewEvent, Projection, Query, QueryItem,
    ReadOptions, StateProjector,
};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;

const COURSE_DEFINED: &str = "CourseDefined";
const ENROLLED: &str = "StudentEnrolled";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Course {
    course_id: String,
    capacity: u64,
}

fn define(course_id: &str, capacity: u64) -> Result<NewEvent, crablet::Error> {
    NewEvent::builder(COURSE_DEFINED)
        .tag("course_id", course_id)
        .data(&Course {
            course_id: course_id.into(),
            capacity,
        })
        .build()
}

fn enrollment(course_id: &str, student_id: &str) -> Result<NewEvent, crablet::Error> {
    NewEvent::builder(ENROLLED)
        .tag("course_id", course_id)
        .tag("student_id", student_id)
        .build()
}

/// (capacity, enrolled count, this student enrolled?)
type States = (Option<Course>, u64, bool);

/// The decision model of "enroll `student` in `course`": three projectors, one read.
async fn decide(
    store: &dyn EventStore,
    course: &str,
    student: &str,
) -> Result<Projection<States>, crablet::Error> {
    let definition = QueryItem::new()
        .types([COURSE_DEFINED])
        .tag("course_id", course);
    let enrolled = QueryItem::new().types([ENROLLED]).tag("course_id", course);
    let this_student = enrolled.clone().tag("student_id", student);
    let projection = store
        .project((
            StateProjector::<Option<Course>>::last_data(Query::from(definition)),
            StateProjector::counter(Query::from(enrolled)),
            StateProjector::exists(Query::from(this_student)),
        ))
        .await?;
    let (capacity, count, already) = &projection.states;
    println!(
        "  decision model for {student} in {course}: capacity {}, {count} enrolled, {student} enrolled: {already}",
        capacity.as_ref().map_or(0, |c| c.capacity),
    );
    println!(
        "    one read, {} event(s); condition: {} query items, after {}",
        projection.events_read,
        projection.condition.fail_if_events_match.items.len(),
        projection
            .condition
            .after
            .map_or("the beginning".to_string(), |c| c.to_string()),
    );
    Ok(projection)
}

/// Whether the model allows the enrollment.
fn allows(states: &States) -> bool {
    let (course, count, already) = states;
    matches!(course, Some(course) if *count < course.capacity) && !already
}

// ---------------------------------------------------------------------------------------------
// The same decision with typed events and a named decision model.
// ---------------------------------------------------------------------------------------------

/// `CourseDefined`, typed: the course id is a tag, the capacity the payload. It decodes the
/// events `define` appends (their payload's extra `course_id` is ignored).
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct CourseDefined {
    #[crablet(tag)]
    course_id: String,
    capacity: u64,
}

/// `StudentEnrolled`, typed: both ids are tags, there is no payload.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct StudentEnrolled {
    #[crablet(tag)]
    course_id: String,
    #[crablet(tag)]
    student_id: String,
}

/// The decision model of "enroll `student` in `course`", named: the same three projectors,
/// folded in one read with one condition, their states in `EnrollmentDecisionState`.
#[derive(DecisionModel)]
struct EnrollmentDecision {
    /// The course's definition (its capacity), if it is defined.
    course: StateProjector<Option<CourseDefined>>,
    /// How many students are enrolled in the course.
    enrolled: StateProjector<u64>,
    /// Whether this student is enrolled in it already.
    already: StateProjector<bool>,
}

impl EnrollmentDecision {
    fn new(course: &str, student: &str) -> Self {
        let enrolled = QueryItem::of::<StudentEnrolled>().tag("course_id", course);
        let this_student = enrolled.clone().tag("student_id", student);
        EnrollmentDecision {
            course: StateProjector::last_typed(
                QueryItem::of::<CourseDefined>().tag("course_id", course),
            ),
            enrolled: StateProjector::counter(Query::from(enrolled)),
            already: StateProjector::exists(Query::from(this_student)),
        }
    }
}

impl EnrollmentDecisionState {
    /// Whether the model allows the enrollment.
    fn allows(&self) -> bool {
        matches!(&self.course, Some(course) if self.enrolled < course.capacity) && !self.already
    }
}

/// Projects the typed model next to the dynamic `decision` and checks that both decide alike.
async fn decide_typed(
    store: &dyn EventStore,
    course: &str,
    student: &str,
    decision: &Projection<States>,
) -> Result<Projection<EnrollmentDecisionState>, AnyError> {
    let typed = store
        .project(EnrollmentDecision::new(course, student))
        .await?;
    println!("    typed: {:?}", typed.states);
    let (dynamic_course, count, already) = &decision.states;
    let same_states = dynamic_course
        .as_ref()
        .map(|c| (c.course_id.as_str(), c.capacity))
        == typed
            .states
            .course
            .as_ref()
            .map(|c| (c.course_id.as_str(), c.capacity))
        && *count == typed.states.enrolled
        && *already == typed.states.already
        && allows(&decision.states) == typed.states.allows();
    check(
        same_states
            && typed.condition == decision.condition
            && typed.events_read == decision.events_read,
        "the typed decision model gives the same states and the same condition",
    )?;
    Ok(typed)
}

async fn run() -> Result<(), AnyError> {
    let backend = common::open("decision_model").await?;
    let store = backend.store.as_ref();
    store
        .append(vec![
            define("c1-databases", 3)?,
            define("c2-compilers", 30)?,
        ])
        .await?;
    println!("courses: c1-databases (capacity 3), c2-compilers (capacity 30)");
    let typed_alice = StudentEnrolled {
        course_id: "c1-databases".into(),
        student_id: "alice".into(),
    };
    check(
        typed_alice.encode()? == enrollment("c1-databases", "alice")?,
        "the typed StudentEnrolled encodes to the event the dynamic builder makes",
    )?;

    println!("1. alice enrolls in c1 while nobody interferes:");
    let decision = decide(store, "c1-databases", "alice").await?;
    decide_typed(store, "c1-databases", "alice", &decision).await?;
    check(allows(&decision.states), "the model allows alice")?;
    store
        .append_if(
            vec![enrollment("c1-databases", "alice")?],
            decision.condition,
        )
        .await?;
    println!("  appended with the decision's condition");

    println!("2. bob decides on c1; meanwhile dave enrolls in c2 (outside bob's boundary):");
    let decision = decide(store, "c1-databases", "bob").await?;
    decide_typed(store, "c1-databases", "bob", &decision).await?;
    store
        .append(vec![enrollment("c2-compilers", "dave")?])
        .await?;
    let bob = store
        .append_if(vec![enrollment("c1-databases", "bob")?], decision.condition)
        .await;
    println!(
        "  bob's append: {}",
        match &bob {
            Ok(cursor) => format!("succeeded at {cursor}"),
            Err(err) => format!("failed: {err}"),
        }
    );
    check(
        bob.is_ok(),
        "an append outside the decision's boundary causes no conflict",
    )?;

    println!("3. carol decides on c1 (one seat left); meanwhile erin takes that seat:");
    let decision = decide(store, "c1-databases", "carol").await?;
    let typed = decide_typed(store, "c1-databases", "carol", &decision).await?;
    check(allows(&decision.states), "the model allows carol")?;
    store
        .append(vec![enrollment("c1-databases", "erin")?])
        .await?;
    println!("  erin enrolled in c1-databases");
    let carol = store
        .append_if(
            vec![enrollment("c1-databases", "carol")?],
            decision.condition,
        )
        .await;
    match &carol {
        Ok(cursor) => println!("  carol's append succeeded at {cursor}"),
        Err(err) => println!("  carol's append failed: {err}"),
    }
    check(
        carol.as_ref().is_err_and(|e| e.is_conflict()),
        "the append on the stale decision fails with a conflict",
    )?;
    let typed_carol = StudentEnrolled {
        course_id: "c1-databases".into(),
        student_id: "carol".into(),
    };
    let carol_typed = store
        .append_if(vec![typed_carol.encode()?], typed.condition)
        .await;
    check(
        carol_typed.is_err_and(|e| e.is_conflict()),
        "the typed model's stale condition conflicts too",
    )?;
    println!("  carol decides again on fresh state:");
    let decision = decide(store, "c1-databases", "carol").await?;
    decide_typed(store, "c1-databases", "carol", &decision).await?;
    check(
        !allows(&decision.states),
        "the fresh model refuses carol: the course is full",
    )?;

    println!("reading the log back:");
    let enrolled_in =
        |course: &str| Query::from(QueryItem::new().types([ENROLLED]).tag("course_id", course));
    let c1 = store
        .query(&enrolled_in("c1-databases"), ReadOptions::default())
        .await?;
    let c2 = store
        .query(&enrolled_in("c2-compilers"), ReadOptions::default())
        .await?;
    let students = |events: &[crablet::Event]| {
        events
            .iter()
            .filter_map(|e| e.tag("student_id").map(str::to_string))
            .collect::<Vec<_>>()
    };
    println!("  c1-databases: {:?}", students(&c1));
    println!("  c2-compilers: {:?}", students(&c2));
    check(
        students(&c1) == ["alice", "bob", "erin"] && students(&c2) == ["dave"],
        "c1 is full but not over capacity; the conflicting append wrote nothing",
    )?;
    let typed_c1 = store
        .query_typed::<StudentEnrolled>(
            &Query::from(QueryItem::of::<StudentEnrolled>().tag("course_id", "c1-databases")),
            ReadOptions::default(),
        )
        .await?;
    let typed_students: Vec<&str> = typed_c1
        .iter()
        .map(|e| e.event.student_id.as_str())
        .collect();
    check(
        typed_students == students(&c1),
        "read typed, c1 holds the same students",
    )?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run()).await
}
