//! The decision model both criterion benches use (go-crablet's course subscription).
use crablet::{Query, QueryItem, StateProjector};

/// Events of `event_type` tagged with course `course`.
pub fn course_item(event_type: &str, course: &str) -> Query {
    Query::from(
        QueryItem::new()
            .types([event_type])
            .tag("course_id", course),
    )
}

/// go-crablet's course-subscription decision model: course exists, enrolled count, left count.
#[allow(clippy::type_complexity)]
pub fn course_model(
    course: &str,
) -> (
    StateProjector<bool>,
    StateProjector<u64>,
    StateProjector<u64>,
) {
    (
        StateProjector::exists(course_item("CourseDefined", course)),
        StateProjector::counter(course_item("StudentEnrolled", course)),
        StateProjector::counter(course_item("StudentLeft", course)),
    )
}
