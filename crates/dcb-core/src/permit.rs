//! Slots in a backend's limit on concurrent projections.
use std::any::Any;

/// A slot in a backend's limit on concurrent projections, released when dropped.
#[derive(Default)]
pub struct ProjectionPermit(#[allow(dead_code)] Option<Box<dyn Any + Send + Sync>>);

impl ProjectionPermit {
    /// A permit that limits nothing.
    pub fn unlimited() -> Self {
        Self(None)
    }

    /// Wraps a backend's guard (a semaphore permit, say).
    pub fn new(guard: impl Any + Send + Sync) -> Self {
        Self(Some(Box::new(guard)))
    }
}

impl std::fmt::Debug for ProjectionPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProjectionPermit")
    }
}
