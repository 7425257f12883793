//! Money transfers between accounts, through the command executor.
//!
//! - `OpenAccount` refuses an account that is already open, also when several opens of the same
//!   account race: exactly one of them succeeds.
//! - `TransferMoney` decides on a model of BOTH accounts (their balances, folded from
//!   `AccountOpened` and `MoneyTransferred` events in one read) and appends only if neither
//!   account changed since: balances change, overdrafts are refused with a business error, and
//!   concurrent transfers from one account never overdraw it. Conflicts are retried on fresh
//!   state by the executor's `RetryPolicy`.
//! - Every command is recorded in the audit trail atomically with its events.
//!
//! At the end the whole log is read back and folded independently; the example exits non-zero
//! if any invariant is violated.
//!
//! ```text
//! cargo run --example transfer
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example transfer
//! ```
mod common;

use common::{check, check_none, AnyError, Interleaving};
use crablet::command::{
    handler_fn, reject, Command, CommandError, CommandExecutor, CommandHandler, CommandOutcome,
    Decision, HandlerError, RetryPolicy,
};
use crablet::{
    CommandFilter, DomainEvent, EventReaderExt, Query, QueryItem, ReadOptions, StateProjector,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An account was opened. Its id is a tag, so queries select the account's events by it.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct AccountOpened {
    #[crablet(tag)]
    account_id: String,
    initial_balance: i64,
}

/// Money moved between two accounts. The event carries both accounts as tags (one event cannot
/// carry the same tag twice, so under two keys): it belongs to the consistency boundary of both.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct MoneyTransferred {
    #[crablet(tag)]
    from_account_id: String,
    #[crablet(tag)]
    to_account_id: String,
    amount: i64,
}

/// Every event of the bank: the event types come from the wrapped structs.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum BankEvent {
    Opened(AccountOpened),
    Transferred(MoneyTransferred),
}

/// The payload of the `OpenAccount` command.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenAccount {
    account_id: String,
    initial_balance: i64,
}

/// The payload of the `TransferMoney` command.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TransferMoney {
    from_account_id: String,
    to_account_id: String,
    amount: i64,
}

/// Why the bank refuses a command: the handlers' business errors.
#[derive(Debug)]
enum BankError {
    AlreadyOpen(String),
    UnknownAccount(String),
    InsufficientFunds {
        account_id: String,
        balance: i64,
        amount: i64,
    },
    NotPositive(i64),
    SameAccount(String),
}

impl fmt::Display for BankError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BankError::AlreadyOpen(id) => write!(f, "account {id} is already open"),
            BankError::UnknownAccount(id) => write!(f, "account {id} does not exist"),
            BankError::InsufficientFunds {
                account_id,
                balance,
                amount,
            } => write!(
                f,
                "insufficient funds: {account_id} has {balance}, cannot transfer {amount}"
            ),
            BankError::NotPositive(amount) => write!(f, "amount must be positive, got {amount}"),
            BankError::SameAccount(id) => write!(f, "cannot transfer from {id} to itself"),
        }
    }
}

impl std::error::Error for BankError {}

// ---------------------------------------------------------------------------------------------
// The decision model: one account's balance.
// ---------------------------------------------------------------------------------------------

/// Every event that changes the balance of `account_id`: its opening, and transfers from it and
/// to it. A transfer carries both accounts as tags (`from_account_id`, `to_account_id`; one event
/// cannot carry the same tag key twice), so it belongs to the consistency boundary of both.
fn account_events(account_id: &str) -> Query {
    Query::from_items([
        QueryItem::of::<AccountOpened>().tag("account_id", account_id),
        QueryItem::of::<MoneyTransferred>().tag("from_account_id", account_id),
        QueryItem::of::<MoneyTransferred>().tag("to_account_id", account_id),
    ])
}

#[derive(Debug, Clone, Default)]
struct Account {
    open: bool,
    balance: i64,
}

/// Applies one event to the balance of `account_id`.
fn apply(account_id: &str, account: &mut Account, event: &BankEvent) {
    match event {
        BankEvent::Opened(opened) => {
            account.open = true;
            account.balance += opened.initial_balance;
        }
        BankEvent::Transferred(transfer) => {
            if transfer.from_account_id == account_id {
                account.balance -= transfer.amount;
            }
            if transfer.to_account_id == account_id {
                account.balance += transfer.amount;
            }
        }
    }
}

