//! The executor scenarios on the in-memory store.

#[macro_use]
mod common;

use dcb_core::EventStore;
use dcb_memory::InMemoryEventStore;
use std::sync::Arc;

async fn store() -> (Arc<dyn EventStore>, ()) {
    (Arc::new(InMemoryEventStore::new()), ())
}

all_backend_tests!();

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_commands_complete() {
    let (store, ()) = store().await;
    common::many_concurrent_commands_complete(store, 32).await;
}
