//! `crablet import FILE [--batch-size N]`.
//!
//! Every batch is one command of the command layer, with the idempotency id
//! `crablet-import/<sha256 of the file>/<line of the batch's first event>`: its record commits
//! in the same transaction as its events, so after an interruption a rerun with the same file
//! finds the batches already imported and skips them (the executor replays their record
//! instead of appending). The record's payload says which lines the batch covered, so a rerun
//! with another `--batch-size` realigns on the original batches instead of importing a line
//! twice.
use crate::connect::Target;
use crate::error::{CliError, CliResult};
use crate::format::parse_event_line;
use async_trait::async_trait;
use dcb_command::{
    Command, CommandError, CommandExecutor, CommandHandler, Decision, HandlerResult,
};
use dcb_core::{validate_events, EventReader, EventStore, Limits, NewEvent};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The command type of an import batch in the audit trail.
const COMMAND_TYPE: &str = "CrabletImportBatch";

/// The recorded payload of one batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImportBatch {
    /// SHA-256 of the whole file, hex.
    file_sha256: String,
    /// The line of the batch's first event (1-based).
    first_line: u64,
    /// The line of its last event.
    last_line: u64,
    /// How many events it appended.
    events: u64,
}

/// Appends a batch that was validated beforehand, unconditionally.
struct AppendBatch(Vec<NewEvent>);

#[async_trait]
impl CommandHandler<ImportBatch> for AppendBatch {
    type Error = Infallible;

    async fn handle(
        &self,
        _command: &Command<ImportBatch>,
        _reader: &dyn EventReader,
    ) -> HandlerResult<Infallible> {
        Ok(Decision::append(self.0.clone()))
    }
}

/// The file's lines, numbered from 1.
struct Lines {
    reader: BufReader<File>,
    number: u64,
    buffer: Vec<u8>,
}

impl Lines {
    /// The next line without its line break, or `None` at the end.
    fn next_line(&mut self) -> std::io::Result<Option<(u64, Result<String, ()>)>> {
        self.buffer.clear();
        if self.reader.read_until(b'\n', &mut self.buffer)? == 0 {
            return Ok(None);
        }
        self.number += 1;
        if self.buffer.last() == Some(&b'\n') {
            self.buffer.pop();
            if self.buffer.last() == Some(&b'\r') {
                self.buffer.pop();
            }
        }
        let text = String::from_utf8(std::mem::take(&mut self.buffer)).map_err(|_| ());
        Ok(Some((self.number, text)))
    }
}