/// A projector of one account: its transition gets each event decoded.
fn account(account_id: &str) -> StateProjector<Account> {
    let id = account_id.to_string();
    StateProjector::typed(
        account_events(account_id),
        Account::default(),
        move |a, e: &BankEvent| apply(&id, a, e),
    )
}

// ---------------------------------------------------------------------------------------------
// The command handlers.
// ---------------------------------------------------------------------------------------------

fn open_account_handler() -> impl CommandHandler<OpenAccount, Error = BankError> {
    handler_fn(|command: &Command<OpenAccount>, reader| {
        Box::pin(async move {
            let open = &command.payload;
            let opened = QueryItem::of::<AccountOpened>().tag("account_id", &open.account_id);
            let model = reader
                .project(StateProjector::exists(Query::from(opened)))
                .await?;
            if model.states {
                return Err(reject(BankError::AlreadyOpen(open.account_id.clone())));
            }
            let event = AccountOpened {
                account_id: open.account_id.clone(),
                initial_balance: open.initial_balance,
            };
            // Fails (and is retried, then refused) if another open of this account got in first.
            Ok(Decision::append([event.encode()?]).guarded_by(model.condition))
        })
    })
}

fn transfer_handler() -> impl CommandHandler<TransferMoney, Error = BankError> {
    handler_fn(|command: &Command<TransferMoney>, reader| {
        Box::pin(async move {
            let transfer = &command.payload;
            if transfer.amount <= 0 {
                return Err(reject(BankError::NotPositive(transfer.amount)));
            }
            if transfer.from_account_id == transfer.to_account_id {
                return Err(reject(BankError::SameAccount(
                    transfer.from_account_id.clone(),
                )));
            }
            // Both accounts, folded in ONE read; the condition covers both boundaries.
            let model = reader
                .project((
                    account(&transfer.from_account_id),
                    account(&transfer.to_account_id),
                ))
                .await?;
            let (from, to) = &model.states;
            for (id, state) in [
                (&transfer.from_account_id, from),
                (&transfer.to_account_id, to),
            ] {
                if !state.open {
                    return Err(reject(BankError::UnknownAccount(id.clone())));
                }
            }
            if from.balance < transfer.amount {
                return Err(reject(BankError::InsufficientFunds {
                    account_id: transfer.from_account_id.clone(),
                    balance: from.balance,
                    amount: transfer.amount,
                }));
            }
            let event = MoneyTransferred {
                from_account_id: transfer.from_account_id.clone(),
                to_account_id: transfer.to_account_id.clone(),
                amount: transfer.amount,
            };
            Ok::<_, HandlerError<BankError>>(
                Decision::append([event.encode()?]).guarded_by(model.condition),
            )
        })
    })
}

fn open_command(account_id: &str, initial_balance: i64) -> Command<OpenAccount> {
    Command::new(
        "OpenAccount",
        OpenAccount {
            account_id: account_id.into(),
            initial_balance,
        },
    )
}

fn transfer_command(from: &str, to: &str, amount: i64) -> Command<TransferMoney> {
    Command::new(
        "TransferMoney",
        TransferMoney {
            from_account_id: from.into(),
            to_account_id: to.into(),
            amount,
        },
    )
}

type Outcome = Result<CommandOutcome, CommandError<BankError>>;

