//! Wake-ups from a backend to its subscribers: "something may have been appended".
use std::sync::Arc;
use tokio::sync::watch;

/// The receiving side of a backend's wake-ups: "something may have been appended".
///
/// A feed only says *that* something changed, never *what*: a subscriber that wakes re-reads its
/// query, so spurious or coalesced wake-ups are harmless. Feeds come from
/// [`EventReader::change_feed`](crate::EventReader::change_feed); backends create them with a [`ChangeNotifier`].
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    rx: watch::Receiver<u64>,
}

impl ChangeFeed {
    /// Marks every change so far as seen. Call it *before* a read: a change that happens after
    /// this call then wakes the next [`changed`](Self::changed), so no wake-up is lost between
    /// the read and the wait.
    pub fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Waits until something changed since the last [`mark_seen`](Self::mark_seen). Returns
    /// `false` when the backend closed the feed (no wake-up will ever come again; poll instead).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// The sending side of [`ChangeFeed`]s: a backend keeps one and calls
/// [`notify`](Self::notify) after every commit. Cheap to clone; clones share the feeds.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use dcb_core::ChangeNotifier;
/// let notifier = ChangeNotifier::new();
/// let mut feed = notifier.feed();
/// feed.mark_seen();
/// notifier.notify();
/// assert!(feed.changed().await);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ChangeNotifier {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for ChangeNotifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeNotifier {
    /// A notifier without feeds.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Wakes every feed. Never blocks and never fails, also without feeds.
    pub fn notify(&self) {
        self.tx
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// A new feed that is woken by every later [`notify`](Self::notify).
    pub fn feed(&self) -> ChangeFeed {
        ChangeFeed {
            rx: self.tx.subscribe(),
        }
    }

    /// How many feeds are alive.
    pub fn feeds(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Completes when no feed is alive (at once if there is none).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}
