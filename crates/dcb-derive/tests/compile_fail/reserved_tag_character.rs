#[derive(crablet::DomainEvent)]
struct Deposited {
    #[crablet(tag = "account:id")]
    account_id: String,
}

fn main() {}
