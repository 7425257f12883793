#[derive(crablet::DomainEvent)]
enum CourseEvent {
    CourseDefined {
        #[crablet(tag)]
        course_id: String,
    },
    #[crablet(event_type = "CourseDefined")]
    CourseRedefined {
        #[crablet(tag)]
        course_id: String,
    },
}

fn main() {}
