//! `crablet events` and `crablet export`.
use crate::args::FilterArgs;
use crate::connect::Target;
use crate::error::{CliError, CliResult};
use crate::format::{event_line, output_width, EventTable};
use dcb_core::{
    is_fatal_for_subscription, subscribe, Event, EventReader, ReadOptions, SubscribeOptions,
};
use futures_util::StreamExt;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What `crablet events` was asked for.
#[derive(Debug)]
pub struct EventsOptions {
    /// Types, tags and cursor bounds.
    pub filter: FilterArgs,
    /// At most this many events.
    pub limit: Option<u64>,
    /// Newest first.
    pub backwards: bool,
    /// JSON lines instead of a table.
    pub jsonl: bool,
    /// Keep following new events.
    pub follow: bool,
    /// Fit the table to the terminal.
    pub truncate: bool,
}

/// The store's read options for a filter.
fn read_options(filter: &FilterArgs, limit: Option<u64>, backwards: bool) -> ReadOptions {
    let mut options = ReadOptions {
        after: filter.after,
        before: filter.before,
        limit: limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
        ..ReadOptions::default()
    };
    if backwards {
        options = options.backwards();
    }
    options
}

/// Writes events as table rows or JSON lines.
struct Printer {
    table: Option<EventTable>,
    header_done: bool,
}

impl Printer {
    fn new(options: &EventsOptions) -> Self {
        Self {
            table: (!options.jsonl).then(|| EventTable::new(output_width(), options.truncate)),
            header_done: false,
        }
    }

    fn print(&mut self, out: &mut impl Write, event: &Event) -> CliResult {
        match &self.table {
            Some(table) => {
                if !self.header_done {
                    writeln!(out, "{}", table.header())?;
                    self.header_done = true;
                }
                writeln!(out, "{}", table.row(event))?;
            }
            None => {
                let line = event_line(event).map_err(std::io::Error::other)?;
                writeln!(out, "{line}")?;
            }
        }
        Ok(())
    }
}

/// `crablet events`.
pub async fn run(target: &Target, options: EventsOptions) -> CliResult {
    let store = target.connect_reader().await?;
    let query = options.filter.query();
    let mut printer = Printer::new(&options);
    let stdout = std::io::stdout();
    if options.follow {
        let mut stream = subscribe(
            Arc::new(store),
            &query,
            options.filter.after,
            SubscribeOptions::default().poll_interval(Duration::from_millis(500)),
        );
        let mut printed = 0u64;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let item = tokio::select! {
                _ = &mut ctrl_c => break,
                item = stream.next() => item,
            };
            match item {
                None => break,
                Some(Ok(event)) => {
                    let mut out = stdout.lock();
                    printer.print(&mut out, &event)?;
                    out.flush()?;
                    printed += 1;
                    if options.limit.is_some_and(|limit| printed >= limit) {
                        break;
                    }
                }
                Some(Err(err)) if is_fatal_for_subscription(&err) => return Err(err.into()),
                Some(Err(err)) => {
                    eprintln!("warning: reading failed, retrying: {err}");
                }
            }
        }
        return Ok(());
    }
    let read = read_options(&options.filter, options.limit, options.backwards);
    let mut stream = store.query_stream(&query, read);
    let mut out = BufWriter::new(stdout.lock());
    let mut printed = false;
    while let Some(event) = stream.next().await {
        printer.print(&mut out, &event?)?;
        printed = true;
    }
    if !printed && !options.jsonl {
        eprintln!("no events match");
    }
    out.flush()?;
    Ok(())
}

/// `crablet export`: JSON lines to a file or standard output. A file is written beside its
/// destination and renamed into place once complete, so a failed export leaves no partial file
/// under the asked-for name.
pub async fn export(
    target: &Target,
    filter: &FilterArgs,
    limit: Option<u64>,
    output: Option<&Path>,
) -> CliResult {
    let store = target.connect_reader().await?;
    let query = filter.query();
    let mut stream = store.query_stream(&query, read_options(filter, limit, false));
    match output {
        None => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            while let Some(event) = stream.next().await {
                let line = event_line(&event?).map_err(std::io::Error::other)?;
                writeln!(out, "{line}")?;
            }
            out.flush()?;
        }
        Some(path) => {
            let partial = partial_path(path);
            let file_error = |what: &str, source| CliError::File {
                what: format!("{what} {}", partial.display()),
                source,
            };
            let file = std::fs::File::create(&partial).map_err(|e| file_error("creating", e))?;
            let mut out = BufWriter::new(file);
            let mut count = 0u64;
            let result: CliResult = async {
                while let Some(event) = stream.next().await {
                    let line = event_line(&event?).map_err(std::io::Error::other)?;
                    writeln!(out, "{line}").map_err(|e| file_error("writing", e))?;
                    count += 1;
                }
                out.flush().map_err(|e| file_error("writing", e))?;
                out.get_ref()
                    .sync_all()
                    .map_err(|e| file_error("syncing", e))?;
                Ok(())
            }
            .await;
            drop(out);
            if let Err(err) = result {
                let _ = std::fs::remove_file(&partial);
                return Err(err);
            }
            std::fs::rename(&partial, path).map_err(|source| CliError::File {
                what: format!("renaming {} to {}", partial.display(), path.display()),
                source,
            })?;
            eprintln!("exported {count} events to {}", path.display());
        }
    }
    Ok(())
}

/// `FILE.partial` beside `FILE`.
fn partial_path(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}
