//! Wake-ups for subscriptions and handler runners.
//!
//! - **In process**: every successful append of this store wakes the store's local
//!   [`ChangeNotifier`], so subscribers in the same process never depend on NOTIFY.
//! - **Across processes**: with `notify_on_append`, a background *notifier* task sends
//!   `pg_notify(channel, instance)` on a pooled connection after appends have committed. It never
//!   runs inside an append transaction (NOTIFY takes a database-wide lock at commit, which would
//!   serialize all appends) and adds nothing to an append's round trip. The first append after a
//!   quiet period is notified at once; bursts are coalesced into at most one notification per
//!   `notify_interval` (each NOTIFY is a small transaction of its own).
//! - A dedicated **listener** connection (not from the pool) runs `LISTEN channel` while at
//!   least one feed is alive, started lazily by the first subscriber and stopped when the last
//!   one is gone; it forwards notifications of *other* store instances into the local notifier.
//!   After every (re)connection it wakes the subscribers once, since notifications sent while it
//!   was away are lost.
//!
//! The channel is per schema: `crablet_<schema>`, shortened with a hash when that exceeds
//! PostgreSQL's 63-byte identifier limit.
use crate::config::StoreConfig;
use dcb_core::{ChangeFeed, ChangeNotifier};
use deadpool_postgres::Pool;
use futures_util::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::Instrument;

/// PostgreSQL's longest identifier (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;
/// How often an idle listener checks that its connection still answers.
const LISTENER_HEALTH_CHECK: Duration = Duration::from_secs(30);
const RETRY_INITIAL: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The NOTIFY channel of a schema: `crablet_<schema>`, at most 63 bytes.
pub(crate) fn channel_name(schema: &str) -> String {
    let full = format!("crablet_{schema}");
    if full.len() <= MAX_IDENTIFIER {
        return full;
    }
    // Keep a readable prefix and make it unique with a hash of the whole name.
    let hash = fnv1a(schema.as_bytes());
    let suffix = format!("_{hash:016x}");
    let mut cut = MAX_IDENTIFIER - suffix.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &full[..cut])
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An id of this store instance, sent as the NOTIFY payload so the listener can ignore its own
/// notifications (local subscribers were already woken in process).
fn instance_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}-{n:x}", std::process::id(), nanos as u64)
}

