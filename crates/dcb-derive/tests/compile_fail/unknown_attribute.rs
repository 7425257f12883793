#[derive(crablet::DomainEvent)]
#[crablet(name = "Deposited")]
struct Deposited {
    amount: u64,
}

fn main() {}
