// The generated payload structs use names of this prefix.
#[derive(crablet::DomainEvent)]
struct Deposited {
    __crablet_marker: u64,
}

fn main() {}
