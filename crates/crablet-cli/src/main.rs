//! `crablet`: the operator command line of the crablet event store on PostgreSQL.
//!
//! Run `crablet --help` (or `cargo run -p crablet-cli -- --help`) for the commands. Every
//! failure is one line on stderr, `error: ...`, and a non-zero exit code: 2 for bad usage
//! (an unknown option, a malformed cursor or tag), 1 for everything else (an unreachable
//! database, a missing schema, a corrupt import line, ...).
mod args;
mod commands;
mod connect;
mod error;
mod format;

use args::{parse_cursor, FilterArgs};
use clap::{error::ErrorKind, Parser, Subcommand, ValueEnum};
use connect::Target;
use dcb_core::Cursor;
use dcb_postgres::{ReadFrom, StoreConfig};
use error::CliError;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const AFTER_HELP: &str = "\
Exit codes: 0 success; 1 failure (unreachable database, missing schema, corrupt import line, \
unknown handler, ...); 2 bad usage (unknown option, malformed cursor or tag). Every failure is \
one line on stderr: `error: ...`.

Cursors are written TRANSACTION_ID/POSITION, exactly as crablet prints them (e.g. 7421/15).";

/// The crablet event store's operator command line: migrations, status, reading, export and
/// import, and durable handlers.
#[derive(Debug, Parser)]
#[command(name = "crablet", version, after_help = AFTER_HELP, propagate_version = true)]
struct Cli {
    /// PostgreSQL connection URL, e.g. postgres://user@host:5432/db.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        display_order = 900
    )]
    database_url: Option<String>,
    /// The PostgreSQL schema holding the store's tables.
    #[arg(long, global = true, default_value_t = StoreConfig::default().schema, display_order = 901)]
    schema: String,
    /// A hot standby of the database (a streaming replica), for the read commands with
    /// --read-from standby; repeat it for several (reads go to them in turn).
    #[arg(
        long = "standby",
        value_name = "URL",
        global = true,
        display_order = 902
    )]
    standbys: Vec<String>,
    /// Where `events` and `export` read: the primary, or a standby (needs --standby; a read no
    /// standby can serve runs on the primary). Writes and every other command use the primary.
    #[arg(long, value_enum, global = true, default_value_t = ReadFromArg::Primary, display_order = 903)]
    read_from: ReadFromArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates or upgrades the store's schema, then prints its version. Idempotent, and safe
    /// to run from several processes at once.
    Migrate,
    /// Schema version, event count, head cursor, table and index sizes, and every durable
    /// handler with its checkpoint, lag, lease, failures and parked events.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Reads events: by type (--type, OR-ed) and tag (--tag, AND-ed), after or before a cursor,
    /// forwards or backwards; --follow keeps printing new events until Ctrl-C.
    Events(EventsArgs),
    /// Writes events as JSON lines, one per event: {"type", "tags", "data", "metadata",
    /// "occurred_at", "cursor"}. Tags are "key:value" strings (split at the first ':'; keys never
    /// contain ':'); occurred_at is RFC 3339 in UTC with microseconds; cursor is
    /// TRANSACTION_ID/POSITION.
    Export(ExportArgs),
    /// Appends the events of an export file, in batches, each batch atomically and at most
    /// once (an interrupted import can be rerun). The original occurred_at is NOT kept.
    #[command(long_about = IMPORT_HELP)]
    Import(ImportArgs),
    /// Durable handlers: list them, move a checkpoint, see and drop parked events.
    #[command(subcommand)]
    Handlers(HandlersCommand),
    /// A partitioned event log: partition it, create partitions ahead, list them, detach old
    /// ones for archiving (docs/scale-out.md, "A partitioned log").
    #[command(subcommand)]
    Partition(PartitionCommand),
}

