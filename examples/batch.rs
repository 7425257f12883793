//! Creating users and orders in batches: one atomic append per batch, no duplicates.
//!
//! - A batch that names the same user (or order) twice is refused as a whole, and nothing is
//!   appended (orders are checked before sending; users by the multi-command append itself).
//! - A user batch is one multi-command append (`append_batch`): one command per user, each with
//!   the condition "this user does not exist yet". If ANY of them exists (or the batch names a
//!   user twice), the whole batch is refused, nothing is written, and the error names the user.
//! - An order batch decides on a projection (the `BTreeMap` projectors "does user X exist" and
//!   "does order Y exist", folded in one read) and appends with the condition that read returned.
//! - Batches racing with overlapping users: a batch gets in only if none of its users did
//!   before, so no user is ever created twice.
//!
//! The events are typed: `User` and `Order` derive `DomainEvent` under the event types
//! `UserCreated` and `OrderCreated` (`#[crablet(event_type = "..")]`), their ids as tags. At
//! the end all users and orders are read back with `query_typed` and checked; the example exits
//! non-zero if a duplicate or an order of an unknown user made it into the log.
//!
//! ```text
//! cargo run --example batch
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example batch
//! ```
mod common;

use common::{check, check_none, AnyError};
use crablet::{
    encode_all, AppendCommand, AppendCondition, Cursor, DomainEvent, EventReaderExt, EventStore,
    Query, QueryItem, ReadOptions, StateProjector,
};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// A user, and the event that creates it.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(event_type = "UserCreated")]
struct User {
    #[crablet(tag)]
    user_id: String,
    email: String,
}

/// An order of a user, and the event that creates it. Tagged with both ids: an order is found
/// by its own id and by its user's.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(event_type = "OrderCreated")]
struct Order {
    #[crablet(tag)]
    order_id: String,
    #[crablet(tag)]
    user_id: String,
    amount_cents: u64,
}

/// Every event of the example, as it is read back.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Created {
    User(User),
    Order(Order),
}

fn user(n: usize) -> User {
    User {
        user_id: format!("u{n:04}"),
        email: format!("user{n}@example.com"),
    }
}

fn order(n: usize, user: usize) -> Order {
    Order {
        order_id: format!("o{n:05}"),
        user_id: format!("u{user:04}"),
        amount_cents: 100 + (n as u64 * 37) % 9_900,
    }
}

fn user_item(user_id: &str) -> QueryItem {
    QueryItem::of::<User>().tag("user_id", user_id)
}

fn order_item(order_id: &str) -> QueryItem {
    QueryItem::of::<Order>().tag("order_id", order_id)
}

/// Why a batch was not written.
#[derive(Debug)]
enum Refused {
    /// The batch names an id twice; found before sending it.
    DuplicateInBatch(String),
    /// Some ids of the batch already exist in the store.
    AlreadyExists,
    /// This user of the batch exists already.
    UserExists(String),
    /// Orders for users that do not exist.
    UnknownUsers(Vec<String>),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::DuplicateInBatch(id) => write!(f, "{id} occurs twice in the batch"),
            Refused::AlreadyExists => write!(f, "some of its ids already exist"),
            Refused::UserExists(id) => write!(f, "user {id} exists already"),
            Refused::UnknownUsers(ids) => write!(f, "unknown users {}", ids.join(", ")),
        }
    }
}

/// The first id that occurs twice in `ids`.
fn first_duplicate<'a>(ids: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut seen = HashSet::new();
    ids.into_iter()
        .find(|id| !seen.insert(*id))
        .map(str::to_string)
}

/// Creates all `users` in one multi-command append (one command per user, each with its own
/// condition), or none of them. The error names the command that failed, so the refusal names
/// the user: one that exists already, or one the batch names twice.
async fn create_users(
    store: &dyn EventStore,
    users: &[User],
) -> Result<Result<Cursor, Refused>, crablet::Error> {
    let commands = users
        .iter()
        .map(|u| {
            let event = u.encode()?;
            let fresh = AppendCondition::new(Query::from(user_item(&u.user_id)));
            Ok(AppendCommand::new(vec![event]).only_if(fresh))
        })
        .collect::<Result<Vec<_>, crablet::Error>>()?;
    match store.append_batch(commands).await {
        Ok(cursors) => Ok(cursors.last().copied().ok_or(Refused::AlreadyExists)),
        Err(crablet::Error::Conflict(info)) => {
            let named = info.command.and_then(|i| users.get(i));
            Ok(Err(match (named, info.earlier_command) {
                (Some(u), Some(_)) => Refused::DuplicateInBatch(u.user_id.clone()),
                (Some(u), None) => Refused::UserExists(u.user_id.clone()),
                (None, _) => Refused::AlreadyExists,
            }))
        }
        Err(err) => Err(err),
    }
}

