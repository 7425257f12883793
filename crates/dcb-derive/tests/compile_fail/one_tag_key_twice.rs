#[derive(crablet::DomainEvent)]
struct ProductsOrdered {
    #[crablet(tag = "product")]
    first: String,
    #[crablet(tag = "product")]
    second: String,
}

fn main() {}
