//! Cancelled and timed-out appends: whatever a call reports is true of the log.
//!
//! [`check_log`] is public so that backend tests with their own timeouts (tight
//! `append_timeout`s on PostgreSQL) can check their calls the same way.

use super::support::*;
use super::Factory;
use dcb_core::{
    matches, AppendCondition, Cursor, Error, Event, EventReaderExt, NewEvent, Query,
    StateProjector, Tag,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

/// How long the case may take before it is declared hung.
const HANG: Duration = Duration::from_secs(300);

/// What the result of an append says about the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// Acknowledged: its events are stored, once, the last one at this cursor.
    Written(Cursor),
    /// Certainly not written: a conflict, a timeout, rejected input.
    NothingWritten(String),
    /// The store said it could not tell (`outcome_unknown`), or the future was dropped.
    Unknown(String),
}

/// One append as [`check_log`] sees it. Its events carry `id` as `data.op`.
#[derive(Debug, Clone)]
pub struct AppendCall {
    /// The `data.op` of the call's events.
    pub id: String,
    /// How many events it appended.
    pub size: usize,
    /// Its condition, if any.
    pub condition: Option<AppendCondition>,
    /// What its result said.
    pub reported: Reported,
}

/// Reads an append's result. `Err` for a result no correct store may give under timeouts and
/// cancellation: a storage error that claims a certain outcome (an aborted transaction met by a
/// later call, a reply out of step), or a timeout of a call that was not bounded.
pub fn classify(result: &Result<Cursor, Error>) -> Result<Reported, String> {
    match result {
        Ok(cursor) => Ok(Reported::Written(*cursor)),
        Err(err @ (Error::Conflict(_) | Error::Timeout { .. })) => {
            Ok(Reported::NothingWritten(err.to_string()))
        }
        Err(
            err @ Error::Storage {
                outcome_unknown: true,
                ..
            },
        ) => Ok(Reported::Unknown(err.to_string())),
        Err(err) => Err(format!("{err} ({err:?})")),
    }
}

/// Checks `calls` against the whole `log`:
/// - an acknowledged call's events are stored once, all of them, the last at the returned cursor;
/// - a call that reported nothing written stored nothing;
/// - a call of unknown outcome stored all of its events or none;
/// - every stored conditional call's condition held: no event matching its query lies strictly
///   between its `after` and its first event (its own events excepted).
///
/// # Panics
///
/// On the first violation, naming the call and the events involved.
pub fn check_log(calls: &[AppendCall], log: &[Event]) {
    let mut by_id: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in log {
        if let Some(id) = event.data["op"].as_str() {
            by_id.entry(id).or_default().push(event);
        }
    }
    for call in calls {
        let stored = by_id.get(call.id.as_str()).cloned().unwrap_or_default();
        let id = &call.id;
        match &call.reported {
            Reported::Written(cursor) => {
                assert_eq!(
                    stored.len(),
                    call.size,
                    "call {id} was acknowledged at {cursor}: all {} of its events must be \
                     stored once, found {}",
                    call.size,
                    stored.len()
                );
                assert_eq!(
                    stored.last().map(|e| e.cursor),
                    Some(*cursor),
                    "call {id}: acknowledged cursor"
                );
            }
            Reported::NothingWritten(why) => assert!(
                stored.is_empty(),
                "call {id} reported `{why}` but {} of its events are stored (first at {})",
                stored.len(),
                stored[0].cursor
            ),
            Reported::Unknown(_) => assert!(
                stored.is_empty() || stored.len() == call.size,
                "call {id} of unknown outcome stored {} of its {} events",
                stored.len(),
                call.size
            ),
        }
        let (Some(condition), Some(first)) = (&call.condition, stored.first()) else {
            continue;
        };
        let violation = log.iter().find(|e| {
            e.data["op"].as_str() != Some(id.as_str())
                && condition.after.is_none_or(|after| e.cursor > after)
                && e.cursor < first.cursor
                && matches(&condition.fail_if_events_match, &e.event_type, &e.tags)
        });
        if let Some(e) = violation {
            panic!(
                "call {id} ({:?}) is stored at {} although event {} ({}, op {:?}) matches its \
                 condition after {:?}",
                call.reported, first.cursor, e.cursor, e.event_type, e.data["op"], condition.after
            );
        }
    }
}