#[derive(Debug, Subcommand)]
enum PartitionCommand {
    /// Range-partitions the events table by position and the commands table by transaction
    /// id, in one switch (without copying: the existing tables become the first partitions),
    /// or updates the configuration of a partitioned store; then creates the partitions ahead
    /// and lists them.
    Enable {
        /// Positions per partition (keep partitions large: decisions probe every partition).
        #[arg(long)]
        range: i64,
        /// Empty ranges kept created ahead of the newest position.
        #[arg(long, default_value_t = 2)]
        ahead: i32,
        /// Positions appends may use while the conversion validates the first partition's
        /// bound (default: one range).
        #[arg(long)]
        headroom: Option<i64>,
        /// Transaction ids per commands partition (default: --range, at least 1000000; every
        /// writing transaction of the cluster draws one).
        #[arg(long, value_name = "XIDS")]
        command_range: Option<i64>,
    },
    /// Creates the partitions missing for EXTRA more positions plus the configured margin
    /// (before a bulk import, or from cron; the store also does it as it grows).
    CreateAhead {
        /// Positions to cover beyond the newest one, on top of the margin.
        #[arg(long, default_value_t = 0)]
        extra: i64,
    },
    /// Lists the partitions: the log's by position, the commands table's by transaction id
    /// (bounds, estimated rows, size).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detaches an old partition (DETACH PARTITION ... CONCURRENTLY): its events leave every
    /// read and every condition check. The partition being written and later ones are refused.
    /// A commands partition (commands_x...) takes its commands out of `crablet commands`; their
    /// ids stay recorded, so retries are still duplicates.
    Detach {
        /// The partition's name, as `crablet partition list` prints it.
        name: String,
        /// Drop the detached table at once instead of leaving it to dump.
        #[arg(long)]
        drop: bool,
    },
}

const IMPORT_HELP: &str = "\
Appends the events of an export file (JSON lines, see `crablet export --help`), in batches, each \
batch in one transaction.

Each batch runs as a command with an idempotency id made of the file's SHA-256 and the line \
number of the batch's first event; the command record commits together with the events. An \
interrupted import rerun with the SAME file skips the batches already imported and appends the \
rest, without duplicates (also with another --batch-size). An edited file has another hash: \
rerunning it imports everything again.

Every line of a batch is checked before the batch is appended: the import stops at the first bad \
line, names its line number, and writes nothing from that line's batch (the batches before it \
stay imported). Blank lines are skipped.

The events get new cursors. They get the time of the import as occurred_at, unless \
--keep-occurred-at: then every line must carry an RFC 3339 occurred_at (as export writes it), \
recorded as given (for moving a log out of another store).

Batches with more than about 24 distinct tags take the store's escalation lock for their \
transaction, which briefly holds up concurrent reads and conditional appends: prefer smaller \
batches on a busy store.";

#[derive(Debug, clap::Args)]
struct EventsArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// At most this many events (with --follow: stop after this many).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Newest first.
    #[arg(long, conflicts_with = "follow")]
    backwards: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// After the stored events, keep printing new ones as they are appended, until Ctrl-C.
    #[arg(long, conflicts_with = "before")]
    follow: bool,
    /// Do not truncate long tags and JSON to fit the terminal (table format).
    #[arg(long)]
    no_truncate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReadFromArg {
    /// The primary: exact, never behind.
    Primary,
    /// A hot standby: behind the primary by its replay lag (docs/scale-out.md).
    Standby,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// A table fitted to the terminal's width (long JSON truncated with '…').
    Table,
    /// One JSON object per line, as `crablet export` writes them.
    Jsonl,
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// At most this many events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Write to FILE (replaced if it exists) instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// The file to import (JSON lines, as `crablet export` writes them).
    file: PathBuf,
    /// Events per batch (per transaction and per idempotent command).
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch_size: u64,
    /// Record each line's occurred_at instead of the time of the import.
    #[arg(long)]
    keep_occurred_at: bool,
}