/// Creates all `orders` in one atomic append if every order is new and every user exists.
async fn create_orders(
    store: &dyn EventStore,
    orders: &[Order],
) -> Result<Result<Cursor, Refused>, crablet::Error> {
    if let Some(id) = first_duplicate(orders.iter().map(|o| o.order_id.as_str())) {
        return Ok(Err(Refused::DuplicateInBatch(id)));
    }
    // Projectors built at run time, keyed by id, folded in one read.
    let users: BTreeMap<String, StateProjector<bool>> = orders
        .iter()
        .map(|o| {
            let exists = StateProjector::exists(Query::from(user_item(&o.user_id)));
            (o.user_id.clone(), exists)
        })
        .collect();
    let existing: BTreeMap<String, StateProjector<bool>> = orders
        .iter()
        .map(|o| {
            let exists = StateProjector::exists(Query::from(order_item(&o.order_id)));
            (o.order_id.clone(), exists)
        })
        .collect();
    let decision = store.project((users, existing)).await?;
    let (users, existing) = &decision.states;
    let unknown: Vec<String> = users
        .iter()
        .filter(|(_, exists)| !**exists)
        .map(|(id, _)| id.clone())
        .collect();
    if !unknown.is_empty() {
        return Ok(Err(Refused::UnknownUsers(unknown)));
    }
    if existing.values().any(|exists| *exists) {
        return Ok(Err(Refused::AlreadyExists));
    }
    let events = encode_all(orders)?;
    match store.append_if(events, decision.condition).await {
        Ok(cursor) => Ok(Ok(cursor)),
        Err(err) if err.is_conflict() => Ok(Err(Refused::AlreadyExists)),
        Err(err) => Err(err),
    }
}

/// Checks that a batch was accepted (or refused) as expected, and says what happened.
fn report(what: &str, outcome: Result<Cursor, Refused>, expect_ok: bool) -> Result<(), AnyError> {
    let happened = match &outcome {
        Ok(cursor) => format!("appended atomically (last event {cursor})"),
        Err(refused) => format!("refused as a whole, nothing written ({refused})"),
    };
    check(outcome.is_ok() == expect_ok, format!("{what}: {happened}"))
}

