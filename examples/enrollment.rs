//! Course enrollment under concurrency: courses with a capacity, students, enroll and unenroll.
//!
//! The rules, each enforced by a decision model and the append condition it returns:
//! - a course or a student is defined only once (also when definitions race);
//! - a student enrolls only in an existing course, only once at a time, only while the course
//!   has a free seat, and in at most `MAX_COURSES_PER_STUDENT` courses;
//! - a student unenrolls only from a course they are enrolled in.
//!
//! The events are typed (`#[derive(DomainEvent)]` structs, with the course and student ids as
//! tags), and the enrollment decision is a named decision model (`#[derive(DecisionModel)]`):
//! five projectors folded in one read, whose states come back by name. Hundreds of commands race
//! through a `CommandExecutor` with a `RetryPolicy`. The handlers are written as `CommandHandler`
//! implementations that refuse with `reject(..)`. At the end the whole log is folded from the
//! first event, checking every rule at every event in log order; the example exits non-zero if
//! one was ever broken.
//!
//! ```text
//! cargo run --example enrollment
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example enrollment
//! ```
mod common;

use async_trait::async_trait;
use common::{check, check_none, AnyError, Interleaving};
use crablet::command::{
    reject, Command, CommandError, CommandExecutor, CommandHandler, CommandOutcome, Decision,
    HandlerResult, RetryPolicy,
};
use crablet::{
    DecisionModel, DomainEvent, Event, EventReader, EventReaderExt, Query, QueryItem,
    StateProjector, Tag,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_COURSES_PER_STUDENT: u32 = 3;
const COURSES: [(&str, u32); 6] = [
    ("c1-rust", 10),
    ("c2-sql", 15),
    ("c3-math", 12),
    ("c4-art", 8),
    ("c5-music", 20),
    ("c6-chess", 5),
];
const STUDENTS: usize = 30;
const REQUESTS_PER_STUDENT: usize = 5;

// ---------------------------------------------------------------------------------------------
// Events, commands and business errors.
// ---------------------------------------------------------------------------------------------

/// A course was defined with its capacity. The id is a tag: queries select a course's events.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct CourseDefined {
    #[crablet(tag)]
    course_id: String,
    capacity: u32,
}

/// A student was registered.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct StudentRegistered {
    #[crablet(tag)]
    student_id: String,
}

/// A student took a seat in a course. Tagged with both ids, the event belongs to the consistency
/// boundary of the course (its seats) and to that of the student (their courses).
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct StudentEnrolledInCourse {
    #[crablet(tag)]
    course_id: String,
    #[crablet(tag)]
    student_id: String,
}

/// A student gave their seat in a course back.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct StudentUnenrolledFromCourse {
    #[crablet(tag)]
    course_id: String,
    #[crablet(tag)]
    student_id: String,
}

/// The events that change who sits in which course.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum SeatChange {
    Enrolled(StudentEnrolledInCourse),
    Unenrolled(StudentUnenrolledFromCourse),
}

/// Every event of the example, as the audit reads them back.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum SchoolEvent {
    Course(CourseDefined),
    Student(StudentRegistered),
    Enrolled(StudentEnrolledInCourse),
    Unenrolled(StudentUnenrolledFromCourse),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DefineCourse {
    course_id: String,
    capacity: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RegisterStudent {
    student_id: String,
}

/// Payload of `Enroll` and `Unenroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Enrollment {
    student_id: String,
    course_id: String,
}

#[derive(Debug)]
enum Refusal {
    CourseExists(String),
    StudentExists(String),
    NoSuchCourse(String),
    NoSuchStudent(String),
    AlreadyEnrolled,
    CourseFull { capacity: u32 },
    TooManyCourses,
    NotEnrolled,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::CourseExists(id) => write!(f, "course {id} already exists"),
            Refusal::StudentExists(id) => write!(f, "student {id} already exists"),
            Refusal::NoSuchCourse(id) => write!(f, "course {id} does not exist"),
            Refusal::NoSuchStudent(id) => write!(f, "student {id} does not exist"),
            Refusal::AlreadyEnrolled => write!(f, "already enrolled"),
            Refusal::CourseFull { capacity } => write!(f, "course full ({capacity} seats)"),
            Refusal::TooManyCourses => {
                write!(f, "already enrolled in {MAX_COURSES_PER_STUDENT} courses")
            }
            Refusal::NotEnrolled => write!(f, "not enrolled"),
        }
    }
}

impl std::error::Error for Refusal {}

