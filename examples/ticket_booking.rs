//! Concert ticket booking: many customers race for a few seats.
//!
//! Every customer tries to book `--tickets` seats of a concert with `--seats` seats, all at the
//! same time. Each booking decides on one read (the concert's seat count, the tickets already
//! booked, and whether this customer already booked) and appends with the condition that read
//! returned; on a conflict the customer simply decides again on fresh state. Exactly
//! `seats / tickets` bookings succeed (fewer if there are fewer customers), the others are told
//! the concert is sold out, and no seat is ever sold twice.
//!
//! The events are typed (`#[derive(DomainEvent)]`, the concert and customer ids as tags): the
//! projectors get them decoded, and the bookings are read back with `query_typed`.
//!
//! This example uses the store directly (`project` + `append_if` + a retry loop), which is what
//! the command executor does for you in the `transfer` and `enrollment` examples.
//!
//! ```text
//! cargo run --example ticket_booking -- --users 100 --seats 20 --tickets 2
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --example ticket_booking
//! ```
mod common;

use clap::Parser;
use common::{check, AnyError};
use crablet::{
    DomainEvent, EventReaderExt, EventStore, Query, QueryItem, ReadOptions, StateProjector,
};
use rand::Rng;
use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONCERT: &str = "concert-2025-rust-philharmonic";

/// Book concert tickets concurrently and check that no seat is oversold.
#[derive(Debug, Parser)]
struct Args {
    /// Customers booking at the same time.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    users: u32,
    /// Seats of the concert.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    seats: u32,
    /// Tickets each customer tries to book.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    tickets: u32,
}

/// A concert was scheduled with its number of seats.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct ConcertScheduled {
    #[crablet(tag)]
    concert_id: String,
    seats: u32,
}

/// A customer booked tickets for a concert. Tagged with both ids: the bookings of a concert and
/// the booking of one customer are selected by tag.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct TicketsBooked {
    #[crablet(tag)]
    concert_id: String,
    #[crablet(tag)]
    customer_id: String,
    tickets: u32,
}

fn concert_scheduled(concert: &str) -> Query {
    Query::from(QueryItem::of::<ConcertScheduled>().tag("concert_id", concert))
}

fn bookings(concert: &str) -> Query {
    Query::from(QueryItem::of::<TicketsBooked>().tag("concert_id", concert))
}

/// How a customer's booking ended.
#[derive(Debug, PartialEq, Eq)]
enum Booking {
    Booked { attempts: u32 },
    SoldOut { attempts: u32 },
    AlreadyBooked,
}

/// One customer: decide on fresh state, append if nothing changed, else decide again.
async fn book(
    store: &dyn EventStore,
    customer: &str,
    tickets: u32,
) -> Result<Booking, crablet::Error> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let decision = store
            .project((
                StateProjector::<Option<ConcertScheduled>>::last_typed(concert_scheduled(CONCERT)),
                StateProjector::typed(bookings(CONCERT), 0_u32, |sold, booking: &TicketsBooked| {
                    *sold += booking.tickets
                }),
                StateProjector::exists(Query::from(
                    QueryItem::of::<TicketsBooked>()
                        .tag("concert_id", CONCERT)
                        .tag("customer_id", customer),
                )),
            ))
            .await?;
        let (concert, sold, already_booked) = decision.states;
        let seats = concert.map_or(0, |c| c.seats);
        if already_booked {
            return Ok(Booking::AlreadyBooked);
        }
        if sold + tickets > seats {
            return Ok(Booking::SoldOut { attempts });
        }
        let event = TicketsBooked {
            concert_id: CONCERT.into(),
            customer_id: customer.into(),
            tickets,
        }
        .encode()?;
        // A real service might now wait on I/O (a payment check, say); yielding here lets the
        // racing customers interleave between their read and their append, also in memory.
        tokio::task::yield_now().await;
        match store.append_if(vec![event], decision.condition).await {
            Ok(_) => return Ok(Booking::Booked { attempts }),
            // Someone booked since our read: nothing was written; decide again. A short random
            // pause spreads the retries out.
            Err(err) if err.is_conflict() => {
                let pause = rand::thread_rng().gen_range(0..=500);
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

async fn run(args: Args) -> Result<(), AnyError> {
    let backend = common::open("ticket_booking").await?;
    let store = backend.store;
    let Args {
        users,
        seats,
        tickets,
    } = args;
    let scheduled = ConcertScheduled {
        concert_id: CONCERT.into(),
        seats,
    };
    store.append(vec![scheduled.encode()?]).await?;
    let expected = (seats / tickets).min(users);
    println!(
        "{users} customers each try to book {tickets} of {seats} seats at once; {expected} bookings can succeed"
    );

    let start = Arc::new(tokio::sync::Barrier::new(users as usize));
    let began = Instant::now();
    let tasks: Vec<_> = (1..=users)
        .map(|n| {
            let (store, start) = (store.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                book(store.as_ref(), &format!("customer-{n:05}"), tickets).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await??);
    }
    let elapsed = began.elapsed();

    let booked = outcomes
        .iter()
        .filter(|o| matches!(o, Booking::Booked { .. }))
        .count() as u32;
    let sold_out = outcomes
        .iter()
        .filter(|o| matches!(o, Booking::SoldOut { .. }))
        .count() as u32;
    let decisions: u32 = outcomes
        .iter()
        .map(|o| match o {
            Booking::Booked { attempts } | Booking::SoldOut { attempts } => *attempts,
            Booking::AlreadyBooked => 1,
        })
        .sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "  {booked} booked, {sold_out} refused (sold out) in {:.1} ms: {:.0} customers/s, \
         {decisions} decisions ({} retried after a conflict), {:.0} decisions/s",
        secs * 1000.0,
        f64::from(users) / secs,
        decisions - users,
        f64::from(decisions) / secs,
    );

    // Read the bookings back.
    let log = store
        .query_typed::<TicketsBooked>(&bookings(CONCERT), ReadOptions::default())
        .await?;
    let mut customers = BTreeSet::new();
    let mut sold = 0;
    for booked in &log {
        sold += booked.event.tickets;
        customers.insert(booked.event.customer_id.as_str());
    }
    println!(
        "  the log holds {} bookings for {sold} of {seats} seats",
        log.len()
    );
    check(
        sold <= seats,
        format!("seats never oversold ({sold} <= {seats})"),
    )?;
    check(
        booked == expected && log.len() as u32 == expected,
        format!("exactly {expected} bookings succeed and are in the log"),
    )?;
    check(
        sold_out == users - expected,
        format!("the other {} customers are refused", users - expected),
    )?;
    check(
        customers.len() == log.len(),
        "no customer holds two bookings",
    )?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::exit_code(run(args)).await
}