async fn run() -> Result<(), AnyError> {
    let started = Instant::now();
    let backend = common::open("batch").await?;
    let store = backend.store;
    let s = store.as_ref();

    println!("user batches:");
    let batch: Vec<User> = (1..=50).map(user).collect();
    report("users u0001-u0050", create_users(s, &batch).await?, true)?;
    let mut batch: Vec<User> = (51..=100).map(user).collect();
    batch.push(user(60));
    report(
        "users u0051-u0100 with u0060 twice",
        create_users(s, &batch).await?,
        false,
    )?;
    let batch: Vec<User> = (41..=60).map(user).collect();
    report(
        "users u0041-u0060 (u0041-u0050 exist)",
        create_users(s, &batch).await?,
        false,
    )?;
    let new_ones = Query::from_items((51..=60).map(|n| user_item(&user(n).user_id)));
    check(
        store
            .query(&new_ones, ReadOptions::default())
            .await?
            .is_empty(),
        "the refused batches wrote none of their users",
    )?;
    let batch: Vec<User> = (51..=100).map(user).collect();
    report("users u0051-u0100", create_users(s, &batch).await?, true)?;

    println!("order batches:");
    let batch: Vec<Order> = (1..=100).map(|n| order(n, 1 + (n * 7) % 100)).collect();
    report(
        "orders o00001-o00100",
        create_orders(s, &batch).await?,
        true,
    )?;
    let mut batch: Vec<Order> = (101..=150).map(|n| order(n, 1 + n % 100)).collect();
    batch.push(order(151, 999));
    report(
        "orders o00101-o00151, one for unknown user u0999",
        create_orders(s, &batch).await?,
        false,
    )?;
    let mut batch: Vec<Order> = (101..=150).map(|n| order(n, 1 + n % 100)).collect();
    batch.push(order(120, 5));
    report(
        "orders o00101-o00150 with o00120 twice",
        create_orders(s, &batch).await?,
        false,
    )?;
    let batch: Vec<Order> = (91..=140).map(|n| order(n, 1 + n % 100)).collect();
    report(
        "orders o00091-o00140 (o00091-o00100 exist)",
        create_orders(s, &batch).await?,
        false,
    )?;
    let new_ones = Query::from_items((101..=151).map(|n| order_item(&order(n, 0).order_id)));
    check(
        store
            .query(&new_ones, ReadOptions::default())
            .await?
            .is_empty(),
        "the refused batches wrote none of their orders",
    )?;
    let batch: Vec<Order> = (101..=200).map(|n| order(n, 1 + n % 100)).collect();
    report(
        "orders o00101-o00200",
        create_orders(s, &batch).await?,
        true,
    )?;

    // Eight batches of ten users race; neighbours overlap by five users.
    println!("8 concurrent user batches, each overlapping its neighbours by 5 users:");
    let ranges: Vec<(usize, usize)> = (0..8).map(|i| (201 + 5 * i, 210 + 5 * i)).collect();
    let start = Arc::new(tokio::sync::Barrier::new(ranges.len()));
    let tasks: Vec<_> = ranges
        .iter()
        .map(|&(first, last)| {
            let (store, start) = (store.clone(), start.clone());
            tokio::spawn(async move {
                let batch: Vec<User> = (first..=last).map(user).collect();
                start.wait().await;
                create_users(store.as_ref(), &batch).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for (task, range) in tasks.into_iter().zip(&ranges) {
        match task.await?? {
            Ok(_) => winners.push(*range),
            Err(Refused::AlreadyExists | Refused::UserExists(_)) => losers.push(*range),
            Err(other) => return Err(format!("unexpected refusal: {other}").into()),
        }
    }
    let show = |rs: &[(usize, usize)]| {
        rs.iter()
            .map(|(a, b)| format!("u{a:04}-u{b:04}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("  accepted: {}", show(&winners));
    println!("  refused:  {}", show(&losers));
    let overlap = |a: &(usize, usize), b: &(usize, usize)| a.0 <= b.1 && b.0 <= a.1;
    check(
        !winners.is_empty()
            && winners
                .iter()
                .enumerate()
                .all(|(i, a)| winners[i + 1..].iter().all(|b| !overlap(a, b))),
        "the accepted batches are pairwise disjoint",
    )?;
    check(
        losers.iter().all(|l| winners.iter().any(|w| overlap(l, w))),
        "a batch was refused only because it overlaps one that got in",
    )?;

    // Read everything back.
    println!("reading the log back:");
    let events = store
        .query_typed::<Created>(&Query::of::<Created>(), ReadOptions::default())
        .await?;
    let mut users = BTreeSet::new();
    let mut orders = BTreeSet::new();
    let mut problems = Vec::new();
    for logged in &events {
        match &logged.event {
            Created::User(user) => {
                if !users.insert(user.user_id.clone()) {
                    problems.push(format!("user {} created twice", user.user_id));
                }
            }
            Created::Order(order) => {
                if !users.contains(&order.user_id) {
                    problems.push(format!("order {} of unknown user", order.order_id));
                }
                if !orders.insert(order.order_id.clone()) {
                    problems.push(format!("order {} created twice", order.order_id));
                }
            }
        }
    }
    let expected_users = 100 + winners.len() * 10;
    println!("  {} users, {} orders", users.len(), orders.len());
    check_none(
        &problems,
        "no duplicate user or order, no order of an unknown user",
    )?;
    check(
        users.len() == expected_users && orders.len() == 200,
        format!("exactly the accepted batches are in the log ({expected_users} users, 200 orders)"),
    )?;
    // Each accepted batch is one transaction: its events share one transaction id.
    let transactions: BTreeSet<u64> = events.iter().map(|e| e.cursor.transaction_id).collect();
    check(
        transactions.len() == 2 + 2 + winners.len(),
        format!(
            "{} accepted batches, {} transactions",
            4 + winners.len(),
            transactions.len()
        ),
    )?;
    println!("done in {} ms", started.elapsed().as_millis());
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run()).await
}
