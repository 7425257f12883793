//! Reading a large log with flat memory: `query_stream` and `project_stream`.
//!
//! The example generates a shop's log (`--events N`, default 100 000: product views and
//! purchases), appended in batches of 1000, then reads it back twice without ever holding it
//! in memory:
//! - `query_stream_typed` hands out the purchases one by one, decoded into their typed event
//!   (on PostgreSQL: fetched through a server-side portal, `stream_buffer` rows per round trip)
//!   and the example sums them up;
//! - `project_stream` folds several projectors (counters and a typed projector) over one
//!   stream, reporting progress as it goes, and ends with the same `Projection` (states +
//!   append condition) as `project`.
//!
//! The events are typed (`#[derive(DomainEvent)]` structs, the product and customer ids as
//! tags, wrapped by one enum for the generator).
//!
//! Both results are checked against the totals computed while generating; the example exits
//! non-zero if they differ. At the end it prints the process's peak resident memory (Linux).
//!
//! ```text
//! cargo run --release --example streaming -- --events 1000000
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres cargo run --release --example streaming
//! ```
mod common;

use clap::Parser;
use common::{check, AnyError};
use crablet::{
    DomainEvent, EventReaderExt, ProjectionStep, Query, QueryItem, ReadOptions, StateProjector,
};
use futures_util::StreamExt;
use std::process::ExitCode;
use std::time::Instant;

const PRODUCTS: u64 = 500;
const BATCH: u64 = 1000;
const LOADERS: u64 = 4;

/// Stream a large generated log with constant memory.
#[derive(Debug, Parser)]
struct Args {
    /// Events to generate.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
}

/// A customer looked at a product's page.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct ProductViewed {
    #[crablet(tag)]
    product_id: String,
    ms_on_page: u64,
}

/// A customer bought a product.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct ProductPurchased {
    #[crablet(tag)]
    product_id: String,
    #[crablet(tag)]
    customer_id: String,
    amount_cents: u64,
}

/// Every event of the shop.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum ShopEvent {
    Viewed(ProductViewed),
    Purchased(ProductPurchased),
}

/// The product of event `n` of the generated log.
fn product(n: u64) -> String {
    format!("p{:03}", (n.wrapping_mul(2_654_435_761) >> 8) % PRODUCTS)
}

/// The amount of event `n` if it is a purchase: every fifth event is one.
fn purchase_amount(n: u64) -> Option<u64> {
    (n % 5 == 4).then(|| 100 + (n * 31) % 10_000)
}

/// Event `n` of the generated log: a purchase or a product view.
fn generated(n: u64) -> ShopEvent {
    let product_id = product(n);
    match purchase_amount(n) {
        Some(amount_cents) => ShopEvent::Purchased(ProductPurchased {
            product_id,
            customer_id: format!("c{}", n % 1000),
            amount_cents,
        }),
        None => ShopEvent::Viewed(ProductViewed {
            product_id,
            ms_on_page: n % 60_000,
        }),
    }
}

