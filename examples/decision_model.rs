//! A decision model: several projectors folded in one read, and the condition that read returns.
//!
//! To enroll a student in a course we need three facts: the course's capacity, how many students
//! are enrolled, and whether this student already is. Three projectors, a tuple, ONE read of the
//! union of their queries. `project` returns the three states and an `AppendCondition` (that
//! union, after the last event read); appending with it succeeds only if nothing relevant to any
//! of the three facts was appended since.
//!
//! The example shows the three outcomes:
//! 1. nobody interferes: the append succeeds;
//! 2. an unrelated writer (another course) slips in: the append still succeeds, because the
//!    consistency boundary is only what the decision read;
//! 3. a relevant writer (an enrollment into the same course) slips in: the append fails with a
//!    conflict and writes nothing; deciding again on fresh state refuses the enrollment, since
//!    the course is now full. Without the condition the course would have been overbooked.
//!
//! ```text
//! cargo run --example decision_model
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example decision_model
//! ```
mod common;

use common::{check, AnyError};
use crablet::{
    EventReaderExt, EventStore, NewEvent, Projection, Query, QueryItem, ReadOptions, StateProjector,
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

    println!("1. alice enrolls in c1 while nobody interferes:");
    let decision = decide(store, "c1-databases", "alice").await?;
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
    println!("  carol decides again on fresh state:");
    let decision = decide(store, "c1-databases", "carol").await?;
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
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run()).await
}