/// 8 clients × 60 operations, half unconditional appends, half decide-then-`append_if` on three
/// shared boundaries; half of all calls run against a random sleep of up to 1.5 ms and are
/// dropped when it ends first. Every result is then checked against the log with
/// [`check_log`], and every client's next append must succeed: a cancelled call leaves no
/// transaction, lock or reply behind for a later one to meet.
pub async fn concurrent_cancelled_appends_tell_the_truth(factory: Factory<'_>) {
    const CLIENTS: usize = 8;
    const OPS: usize = 60;
    let store = factory.new_store().await;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let slot = |n: u64| {
        Query::from(
            dcb_core::QueryItem::new()
                .types(["Booked"])
                .tag("slot", n.to_string()),
        )
    };
    let mut handles = Vec::new();
    for client in 0..CLIENTS {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(0x00ca_9ce1 + client as u64);
            let mut calls = Vec::new();
            barrier.wait().await;
            for op in 0..OPS {
                let id = format!("{client}-{op}");
                let n = rng.gen_range(0..3u64);
                let event = NewEvent::new(
                    "Booked",
                    vec![Tag::new("slot", n.to_string())],
                    json!({ "op": id }),
                );
                let condition = if rng.gen_bool(0.5) {
                    let decision = store
                        .project(StateProjector::counter(slot(n)))
                        .await
                        .unwrap_or_else(|err| panic!("call {id}: decision read failed: {err}"));
                    Some(decision.condition)
                } else {
                    None
                };
                let call = {
                    let store = store.clone();
                    let condition = condition.clone();
                    async move {
                        match condition {
                            Some(c) => store.append_if(vec![event], c).await,
                            None => store.append(vec![event]).await,
                        }
                    }
                };
                let reported = if rng.gen_bool(0.5) {
                    let patience = Duration::from_micros(rng.gen_range(0..1500));
                    tokio::select! {
                        result = call => classify(&result),
                        _ = tokio::time::sleep(patience) => Ok(Reported::Unknown("dropped".into())),
                    }
                } else {
                    classify(&call.await)
                };
                let reported =
                    reported.unwrap_or_else(|err| panic!("call {id}: untruthful result: {err}"));
                calls.push(AppendCall {
                    id,
                    size: 1,
                    condition,
                    reported,
                });
            }
            // Nothing a cancelled call left behind (a lock, a transaction, a reply out of step)
            // may reach a later decision on any of the boundaries.
            for n in 0..3u64 {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let id = format!("{client}-after-{n}-{attempt}");
                    let decision = store
                        .project(StateProjector::counter(slot(n)))
                        .await
                        .unwrap_or_else(|err| panic!("call {id}: decision after the storm: {err}"));
                    let event = NewEvent::new(
                        "Booked",
                        vec![Tag::new("slot", n.to_string())],
                        json!({ "op": id }),
                    );
                    let condition = decision.condition;
                    match store.append_if(vec![event], condition.clone()).await {
                        Ok(cursor) => {
                            calls.push(AppendCall {
                                id,
                                size: 1,
                                condition: Some(condition),
                                reported: Reported::Written(cursor),
                            });
                            break;
                        }
                        // Other clients decide on the same boundaries meanwhile.
                        Err(Error::Conflict(_)) if attempt < 100 => continue,
                        Err(err) => panic!("call {id}: append after the storm: {err}"),
                    }
                }
            }
            calls
        }));
    }
    let calls: Vec<AppendCall> = join_tasks(handles, HANG, "cancelling clients")
        .await
        .into_iter()
        .flatten()
        .collect();
    let log = all_events(&*store).await;
    check_log(&calls, &log);
    let written = calls
        .iter()
        .filter(|c| matches!(c.reported, Reported::Written(_)))
        .count();
    assert!(written > CLIENTS, "some calls must have been acknowledged");
}