/// The process's resident memory, current and peak, in MiB (Linux only).
fn memory_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn run(args: Args) -> Result<(), AnyError> {
    let backend = common::open("streaming").await?;
    let store = backend.store.clone();
    let total = args.events;
    let progress_every = (total / 4).max(1);

    // 1. Generate and append the log in batches of 1000, one append per batch, by a few
    //    concurrent loaders (unconditional appends never wait for each other).
    let began = Instant::now();
    let batches = total.div_ceil(BATCH);
    let loaders: Vec<_> = (0..LOADERS)
        .map(|loader| {
            let store = store.clone();
            tokio::spawn(async move {
                for batch in (loader..batches).step_by(LOADERS as usize) {
                    let events = (batch * BATCH..((batch + 1) * BATCH).min(total))
                        .map(|n| generated(n).encode())
                        .collect::<Result<Vec<_>, _>>()?;
                    store.append(events).await?;
                }
                Ok::<_, crablet::Error>(())
            })
        })
        .collect();
    for loader in loaders {
        loader.await??;
    }
    let purchases = (0..total).filter_map(purchase_amount).count() as u64;
    let revenue: u64 = (0..total).filter_map(purchase_amount).sum();
    let secs = began.elapsed().as_secs_f64();
    println!(
        "appended {total} events in batches of {BATCH} ({LOADERS} loaders) in {secs:.1} s ({:.0} events/s): {purchases} purchases, {} views",
        total as f64 / secs.max(1e-9),
        total - purchases
    );
    if let Some((rss, _)) = memory_mib() {
        let note = if backend.on_postgres {
            ""
        } else {
            " (the in-memory store keeps the log in this process)"
        };
        println!("  resident memory after loading: {rss:.0} MiB{note}");
    }

    // 2. query_stream: the purchases, one at a time.
    println!("query_stream over the purchases:");
    let began = Instant::now();
    let mut stream = store.query_stream_typed::<ProductPurchased>(
        &Query::of::<ProductPurchased>(),
        ReadOptions::default(),
    );
    let (mut streamed, mut streamed_revenue) = (0_u64, 0_u64);
    let mut last_cursor = None;
    while let Some(event) = stream.next().await {
        let event = event?;
        streamed += 1;
        streamed_revenue += event.event.amount_cents;
        if last_cursor.is_some_and(|last| last >= event.cursor) {
            return Err(format!("events out of cursor order at {}", event.cursor).into());
        }
        last_cursor = Some(event.cursor);
        if streamed % (progress_every / 5).max(1) == 0 {
            println!(
                "  ... {streamed} purchases streamed (cursor {})",
                event.cursor
            );
        }
    }
    drop(stream);
    println!(
        "  {streamed} purchases, revenue {:.2}, in {:.2} s",
        streamed_revenue as f64 / 100.0,
        began.elapsed().as_secs_f64()
    );
    check(
        streamed == purchases && streamed_revenue == revenue,
        "query_stream returns every purchase once, in cursor order",
    )?;

    // 3. project_stream: three projectors over the whole log, with progress.
    println!("project_stream over the whole log (views, purchases, revenue of p042):");
    let began = Instant::now();
    let p042 = QueryItem::of::<ProductPurchased>().tag("product_id", "p042");
    let projectors = (
        StateProjector::counter(Query::of::<ProductViewed>()),
        StateProjector::counter(Query::of::<ProductPurchased>()),
        StateProjector::typed(p042, 0_u64, |sum, purchase: &ProductPurchased| {
            *sum += purchase.amount_cents
        }),
    );
    let mut steps = store.project_stream(projectors, progress_every);
    let mut projection = None;
    while let Some(step) = steps.next().await {
        match step? {
            ProjectionStep::Progress {
                events_read,
                cursor,
            } => {
                let pct = events_read * 100 / total.max(1);
                println!("  ... {events_read} events folded ({pct}%, cursor {cursor})");
            }
            ProjectionStep::Done(done) => projection = Some(done),
        }
    }
    let projection = projection.ok_or("project_stream ended without a result")?;
    let (views, bought, p042_revenue) = projection.states;
    println!(
        "  {views} views, {bought} purchases, p042 revenue {:.2}; {} events in {:.2} s",
        p042_revenue as f64 / 100.0,
        projection.events_read,
        began.elapsed().as_secs_f64()
    );
    let expected_p042: u64 = (0..total)
        .filter(|&n| product(n) == "p042")
        .filter_map(purchase_amount)
        .sum();
    check(
        views == total - purchases
            && bought == purchases
            && p042_revenue == expected_p042
            && projection.events_read == total,
        "project_stream folds every event exactly once",
    )?;
    let newest = store
        .query(&Query::all(), ReadOptions::default().backwards().limit(1))
        .await?;
    check(
        projection.condition.after == newest.first().map(|e| e.cursor),
        "its condition starts after the newest event of the log",
    )?;

    match memory_mib() {
        Some((rss, peak)) => {
            println!("peak resident memory (VmHWM): {peak:.0} MiB (now {rss:.0} MiB)")
        }
        None => println!("peak resident memory: not available on this platform"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::exit_code(run(args)).await
}
