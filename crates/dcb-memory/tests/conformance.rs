//! The backend-agnostic conformance suite, run against the in-memory store.

use dcb_core::EventStore;
use dcb_memory::InMemoryEventStore;
use std::sync::Arc;

struct MemoryFactory;

#[async_trait::async_trait]
impl dcb_testkit::StoreFactory for MemoryFactory {
    async fn new_store(&self) -> Arc<dyn EventStore> {
        Arc::new(InMemoryEventStore::new())
    }
}

dcb_testkit::conformance_tests!(MemoryFactory);
