//! Subscriptions: catch up on the stored events of a query, then follow new ones as they commit.
//!
//! A subscription is nothing but a loop of *complete* reads (see [`EventReader`]): read at most
//! `batch_size` events after the last delivered cursor, hand them out one by one, and when a read
//! came back short, wait for a wake-up (the backend's [`ChangeFeed`]) or for `poll_interval`,
//! whichever comes first. Because every read returns all matching events that will ever exist
//! below its cursors, continuing after the last delivered cursor never skips an event and never
//! repeats one, across the catch-up/live boundary and under out-of-order commits alike.
use crate::change_feed::ChangeFeed;
use crate::{Cursor, Error, Event, EventReader, EventStream, Query, ReadOptions};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Settings of a subscription.
///
/// ```
/// use dcb_core::SubscribeOptions;
/// use std::time::Duration;
/// let options = SubscribeOptions::default().batch_size(100).poll_interval(Duration::from_millis(250));
/// assert_eq!(options.batch_size, 100);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// The most events one read fetches; also the most events buffered in the stream, so a slow
    /// consumer never makes it grow. Default 256.
    pub batch_size: usize,
    /// How long a caught-up subscription waits for a wake-up before it reads again anyway: the
    /// fallback for lost or missing notifications (a backend without a change feed is polled at
    /// this rate). Default 1 s.
    pub poll_interval: Duration,
    /// Delay before the first retry after a transient read error; doubled per consecutive
    /// failure. Default 100 ms.
    pub retry_initial: Duration,
    /// Longest delay between retries. Default 5 s.
    pub retry_max: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

impl SubscribeOptions {
    /// Sets the batch size.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets the polling fallback interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets the retry backoff: first delay and cap.
    pub fn retry(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max;
        self
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.to_string(),
            })
        };
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval", "must be longer than zero");
        }
        crate::runner::validate_backoff(self.retry_initial, self.retry_max)
    }

    /// The delay before retry number `failures` (1-based): exponential, capped at `retry_max`.
    pub fn retry_delay(&self, failures: u32) -> Duration {
        crate::runner::backoff_delay(self.retry_initial, self.retry_max, failures)
    }
}

/// True for errors a subscription cannot recover from by retrying the same read: invalid input
/// or configuration, or a schema that does not match. Everything else (storage errors, timeouts,
/// serialization conflicts of the read transaction, ...) is retried.
pub fn is_fatal_for_subscription(error: &Error) -> bool {
    matches!(
        error,
        Error::Validation(_) | Error::Schema { .. } | Error::Config { .. }
    )
}

/// Subscribes to the events matching `query` strictly after `after` (from the beginning when
/// `None`), over any shared reader: first every stored event, then new ones as they commit, in
/// cursor order, each exactly once.
///
/// The stream only reads when it is polled and holds at most one batch, so a slow consumer
/// applies backpressure instead of growing memory. It wakes on the reader's
/// [`change_feed`](EventReader::change_feed) and reads at least every `poll_interval` anyway.
///
/// Errors arrive as `Err` items. Transient ones (storage errors, timeouts, anything not
/// [fatal](is_fatal_for_subscription)) are followed by a retry after an exponential backoff
/// (`retry_initial` doubling up to `retry_max`) from the last delivered cursor, so the stream
/// resumes without gap or duplicate; a fatal error (invalid query or options, schema mismatch,
/// configuration) is the stream's last item. The stream never ends otherwise.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # use std::sync::Arc;
/// # use futures_util::StreamExt;
/// # struct Empty;
/// # #[async_trait::async_trait]
/// # impl dcb_core::EventReader for Empty {
/// #     async fn query(&self, _: &dcb_core::Query, _: dcb_core::ReadOptions) -> dcb_core::Result<Vec<dcb_core::Event>> { Ok(vec![]) }
/// #     fn query_stream(&self, _: &dcb_core::Query, _: dcb_core::ReadOptions) -> dcb_core::EventStream { futures_util::stream::empty().boxed() }
/// # }
/// use dcb_core::{subscribe, Query, SubscribeOptions};
/// // A zero batch size is a fatal error: it is the stream's only item.
/// let mut stream = subscribe(Arc::new(Empty), &Query::all(), None, SubscribeOptions::default().batch_size(0));
/// assert!(stream.next().await.unwrap().is_err());
/// assert!(stream.next().await.is_none());
/// # }
/// ```
pub fn subscribe<R>(
    reader: Arc<R>,
    query: &Query,
    after: Option<Cursor>,
    options: SubscribeOptions,
) -> EventStream
where
    R: EventReader + ?Sized + 'static,
{
    if let Err(err) = options.validate() {
        return Box::pin(futures_util::stream::once(async { Err(err) }));
    }
    if let Err(err) = crate::validate_query(query) {
        return Box::pin(futures_util::stream::once(async { Err(err) }));
    }
    let state = State {
        reader,
        query: query.clone(),
        after,
        options,
        buffer: VecDeque::new(),
        feed: None,
        started: false,
        next: Next::Read,
        failures: 0,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, State::step))
}

