#[derive(crablet::DomainEvent)]
enum ShiftEvent {
    ShiftStarted {
        #[crablet(tag)]
        at: std::time::SystemTime,
    },
}

fn main() {}