/// Runs `commands` concurrently, each in its own task, released together by a barrier. Returns
/// their outcomes and how many decisions the handler took.
async fn race<T, H>(
    executor: &CommandExecutor,
    handler: &Arc<H>,
    commands: Vec<Command<T>>,
) -> (Vec<Outcome>, u32)
where
    T: Serialize + Send + Sync + 'static,
    H: CommandHandler<T, Error = BankError> + 'static,
{
    let counted = Arc::new(Interleaving::new(handler.clone()));
    let start = Arc::new(tokio::sync::Barrier::new(commands.len()));
    let tasks: Vec<_> = commands
        .into_iter()
        .map(|command| {
            let (executor, handler, start) = (executor.clone(), counted.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                executor.execute(command, &*handler).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("command task panicked"));
    }
    (outcomes, counted.decisions())
}

/// The current balance of an account, read through a projection.
async fn balance(executor: &CommandExecutor, account_id: &str) -> Result<i64, AnyError> {
    Ok(executor
        .store()
        .project(account(account_id))
        .await?
        .states
        .balance)
}

/// Prints a refused command's reason, and fails unless the refusal is a business error.
fn refused(outcome: Outcome, what: &str) -> Result<BankError, AnyError> {
    match outcome {
        Err(CommandError::Rejected(reason)) => {
            println!("  {what}: refused ({reason})");
            Ok(reason)
        }
        Ok(_) => Err(format!("invariant violated: {what} was accepted").into()),
        Err(other) => Err(format!("{what} failed unexpectedly: {other}").into()),
    }
}

async fn run() -> Result<(), AnyError> {
    let started = Instant::now();
    let backend = common::open("transfer").await?;
    let executor = CommandExecutor::new(backend.store.clone()).with_retry(
        RetryPolicy::attempts(10)
            .initial_backoff(Duration::from_millis(2))
            .max_backoff(Duration::from_millis(50)),
    );
    let open = Arc::new(open_account_handler());
    let transfer = Arc::new(transfer_handler());

    // 1. Open accounts. Ten opens of alice race; exactly one may win.
    println!("opening accounts (10 concurrent opens of alice race):");
    let (opens, decisions) = race(
        &executor,
        &open,
        (0..10).map(|_| open_command("alice", 100)).collect(),
    )
    .await;
    let opened = opens.iter().filter(|o| o.is_ok()).count();
    let already_open = opens
        .iter()
        .filter(|o| matches!(o, Err(CommandError::Rejected(BankError::AlreadyOpen(_)))))
        .count();
    println!(
        "  alice: {opened} open succeeded, {already_open} refused as duplicates ({decisions} decisions for 10 commands)"
    );
    check(
        opened == 1 && already_open == 9,
        "exactly one of 10 racing opens of alice succeeds",
    )?;
    for (id, initial) in [("bob", 50), ("carol", 100), ("dave", 0)] {
        executor.execute(open_command(id, initial), &*open).await?;
        println!("  opened {id} with {initial}");
    }
    refused(
        executor
            .execute(open_command("bob", 1_000_000), &*open)
            .await,
        "opening bob again",
    )?;

    // 2. Transfers change balances; bad ones are refused with a business error.
    println!("transfers:");
    executor
        .execute(transfer_command("alice", "bob", 30), &*transfer)
        .await?;
    let (alice, bob) = (
        balance(&executor, "alice").await?,
        balance(&executor, "bob").await?,
    );
    println!("  alice -> bob 30: alice {alice}, bob {bob}");
    check(
        alice == 70 && bob == 80,
        "a transfer moves money (alice 100 -> 70, bob 50 -> 80)",
    )?;
    executor
        .execute(transfer_command("bob", "alice", 10), &*transfer)
        .await?;
    println!(
        "  bob -> alice 10: alice {}, bob {}",
        balance(&executor, "alice").await?,
        balance(&executor, "bob").await?
    );
    let overdraft = refused(
        executor
            .execute(transfer_command("bob", "alice", 1000), &*transfer)
            .await,
        "bob -> alice 1000",
    )?;
    check(
        matches!(overdraft, BankError::InsufficientFunds { .. }),
        "an overdraft is refused as insufficient funds",
    )?;
    refused(
        executor
            .execute(transfer_command("alice", "zoe", 5), &*transfer)
            .await,
        "alice -> zoe 5",
    )?;
    refused(
        executor
            .execute(transfer_command("alice", "bob", -5), &*transfer)
            .await,
        "alice -> bob -5",
    )?;

    // 3. Twenty concurrent transfers of 30 from carol (100): only three fit.
    println!("20 concurrent transfers of 30 from carol (balance 100) to dave:");
    let (racing, decisions) = race(
        &executor,
        &transfer,
        (0..20)
            .map(|_| transfer_command("carol", "dave", 30))
            .collect(),
    )
    .await;
    let succeeded = racing.iter().filter(|o| o.is_ok()).count();
    let insufficient = racing
        .iter()
        .filter(|o| {
            matches!(
                o,
                Err(CommandError::Rejected(BankError::InsufficientFunds { .. }))
            )
        })
        .count();
    for outcome in &racing {
        if let Err(err) = outcome {
            if !err.is_rejected() {
                return Err(format!("a racing transfer failed unexpectedly: {err}").into());
            }
        }
    }
    let carol = balance(&executor, "carol").await?;
    println!(
        "  {succeeded} succeeded, {insufficient} refused for insufficient funds; carol has {carol}\n  ({decisions} decisions for 20 commands: each conflict was retried on fresh state)"
    );
    check(
        succeeded == 3 && insufficient == 17 && carol == 10,
        "exactly 3 of 20 concurrent transfers succeed and carol is never overdrawn",
    )?;

    // 4. Idempotency: a client retrying the same request (same id) transfers once.
    println!("a client sends transfer invoice-17 (alice -> bob 5) twice:");
    let first = executor
        .execute(
            transfer_command("alice", "bob", 5).with_id("invoice-17"),
            &*transfer,
        )
        .await?;
    let second = executor
        .execute(
            transfer_command("alice", "bob", 5).with_id("invoice-17"),
            &*transfer,
        )
        .await?;
    println!(
        "  first: replayed = {}, second: replayed = {}",
        first.replayed, second.replayed
    );
    check(
        !first.replayed && second.replayed && first.record == second.record,
        "a repeated command id is replayed, not executed again",
    )?;

    // 5. Read everything back and check it independently of the handlers.
    println!("final balances:");
    let log = executor
        .store()
        .query_typed::<BankEvent>(&Query::of::<BankEvent>(), ReadOptions::default())
        .await?;
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    let mut opened_twice = Vec::new();
    let mut overdrawn = Vec::new();
    let mut unknown = Vec::new();
    let mut transfers = 0;
    for logged in &log {
        match &logged.event {
            BankEvent::Opened(open) => {
                if balances
                    .insert(open.account_id.clone(), open.initial_balance)
                    .is_some()
                {
                    opened_twice.push(open.account_id.clone());
                }
            }
            BankEvent::Transferred(t) => {
                transfers += 1;
                for id in [&t.from_account_id, &t.to_account_id] {
                    if !balances.contains_key(id) {
                        unknown.push(id.clone());
                    }
                }
                let from = balances.entry(t.from_account_id.clone()).or_default();
                *from -= t.amount;
                if *from < 0 {
                    overdrawn.push(format!("{} at {}", t.from_account_id, logged.cursor));
                }
                *balances.entry(t.to_account_id.clone()).or_default() += t.amount;
            }
        }
    }
    for (id, balance) in &balances {
        println!("  {id:<6} {balance:>4}");
    }
    let expected: BTreeMap<String, i64> = [("alice", 75), ("bob", 75), ("carol", 10), ("dave", 90)]
        .into_iter()
        .map(|(id, b)| (id.to_string(), b))
        .collect();
    check_none(&opened_twice, "no account opened twice")?;
    check_none(&unknown, "no transfer touches an unopened account")?;
    check_none(
        &overdrawn,
        "no balance ever goes below zero, at any point of the log",
    )?;
    check(
        balances.values().sum::<i64>() == 250,
        "money is conserved: the total is the 250 deposited at opening",
    )?;
    check(
        balances == expected,
        "balances are alice 75, bob 75, carol 10, dave 90",
    )?;
    for (id, want) in &expected {
        let projected = balance(&executor, id).await?;
        check(
            projected == *want,
            format!("the decision model agrees on {id} ({projected})"),
        )?;
    }

    // 6. The audit trail: one record per executed command, written with its events.
    println!("commands log:");
    let commands = executor.commands(&CommandFilter::default()).await?;
    for (n, record) in commands.iter().enumerate() {
        let event = record.last_event.map_or("-".to_string(), |c| c.to_string());
        let id = record
            .id
            .as_deref()
            .map(|id| format!(" id={id}"))
            .unwrap_or_default();
        println!(
            "  {:>2}. {}{id} {} -> event {event}",
            n + 1,
            record.command_type,
            record.data
        );
    }
    let count = |t: &str| commands.iter().filter(|c| c.command_type == t).count();
    check(
        count("OpenAccount") == 4 && count("TransferMoney") == 6,
        "the log holds the 4 opens and 6 transfers that succeeded, no refused or replayed command",
    )?;
    check(
        commands.iter().all(|c| c.last_event.is_some()) && transfers == 6,
        "every recorded command wrote its event, and only they did",
    )?;
    println!("done in {} ms", started.elapsed().as_millis());
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run()).await
}
