// A tag is not part of the payload: serde's rename would be silently ignored.
#[derive(crablet::DomainEvent)]
struct Deposited {
    #[crablet(tag)]
    #[serde(rename = "account")]
    account_id: String,
    amount: u64,
}

fn main() {}
