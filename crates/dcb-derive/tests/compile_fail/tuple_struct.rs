#[derive(crablet::DomainEvent)]
struct Deposited(u64);

fn main() {}
