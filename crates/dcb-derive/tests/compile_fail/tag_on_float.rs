#[derive(crablet::DomainEvent)]
struct PriceChanged {
    #[crablet(tag)]
    price: f64,
}

fn main() {}