// ---------------------------------------------------------------------------------------------
// Queries, projectors and the enrollment decision model.
// ---------------------------------------------------------------------------------------------

fn course_defined(course_id: &str) -> Query {
    Query::from(QueryItem::of::<CourseDefined>().tag("course_id", course_id))
}

fn student_registered(student_id: &str) -> Query {
    Query::from(QueryItem::of::<StudentRegistered>().tag("student_id", student_id))
}

/// Enrollments minus unenrollments among the seat changes carrying `tags`: the seats taken in a
/// course, the courses of a student, or whether one student is in one course.
fn net_enrollments(tags: impl IntoIterator<Item = Tag>) -> StateProjector<u32> {
    StateProjector::typed(
        QueryItem::of::<SeatChange>().tags(tags),
        0,
        |count, change: &SeatChange| match change {
            SeatChange::Enrolled(_) => *count += 1,
            SeatChange::Unenrolled(_) => *count = count.saturating_sub(1),
        },
    )
}

/// What enrolling a student in a course decides on: five projectors, folded in ONE read, with
/// ONE append condition covering the course's definition and seats, the student's registration
/// and courses. Any enrollment into this course or by this student since the read makes the
/// append fail. The states come back by name (`EnrollDecisionState`), so the three counters
/// cannot be mixed up.
#[derive(DecisionModel)]
struct EnrollDecision {
    /// The course's definition, if it exists.
    course: StateProjector<Option<CourseDefined>>,
    /// Whether the student is registered.
    student_exists: StateProjector<bool>,
    /// The seats taken in the course.
    seats_taken: StateProjector<u32>,
    /// The courses the student is enrolled in.
    student_courses: StateProjector<u32>,
    /// Whether the student is enrolled in this course (1) or not (0).
    enrolled: StateProjector<u32>,
}

