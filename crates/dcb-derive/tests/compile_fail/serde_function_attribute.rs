// Left out when empty, but then missing when read: it would not decode without a default.
#[derive(crablet::DomainEvent)]
struct Deposited {
    #[serde(skip_serializing_if = "String::is_empty")]
    note: String,
}

fn main() {}
