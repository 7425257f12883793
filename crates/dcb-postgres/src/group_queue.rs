//! The group-commit queue of one store: calls waiting for a group, and how a caller abandons
//! one (`group.rs` runs the flushers).
use dcb_core::{AppendCondition, Cursor, Error, NewEvent};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The events and (simplified) condition of one call of a group.
pub(crate) type Call = (Vec<NewEvent>, Option<AppendCondition>);

/// What a group's results are read with, once its events moved into the statement: per call,
/// how many events it appends and its condition's cursor (if it has a condition).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallShape {
    pub(crate) events: usize,
    pub(crate) condition: Option<Option<Cursor>>,
}

pub(crate) const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// One call waiting for a group; owned by the queue, then by the flusher that takes it.
pub(crate) struct Pending {
    pub(crate) events: Vec<NewEvent>,
    /// Simplified, as the single-call path checks it.
    pub(crate) condition: Option<AppendCondition>,
    /// Shared with the caller, who may abandon the call while it is queued.
    pub(crate) state: Arc<AtomicU8>,
    pub(crate) reply: oneshot::Sender<Result<Cursor, Error>>,
}

impl Pending {
    /// Takes the call for a group, unless it was abandoned or its caller is gone.
    pub(crate) fn take(&self) -> bool {
        !self.reply.is_closed()
            && self
                .state
                .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// Gives up waiting: true if the call was never taken (it certainly wrote nothing).
pub(crate) fn abandon(state: &AtomicU8) -> bool {
    state
        .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) waiting: VecDeque<Pending>,
    pub(crate) flushers: usize,
    /// When a flusher last started or took a group.
    pub(crate) progress: Option<Instant>,
}

/// The group-commit queue of one store.
#[derive(Default)]
pub(crate) struct Groups {
    queue: Mutex<Queue>,
}

impl Groups {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
