#[derive(crablet::DomainEvent)]
struct Deposited {
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

fn main() {}