impl EnrollDecision {
    fn new(course_id: &str, student_id: &str) -> Self {
        let course_tag = || Tag::new("course_id", course_id);
        let student_tag = || Tag::new("student_id", student_id);
        EnrollDecision {
            course: StateProjector::last_typed(course_defined(course_id)),
            student_exists: StateProjector::exists(student_registered(student_id)),
            seats_taken: net_enrollments([course_tag()]),
            student_courses: net_enrollments([student_tag()]),
            enrolled: net_enrollments([course_tag(), student_tag()]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers.
// ---------------------------------------------------------------------------------------------

struct DefineCourseHandler;

#[async_trait]
impl CommandHandler<DefineCourse> for DefineCourseHandler {
    type Error = Refusal;

    async fn handle(
        &self,
        command: &Command<DefineCourse>,
        reader: &dyn EventReader,
    ) -> HandlerResult<Refusal> {
        let course = &command.payload;
        let model = reader
            .project(StateProjector::exists(course_defined(&course.course_id)))
            .await?;
        if model.states {
            return Err(reject(Refusal::CourseExists(course.course_id.clone())));
        }
        let event = CourseDefined {
            course_id: course.course_id.clone(),
            capacity: course.capacity,
        };
        Ok(Decision::append_typed(&[event])?.guarded_by(model.condition))
    }
}

struct RegisterStudentHandler;

#[async_trait]
impl CommandHandler<RegisterStudent> for RegisterStudentHandler {
    type Error = Refusal;

    async fn handle(
        &self,
        command: &Command<RegisterStudent>,
        reader: &dyn EventReader,
    ) -> HandlerResult<Refusal> {
        let student = &command.payload;
        let model = reader
            .project(StateProjector::exists(student_registered(
                &student.student_id,
            )))
            .await?;
        if model.states {
            return Err(reject(Refusal::StudentExists(student.student_id.clone())));
        }
        let event = StudentRegistered {
            student_id: student.student_id.clone(),
        };
        Ok(Decision::append_typed(&[event])?.guarded_by(model.condition))
    }
}

struct EnrollHandler;

#[async_trait]
impl CommandHandler<Enrollment> for EnrollHandler {
    type Error = Refusal;

    async fn handle(
        &self,
        command: &Command<Enrollment>,
        reader: &dyn EventReader,
    ) -> HandlerResult<Refusal> {
        let Enrollment {
            student_id,
            course_id,
        } = &command.payload;
        let model = reader
            .project(EnrollDecision::new(course_id, student_id))
            .await?;
        let EnrollDecisionState {
            course,
            student_exists,
            seats_taken,
            student_courses,
            enrolled,
        } = model.states;
        let Some(course) = course else {
            return Err(reject(Refusal::NoSuchCourse(course_id.clone())));
        };
        if !student_exists {
            return Err(reject(Refusal::NoSuchStudent(student_id.clone())));
        }
        if enrolled > 0 {
            return Err(reject(Refusal::AlreadyEnrolled));
        }
        if seats_taken >= course.capacity {
            return Err(reject(Refusal::CourseFull {
                capacity: course.capacity,
            }));
        }
        if student_courses >= MAX_COURSES_PER_STUDENT {
            return Err(reject(Refusal::TooManyCourses));
        }
        let event = StudentEnrolledInCourse {
            course_id: course_id.clone(),
            student_id: student_id.clone(),
        };
        Ok(Decision::append_typed(&[event])?.guarded_by(model.condition))
    }
}

struct UnenrollHandler;

#[async_trait]
impl CommandHandler<Enrollment> for UnenrollHandler {
    type Error = Refusal;

    async fn handle(
        &self,
        command: &Command<Enrollment>,
        reader: &dyn EventReader,
    ) -> HandlerResult<Refusal> {
        let Enrollment {
            student_id,
            course_id,
        } = &command.payload;
        let model = reader
            .project(net_enrollments([
                Tag::new("course_id", course_id),
                Tag::new("student_id", student_id),
            ]))
            .await?;
        if model.states == 0 {
            return Err(reject(Refusal::NotEnrolled));
        }
        let event = StudentUnenrolledFromCourse {
            course_id: course_id.clone(),
            student_id: student_id.clone(),
        };
        Ok(Decision::append_typed(&[event])?.guarded_by(model.condition))
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands concurrently and tallying their outcomes.
// ---------------------------------------------------------------------------------------------

type Outcome = Result<CommandOutcome, CommandError<Refusal>>;

/// Runs all `commands` at once, each in its own task, released together by a barrier. Returns
/// their outcomes and how many decisions the handler took.
async fn race<T, H>(
    executor: &CommandExecutor,
    handler: H,
    commands: Vec<Command<T>>,
) -> (Vec<Outcome>, u32)
where
    T: Serialize + Send + Sync + 'static,
    H: CommandHandler<T, Error = Refusal> + 'static,
{
    let handler = Arc::new(Interleaving::new(handler));
    let start = Arc::new(tokio::sync::Barrier::new(commands.len()));
    let tasks: Vec<_> = commands
        .into_iter()
        .map(|command| {
            let (executor, handler, start) = (executor.clone(), handler.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                executor.execute(command, &handler).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.expect("command task panicked"));
    }
    (outcomes, handler.decisions())
}

/// Counts of what happened to a wave of commands, by outcome.
#[derive(Default)]
struct Tally {
    commands: usize,
    decisions: u32,
    succeeded: usize,
    refused: BTreeMap<String, usize>,
    gave_up: usize,
}

impl Tally {
    fn of((outcomes, decisions): &(Vec<Outcome>, u32)) -> Result<Self, AnyError> {
        let mut tally = Tally {
            commands: outcomes.len(),
            decisions: *decisions,
            ..Tally::default()
        };
        for outcome in outcomes {
            match outcome {
                Ok(_) => tally.succeeded += 1,
                Err(CommandError::Rejected(reason)) => {
                    let kind = format!("{reason:?}");
                    let kind = kind.split([' ', '(', '{']).next().unwrap_or_default();
                    *tally.refused.entry(kind.to_string()).or_default() += 1;
                }
                // Still conflicting after every retry: nothing was written. Not a broken rule,
                // but with this workload and retry policy it should not happen.
                Err(CommandError::Conflict { .. }) => tally.gave_up += 1,
                Err(other) => return Err(format!("a command failed: {other}").into()),
            }
        }
        Ok(tally)
    }

    fn print(&self, what: &str) {
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        println!(
            "  {what}: {} commands, {} decisions; {} succeeded, refused: {}{}",
            self.commands,
            self.decisions,
            self.succeeded,
            if refused.is_empty() {
                "none".to_string()
            } else {
                refused.join(", ")
            },
            if self.gave_up > 0 {
                format!(", {} gave up after retries", self.gave_up)
            } else {
                String::new()
            },
        );
    }

    fn refused(&self, kind: &str) -> usize {
        self.refused.get(kind).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// The audit: every rule, checked at every event of the whole log, in log order.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Audit {
    capacity: BTreeMap<String, u32>,
    students: BTreeSet<String>,
    /// Current enrollments: (course, student).
    enrolled: BTreeSet<(String, String)>,
    enrollments: usize,
    unenrollments: usize,
    violations: Vec<String>,
}

impl Audit {
    /// Checks one event of the log. An event that does not decode as one of the example's
    /// (an unexpected type, a payload that does not fit) is a violation too.
    fn apply(&mut self, event: &Event) {
        let at = event.cursor;
        let decoded = match SchoolEvent::decode(event) {
            Ok(decoded) => decoded,
            Err(err) => return self.violations.push(format!("{at}: {err}")),
        };
        match decoded {
            SchoolEvent::Course(course) => {
                if self
                    .capacity
                    .insert(course.course_id.clone(), course.capacity)
                    .is_some()
                {
                    self.violations
                        .push(format!("{at}: course {} defined twice", course.course_id));
                }
            }
            SchoolEvent::Student(StudentRegistered { student_id }) => {
                if !self.students.insert(student_id.clone()) {
                    self.violations
                        .push(format!("{at}: student {student_id} registered twice"));
                }
            }
            SchoolEvent::Unenrolled(StudentUnenrolledFromCourse {
                course_id: course,
                student_id: student,
            }) => {
                self.unenrollments += 1;
                if !self.enrolled.remove(&(course.clone(), student.clone())) {
                    self.violations.push(format!(
                        "{at}: {student} left {course} without being enrolled"
                    ));
                }
            }
            SchoolEvent::Enrolled(StudentEnrolledInCourse {
                course_id: course,
                student_id: student,
            }) => {
                self.enrollments += 1;
                let Some(&capacity) = self.capacity.get(&course) else {
                    return self.violations.push(format!(
                        "{at}: {student} enrolled in unknown course {course}"
                    ));
                };
                if !self.students.contains(&student) {
                    self.violations
                        .push(format!("{at}: unknown student {student} enrolled"));
                }
                if !self.enrolled.insert((course.clone(), student.clone())) {
                    self.violations
                        .push(format!("{at}: {student} enrolled twice in {course}"));
                }
                if self.seats_taken(&course) > capacity as usize {
                    self.violations
                        .push(format!("{at}: {course} over capacity {capacity}"));
                }
                if self.courses_of(&student) > MAX_COURSES_PER_STUDENT as usize {
                    self.violations.push(format!(
                        "{at}: {student} in more than {MAX_COURSES_PER_STUDENT} courses"
                    ));
                }
            }
        }
    }

    fn seats_taken(&self, course: &str) -> usize {
        self.enrolled.iter().filter(|(c, _)| c == course).count()
    }

    fn courses_of(&self, student: &str) -> usize {
        self.enrolled.iter().filter(|(_, s)| s == student).count()
    }
}

// ---------------------------------------------------------------------------------------------

fn student_id(n: usize) -> String {
    format!("s{n:02}")
}

async fn run() -> Result<(), AnyError> {
    let started = Instant::now();
    let backend = common::open("enrollment").await?;
    let executor = CommandExecutor::new(backend.store.clone()).with_retry(
        RetryPolicy::attempts(50)
            .initial_backoff(Duration::from_millis(1))
            .max_backoff(Duration::from_millis(20)),
    );
    let mut rng = StdRng::seed_from_u64(7);

    // 1. Courses and students, every definition sent three times at once.
    println!(
        "defining {} courses and registering {STUDENTS} students, each sent 3 times concurrently:",
        COURSES.len()
    );
    let define: Vec<_> = (0..3)
        .flat_map(|_| COURSES.iter())
        .map(|&(id, capacity)| {
            Command::new(
                "DefineCourse",
                DefineCourse {
                    course_id: id.into(),
                    capacity,
                },
            )
        })
        .collect();
    let courses = Tally::of(&race(&executor, DefineCourseHandler, define).await)?;
    courses.print("DefineCourse");
    let register: Vec<_> = (0..3)
        .flat_map(|_| 1..=STUDENTS)
        .map(|n| {
            Command::new(
                "RegisterStudent",
                RegisterStudent {
                    student_id: student_id(n),
                },
            )
        })
        .collect();
    let students = Tally::of(&race(&executor, RegisterStudentHandler, register).await)?;
    students.print("RegisterStudent");
    check(
        courses.succeeded == COURSES.len() && courses.refused("CourseExists") == 2 * COURSES.len(),
        "each course is defined exactly once, its duplicates refused",
    )?;
    check(
        students.succeeded == STUDENTS && students.refused("StudentExists") == 2 * STUDENTS,
        "each student is registered exactly once, the duplicates refused",
    )?;

    // 2. Every student asks for 5 random courses, one of them twice, plus one unknown course;
    //    all requests race.
    let mut requests = Vec::new();
    for n in 1..=STUDENTS {
        let mut wanted: Vec<&str> = COURSES.iter().map(|(id, _)| *id).collect();
        wanted.shuffle(&mut rng);
        wanted.truncate(REQUESTS_PER_STUDENT);
        wanted.push(wanted[0]);
        if n % 10 == 0 {
            wanted.push("c9-unknown");
        }
        for course in wanted {
            requests.push(Enrollment {
                student_id: student_id(n),
                course_id: course.into(),
            });
        }
    }
    requests.shuffle(&mut rng);
    let seats: u32 = COURSES.iter().map(|(_, c)| c).sum();
    println!(
        "{} enrollment requests race ({seats} seats, at most {MAX_COURSES_PER_STUDENT} courses per student):",
        requests.len()
    );
    let commands = requests
        .into_iter()
        .map(|e| Command::new("Enroll", e))
        .collect();
    let enrolls = Tally::of(&race(&executor, EnrollHandler, commands).await)?;
    enrolls.print("Enroll");

    // 3. Some students drop a course (each sends the drop twice) while others, who are not
    //    dropping that course, try to take the freed seats.
    let audit = executor.store().project(audit_projector()).await?.states;
    let mut dropping: Vec<(String, String)> = audit.enrolled.iter().cloned().collect();
    dropping.shuffle(&mut rng);
    dropping.truncate(10);
    let mut leaving = Vec::new();
    let mut joining = Vec::new();
    for (i, (course, student)) in dropping.iter().enumerate() {
        let drop = Enrollment {
            student_id: student.clone(),
            course_id: course.clone(),
        };
        leaving.push(Command::new("Unenroll", drop.clone()));
        leaving.push(Command::new("Unenroll", drop));
        let newcomer = (0..STUDENTS)
            .map(|k| student_id(1 + (i * 7 + k) % STUDENTS))
            .find(|s| !dropping.iter().any(|(c, d)| c == course && d == s))
            .ok_or("no newcomer available")?;
        joining.push(Command::new(
            "Enroll",
            Enrollment {
                student_id: newcomer,
                course_id: course.clone(),
            },
        ));
    }
    println!(
        "{} students drop a course (sending the drop twice) while {} others try to enroll:",
        dropping.len(),
        joining.len()
    );
    let (left, late) = tokio::join!(
        race(&executor, UnenrollHandler, leaving),
        race(&executor, EnrollHandler, joining)
    );
    let (left, late) = (Tally::of(&left)?, Tally::of(&late)?);
    left.print("Unenroll");
    late.print("Enroll");

    // 4. Fold the whole log from the first event and check every rule at every event.
    println!("checking the whole log:");
    let projection = executor.store().project(audit_projector()).await?;
    let audit = projection.states;
    for (course, capacity) in &audit.capacity {
        let taken = audit.seats_taken(course);
        println!("  {course:<9} {taken:>2}/{capacity:<2} seats taken");
    }
    println!("  {} events in the log", projection.events_read);
    check_none(&audit.violations, "no rule broken at any event of the log")?;
    check(
        audit.capacity.len() == COURSES.len() && audit.students.len() == STUDENTS,
        "no duplicate course or student",
    )?;
    check(
        audit.enrollments == enrolls.succeeded + late.succeeded
            && audit.unenrollments == left.succeeded,
        "the log holds exactly the enrollments and unenrollments that succeeded",
    )?;
    check(
        left.succeeded == dropping.len() && left.refused("NotEnrolled") == dropping.len(),
        "each course is dropped once; the second drop is refused",
    )?;
    check(
        enrolls.refused("NoSuchCourse") == STUDENTS / 10,
        "enrollments in an unknown course are refused",
    )?;
    let full = |t: &Tally| t.refused("CourseFull") + t.refused("TooManyCourses");
    check(
        full(&enrolls) > 0,
        "capacity and the per-student limit were actually contended",
    )?;
    println!("done in {} ms", started.elapsed().as_millis());
    Ok(())
}

/// The audit folds the WHOLE log (not only the example's event types), so that an event of any
/// other type would be reported too.
fn audit_projector() -> StateProjector<Audit> {
    StateProjector::new(Query::all(), Audit::default(), Audit::apply)
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run()).await
}
