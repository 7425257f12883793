//! The six example pages of the DCB specification (<https://dcb.events/examples/>), as runnable,
//! self-checking scenarios on crablet's typed layer:
//!
//! 1. unique username: a name is held by one account; a closed account or a rename frees it,
//!    but only after a retention period of 3 days;
//! 2. course subscriptions: course capacity, capacity changes, no double subscription, at most
//!    5 courses per student;
//! 3. invoice number: gap-free invoice numbers, deciding on the LAST invoice only (read
//!    backwards with a limit of 1);
//! 4. opt-in token: a one-time password is confirmed once, and not after 60 minutes;
//! 5. dynamic product price: the displayed price must be valid; after a change the old price
//!    stays valid for a grace period of 10 minutes; one order can hold several products;
//! 6. prevent record duplication: an idempotency token is used once.
//!
//! Every test case of a page is one given/when/then [`Scenario`]: the `given` events are
//! appended, the `when` command runs through a `CommandExecutor`, and `then` checks the one
//! appended event or the page's error message, verbatim (the business errors display as the
//! page's messages). Each scenario runs on a store of its own. Checks marked "(not on the page)"
//! cover a rule the page states but does not test, or the page's concurrency claim: a decision
//! whose consistency boundary is touched between its read and its append fails with a conflict.
//!
//! Time is a parameter: commands carry the clock (`now`), events record when they happened,
//! and the pages' "4 days ago" is `days_ago(4)`. Nothing sleeps.
//!
//! A failed scenario reports what differs and the example exits non-zero.
//!
//! ```text
//! cargo run --example dcb_spec
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example dcb_spec
//! ```
//!
//! On PostgreSQL every scenario gets a schema of its own, `crablet_example_dcb_spec_<n>`
//! (dropped and recreated), and the schemas are dropped again when every scenario passed.
mod common;

use common::{check, AnyError, Interleaving};
use crablet::command::{
    handler_fn, reject, Command, CommandExecutor, CommandHandler, Decision, HandlerError,
    RetryPolicy,
};
use crablet::memory::InMemoryEventStore;
use crablet::postgres::{tokio_postgres, Pool, PostgresEventStore, StoreConfig};
use crablet::{
    DecisionModel, DomainEvent, EventReaderExt, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, StateProjector,
};
use dcb_testkit::scenario::Scenario;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Time: the clock is a parameter of the commands.
// ---------------------------------------------------------------------------------------------

/// Seconds since the Unix epoch: when an event happened, and the clock a command is given.
type Timestamp = u64;

const MINUTE: u64 = 60;
const DAY: u64 = 24 * 60 * MINUTE;

/// "Now" in every scenario.
const NOW: Timestamp = 1_775_000_000;

fn minutes_ago(minutes: u64) -> Timestamp {
    NOW - minutes * MINUTE
}

fn days_ago(days: u64) -> Timestamp {
    NOW - days * DAY
}

/// The time of the username and price pages' given events that have no age (no `daysAgo` /
/// `minutesAgo` metadata): those pages count such events as old, past any retention or grace
/// period. (The opt-in page counts a sign-up without an age as not expired: those start `NOW`.)
const LONG_AGO: Timestamp = NOW - 365 * DAY;

/// How long ago `at` was, seen from `now` (0 for a time after `now`).
fn age(at: Timestamp, now: Timestamp) -> u64 {
    now.saturating_sub(at)
}

// =============================================================================================
// 1. Unique username (unique-username.md, unique_username_01..04)
// =============================================================================================

/// A username is held for this long after its account closed or it was renamed away (F4).
const USERNAME_RETENTION: u64 = 3 * DAY;

/// An account was registered. The page's example tags the raw name; real code would normalize
/// it (case, ...) and tag a hash of it.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct AccountRegistered {
    #[crablet(tag)]
    username: String,
}

/// An account was closed (F2): its name is free once the retention period is over (F4).
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct AccountClosed {
    #[crablet(tag)]
    username: String,
    closed_at: Timestamp,
}

/// A user renamed themselves (F3). The event carries BOTH names under the tag key `username`
/// (one tag field with several values), so the one query item of a name catches it whether
/// the name is the old one or the new one.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct UsernameChanged {
    old_username: String,
    new_username: String,
    /// `[old_username, new_username]`.
    #[crablet(tag = "username")]
    usernames: Vec<String>,
    changed_at: Timestamp,
}

/// Every event of the username page.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum AccountEvent {
    Registered(AccountRegistered),
    Closed(AccountClosed),
    UsernameChanged(UsernameChanged),
}

fn registered(username: &str) -> AccountEvent {
    AccountEvent::Registered(AccountRegistered {
        username: username.into(),
    })
}

fn closed(username: &str, closed_at: Timestamp) -> AccountEvent {
    AccountEvent::Closed(AccountClosed {
        username: username.into(),
        closed_at,
    })
}

fn username_changed(old: &str, new: &str, changed_at: Timestamp) -> AccountEvent {
    AccountEvent::UsernameChanged(UsernameChanged {
        old_username: old.into(),
        new_username: new.into(),
        usernames: vec![old.into(), new.into()],
        changed_at,
    })
}

/// The page's only command. Closing accounts and renaming exist only as given events.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RegisterAccount {
    username: String,
    now: Timestamp,
}

#[derive(Debug, thiserror::Error)]
enum UsernameError {
    #[error("Username \"{0}\" is claimed")]
    Claimed(String),
}

/// The page's decision model of `registerAccount`.
#[derive(DecisionModel)]
struct RegisterAccountModel {
    /// `isUsernameClaimed(username)`, in its final form (F4).
    is_username_claimed: StateProjector<bool>,
}

/// Whether `username` is claimed at `now`: registered (F1), not freed by a closed account (F2)
/// or a rename away from it (F3), unless that happened within the retention period (F4).
fn is_username_claimed(username: &str, now: Timestamp) -> StateProjector<bool> {
    let name = username.to_string();
    let held = move |at: Timestamp| age(at, now) <= USERNAME_RETENTION;
    StateProjector::typed(
        QueryItem::of::<AccountEvent>().tag("username", username),
        false,
        move |claimed, event: &AccountEvent| {
            *claimed = match event {
                AccountEvent::Registered(_) => true,
                AccountEvent::Closed(closed) => held(closed.closed_at),
                AccountEvent::UsernameChanged(changed) => {
                    changed.new_username == name || held(changed.changed_at)
                }
            }
        },
    )
}

