// The event type is the event's type, never a field of its payload.
#[derive(crablet::DomainEvent)]
#[serde(tag = "type")]
struct Deposited {
    amount: u64,
}

fn main() {}