#[derive(Debug, Subcommand)]
enum HandlersCommand {
    /// Every durable handler: checkpoint, lag, lease, failures and parked events.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Moves a handler's checkpoint: it processes every matching event after the new
    /// checkpoint again (or skips ahead to it). Without --to: back to the beginning. Parked
    /// events after the new checkpoint are dropped (the handler meets them again). The
    /// handler's read model is not cleared: that is the application's to do.
    Reset {
        /// The handler's name.
        name: String,
        /// The new checkpoint (TRANSACTION_ID/POSITION); omitted: before the first event.
        #[arg(long, value_name = "CURSOR", value_parser = parse_cursor)]
        to: Option<Cursor>,
        /// Also set the checkpoint of a handler that never ran (it then starts after it).
        #[arg(long)]
        create: bool,
    },
    /// The events a handler parked (FailurePolicy::Park), oldest first.
    Parked {
        /// The handler's name.
        name: String,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Asks the running instance of a handler to process one of its parked events again
    /// (after the fix is deployed): it does so between two batches, within its poll interval,
    /// and the event's row goes away on success. Waits for the outcome unless --no-wait.
    Replay {
        /// The handler's name.
        name: String,
        /// The parked event's cursor.
        #[arg(value_parser = parse_cursor)]
        cursor: Cursor,
        /// Return once the replay is requested, without waiting for the outcome.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the outcome, in seconds.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 30,
            conflicts_with = "no_wait"
        )]
        timeout: u64,
    },
    /// Deletes one parked event of a handler without processing it.
    DropParked {
        /// The handler's name.
        name: String,
        /// The parked event's cursor.
        #[arg(value_parser = parse_cursor)]
        cursor: Cursor,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is_broken_pipe() => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", err.one_line());
            ExitCode::from(err.exit_code())
        }
    }
}

/// Help and version go to stdout as clap writes them; a malformed value gets the first line of
/// clap's message only (one line naming the problem); other usage errors keep clap's usage hint.
fn usage_error(err: clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or("error: invalid value");
            eprintln!("{first}");
            ExitCode::from(2)
        }
        _ => {
            let code = err.exit_code();
            let _ = err.print();
            ExitCode::from(u8::try_from(code).unwrap_or(2))
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let target = Target {
        url: cli.database_url,
        schema: cli.schema,
        standbys: cli.standbys,
        read_from: match cli.read_from {
            ReadFromArg::Primary => ReadFrom::Primary,
            ReadFromArg::Standby => ReadFrom::Standby,
        },
    };
    match cli.command {
        Command::Migrate => commands::migrate::run(&target).await,
        Command::Status { json } => commands::status::run(&target, json).await,
        Command::Events(args) => {
            commands::events::run(
                &target,
                commands::events::EventsOptions {
                    filter: args.filter,
                    limit: args.limit,
                    backwards: args.backwards,
                    jsonl: args.format == Format::Jsonl,
                    follow: args.follow,
                    truncate: !args.no_truncate,
                },
            )
            .await
        }
        Command::Export(args) => {
            commands::events::export(&target, &args.filter, args.limit, args.output.as_deref())
                .await
        }
        Command::Import(args) => {
            let batch_size = usize::try_from(args.batch_size).unwrap_or(500);
            commands::import::run(&target, &args.file, batch_size, args.keep_occurred_at).await
        }
        Command::Handlers(command) => match command {
            HandlersCommand::List { json } => commands::handlers::list(&target, json).await,
            HandlersCommand::Reset { name, to, create } => {
                commands::handlers::reset(&target, &name, to, create).await
            }
            HandlersCommand::Parked { name, json } => {
                commands::handlers::parked(&target, &name, json).await
            }
            HandlersCommand::Replay {
                name,
                cursor,
                no_wait,
                timeout,
            } => {
                let wait = (!no_wait).then(|| Duration::from_secs(timeout));
                commands::handlers::replay(&target, &name, cursor, wait).await
            }
            HandlersCommand::DropParked { name, cursor } => {
                commands::handlers::drop_parked(&target, &name, cursor).await
            }
        },
        Command::Partition(command) => match command {
            PartitionCommand::Enable {
                range,
                ahead,
                headroom,
                command_range,
            } => commands::partition::enable(&target, range, ahead, headroom, command_range).await,
            PartitionCommand::CreateAhead { extra } => {
                commands::partition::create_ahead(&target, extra).await
            }
            PartitionCommand::List { json } => commands::partition::list(&target, json).await,
            PartitionCommand::Detach { name, drop } => {
                commands::partition::detach(&target, &name, drop).await
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