fn backoff(failures: u32) -> Duration {
    dcb_core::runner::backoff_delay(RETRY_INITIAL, RETRY_MAX, failures)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values (task handles, a config) stay consistent if a holder panicked.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// State shared with the listener task.
struct Shared {
    channel: String,
    instance: String,
    local: ChangeNotifier,
    listen_config: OnceLock<tokio_postgres::Config>,
    listener: Mutex<Option<JoinHandle<()>>>,
}

/// The wake-up machinery of one store (one per `PostgresEventStore`, shared by its clones).
pub(crate) struct Changes {
    shared: Arc<Shared>,
    pool: Pool,
    notify_on_append: bool,
    notify_interval: Duration,
    outbox: watch::Sender<u64>,
    notifier: Mutex<Option<JoinHandle<()>>>,
    /// Woken after a handler runner of this store committed a checkpoint.
    pub(crate) checkpoints: ChangeNotifier,
}

impl Changes {
    pub(crate) fn new(config: &StoreConfig, pool: Pool) -> Self {
        Self {
            shared: Arc::new(Shared {
                channel: channel_name(&config.schema),
                instance: instance_id(),
                local: ChangeNotifier::new(),
                listen_config: OnceLock::new(),
                listener: Mutex::new(None),
            }),
            pool,
            notify_on_append: config.notify_on_append,
            notify_interval: config.notify_interval,
            outbox: watch::Sender::new(0),
            notifier: Mutex::new(None),
            checkpoints: ChangeNotifier::new(),
        }
    }

    /// Enables the cross-process listener: it connects with `config` (the pool's connections
    /// cannot receive notifications). Without it, subscribers are woken by this store's own
    /// appends and otherwise poll.
    pub(crate) fn set_listen_config(&self, config: tokio_postgres::Config) {
        let _ = self.shared.listen_config.set(config);
    }

    /// Called after an append committed: wakes local feeds and, if enabled, the notifier.
    pub(crate) fn committed(&self) {
        self.shared.local.notify();
        if self.notify_on_append {
            self.outbox.send_modify(|n| *n = n.wrapping_add(1));
            self.ensure_notifier();
        }
    }

    /// A feed woken by local appends and by other instances' notifications.
    pub(crate) fn feed(&self) -> ChangeFeed {
        // The feed exists before the listener is checked, so a listener that is about to stop
        // for lack of feeds sees it (both sides decide under the `listener` lock).
        let feed = self.shared.local.feed();
        self.ensure_listener();
        feed
    }

    fn ensure_notifier(&self) {
        let mut guard = lock(&self.notifier);
        if guard.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let rx = self.outbox.subscribe();
        let pool = self.pool.clone();
        let channel = self.shared.channel.clone();
        let instance = self.shared.instance.clone();
        let span = tracing::debug_span!("pg.notifier", channel = %channel);
        let interval = self.notify_interval;
        let task = notifier(rx, pool, channel, instance, interval);
        *guard = Some(runtime.spawn(task.instrument(span)));
    }

    fn ensure_listener(&self) {
        let Some(config) = self.shared.listen_config.get().cloned() else {
            return;
        };
        let mut guard = lock(&self.shared.listener);
        if guard.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let span = tracing::debug_span!("pg.listener", channel = %self.shared.channel);
        *guard = Some(runtime.spawn(listener(Arc::clone(&self.shared), config).instrument(span)));
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        if let Some(handle) = lock(&self.notifier).take() {
            handle.abort();
        }
        if let Some(handle) = lock(&self.shared.listener).take() {
            handle.abort();
        }
    }
}

/// Sends one notification per observed change, after the change, at most one per `interval`
/// (changes during the interval are covered by one notification at its end); retries with
/// backoff.
async fn notifier(
    mut rx: watch::Receiver<u64>,
    pool: Pool,
    channel: String,
    instance: String,
    interval: Duration,
) {
    let mut failures = 0u32;
    loop {
        if rx.changed().await.is_err() {
            return; // the store is gone
        }
        rx.borrow_and_update();
        loop {
            match send_notify(&pool, &channel, &instance).await {
                Ok(()) => {
                    failures = 0;
                    if !interval.is_zero() {
                        tokio::time::sleep(interval).await;
                    }
                    break;
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(%err, channel, "NOTIFY failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                    // Anything appended meanwhile is covered by the retry.
                    rx.borrow_and_update();
                }
            }
        }
    }
}

async fn send_notify(pool: &Pool, channel: &str, instance: &str) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let stmt = client
        .prepare_cached("SELECT pg_notify($1, $2)")
        .await
        .map_err(|e| e.to_string())?;
    client
        .execute(&stmt, &[&channel, &instance])
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Why a listener session ended.
enum SessionEnd {
    /// No feed is alive any more.
    Idle,
    /// The connection failed; reconnect.
    Lost(String),
}

/// Listens while feeds are alive; reconnects with backoff.
async fn listener(shared: Arc<Shared>, config: tokio_postgres::Config) {
    let mut failures = 0u32;
    loop {
        match listen_session(&shared, &config, &mut failures).await {
            SessionEnd::Idle => {
                let mut guard = lock(&shared.listener);
                if shared.local.feeds() == 0 {
                    *guard = None;
                    tracing::debug!(channel = %shared.channel, "listener stops: no subscriber");
                    return;
                }
            }
            SessionEnd::Lost(reason) => {
                failures = failures.saturating_add(1);
                tracing::debug!(channel = %shared.channel, reason, failures, "listener connection lost");
                let delay = backoff(failures);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.local.closed() => {}
                }
                // Subscribers may have missed notifications: make them look.
                shared.local.notify();
            }
        }
    }
}

async fn listen_session(
    shared: &Shared,
    config: &tokio_postgres::Config,
    failures: &mut u32,
) -> SessionEnd {
    if shared.local.feeds() == 0 {
        return SessionEnd::Idle;
    }
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(err) => return SessionEnd::Lost(err.to_string()),
    };
    let own = shared.instance.as_str();
    let local = &shared.local;
    // Drives the connection and forwards notifications until it ends.
    let drive = async {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if n.payload() != own {
                        local.notify();
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return err.to_string(),
                None => return "connection closed".to_string(),
            }
        }
    };
    let session = async {
        let listen = format!("LISTEN {}", quote_ident(&shared.channel));
        if let Err(err) = client.batch_execute(&listen).await {
            return SessionEnd::Lost(err.to_string());
        }
        *failures = 0;
        // Appends may have committed before LISTEN took effect.
        local.notify();
        loop {
            tokio::select! {
                _ = local.closed() => return SessionEnd::Idle,
                _ = tokio::time::sleep(LISTENER_HEALTH_CHECK) => {
                    if let Err(err) = client.batch_execute("SELECT 1").await {
                        return SessionEnd::Lost(err.to_string());
                    }
                }
            }
        }
    };
    tokio::select! {
        reason = drive => SessionEnd::Lost(reason),
        end = session => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_fit_identifiers_and_stay_distinct() {
        assert_eq!(channel_name("public"), "crablet_public");
        let long_a = "a".repeat(63);
        let long_b = format!("{}b", "a".repeat(62));
        let a = channel_name(&long_a);
        let b = channel_name(&long_b);
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        let unicode = "é".repeat(40);
        assert!(channel_name(&unicode).len() <= 63);
    }
}