fn register_account_handler() -> impl CommandHandler<RegisterAccount, Error = UsernameError> {
    handler_fn(|command: &Command<RegisterAccount>, reader| {
        Box::pin(async move {
            let RegisterAccount { username, now } = &command.payload;
            let model = reader
                .project(RegisterAccountModel {
                    is_username_claimed: is_username_claimed(username, *now),
                })
                .await?;
            if model.states.is_username_claimed {
                return Err(reject(UsernameError::Claimed(username.clone())));
            }
            let event = registered(username);
            // A parallel claim of the same name makes this append fail.
            Ok::<_, HandlerError<UsernameError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

fn register(username: &str) -> Command<RegisterAccount> {
    Command::new(
        "RegisterAccount",
        RegisterAccount {
            username: username.into(),
            now: NOW,
        },
    )
}

async fn unique_username(run: &mut Run) -> Result<(), AnyError> {
    println!("1. unique username (retention of a freed name: 3 days)");
    let handler = &register_account_handler();
    run.scenario(
        r#"given Registered(u1): register u1 -> Username "u1" is claimed"#,
        |s| async move {
            s.given_typed(&[registered("u1")])
                .await
                .when_command(register("u1"), handler)
                .await
                .then_error(r#"Username "u1" is claimed"#)
                .await;
        },
    )
    .await?;
    run.scenario(
        "given nothing: register u1 -> AccountRegistered(u1)",
        |s| async move {
            s.when_command(register("u1"), handler)
                .await
                .then_typed(&[registered("u1")])
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2: given Registered(u1), Closed(u1): register u1 -> AccountRegistered(u1)",
        |s| async move {
            s.given_typed(&[registered("u1"), closed("u1", LONG_AGO)])
                .await
                .when_command(register("u1"), handler)
                .await
                .then_typed(&[registered("u1")])
                .await;
        },
    )
    .await?;
    run.scenario(
        "F3: given Registered(u1), Changed(u1 -> u1changed): register u1 -> AccountRegistered(u1)",
        |s| async move {
            s.given_typed(&[
                registered("u1"),
                username_changed("u1", "u1changed", LONG_AGO),
            ])
            .await
            .when_command(register("u1"), handler)
            .await
            .then_typed(&[registered("u1")])
            .await;
        },
    )
    .await?;
    run.scenario(
        r#"F3: given Registered(u1), Changed(u1 -> u1changed): register u1changed -> Username "u1changed" is claimed"#,
        |s| async move {
            s.given_typed(&[
                registered("u1"),
                username_changed("u1", "u1changed", LONG_AGO),
            ])
            .await
            .when_command(register("u1changed"), handler)
            .await
            .then_error(r#"Username "u1changed" is claimed"#)
            .await;
        },
    )
    .await?;
    // The page gives the registrations an age too (4 days); it plays no part in the rule, so
    // AccountRegistered records no time.
    run.scenario(
        r#"F4: given Registered(u1, 4 days ago), Closed(u1, 3 days ago): register u1 -> Username "u1" is claimed"#,
        |s| async move {
            s.given_typed(&[registered("u1"), closed("u1", days_ago(3))])
                .await
                .when_command(register("u1"), handler)
                .await
                .then_error(r#"Username "u1" is claimed"#)
                .await;
        },
    )
    .await?;
    run.scenario(
        r#"F4: given Registered(u1, 4d), Changed(u1 -> u1changed, 3d): register u1 -> Username "u1" is claimed"#,
        |s| async move {
            s.given_typed(&[
                registered("u1"),
                username_changed("u1", "u1changed", days_ago(3)),
            ])
            .await
            .when_command(register("u1"), handler)
            .await
            .then_error(r#"Username "u1" is claimed"#)
            .await;
        },
    )
    .await?;
    run.scenario(
        "F4: given Registered(u1, 4d), Closed(u1, 4d): register u1 -> AccountRegistered(u1)",
        |s| async move {
            s.given_typed(&[registered("u1"), closed("u1", days_ago(4))])
                .await
                .when_command(register("u1"), handler)
                .await
                .then_typed(&[registered("u1")])
                .await;
        },
    )
    .await?;
    run.scenario(
        "F4: given Registered(u1, 4d), Changed(u1 -> u1changed, 4d): register u1 -> AccountRegistered(u1)",
        |s| async move {
            s.given_typed(&[
                registered("u1"),
                username_changed("u1", "u1changed", days_ago(4)),
            ])
            .await
            .when_command(register("u1"), handler)
            .await
            .then_typed(&[registered("u1")])
            .await;
        },
    )
    .await?;
    run.check(
        "(not on the page) a parallel claim of u1 between the decision's read and its append makes the append fail",
        |store| async move {
            commit_conflicts(&store, handler, register("u1"), &[registered("u1")]).await
        },
    )
    .await?;
    run.check(
        "(not on the page) a parallel claim of another name does not",
        |store| async move {
            Ok(!commit_conflicts(&store, handler, register("u1"), &[registered("u2")]).await?)
        },
    )
    .await
}

// =============================================================================================
// 2. Course subscriptions (course-subscriptions.md, course_subscription_01..03)
// =============================================================================================

/// The most courses one student may subscribe to. The page's rules say 10, but its
/// implementation (the Feature 3 prose, the check and its error message) says 5; this follows
/// the implementation.
const MAX_COURSES_PER_STUDENT: u64 = 5;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct CourseDefined {
    #[crablet(tag = "course")]
    course_id: String,
    capacity: u32,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct CourseCapacityChanged {
    #[crablet(tag = "course")]
    course_id: String,
    new_capacity: u32,
}

/// A subscription belongs to two entities at once, so the one event carries both tags.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct StudentSubscribedToCourse {
    #[crablet(tag = "student")]
    student_id: String,
    #[crablet(tag = "course")]
    course_id: String,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum CourseEvent {
    Defined(CourseDefined),
    CapacityChanged(CourseCapacityChanged),
    Subscribed(StudentSubscribedToCourse),
}

fn course_defined(course_id: &str, capacity: u32) -> CourseEvent {
    CourseEvent::Defined(CourseDefined {
        course_id: course_id.into(),
        capacity,
    })
}

fn capacity_changed(course_id: &str, new_capacity: u32) -> CourseEvent {
    CourseEvent::CapacityChanged(CourseCapacityChanged {
        course_id: course_id.into(),
        new_capacity,
    })
}

fn subscribed(student_id: &str, course_id: &str) -> CourseEvent {
    CourseEvent::Subscribed(StudentSubscribedToCourse {
        student_id: student_id.into(),
        course_id: course_id.into(),
    })
}

/// The capacities are `NonZeroU32`: "a positive integer" is the rule, which the page does not
/// check; here a command with capacity 0 cannot be built.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DefineCourse {
    course_id: String,
    capacity: NonZeroU32,
}

/// The page's command schema lists `studentId` here by mistake; its handler and tests use
/// `courseId`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChangeCourseCapacity {
    course_id: String,
    new_capacity: NonZeroU32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubscribeStudentToCourse {
    student_id: String,
    course_id: String,
}

#[derive(Debug, thiserror::Error)]
enum CourseError {
    #[error("Course with id \"{0}\" already exists")]
    AlreadyExists(String),
    #[error("Course \"{0}\" does not exist")]
    DoesNotExist(String),
    #[error("New capacity {0} is the same as the current capacity")]
    SameCapacity(u32),
    #[error("Course \"{0}\" is already fully booked")]
    FullyBooked(String),
    #[error("Student already subscribed to this course")]
    AlreadySubscribed,
    #[error("Student already subscribed to {} courses", MAX_COURSES_PER_STUDENT)]
    TooManyCourses,
}

/// `courseExists(courseId)`.
fn course_exists(course_id: &str) -> StateProjector<bool> {
    StateProjector::exists(QueryItem::of::<CourseDefined>().tag("course", course_id))
}

/// `courseCapacity(courseId)`: the defined capacity, or the last changed one.
fn course_capacity(course_id: &str) -> StateProjector<u32> {
    StateProjector::typed(
        QueryItem::of::<(CourseDefined, CourseCapacityChanged)>().tag("course", course_id),
        0,
        |capacity, event: &CourseEvent| match event {
            CourseEvent::Defined(defined) => *capacity = defined.capacity,
            CourseEvent::CapacityChanged(changed) => *capacity = changed.new_capacity,
            CourseEvent::Subscribed(_) => {}
        },
    )
}

/// `numberOfCourseSubscriptions(courseId)`.
fn number_of_course_subscriptions(course_id: &str) -> StateProjector<u64> {
    StateProjector::counter(QueryItem::of::<StudentSubscribedToCourse>().tag("course", course_id))
}

/// `numberOfStudentSubscriptions(studentId)`.
fn number_of_student_subscriptions(student_id: &str) -> StateProjector<u64> {
    StateProjector::counter(QueryItem::of::<StudentSubscribedToCourse>().tag("student", student_id))
}

/// `studentAlreadySubscribed(studentId, courseId)`: the event must carry both tags.
fn student_already_subscribed(student_id: &str, course_id: &str) -> StateProjector<bool> {
    StateProjector::exists(
        QueryItem::of::<StudentSubscribedToCourse>()
            .tag("student", student_id)
            .tag("course", course_id),
    )
}

#[derive(DecisionModel)]
struct DefineCourseModel {
    course_exists: StateProjector<bool>,
}

#[derive(DecisionModel)]
struct ChangeCourseCapacityModel {
    course_exists: StateProjector<bool>,
    course_capacity: StateProjector<u32>,
}

/// The decision model of a subscription: five projections, ONE read, ONE condition. A parallel
/// subscription to the same course or by the same student, or a capacity change of the
/// course, makes the append fail.
#[derive(DecisionModel)]
struct SubscribeModel {
    course_exists: StateProjector<bool>,
    course_capacity: StateProjector<u32>,
    number_of_course_subscriptions: StateProjector<u64>,
    number_of_student_subscriptions: StateProjector<u64>,
    student_already_subscribed: StateProjector<bool>,
}

fn define_course_handler() -> impl CommandHandler<DefineCourse, Error = CourseError> {
    handler_fn(|command: &Command<DefineCourse>, reader| {
        Box::pin(async move {
            let DefineCourse {
                course_id,
                capacity,
            } = &command.payload;
            let model = reader
                .project(DefineCourseModel {
                    course_exists: course_exists(course_id),
                })
                .await?;
            if model.states.course_exists {
                return Err(reject(CourseError::AlreadyExists(course_id.clone())));
            }
            let event = CourseDefined {
                course_id: course_id.clone(),
                capacity: capacity.get(),
            };
            Ok::<_, HandlerError<CourseError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

/// The capacity may drop below the number of subscriptions: nothing blocks that, and later
/// subscriptions then fail as fully booked.
fn change_course_capacity_handler() -> impl CommandHandler<ChangeCourseCapacity, Error = CourseError>
{
    handler_fn(|command: &Command<ChangeCourseCapacity>, reader| {
        Box::pin(async move {
            let ChangeCourseCapacity {
                course_id,
                new_capacity,
            } = &command.payload;
            let model = reader
                .project(ChangeCourseCapacityModel {
                    course_exists: course_exists(course_id),
                    course_capacity: course_capacity(course_id),
                })
                .await?;
            let states = &model.states;
            if !states.course_exists {
                return Err(reject(CourseError::DoesNotExist(course_id.clone())));
            }
            if states.course_capacity == new_capacity.get() {
                return Err(reject(CourseError::SameCapacity(new_capacity.get())));
            }
            let event = CourseCapacityChanged {
                course_id: course_id.clone(),
                new_capacity: new_capacity.get(),
            };
            Ok::<_, HandlerError<CourseError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

fn subscribe_handler() -> impl CommandHandler<SubscribeStudentToCourse, Error = CourseError> {
    handler_fn(|command: &Command<SubscribeStudentToCourse>, reader| {
        Box::pin(async move {
            let SubscribeStudentToCourse {
                student_id,
                course_id,
            } = &command.payload;
            let model = reader
                .project(SubscribeModel {
                    course_exists: course_exists(course_id),
                    course_capacity: course_capacity(course_id),
                    number_of_course_subscriptions: number_of_course_subscriptions(course_id),
                    number_of_student_subscriptions: number_of_student_subscriptions(student_id),
                    student_already_subscribed: student_already_subscribed(student_id, course_id),
                })
                .await?;
            let states = &model.states;
            if !states.course_exists {
                return Err(reject(CourseError::DoesNotExist(course_id.clone())));
            }
            if states.number_of_course_subscriptions >= u64::from(states.course_capacity) {
                return Err(reject(CourseError::FullyBooked(course_id.clone())));
            }
            if states.student_already_subscribed {
                return Err(reject(CourseError::AlreadySubscribed));
            }
            if states.number_of_student_subscriptions >= MAX_COURSES_PER_STUDENT {
                return Err(reject(CourseError::TooManyCourses));
            }
            let event = StudentSubscribedToCourse {
                student_id: student_id.clone(),
                course_id: course_id.clone(),
            };
            Ok::<_, HandlerError<CourseError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

fn capacity(value: u32) -> NonZeroU32 {
    NonZeroU32::new(value).expect("the scenarios' capacities are positive")
}

fn define_course(course_id: &str, cap: u32) -> Command<DefineCourse> {
    Command::new(
        "DefineCourse",
        DefineCourse {
            course_id: course_id.into(),
            capacity: capacity(cap),
        },
    )
}

fn change_capacity(course_id: &str, new_capacity: u32) -> Command<ChangeCourseCapacity> {
    Command::new(
        "ChangeCourseCapacity",
        ChangeCourseCapacity {
            course_id: course_id.into(),
            new_capacity: capacity(new_capacity),
        },
    )
}

fn subscribe(student_id: &str, course_id: &str) -> Command<SubscribeStudentToCourse> {
    Command::new(
        "SubscribeStudentToCourse",
        SubscribeStudentToCourse {
            student_id: student_id.into(),
            course_id: course_id.into(),
        },
    )
}

async fn course_subscriptions(run: &mut Run) -> Result<(), AnyError> {
    println!(
        "2. course subscriptions (capacity, capacity change, no double subscription, at most {MAX_COURSES_PER_STUDENT} courses per student)"
    );
    let define = &define_course_handler();
    let change = &change_course_capacity_handler();
    let subscribe_to = &subscribe_handler();
    run.scenario(
        r#"F1: given CourseDefined(c1, 10): define c1 (15) -> Course with id "c1" already exists"#,
        |s| async move {
            s.given_typed(&[course_defined("c1", 10)])
                .await
                .when_command(define_course("c1", 15), define)
                .await
                .then_error(r#"Course with id "c1" already exists"#)
                .await;
        },
    )
    .await?;
    run.scenario(
        "F1: given nothing: define c1 (15) -> CourseDefined(c1, 15)",
        |s| async move {
            s.when_command(define_course("c1", 15), define)
                .await
                .then_typed(&[course_defined("c1", 15)])
                .await;
        },
    )
    .await?;
    run.scenario(
        r#"F2: given nothing: change capacity of c0 to 15 -> Course "c0" does not exist"#,
        |s| async move {
            s.when_command(change_capacity("c0", 15), change)
                .await
                .then_error(r#"Course "c0" does not exist"#)
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2: given CourseDefined(c1, 12): change capacity of c1 to 15 -> CourseCapacityChanged(c1, 15)",
        |s| async move {
            s.given_typed(&[course_defined("c1", 12)])
                .await
                .when_command(change_capacity("c1", 15), change)
                .await
                .then_typed(&[capacity_changed("c1", 15)])
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2 (not on the page): given CourseDefined(c1, 12), CapacityChanged(c1, 15): change capacity of c1 to 15 -> New capacity 15 is the same as the current capacity",
        |s| async move {
            s.given_typed(&[course_defined("c1", 12), capacity_changed("c1", 15)])
                .await
                .when_command(change_capacity("c1", 15), change)
                .await
                .then_error("New capacity 15 is the same as the current capacity")
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2 (not on the page): given CourseDefined(c1, 3), s1..s3 subscribed: change capacity of c1 to 2 -> CourseCapacityChanged(c1, 2) (below the subscriptions)",
        |s| async move {
            s.given_typed(&[
                course_defined("c1", 3),
                subscribed("s1", "c1"),
                subscribed("s2", "c1"),
                subscribed("s3", "c1"),
            ])
            .await
            .when_command(change_capacity("c1", 2), change)
            .await
            .then_typed(&[capacity_changed("c1", 2)])
            .await;
        },
    )
    .await?;
    run.scenario(
        r#"F3: given nothing: subscribe s1 to c0 -> Course "c0" does not exist"#,
        |s| async move {
            s.when_command(subscribe("s1", "c0"), subscribe_to)
                .await
                .then_error(r#"Course "c0" does not exist"#)
                .await;
        },
    )
    .await?;
    run.scenario(
        r#"F3: given CourseDefined(c1, 3), s1..s3 subscribed to c1: subscribe s4 to c1 -> Course "c1" is already fully booked"#,
        |s| async move {
            s.given_typed(&[
                course_defined("c1", 3),
                subscribed("s1", "c1"),
                subscribed("s2", "c1"),
                subscribed("s3", "c1"),
            ])
            .await
            .when_command(subscribe("s4", "c1"), subscribe_to)
            .await
            .then_error(r#"Course "c1" is already fully booked"#)
            .await;
        },
    )
    .await?;
    run.scenario(
        r#"F3 (not on the page): given CourseDefined(c1, 10), s1 subscribed, capacity changed to 1: subscribe s2 to c1 -> Course "c1" is already fully booked"#,
        |s| async move {
            s.given_typed(&[
                course_defined("c1", 10),
                subscribed("s1", "c1"),
                capacity_changed("c1", 1),
            ])
            .await
            .when_command(subscribe("s2", "c1"), subscribe_to)
            .await
            .then_error(r#"Course "c1" is already fully booked"#)
            .await;
        },
    )
    .await?;
    run.scenario(
        "F3: given CourseDefined(c1, 10), s1 subscribed to c1: subscribe s1 to c1 -> Student already subscribed to this course",
        |s| async move {
            s.given_typed(&[course_defined("c1", 10), subscribed("s1", "c1")])
                .await
                .when_command(subscribe("s1", "c1"), subscribe_to)
                .await
                .then_error("Student already subscribed to this course")
                .await;
        },
    )
    .await?;
    run.scenario(
        "F3: given CourseDefined(c6, 10), s1 subscribed to c1..c5 (never defined): subscribe s1 to c6 -> Student already subscribed to 5 courses",
        |s| async move {
            s.given_typed(&[
                course_defined("c6", 10),
                subscribed("s1", "c1"),
                subscribed("s1", "c2"),
                subscribed("s1", "c3"),
                subscribed("s1", "c4"),
                subscribed("s1", "c5"),
            ])
            .await
            .when_command(subscribe("s1", "c6"), subscribe_to)
            .await
            .then_error("Student already subscribed to 5 courses")
            .await;
        },
    )
    .await?;
    run.scenario(
        "F3: given CourseDefined(c1, 10): subscribe s1 to c1 -> StudentSubscribedToCourse(s1, c1)",
        |s| async move {
            s.given_typed(&[course_defined("c1", 10)])
                .await
                .when_command(subscribe("s1", "c1"), subscribe_to)
                .await
                .then_typed(&[subscribed("s1", "c1")])
                .await;
        },
    )
    .await?;
    // The consistency boundary of one subscription: the course and the student.
    let courses = [course_defined("c1", 10), course_defined("c2", 10)];
    for (title, interloper, conflicts) in [
        (
            "another student subscribing to c1",
            subscribed("s2", "c1"),
            true,
        ),
        (
            "s1 subscribing to another course",
            subscribed("s1", "c2"),
            true,
        ),
        ("a capacity change of c1", capacity_changed("c1", 20), true),
        (
            "another student subscribing to another course",
            subscribed("s2", "c2"),
            false,
        ),
    ] {
        let courses = &courses;
        let verb = if conflicts { "makes" } else { "does not make" };
        run.check(
            format!(
                "(not on the page) s1 -> c1: {title} between the decision's read and its append {verb} the append fail"
            ),
            |store| async move {
                store.append(crablet::encode_all(courses)?).await?;
                let conflicted =
                    commit_conflicts(&store, subscribe_to, subscribe("s1", "c1"), &[interloper])
                        .await?;
                Ok(conflicted == conflicts)
            },
        )
        .await?;
    }
    Ok(())
}

// =============================================================================================
// 3. Invoice number (invoice-number.md, invoice_number_01)
// =============================================================================================

/// An invoice. The server picks the number: the last one plus 1, with no gaps.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct InvoiceCreated {
    #[crablet(tag = "invoice")]
    invoice_number: u64,
    invoice_data: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CreateInvoice {
    invoice_data: serde_json::Value,
}

/// `nextInvoiceNumber()`, the page's performance variant: only the LAST InvoiceCreated counts
/// (the handler ignores the old state), so the projection reads the query backwards with a
/// limit of 1. Its condition is the query after that invoice (after nothing when there is none,
/// so then any existing invoice makes the append fail).
fn last_invoice() -> StateProjector<Option<InvoiceCreated>> {
    StateProjector::last_typed(Query::of::<InvoiceCreated>())
}

/// The page's basic `nextInvoiceNumber()`: folds EVERY invoice forwards; only to compare what
/// the two read.
fn next_invoice_number_by_replay() -> StateProjector<u64> {
    StateProjector::typed(
        Query::of::<InvoiceCreated>(),
        1,
        |next, invoice: &InvoiceCreated| *next = invoice.invoice_number + 1,
    )
}

/// `createInvoice`; records in `max_read` the most events any of its decisions read.
fn create_invoice_handler(max_read: Arc<AtomicU64>) -> impl CommandHandler<CreateInvoice> {
    handler_fn(move |command: &Command<CreateInvoice>, reader| {
        let max_read = max_read.clone();
        Box::pin(async move {
            let last = reader.project(last_invoice()).await?;
            max_read.fetch_max(last.events_read, Ordering::Relaxed);
            let next = last.states.map_or(1, |last| last.invoice_number + 1);
            let event = InvoiceCreated {
                invoice_number: next,
                invoice_data: command.payload.invoice_data.clone(),
            };
            Ok::<_, HandlerError>(Decision::append_typed(&[event])?.guarded_by(last.condition))
        })
    })
}

fn create_invoice(invoice_data: serde_json::Value) -> Command<CreateInvoice> {
    Command::new("CreateInvoice", CreateInvoice { invoice_data })
}

fn invoice(invoice_number: u64, invoice_data: serde_json::Value) -> InvoiceCreated {
    InvoiceCreated {
        invoice_number,
        invoice_data,
    }
}

async fn invoice_number(run: &mut Run) -> Result<(), AnyError> {
    println!("3. invoice number (gap-free; decided on the last invoice only)");
    let max_read = Arc::new(AtomicU64::new(0));
    let handler = &create_invoice_handler(max_read.clone());
    run.scenario(
        r#"Create first invoice: given nothing: createInvoice({foo: "bar"}) -> InvoiceCreated(1, {foo: "bar"})"#,
        |s| async move {
            s.when_command(create_invoice(json!({"foo": "bar"})), handler)
                .await
                .then_typed(&[invoice(1, json!({"foo": "bar"}))])
                .await;
        },
    )
    .await?;
    run.scenario(
        r#"Create second invoice: given InvoiceCreated(1, {foo: "bar"}): createInvoice({bar: "baz"}) -> InvoiceCreated(2, {bar: "baz"})"#,
        |s| async move {
            s.given_typed(&[invoice(1, json!({"foo": "bar"}))])
                .await
                .when_command(create_invoice(json!({"bar": "baz"})), handler)
                .await
                .then_typed(&[invoice(2, json!({"bar": "baz"}))])
                .await;
        },
    )
    .await?;
    let store = run.fresh().await?;
    let history: Vec<InvoiceCreated> = (1..=20).map(|n| invoice(n, json!({ "n": n }))).collect();
    Scenario::on(store.clone())
        .given_typed(&history)
        .await
        .when_command(create_invoice(json!({"n": 21})), handler)
        .await
        .then_typed(&[invoice(21, json!({"n": 21}))])
        .await;
    run.ok("(not on the page) given InvoiceCreated(1..20): createInvoice -> InvoiceCreated(21)");
    let replayed = store.project(next_invoice_number_by_replay()).await?;
    let newest = store.project(last_invoice()).await?;
    run.holds(
        newest.events_read == 1
            && newest.states.as_ref().map(|i| i.invoice_number) == Some(21)
            && replayed.states == 22,
        format!(
            "the last invoice alone is read backwards: {} event read of 21 (the forward fold reads {}), both give 22 next",
            newest.events_read, replayed.events_read
        ),
    )?;
    let most = max_read.load(Ordering::Relaxed);
    run.holds(
        most <= 1,
        format!(
            "every createInvoice decision read at most 1 event (events_read <= 1, at most {most})"
        ),
    )?;
    run.check(
        "(not on the page) on an empty store, an invoice created between the decision's read and its append makes the append fail",
        |store| async move {
            commit_conflicts(
                &store,
                handler,
                create_invoice(json!({})),
                &[invoice(1, json!({}))],
            )
            .await
        },
    )
    .await?;
    run.check(
        "(not on the page) 8 concurrent createInvoice (retried on conflict) give invoices 1..8, each once, in log order",
        |store| async move {
            let executor = CommandExecutor::new(store.clone()).with_retry(
                RetryPolicy::attempts(20)
                    .initial_backoff(Duration::from_millis(1))
                    .max_backoff(Duration::from_millis(20)),
            );
            let racing = Arc::new(Interleaving::new(create_invoice_handler(Arc::new(
                AtomicU64::new(0),
            ))));
            let start = Arc::new(tokio::sync::Barrier::new(8));
            let tasks: Vec<_> = (1..=8)
                .map(|n| {
                    let (executor, racing, start) =
                        (executor.clone(), racing.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        executor
                            .execute(create_invoice(json!({ "writer": n })), &*racing)
                            .await
                    })
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            let invoices = Query::of::<InvoiceCreated>();
            let numbers: Vec<u64> = store
                .query_typed::<InvoiceCreated>(&invoices, ReadOptions::default())
                .await?
                .into_iter()
                .map(|i| i.event.invoice_number)
                .collect();
            println!(
                "    {} decisions for 8 commands; invoice numbers in log order: {numbers:?}",
                racing.decisions()
            );
            Ok(numbers == (1..=8).collect::<Vec<_>>())
        },
    )
    .await
}

// =============================================================================================
// 4. Opt-in token (opt-in-token.md, opt_in_token_01..02)
// =============================================================================================

/// A one-time password expires this long after the sign-up started (F2).
const OTP_VALIDITY: u64 = 60 * MINUTE;

/// A sign-up started: the server generated the OTP and keeps it in the event, so no token
/// store is needed.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct SignUpInitiated {
    #[crablet(tag = "email")]
    email_address: String,
    #[crablet(tag)]
    otp: String,
    name: String,
    initiated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct SignUpConfirmed {
    #[crablet(tag = "email")]
    email_address: String,
    #[crablet(tag)]
    otp: String,
    name: String,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum SignUpEvent {
    Initiated(SignUpInitiated),
    Confirmed(SignUpConfirmed),
}

fn sign_up_initiated(email: &str, otp: &str, name: &str, at: Timestamp) -> SignUpEvent {
    SignUpEvent::Initiated(SignUpInitiated {
        email_address: email.into(),
        otp: otp.into(),
        name: name.into(),
        initiated_at: at,
    })
}

fn sign_up_confirmed(email: &str, otp: &str, name: &str) -> SignUpEvent {
    SignUpEvent::Confirmed(SignUpConfirmed {
        email_address: email.into(),
        otp: otp.into(),
        name: name.into(),
    })
}

/// The page's only command; sign-ups start only as given events.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConfirmSignUp {
    email_address: String,
    otp: String,
    now: Timestamp,
}

#[derive(Debug, thiserror::Error)]
enum SignUpError {
    #[error("No pending sign-up for this OTP / email address")]
    NoPendingSignUp,
    #[error("OTP was already used")]
    OtpUsed,
    #[error("OTP expired")]
    OtpExpired,
}

/// The state of `pendingSignUp`: none until a sign-up with this email AND this OTP started.
#[derive(Debug, Clone)]
struct PendingSignUp {
    name: String,
    otp_used: bool,
    otp_expired: bool,
}

#[derive(DecisionModel)]
struct ConfirmSignUpModel {
    pending_sign_up: StateProjector<Option<PendingSignUp>>,
}

/// `pendingSignUp(emailAddress, otp)`: both tags are required, so an OTP only counts together
/// with its own email address.
fn pending_sign_up(
    email: &str,
    otp: &str,
    now: Timestamp,
) -> StateProjector<Option<PendingSignUp>> {
    StateProjector::typed(
        QueryItem::of::<SignUpEvent>()
            .tag("email", email)
            .tag("otp", otp),
        None,
        move |pending, event: &SignUpEvent| match event {
            SignUpEvent::Initiated(initiated) => {
                *pending = Some(PendingSignUp {
                    name: initiated.name.clone(),
                    otp_used: false,
                    otp_expired: age(initiated.initiated_at, now) > OTP_VALIDITY,
                })
            }
            SignUpEvent::Confirmed(_) => {
                if let Some(pending) = pending {
                    pending.otp_used = true;
                }
            }
        },
    )
}

fn confirm_sign_up_handler() -> impl CommandHandler<ConfirmSignUp, Error = SignUpError> {
    handler_fn(|command: &Command<ConfirmSignUp>, reader| {
        Box::pin(async move {
            let ConfirmSignUp {
                email_address,
                otp,
                now,
            } = &command.payload;
            let model = reader
                .project(ConfirmSignUpModel {
                    pending_sign_up: pending_sign_up(email_address, otp, *now),
                })
                .await?;
            // "Used" is checked before "expired": a token that is both is reported as used.
            let pending = match &model.states.pending_sign_up {
                None => return Err(reject(SignUpError::NoPendingSignUp)),
                Some(pending) if pending.otp_used => return Err(reject(SignUpError::OtpUsed)),
                Some(pending) if pending.otp_expired => {
                    return Err(reject(SignUpError::OtpExpired))
                }
                Some(pending) => pending,
            };
            let event = SignUpConfirmed {
                email_address: email_address.clone(),
                otp: otp.clone(),
                name: pending.name.clone(),
            };
            // Two confirmations at the same time cannot both succeed.
            Ok::<_, HandlerError<SignUpError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

fn confirm(email: &str, otp: &str) -> Command<ConfirmSignUp> {
    Command::new(
        "ConfirmSignUp",
        ConfirmSignUp {
            email_address: email.into(),
            otp: otp.into(),
            now: NOW,
        },
    )
}

const JOHN: &str = "john.doe@example.com";

async fn opt_in_token(run: &mut Run) -> Result<(), AnyError> {
    println!("4. opt-in token (one-time password, used once, valid for 60 minutes)");
    let handler = &confirm_sign_up_handler();
    // The page's given sign-ups without an age count as not expired: they start `NOW`.
    run.scenario(
        "given nothing: confirm (john.doe, 000000) -> No pending sign-up for this OTP / email address",
        |s| async move {
            s.when_command(confirm(JOHN, "000000"), handler)
                .await
                .then_error("No pending sign-up for this OTP / email address")
                .await;
        },
    )
    .await?;
    run.scenario(
        "given Initiated(john.doe, 111111): confirm (jane.doe, 111111) -> No pending sign-up for this OTP / email address",
        |s| async move {
            s.given_typed(&[sign_up_initiated(JOHN, "111111", "John Doe", NOW)])
                .await
                .when_command(confirm("jane.doe@example.com", "111111"), handler)
                .await
                .then_error("No pending sign-up for this OTP / email address")
                .await;
        },
    )
    .await?;
    run.scenario(
        "given Initiated + Confirmed(john.doe, 222222): confirm (john.doe, 222222) -> OTP was already used",
        |s| async move {
            s.given_typed(&[
                sign_up_initiated(JOHN, "222222", "John Doe", NOW),
                sign_up_confirmed(JOHN, "222222", "John Doe"),
            ])
            .await
            .when_command(confirm(JOHN, "222222"), handler)
            .await
            .then_error("OTP was already used")
            .await;
        },
    )
    .await?;
    run.scenario(
        "given Initiated(john.doe, 444444, John Doe): confirm (john.doe, 444444) -> SignUpConfirmed(john.doe, 444444, John Doe)",
        |s| async move {
            s.given_typed(&[sign_up_initiated(JOHN, "444444", "John Doe", NOW)])
                .await
                .when_command(confirm(JOHN, "444444"), handler)
                .await
                .then_typed(&[sign_up_confirmed(JOHN, "444444", "John Doe")])
                .await;
        },
    )
    .await?;
    // The page's expiry test confirms with the wrong OTP (000000), so it never reaches the
    // expiry check (its `minutesAgo` is also the string "61"); run as written, and as meant.
    run.scenario(
        "F2, as on the page: given Initiated(john.doe, 333333, 61 min ago): confirm (john.doe, 000000) -> No pending sign-up for this OTP / email address",
        |s| async move {
            s.given_typed(&[sign_up_initiated(JOHN, "333333", "John Doe", minutes_ago(61))])
                .await
                .when_command(confirm(JOHN, "000000"), handler)
                .await
                .then_error("No pending sign-up for this OTP / email address")
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2, as meant (not on the page): given Initiated(john.doe, 333333, 61 min ago): confirm (john.doe, 333333) -> OTP expired",
        |s| async move {
            s.given_typed(&[sign_up_initiated(JOHN, "333333", "John Doe", minutes_ago(61))])
                .await
                .when_command(confirm(JOHN, "333333"), handler)
                .await
                .then_error("OTP expired")
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2 (not on the page): given Initiated(john.doe, 555555, 60 min ago): confirm (john.doe, 555555) -> SignUpConfirmed (still valid at 60 minutes)",
        |s| async move {
            s.given_typed(&[sign_up_initiated(JOHN, "555555", "John Doe", minutes_ago(60))])
                .await
                .when_command(confirm(JOHN, "555555"), handler)
                .await
                .then_typed(&[sign_up_confirmed(JOHN, "555555", "John Doe")])
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2 (not on the page): given Initiated(61 min ago) + Confirmed(john.doe, 666666): confirm -> OTP was already used (used is checked before expired)",
        |s| async move {
            s.given_typed(&[
                sign_up_initiated(JOHN, "666666", "John Doe", minutes_ago(61)),
                sign_up_confirmed(JOHN, "666666", "John Doe"),
            ])
            .await
            .when_command(confirm(JOHN, "666666"), handler)
            .await
            .then_error("OTP was already used")
            .await;
        },
    )
    .await?;
    run.check(
        "(not on the page) a second confirmation between the decision's read and its append makes the append fail",
        |store| async move {
            store
                .append(crablet::encode_all(&[sign_up_initiated(JOHN, "777777", "John Doe", NOW)])?)
                .await?;
            commit_conflicts(
                &store,
                handler,
                confirm(JOHN, "777777"),
                &[sign_up_confirmed(JOHN, "777777", "John Doe")],
            )
            .await
        },
    )
    .await
}

// =============================================================================================
// 5. Dynamic product price (dynamic-product-price.md)
// =============================================================================================

/// After a price change the previous price stays valid for this long.
const GRACE_PERIOD: u64 = 10 * MINUTE;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct ProductDefined {
    #[crablet(tag = "product")]
    product_id: String,
    price: u64,
    defined_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct ProductPriceChanged {
    #[crablet(tag = "product")]
    product_id: String,
    new_price: u64,
    changed_at: Timestamp,
}

/// An order of one product (F1, F2). Orders are part of no decision model, so concurrent
/// orders never conflict with each other.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct ProductOrdered {
    #[crablet(tag = "product")]
    product_id: String,
    price: u64,
}

/// An order of several products (F3), tagged with every product.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct ProductsOrdered {
    /// One `product` tag per distinct product of the items.
    #[crablet(tag = "product")]
    products: Vec<String>,
    items: Vec<OrderedItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderedItem {
    product_id: String,
    price: u64,
}

/// The price events, which the decision models read.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum PriceEvent {
    Defined(ProductDefined),
    Changed(ProductPriceChanged),
}

fn product_defined(product_id: &str, price: u64, at: Timestamp) -> PriceEvent {
    PriceEvent::Defined(ProductDefined {
        product_id: product_id.into(),
        price,
        defined_at: at,
    })
}

fn price_changed(product_id: &str, new_price: u64, at: Timestamp) -> PriceEvent {
    PriceEvent::Changed(ProductPriceChanged {
        product_id: product_id.into(),
        new_price,
        changed_at: at,
    })
}

fn product_ordered(product_id: &str, price: u64) -> ProductOrdered {
    ProductOrdered {
        product_id: product_id.into(),
        price,
    }
}

fn products_ordered(items: &[(&str, u64)]) -> ProductsOrdered {
    let mut products: Vec<String> = Vec::new();
    for (id, _) in items {
        if !products.iter().any(|p| p == id) {
            products.push(id.to_string());
        }
    }
    ProductsOrdered {
        products,
        items: items
            .iter()
            .map(|(id, price)| OrderedItem {
                product_id: id.to_string(),
                price: *price,
            })
            .collect(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderProduct {
    product_id: String,
    displayed_price: u64,
    now: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CartItem {
    product_id: String,
    displayed_price: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderProducts {
    items: Vec<CartItem>,
    now: Timestamp,
}

#[derive(Debug, thiserror::Error)]
enum PriceError {
    #[error("invalid price for product \"{0}\"")]
    InvalidPrice(String),
}

/// The valid prices of one product (F2): the newest price set before the grace period (it was
/// current until a change that is still inside the grace period), and every price set inside
/// it.
#[derive(Debug, Clone, Default)]
struct ProductPrice {
    last_valid_old_price: Option<u64>,
    valid_new_prices: Vec<u64>,
}

impl ProductPrice {
    fn is_valid(&self, price: u64) -> bool {
        self.last_valid_old_price == Some(price) || self.valid_new_prices.contains(&price)
    }
}

/// `productPrice(productId)` with a grace period (F2; F3 has one per item). F1's projection
/// (the defined price only) is its special case without changes. On the page, F1 passes its
/// filter as `tags:` where `tagFilter:` is expected, so its runnable query has no tag at all;
/// here every feature filters on `product:{id}`, as F2 and F3 do.
fn product_price(product_id: &str, now: Timestamp) -> StateProjector<ProductPrice> {
    let within_grace = move |at: Timestamp| age(at, now) <= GRACE_PERIOD;
    StateProjector::typed(
        QueryItem::of::<PriceEvent>().tag("product", product_id),
        ProductPrice::default(),
        move |state, event: &PriceEvent| match event {
            PriceEvent::Defined(defined) => {
                *state = if within_grace(defined.defined_at) {
                    ProductPrice {
                        last_valid_old_price: None,
                        valid_new_prices: vec![defined.price],
                    }
                } else {
                    ProductPrice {
                        last_valid_old_price: Some(defined.price),
                        valid_new_prices: Vec::new(),
                    }
                }
            }
            PriceEvent::Changed(changed) => {
                if within_grace(changed.changed_at) {
                    state.valid_new_prices.push(changed.new_price);
                } else {
                    state.last_valid_old_price = Some(changed.new_price);
                }
            }
        },
    )
}

#[derive(DecisionModel)]
struct OrderProductModel {
    product_price: StateProjector<ProductPrice>,
}

/// One `productPrice` per product of the cart, keyed by product id: a set of entities that
/// changes from one command to the next, in one decision model.
#[derive(DecisionModel)]
struct OrderProductsModel {
    product_prices: BTreeMap<String, StateProjector<ProductPrice>>,
}

fn order_product_handler() -> impl CommandHandler<OrderProduct, Error = PriceError> {
    handler_fn(|command: &Command<OrderProduct>, reader| {
        Box::pin(async move {
            let OrderProduct {
                product_id,
                displayed_price,
                now,
            } = &command.payload;
            let model = reader
                .project(OrderProductModel {
                    product_price: product_price(product_id, *now),
                })
                .await?;
            if !model.states.product_price.is_valid(*displayed_price) {
                return Err(reject(PriceError::InvalidPrice(product_id.clone())));
            }
            let event = product_ordered(product_id, *displayed_price);
            // Fails only if the product's price was defined or changed since the read.
            Ok::<_, HandlerError<PriceError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

/// `orderProducts` (F3): the first item with an invalid price refuses the whole order. The
/// page's F3 projection reads `event.metadata.minutesAgo` without `?.`, so there every event
/// needs an age; here every price event records its time anyway. An empty cart is not covered
/// by the page: its decision model has no query, and the store refuses it as invalid input.
fn order_products_handler() -> impl CommandHandler<OrderProducts, Error = PriceError> {
    handler_fn(|command: &Command<OrderProducts>, reader| {
        Box::pin(async move {
            let OrderProducts { items, now } = &command.payload;
            let product_prices = items
                .iter()
                .map(|item| {
                    (
                        item.product_id.clone(),
                        product_price(&item.product_id, *now),
                    )
                })
                .collect();
            let model = reader
                .project(OrderProductsModel { product_prices })
                .await?;
            for item in items {
                let valid = model
                    .states
                    .product_prices
                    .get(&item.product_id)
                    .is_some_and(|price| price.is_valid(item.displayed_price));
                if !valid {
                    return Err(reject(PriceError::InvalidPrice(item.product_id.clone())));
                }
            }
            let ordered: Vec<(&str, u64)> = items
                .iter()
                .map(|item| (item.product_id.as_str(), item.displayed_price))
                .collect();
            let event = products_ordered(&ordered);
            Ok::<_, HandlerError<PriceError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

fn order_product(product_id: &str, displayed_price: u64) -> Command<OrderProduct> {
    Command::new(
        "OrderProduct",
        OrderProduct {
            product_id: product_id.into(),
            displayed_price,
            now: NOW,
        },
    )
}

fn order_products(items: &[(&str, u64)]) -> Command<OrderProducts> {
    Command::new(
        "OrderProducts",
        OrderProducts {
            items: items
                .iter()
                .map(|(id, price)| CartItem {
                    product_id: id.to_string(),
                    displayed_price: *price,
                })
                .collect(),
            now: NOW,
        },
    )
}

async fn dynamic_product_price(run: &mut Run) -> Result<(), AnyError> {
    println!("5. dynamic product price (grace period of an old price: 10 minutes)");
    let one = &order_product_handler();
    let cart = &order_products_handler();
    // F1's two tests, run on F2's model (F2 repeats them); their events have no age.
    run.scenario(
        r#"F1: given Defined(p1, 123): order p1 at 100 -> invalid price for product "p1""#,
        |s| async move {
            s.given_typed(&[product_defined("p1", 123, LONG_AGO)])
                .await
                .when_command(order_product("p1", 100), one)
                .await
                .then_error(r#"invalid price for product "p1""#)
                .await;
        },
    )
    .await?;
    run.scenario(
        "F1: given Defined(p1, 123): order p1 at 123 -> ProductOrdered(p1, 123)",
        |s| async move {
            s.given_typed(&[product_defined("p1", 123, LONG_AGO)])
                .await
                .when_command(order_product("p1", 123), one)
                .await
                .then_typed(&[product_ordered("p1", 123)])
                .await;
        },
    )
    .await?;
    run.scenario(
        r#"F2: given Defined(p1, 123, 20 min ago): order p1 at 100 -> invalid price for product "p1""#,
        |s| async move {
            s.given_typed(&[product_defined("p1", 123, minutes_ago(20))])
                .await
                .when_command(order_product("p1", 100), one)
                .await
                .then_error(r#"invalid price for product "p1""#)
                .await;
        },
    )
    .await?;
    run.scenario(
        r#"F2: given Defined(p1, 123, 20m), Changed(p1 -> 134, 20m): order p1 at 123 -> invalid price for product "p1""#,
        |s| async move {
            s.given_typed(&[
                product_defined("p1", 123, minutes_ago(20)),
                price_changed("p1", 134, minutes_ago(20)),
            ])
            .await
            .when_command(order_product("p1", 123), one)
            .await
            .then_error(r#"invalid price for product "p1""#)
            .await;
        },
    )
    .await?;
    run.scenario(
        "F2: given Defined(p1, 123, 20m): order p1 at 123 -> ProductOrdered(p1, 123)",
        |s| async move {
            s.given_typed(&[product_defined("p1", 123, minutes_ago(20))])
                .await
                .when_command(order_product("p1", 123), one)
                .await
                .then_typed(&[product_ordered("p1", 123)])
                .await;
        },
    )
    .await?;
    run.scenario(
        "F2: given Defined(p1, 123, 20m), Changed(p1 -> 134, 9m): order p1 at 123 -> ProductOrdered(p1, 123) (old price within grace)",
        |s| async move {
            s.given_typed(&[
                product_defined("p1", 123, minutes_ago(20)),
                price_changed("p1", 134, minutes_ago(9)),
            ])
            .await
            .when_command(order_product("p1", 123), one)
            .await
            .then_typed(&[product_ordered("p1", 123)])
            .await;
        },
    )
    .await?;
    run.scenario(
        "F2: given Defined(p1, 123, 20m), Changed(p1 -> 134, 9m): order p1 at 134 -> ProductOrdered(p1, 134) (new price)",
        |s| async move {
            s.given_typed(&[
                product_defined("p1", 123, minutes_ago(20)),
                price_changed("p1", 134, minutes_ago(9)),
            ])
            .await
            .when_command(order_product("p1", 134), one)
            .await
            .then_typed(&[product_ordered("p1", 134)])
            .await;
        },
    )
    .await?;
    run.scenario(
        r#"F3: given Defined(p1, 123, 20m): order [p1 at 100] -> invalid price for product "p1""#,
        |s| async move {
            s.given_typed(&[product_defined("p1", 123, minutes_ago(20))])
                .await
                .when_command(order_products(&[("p1", 100)]), cart)
                .await
                .then_error(r#"invalid price for product "p1""#)
                .await;
        },
    )
    .await?;
    run.scenario(
        r#"F3: given Defined(p1, 123, 20m), Changed(p1 -> 134, 20m): order [p1 at 123] -> invalid price for product "p1""#,
        |s| async move {
            s.given_typed(&[
                product_defined("p1", 123, minutes_ago(20)),
                price_changed("p1", 134, minutes_ago(20)),
            ])
            .await
            .when_command(order_products(&[("p1", 123)]), cart)
            .await
            .then_error(r#"invalid price for product "p1""#)
            .await;
        },
    )
    .await?;
    run.scenario(
        "F3: given Defined(p1, 123, 20m): order [p1 at 123] -> ProductsOrdered([p1 at 123])",
        |s| async move {
            s.given_typed(&[product_defined("p1", 123, minutes_ago(20))])
                .await
                .when_command(order_products(&[("p1", 123)]), cart)
                .await
                .then_typed(&[products_ordered(&[("p1", 123)])])
                .await;
        },
    )
    .await?;
    run.scenario(
        "F3: given Defined(p1, 123, 20m), Changed(p1 -> 134, 9m): order [p1 at 123] -> ProductsOrdered([p1 at 123])",
        |s| async move {
            s.given_typed(&[
                product_defined("p1", 123, minutes_ago(20)),
                price_changed("p1", 134, minutes_ago(9)),
            ])
            .await
            .when_command(order_products(&[("p1", 123)]), cart)
            .await
            .then_typed(&[products_ordered(&[("p1", 123)])])
            .await;
        },
    )
    .await?;
    run.scenario(
        "F3: given Defined(p1, 123, 20m), Changed(p1 -> 134, 9m), Defined(p2, 321, 8m): order [p1 at 123, p2 at 321] -> ProductsOrdered([p1 at 123, p2 at 321])",
        |s| async move {
            s.given_typed(&[
                product_defined("p1", 123, minutes_ago(20)),
                price_changed("p1", 134, minutes_ago(9)),
                product_defined("p2", 321, minutes_ago(8)),
            ])
            .await
            .when_command(order_products(&[("p1", 123), ("p2", 321)]), cart)
            .await
            .then_typed(&[products_ordered(&[("p1", 123), ("p2", 321)])])
            .await;
        },
    )
    .await?;
    run.scenario(
        r#"F3 (not on the page): given Defined(p1, 123, 20m), Defined(p2, 321, 8m): order [p1 at 123, p2 at 300] -> invalid price for product "p2""#,
        |s| async move {
            s.given_typed(&[
                product_defined("p1", 123, minutes_ago(20)),
                product_defined("p2", 321, minutes_ago(8)),
            ])
            .await
            .when_command(order_products(&[("p1", 123), ("p2", 300)]), cart)
            .await
            .then_error(r#"invalid price for product "p2""#)
            .await;
        },
    )
    .await?;
    for (title, interloper, conflicts) in [
        (
            "another order of p1",
            product_ordered("p1", 123).encode()?,
            false,
        ),
        (
            "a price change of p1",
            price_changed("p1", 150, NOW).encode()?,
            true,
        ),
    ] {
        let verb = if conflicts { "makes" } else { "does not make" };
        run.check(
            format!(
                "(not on the page) ordering p1: {title} between the decision's read and its append {verb} the append fail"
            ),
            |store| async move {
                store
                    .append(crablet::encode_all(&[product_defined("p1", 123, LONG_AGO)])?)
                    .await?;
                let conflicted = commit_conflicts_raw(
                    &store,
                    one,
                    order_product("p1", 123),
                    vec![interloper],
                )
                .await?;
                Ok(conflicted == conflicts)
            },
        )
        .await?;
    }
    Ok(())
}

// =============================================================================================
// 6. Prevent record duplication (prevent-record-duplication.md)
// =============================================================================================

/// An order, with the idempotency token the client generated for the request that placed it.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct OrderPlaced {
    #[crablet(tag = "order")]
    order_id: String,
    #[crablet(tag = "idempotency")]
    idempotency_token: String,
}

/// The page's command still carries `orderId`, although its prose calls the id
/// server-generated.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlaceOrder {
    order_id: String,
    idempotency_token: String,
}

#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("Re-submission")]
    Resubmission,
}

#[derive(DecisionModel)]
struct PlaceOrderModel {
    idempotency_token_was_used: StateProjector<bool>,
}

/// `idempotencyTokenWasUsed(idempotencyToken)`.
fn idempotency_token_was_used(token: &str) -> StateProjector<bool> {
    StateProjector::exists(QueryItem::of::<OrderPlaced>().tag("idempotency", token))
}

/// The page's extensions (a unique `orderId` as well; reusing a token once its order is
/// placed) are suggestions it does not implement; neither is done here.
///
/// crablet's executor has an idempotency of its own, by command id (`Command::with_id`, see
/// `examples/transfer.rs`): a repeated id is not executed again but returns the original
/// outcome. This page's token is business data instead, and a second use is refused.
fn place_order_handler() -> impl CommandHandler<PlaceOrder, Error = OrderError> {
    handler_fn(|command: &Command<PlaceOrder>, reader| {
        Box::pin(async move {
            let PlaceOrder {
                order_id,
                idempotency_token,
            } = &command.payload;
            let model = reader
                .project(PlaceOrderModel {
                    idempotency_token_was_used: idempotency_token_was_used(idempotency_token),
                })
                .await?;
            if model.states.idempotency_token_was_used {
                return Err(reject(OrderError::Resubmission));
            }
            let event = order_placed(order_id, idempotency_token);
            // Two requests racing with the same token cannot both append.
            Ok::<_, HandlerError<OrderError>>(
                Decision::append_typed(&[event])?.guarded_by(model.condition),
            )
        })
    })
}

fn order_placed(order_id: &str, token: &str) -> OrderPlaced {
    OrderPlaced {
        order_id: order_id.into(),
        idempotency_token: token.into(),
    }
}

fn place_order(order_id: &str, token: &str) -> Command<PlaceOrder> {
    Command::new(
        "PlaceOrder",
        PlaceOrder {
            order_id: order_id.into(),
            idempotency_token: token.into(),
        },
    )
}

async fn prevent_record_duplication(run: &mut Run) -> Result<(), AnyError> {
    println!("6. prevent record duplication (idempotency token)");
    let handler = &place_order_handler();
    run.scenario(
        "given OrderPlaced(o12345, 11111): place order o54321 with token 11111 -> Re-submission",
        |s| async move {
            s.given_typed(&[order_placed("o12345", "11111")])
                .await
                .when_command(place_order("o54321", "11111"), handler)
                .await
                .then_error("Re-submission")
                .await;
        },
    )
    .await?;
    run.scenario(
        "given OrderPlaced(o12345, 11111): place order o54321 with token 22222 -> OrderPlaced(o54321, 22222)",
        |s| async move {
            s.given_typed(&[order_placed("o12345", "11111")])
                .await
                .when_command(place_order("o54321", "22222"), handler)
                .await
                .then_typed(&[order_placed("o54321", "22222")])
                .await;
        },
    )
    .await?;
    run.check(
        "(not on the page) a request with the same token between the decision's read and its append makes the append fail",
        |store| async move {
            commit_conflicts(
                &store,
                handler,
                place_order("o54321", "33333"),
                &[order_placed("o99999", "33333")],
            )
            .await
        },
    )
    .await
}

// =============================================================================================
// Running the scenarios: a fresh store for each.
// =============================================================================================

/// Decides `command` with `handler` on `store`, appends `interloper` between the decision's
/// read and its commit (as a parallel writer would), then commits the decision with its append
/// condition. True when the commit failed with a conflict; it wrote nothing then.
async fn commit_conflicts<T, H, E>(
    store: &Arc<dyn EventStore>,
    handler: &H,
    command: Command<T>,
    interloper: &[E],
) -> Result<bool, AnyError>
where
    T: Send + Sync,
    H: CommandHandler<T>,
    E: DomainEvent,
{
    commit_conflicts_raw(store, handler, command, crablet::encode_all(interloper)?).await
}

/// [`commit_conflicts`] with the interloper already encoded.
async fn commit_conflicts_raw<T, H>(
    store: &Arc<dyn EventStore>,
    handler: &H,
    command: Command<T>,
    interloper: Vec<NewEvent>,
) -> Result<bool, AnyError>
where
    T: Send + Sync,
    H: CommandHandler<T>,
{
    let decision = handler
        .handle(&command, store.as_ref())
        .await
        .map_err(|err| format!("the decision failed: {err}"))?;
    let (events, condition, _no_work) = decision.into_parts();
    let condition = condition.ok_or("the decision has no append condition")?;
    store.append(interloper).await?;
    match store.append_if(events, condition).await {
        Ok(_) => Ok(false),
        Err(err) if err.is_conflict() => Ok(true),
        Err(err) => Err(err.into()),
    }
}

/// Opens a fresh, empty store per scenario: in memory, or on PostgreSQL a schema of its own
/// (all sharing one connection pool).
struct Run {
    postgres: Option<Postgres>,
    opened: AtomicUsize,
    passed: usize,
}

struct Postgres {
    url: String,
    /// A plain connection, to drop the scenarios' schemas.
    admin: tokio_postgres::Client,
    /// The pool of the first scenario's store, shared by the others.
    pool: Mutex<Option<Pool>>,
}

const SCHEMA_PREFIX: &str = "crablet_example_dcb_spec_";

impl Run {
    async fn open() -> Result<Self, AnyError> {
        let postgres = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => {
                println!("backend: postgres (schemas {SCHEMA_PREFIX}<n>, one per scenario)");
                let (admin, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                Some(Postgres {
                    url,
                    admin,
                    pool: Mutex::new(None),
                })
            }
            _ => {
                println!("backend: in-memory (set DATABASE_URL to run on PostgreSQL)");
                None
            }
        };
        let run = Self {
            postgres,
            opened: AtomicUsize::new(0),
            passed: 0,
        };
        run.drop_schemas().await?;
        Ok(run)
    }

    /// A new, empty store that no other scenario uses.
    async fn fresh(&self) -> Result<Arc<dyn EventStore>, AnyError> {
        let n = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(pg) = &self.postgres else {
            return Ok(Arc::new(InMemoryEventStore::new()));
        };
        let config = StoreConfig::default()
            .schema(format!("{SCHEMA_PREFIX}{n:02}"))
            .auto_migrate(true)
            .notify_on_append(false);
        let pool = pg.pool.lock().expect("pool lock").clone();
        let store = match pool {
            Some(pool) => PostgresEventStore::from_pool(pool, config).await?,
            None => {
                let store = PostgresEventStore::connect(&pg.url, config).await?;
                *pg.pool.lock().expect("pool lock") = Some(store.pool().clone());
                store
            }
        };
        Ok(Arc::new(store))
    }

    /// Drops every schema of this example's scenarios (from this run or an earlier one).
    async fn drop_schemas(&self) -> Result<(), AnyError> {
        let Some(pg) = &self.postgres else {
            return Ok(());
        };
        let pattern = format!("{}%", SCHEMA_PREFIX.replace('_', "\\_"));
        let rows = pg
            .admin
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1",
                &[&pattern],
            )
            .await?;
        for row in rows {
            let schema: String = row.get(0);
            pg.admin
                .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                .await?;
        }
        Ok(())
    }

    fn ok(&mut self, title: &str) {
        self.passed += 1;
        println!("  ok: {title}");
    }

    /// Prints `ok: <title>` if `holds`; otherwise fails the example.
    fn holds(&mut self, holds: bool, title: impl AsRef<str>) -> Result<(), AnyError> {
        check(holds, title.as_ref())?;
        self.passed += 1;
        Ok(())
    }

    /// Runs one given/when/then scenario on a fresh store; its steps panic on a mismatch.
    async fn scenario<F, Fut>(&mut self, title: &str, body: F) -> Result<(), AnyError>
    where
        F: FnOnce(Scenario) -> Fut,
        Fut: Future<Output = ()>,
    {
        let store = self.fresh().await?;
        // A mismatch panics with the testkit's report (on stderr); name the scenario too.
        if AssertUnwindSafe(body(Scenario::on(store)))
            .catch_unwind()
            .await
            .is_err()
        {
            return Err(format!("scenario failed: {title}").into());
        }
        self.ok(title);
        Ok(())
    }

    /// Runs one check on a fresh store: it fails the example unless `body` gives true.
    async fn check<F, Fut>(&mut self, title: impl AsRef<str>, body: F) -> Result<(), AnyError>
    where
        F: FnOnce(Arc<dyn EventStore>) -> Fut,
        Fut: Future<Output = Result<bool, AnyError>>,
    {
        let store = self.fresh().await?;
        let holds = body(store).await?;
        self.holds(holds, title)
    }
}

async fn run() -> Result<(), AnyError> {
    let started = Instant::now();
    let mut run = Run::open().await?;
    unique_username(&mut run).await?;
    course_subscriptions(&mut run).await?;
    invoice_number(&mut run).await?;
    opt_in_token(&mut run).await?;
    dynamic_product_price(&mut run).await?;
    prevent_record_duplication(&mut run).await?;
    run.drop_schemas().await?;
    println!(
        "all {} scenarios and checks of the 6 pages passed, on {} stores, in {} ms",
        run.passed,
        run.opened.load(Ordering::Relaxed),
        started.elapsed().as_millis()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run()).await
}
