#[derive(crablet::DecisionModel)]
struct Model {
    count: u64,
}

fn main() {}