/// Subscriptions on any cloneable reader (every store): `store.subscribe(&query, after)`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dcb_core::Result<()> {
/// # use futures_util::StreamExt;
/// # #[derive(Clone)] struct Empty;
/// # #[async_trait::async_trait]
/// # impl dcb_core::EventReader for Empty {
/// #     async fn query(&self, _: &dcb_core::Query, _: dcb_core::ReadOptions) -> dcb_core::Result<Vec<dcb_core::Event>> { Ok(vec![]) }
/// #     fn query_stream(&self, _: &dcb_core::Query, _: dcb_core::ReadOptions) -> dcb_core::EventStream { futures_util::stream::empty().boxed() }
/// # }
/// # let store = Empty;
/// use dcb_core::{Query, SubscribeExt};
/// let mut events = store.subscribe(&Query::types(["Deposited"]), None);
/// // while let Some(event) = events.next().await { let event = event?; ... }
/// # drop(events);
/// # Ok(()) }
/// ```
pub trait SubscribeExt: EventReader + Clone + Sized + 'static {
    /// [`subscribe`](fn@subscribe) with default [`SubscribeOptions`].
    fn subscribe(&self, query: &Query, after: Option<Cursor>) -> EventStream {
        self.subscribe_with(query, after, SubscribeOptions::default())
    }

    /// [`subscribe`](fn@subscribe) with the given options.
    fn subscribe_with(
        &self,
        query: &Query,
        after: Option<Cursor>,
        options: SubscribeOptions,
    ) -> EventStream {
        subscribe(Arc::new(self.clone()), query, after, options)
    }
}

impl<T: EventReader + Clone + Sized + 'static> SubscribeExt for T {}

/// What the stream does before its next read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Read at once (start, or the last batch was full).
    Read,
    /// Caught up: wait for a wake-up or the poll interval.
    Wait,
    /// A read failed: wait for the backoff delay.
    Backoff,
}

struct State<R: ?Sized> {
    reader: Arc<R>,
    query: Query,
    after: Option<Cursor>,
    options: SubscribeOptions,
    buffer: VecDeque<Event>,
    feed: Option<ChangeFeed>,
    started: bool,
    next: Next,
    failures: u32,
    done: bool,
}

impl<R: EventReader + ?Sized + 'static> State<R> {
    async fn step(mut self) -> Option<(Result<Event, Error>, Self)> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.after = Some(event.cursor);
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            if !self.started {
                // Asked here, not in `subscribe`, so a backend may start its listener inside the
                // runtime that polls the stream.
                self.feed = self.reader.change_feed();
                self.started = true;
            }
            match self.next {
                Next::Read => {}
                Next::Wait => self.wait().await,
                Next::Backoff => {
                    tokio::time::sleep(self.options.retry_delay(self.failures)).await;
                }
            }
            if let Some(feed) = self.feed.as_mut() {
                feed.mark_seen();
            }
            let options = ReadOptions::default()
                .after_opt(self.after)
                .limit(self.options.batch_size);
            let span = tracing::debug_span!(
                "subscribe.read",
                after = ?self.after,
                batch = self.options.batch_size
            );
            match self
                .reader
                .query(&self.query, options)
                .instrument(span)
                .await
            {
                Ok(events) => {
                    self.failures = 0;
                    self.next = if events.len() < self.options.batch_size {
                        Next::Wait
                    } else {
                        Next::Read
                    };
                    self.buffer.extend(events);
                }
                Err(err) if is_fatal_for_subscription(&err) => {
                    tracing::warn!(error = %err, "subscription ends on a fatal error");
                    self.done = true;
                    return Some((Err(err), self));
                }
                Err(err) => {
                    self.failures = self.failures.saturating_add(1);
                    tracing::debug!(error = %err, failures = self.failures, "subscription read failed; retrying");
                    self.next = Next::Backoff;
                    return Some((Err(err), self));
                }
            }
        }
    }

    /// Waits for a wake-up, at most `poll_interval`.
    async fn wait(&mut self) {
        let interval = self.options.poll_interval;
        match self.feed.as_mut() {
            Some(feed) => match tokio::time::timeout(interval, feed.changed()).await {
                Ok(true) | Err(_) => {}
                Ok(false) => {
                    // The backend closed its feed: poll from now on.
                    self.feed = None;
                    tokio::time::sleep(interval).await;
                }
            },
            None => tokio::time::sleep(interval).await,
        }
    }
}