/// SHA-256 (hex) and line count of the file.
fn digest(path: &Path, shown: &str) -> CliResult<(String, u64)> {
    let read_error = |source| CliError::File {
        what: format!("reading {shown}"),
        source,
    };
    let mut file = File::open(path).map_err(|source| CliError::File {
        what: format!("opening {shown}"),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = file.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        lines += buffer[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buffer[n - 1];
    }
    if last != b'\n' {
        lines += 1;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok((hex, lines))
}

/// Checks one event as the store will, naming its field without the batch index.
fn check_event(event: &NewEvent) -> Result<(), String> {
    match validate_events(std::slice::from_ref(event), &Limits { max_batch_size: 1 }) {
        Ok(()) => Ok(()),
        Err(dcb_core::Error::Validation(v)) => {
            let field = v.field.strip_prefix("events[0].").unwrap_or(&v.field);
            Err(format!("invalid event: {field}: {}", v.message))
        }
        Err(other) => Err(format!("invalid event: {other}")),
    }
}

fn progress_bar(lines: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(lines), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} lines ({eta} left) {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// What an import did.
#[derive(Debug, Default)]
struct Summary {
    events: u64,
    batches: u64,
    skipped_events: u64,
    skipped_batches: u64,
}

impl Summary {
    /// What was written before a failure, for its message.
    fn so_far(&self) -> String {
        let mut text = format!(
            "{} event(s) of {} earlier batch(es) were imported",
            self.events, self.batches
        );
        if self.skipped_batches > 0 {
            text.push_str(&format!(
                ", {} batch(es) had been imported by an earlier run",
                self.skipped_batches
            ));
        }
        text
    }
}

/// Imports `path` in batches of `batch_size` events, with their recorded `occurred_at` when
/// `keep_occurred_at`.
pub async fn run(
    target: &Target,
    path: &Path,
    batch_size: usize,
    keep_occurred_at: bool,
) -> CliResult {
    let shown = path.display().to_string();
    let (sha256, total_lines) = digest(path, &shown)?;
    let store = target
        .connect_with(target.config().max_batch_size(batch_size.max(1000)))
        .await?;
    let executor = CommandExecutor::new(Arc::new(store) as Arc<dyn EventStore>);
    let file = File::open(path).map_err(|source| CliError::File {
        what: format!("opening {shown}"),
        source,
    })?;
    let mut lines = Lines {
        reader: BufReader::new(file),
        number: 0,
        buffer: Vec::new(),
    };
    let started = Instant::now();
    let bar = progress_bar(total_lines);
    let mut summary = Summary::default();
    // Parsed events not yet in a batch, ahead of the file's next line (after a realignment).
    let mut pending: VecDeque<(u64, NewEvent)> = VecDeque::new();
    loop {
        let mut batch: Vec<(u64, NewEvent)> = Vec::with_capacity(batch_size);
        while batch.len() < batch_size {
            if let Some(item) = pending.pop_front() {
                batch.push(item);
                continue;
            }
            let read = lines.next_line().map_err(|source| CliError::File {
                what: format!("reading {shown}"),
                source,
            })?;
            let Some((number, text)) = read else { break };
            let bad = |message: String| {
                bar.abandon();
                let from = batch.first().map_or(number, |(first, _)| *first);
                CliError::ImportLine {
                    file: shown.clone(),
                    line: number,
                    message: format!(
                        "{message}; stopped: nothing from this batch (lines {from} to {number}) was written; {}",
                        summary.so_far()
                    ),
                }
            };
            let text = text.map_err(|()| bad("not valid UTF-8".to_string()))?;
            if text.trim().is_empty() {
                continue;
            }
            let event = parse_event_line(&text, keep_occurred_at).map_err(&bad)?;
            check_event(&event).map_err(&bad)?;
            batch.push((number, event));
        }
        let (Some(&(first_line, _)), Some(&(last_line, _))) = (batch.first(), batch.last()) else {
            break;
        };
        let count = batch.len() as u64;
        let payload = ImportBatch {
            file_sha256: sha256.clone(),
            first_line,
            last_line,
            events: count,
        };
        let command = Command::new(COMMAND_TYPE, payload)
            .with_id(format!("crablet-import/{sha256}/{first_line}"))
            .with_metadata(serde_json::json!({ "tool": "crablet import", "file": shown }));
        let events: Vec<NewEvent> = batch.iter().map(|(_, e)| e.clone()).collect();
        let outcome = match executor.execute(command, &AppendBatch(events)).await {
            Ok(outcome) => outcome,
            Err(err) => {
                bar.abandon();
                return Err(batch_error(err, &shown, &batch, &summary));
            }
        };
        if outcome.replayed {
            let original: ImportBatch =
                serde_json::from_value(outcome.record.data.clone()).map_err(|e| {
                    CliError::Other(format!(
                        "the recorded import batch at line {first_line} of {shown} is unreadable: {e}"
                    ))
                })?;
            summary.skipped_batches += 1;
            summary.skipped_events += original.events;
            // Realign on the batch as it was imported.
            if original.last_line < last_line {
                for item in batch
                    .into_iter()
                    .filter(|(n, _)| *n > original.last_line)
                    .rev()
                {
                    pending.push_front(item);
                }
            } else if original.last_line > last_line {
                pending.retain(|(n, _)| *n > original.last_line);
                while lines.number < original.last_line {
                    let read = lines.next_line().map_err(|source| CliError::File {
                        what: format!("reading {shown}"),
                        source,
                    })?;
                    if read.is_none() {
                        break;
                    }
                }
            }
            bar.set_position(original.last_line);
        } else {
            summary.batches += 1;
            summary.events += count;
            bar.set_position(last_line);
        }
        bar.set_message(format!("{} events imported", summary.events));
    }
    bar.finish_and_clear();
    let mut line = format!(
        "imported {} events in {} batches from {shown} in {:.1} s",
        summary.events,
        summary.batches,
        started.elapsed().as_secs_f64()
    );
    if summary.skipped_batches > 0 {
        line.push_str(&format!(
            "; skipped {} batches ({} events) imported by an earlier run of this file",
            summary.skipped_batches, summary.skipped_events
        ));
    }
    println!("{line}");
    Ok(())
}

/// The error of a batch the store refused; nothing of it was written.
fn batch_error(
    err: CommandError<Infallible>,
    shown: &str,
    batch: &[(u64, NewEvent)],
    summary: &Summary,
) -> CliError {
    let first = batch.first().map_or(0, |(n, _)| *n);
    let last = batch.last().map_or(0, |(n, _)| *n);
    match err {
        CommandError::Validation(v) => {
            // The field starts with events[i] for the i-th event of the batch.
            let line = v
                .field
                .strip_prefix("events[")
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(i, _)| i.parse::<usize>().ok())
                .and_then(|i| batch.get(i))
                .map(|(n, _)| *n);
            match line {
                Some(line) => CliError::ImportLine {
                    file: shown.to_string(),
                    line,
                    message: format!(
                        "invalid event: {v}; stopped: nothing from this batch (lines {first} to {last}) was written; {}",
                        summary.so_far()
                    ),
                },
                None => CliError::Other(format!(
                    "{shown}: the batch of lines {first} to {last} was refused: {v}; nothing of it was written; {}",
                    summary.so_far()
                )),
            }
        }
        CommandError::Store(e) => CliError::Other(format!(
            "{shown}: appending the batch of lines {first} to {last} failed: {e}; {}; rerun the same command to import the rest",
            summary.so_far()
        )),
        other => CliError::Other(format!(
            "{shown}: appending the batch of lines {first} to {last} failed: {other}; {}",
            summary.so_far()
        )),
    }
}
