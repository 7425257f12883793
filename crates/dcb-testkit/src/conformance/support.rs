//! Helpers shared by the cases.

use dcb_core::{
    AppendCondition, Cursor, Error, Event, EventStore, NewEvent, Query, QueryItem, ReadOptions,
    Tag, ValidationKind,
};
use serde_json::{json, Value};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub(crate) type Store = Arc<dyn EventStore>;

/// Builds tags from `(key, value)` pairs.
pub(crate) fn tags(pairs: &[(&str, &str)]) -> Vec<Tag> {
    pairs.iter().map(|(k, v)| Tag::new(*k, *v)).collect()
}

/// An event with an empty object as payload.
pub(crate) fn ev(event_type: &str, pairs: &[(&str, &str)]) -> NewEvent {
    NewEvent::new(event_type, tags(pairs), json!({}))
}

/// An event whose payload is `{"n": n}`, so reads can be compared by number.
pub(crate) fn evn(n: i64, event_type: &str, pairs: &[(&str, &str)]) -> NewEvent {
    NewEvent::new(event_type, tags(pairs), json!({ "n": n }))
}

/// A query item from types and tags.
pub(crate) fn item(types: &[&str], pairs: &[(&str, &str)]) -> QueryItem {
    QueryItem::new()
        .types(types.iter().copied())
        .tags(tags(pairs))
}

/// A one-item query.
pub(crate) fn q(types: &[&str], pairs: &[(&str, &str)]) -> Query {
    Query::from(item(types, pairs))
}

/// The `n` payload numbers of events.
pub(crate) fn ns(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .map(|e| {
            e.data["n"]
                .as_i64()
                .unwrap_or_else(|| panic!("event {} has no numeric data.n: {}", e.cursor, e.data))
        })
        .collect()
}

/// Every stored event, in cursor order.
pub(crate) async fn all_events(store: &dyn EventStore) -> Vec<Event> {
    store
        .query(&Query::all(), ReadOptions::default())
        .await
        .unwrap_or_else(|err| panic!("reading all events failed: {err}"))
}

/// Reads `query` with `options`, panicking with context on error.
pub(crate) async fn read(
    store: &dyn EventStore,
    query: &Query,
    options: ReadOptions,
    context: &str,
) -> Vec<Event> {
    store
        .query(query, options)
        .await
        .unwrap_or_else(|err| panic!("{context}: query {query:?} with {options:?} failed: {err}"))
}

/// Reads `query` through `query_stream`, panicking with context on an error item.
pub(crate) async fn read_stream(
    store: &dyn EventStore,
    query: &Query,
    context: &str,
) -> Vec<Event> {
    use futures_util::StreamExt;
    let items: Vec<Result<Event, Error>> = store
        .query_stream(query, ReadOptions::default())
        .collect()
        .await;
    items
        .into_iter()
        .map(|item| item.unwrap_or_else(|err| panic!("{context}: query_stream failed: {err}")))
        .collect()
}

/// Appends, panicking with context on error.
pub(crate) async fn append(store: &dyn EventStore, events: Vec<NewEvent>, context: &str) -> Cursor {
    store
        .append(events)
        .await
        .unwrap_or_else(|err| panic!("{context}: append failed: {err}"))
}

/// Appends conditionally, panicking with context unless it succeeds.
pub(crate) async fn append_if_ok(
    store: &dyn EventStore,
    events: Vec<NewEvent>,
    condition: AppendCondition,
    context: &str,
) -> Cursor {
    let shown = format!("{condition:?}");
    store
        .append_if(events, condition)
        .await
        .unwrap_or_else(|err| {
            panic!("{context}: append_if with {shown} should succeed, got: {err}")
        })
}

/// Appends conditionally, asserting a conflict and that the store did not change.
pub(crate) async fn append_if_conflicts(
    store: &dyn EventStore,
    events: Vec<NewEvent>,
    condition: AppendCondition,
    context: &str,
) -> Error {
    let before = all_events(store).await;
    let shown = format!("{condition:?}");
    let err = match store.append_if(events, condition).await {
        Ok(cursor) => {
            panic!("{context}: append_if with {shown} should conflict but wrote up to {cursor}")
        }
        Err(err) => err,
    };
    assert!(
        err.is_conflict(),
        "{context}: append_if with {shown} should fail with Error::Conflict, got: {err:?}"
    );
    assert_unchanged(store, &before, context).await;
    err
}

/// Asserts that `result` is a validation error of `kind`.
pub(crate) fn expect_validation<T: Debug>(
    result: Result<T, Error>,
    kind: ValidationKind,
    context: &str,
) {
    match result {
        Ok(value) => panic!("{context}: expected a {kind:?} validation error, got Ok({value:?})"),
        Err(Error::Validation(v)) => assert_eq!(
            v.kind, kind,
            "{context}: expected validation kind {kind:?}, got {:?} (field {}: {})",
            v.kind, v.field, v.message
        ),
        Err(other) => panic!("{context}: expected a {kind:?} validation error, got: {other:?}"),
    }
}

/// Asserts that the store still holds exactly `before`.
pub(crate) async fn assert_unchanged(store: &dyn EventStore, before: &[Event], context: &str) {
    let after = all_events(store).await;
    assert_eq!(
        after.len(),
        before.len(),
        "{context}: the store must be unchanged, but it held {} events before and {} after",
        before.len(),
        after.len()
    );
    assert_eq!(after, before, "{context}: the store's events changed");
}

/// The reference selection: events of `all` matching `query`, in order.
pub(crate) fn reference(all: &[Event], query: &Query) -> Vec<Event> {
    all.iter()
        .filter(|e| dcb_core::matches(query, &e.event_type, &e.tags))
        .cloned()
        .collect()
}

/// A cursor below every event any backend can assign.
pub(crate) const CURSOR_MIN: Cursor = Cursor::new(0, 0);

/// A cursor above every event any backend will assign in a test (fits an `i64` too).
pub(crate) const CURSOR_FAR: Cursor = Cursor::new(i64::MAX as u64, i64::MAX);

/// Waits for all tasks, re-raising the first panic as soon as it happens (so a task stuck on a
/// barrier whose partner panicked cannot hang the test), with an overall timeout.
pub(crate) async fn join_tasks<T: Send + 'static>(
    handles: Vec<tokio::task::JoinHandle<T>>,
    timeout: Duration,
    context: &str,
) -> Vec<T> {
    let joined = tokio::time::timeout(timeout, futures_util::future::try_join_all(handles)).await;
    match joined {
        Ok(Ok(results)) => results,
        Ok(Err(join_error)) => {
            if join_error.is_panic() {
                std::panic::resume_unwind(join_error.into_panic())
            }
            panic!("{context}: a task failed: {join_error}")
        }
        Err(_) => panic!("{context}: tasks did not finish within {timeout:?}"),
    }
}

/// Runs `future` with a timeout, panicking with context when it expires.
#[allow(dead_code)]
pub(crate) async fn within<T>(
    timeout: Duration,
    context: &str,
    future: impl Future<Output = T>,
) -> T {
    tokio::time::timeout(timeout, future)
        .await
        .unwrap_or_else(|_| panic!("{context}: did not finish within {timeout:?}"))
}

/// Extracts a JSON value, panicking with context when absent.
#[allow(dead_code)]
pub(crate) fn field<'a>(value: &'a Value, key: &str, context: &str) -> &'a Value {
    value
        .get(key)
        .unwrap_or_else(|| panic!("{context}: missing field {key:?} in {value}"))
}
