#[derive(crablet::DomainEvent)]
struct Wrapped<T> {
    value: T,
}

fn main() {}
