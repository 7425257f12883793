// On an enum, serde's rename_all renames variants: event types are named by crablet.
#[derive(crablet::DomainEvent)]
#[serde(rename_all = "camelCase")]
enum AccountEvent {
    Opened { opening_balance: i64 },
}

fn main() {}
