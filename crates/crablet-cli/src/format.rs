//! How things are written: the JSON line of an event, times, sizes and terminal tables.
use dcb_core::{Event, NewEvent, Tag};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::IsTerminal;
use std::time::SystemTime;

/// A time in RFC 3339, UTC, with microseconds (PostgreSQL's precision).
pub fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A time in RFC 3339, UTC, with milliseconds (for tables).
pub fn rfc3339_millis(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A byte count in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// An event as one JSON line of `export` (and of `events --format jsonl`):
/// `{"type":..,"tags":["key:value",..],"data":..,"metadata":..,"occurred_at":..,"cursor":..}`.
#[derive(Serialize)]
struct LineOut<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    tags: Vec<String>,
    data: &'a Value,
    metadata: Option<&'a Value>,
    occurred_at: String,
    cursor: String,
}

/// The JSON line of `event` (no trailing newline).
pub fn event_line(event: &Event) -> Result<String, serde_json::Error> {
    serde_json::to_string(&LineOut {
        event_type: &event.event_type,
        tags: event.tags.iter().map(Tag::to_string).collect(),
        data: &event.data,
        metadata: event.metadata.as_ref(),
        occurred_at: rfc3339(event.occurred_at),
        cursor: event.cursor.to_string(),
    })
}

/// A line of an import file. `cursor` is accepted (export writes it) and ignored: the store
/// assigns it anew; `occurred_at` is kept when asked, else ignored too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    tags: Vec<String>,
    data: Value,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    occurred_at: Option<String>,
    #[serde(default, rename = "cursor")]
    _cursor: Option<String>,
}

/// Parses one line of an import file into the event to append, with its recorded
/// `occurred_at` when `keep_occurred_at`; the error says what is wrong.
pub fn parse_event_line(line: &str, keep_occurred_at: bool) -> Result<NewEvent, String> {
    let parsed: LineIn = serde_json::from_str(line).map_err(|err| {
        let text = err.to_string();
        let suffix = format!(" at line {} column {}", err.line(), err.column());
        let what = text.strip_suffix(&suffix).unwrap_or(&text);
        if err.is_data() {
            format!("not an event line: {what} (at column {})", err.column())
        } else {
            format!("invalid JSON: {what} (at column {})", err.column())
        }
    })?;
    let mut tags = Vec::with_capacity(parsed.tags.len());
    for (i, tag) in parsed.tags.iter().enumerate() {
        match tag.split_once(':') {
            Some((key, value)) if !key.is_empty() => tags.push(Tag::new(key, value)),
            _ => {
                return Err(format!(
                    "tags[{i}] {tag:?} is not \"key:value\" (a non-empty key, then ':')"
                ))
            }
        }
    }
    let occurred_at = if keep_occurred_at {
        let text = parsed
            .occurred_at
            .as_deref()
            .ok_or("no \"occurred_at\" to keep (--keep-occurred-at needs one on every line)")?;
        let at = chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|err| format!("\"occurred_at\" {text:?} is not an RFC 3339 time ({err})"))?;
        Some(SystemTime::from(at.with_timezone(&chrono::Utc)))
    } else {
        None
    };
    Ok(NewEvent {
        event_type: parsed.event_type,
        tags,
        data: parsed.data,
        metadata: parsed.metadata,
        occurred_at,
    })
}

/// The width tables are fitted to: the terminal's, else `COLUMNS`, else 120.
pub fn output_width() -> usize {
    if std::io::stdout().is_terminal() {
        if let Some((_, columns)) = console::Term::stdout().size_checked() {
            return usize::from(columns).max(40);
        }
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| c > 0)
        .unwrap_or(120)
        .max(40)
}

/// `text` with control characters escaped, cut to `width` characters (the last one `…`).
pub fn fit(text: &str, width: Option<usize>) -> String {
    let clean: String = if text.chars().any(char::is_control) {
        text.chars()
            .flat_map(|c| {
                if c.is_control() {
                    c.escape_default().collect::<Vec<_>>()
                } else {
                    vec![c]
                }
            })
            .collect()
    } else {
        text.to_string()
    };
    match width {
        Some(width) if clean.chars().count() > width => {
            let mut cut: String = clean.chars().take(width.saturating_sub(1)).collect();
            cut.push('…');
            cut
        }
        _ => clean,
    }
}

/// Column alignment in [`table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Left-aligned text.
    Left,
    /// Right-aligned numbers.
    Right,
}

/// A table with a header row, columns as wide as their widest cell, each line prefixed with
/// `indent`; trailing spaces trimmed.
pub fn table(indent: &str, headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::from(indent);
        for (i, cell) in cells.iter().enumerate().take(headers.len()) {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            match headers[i].1 {
                Align::Left => {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                }
                Align::Right => {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.iter().map(|(h, _)| *h).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The streaming table of `crablet events`: fixed columns fitted to a width, so rows can be
/// printed as they arrive (also while following).
pub struct EventTable {
    type_width: usize,
    tags_width: usize,
    data_width: Option<usize>,
    truncate: bool,
}

/// Width of the cursor column (longer cursors push the row right).
const CURSOR_WIDTH: usize = 14;
/// Width of `2026-01-01T00:00:00.000Z`.
const TIME_WIDTH: usize = 24;

impl EventTable {
    /// A table `width` characters wide, or without truncation.
    pub fn new(width: usize, truncate: bool) -> Self {
        let rest = width.saturating_sub(CURSOR_WIDTH + TIME_WIDTH + 8);
        let type_width = (rest / 4).clamp(8, 28);
        let tags_width = (rest * 3 / 10).clamp(8, 40);
        let data_width = rest.saturating_sub(type_width + tags_width + 4).max(12);
        Self {
            type_width,
            tags_width,
            data_width: truncate.then_some(data_width),
            truncate,
        }
    }

    /// The header line.
    pub fn header(&self) -> String {
        self.row_of("CURSOR", "OCCURRED_AT", "TYPE", "TAGS", "DATA")
    }

    /// The line of `event`.
    pub fn row(&self, event: &Event) -> String {
        let tags = event
            .tags
            .iter()
            .map(Tag::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let data = event.data.to_string();
        self.row_of(
            &event.cursor.to_string(),
            &rfc3339_millis(event.occurred_at),
            &event.event_type,
            &tags,
            &data,
        )
    }

    fn row_of(&self, cursor: &str, time: &str, event_type: &str, tags: &str, data: &str) -> String {
        let limit = |w: usize| self.truncate.then_some(w);
        let cell = |text: &str, w: usize| {
            let text = fit(text, limit(w));
            let pad = w.saturating_sub(text.chars().count());
            format!("{text}{}", " ".repeat(pad))
        };
        let line = format!(
            "{}  {}  {}  {}  {}",
            cell(cursor, CURSOR_WIDTH),
            cell(time, TIME_WIDTH),
            cell(event_type, self.type_width),
            cell(tags, self.tags_width),
            fit(data, self.data_width),
        );
        line.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcb_core::Cursor;
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    fn event() -> Event {
        Event {
            cursor: Cursor::new(812, 3),
            event_type: "CourseDefined".into(),
            tags: vec![Tag::new("course_id", "c:1"), Tag::new("term", "2026")],
            data: json!({"capacity": 30, "name": "x".repeat(300)}),
            metadata: None,
            occurred_at: UNIX_EPOCH + Duration::from_micros(1_777_000_000_123_456),
        }
    }

    #[test]
    fn lines_round_trip_through_the_import_parser() {
        let line = event_line(&event()).expect("line");
        assert!(
            line.starts_with(
                r#"{"type":"CourseDefined","tags":["course_id:c:1","term:2026"],"data":{"capacity":30"#
            ),
            "{line}"
        );
        assert!(
            line.ends_with(
                r#""metadata":null,"occurred_at":"2026-04-24T03:06:40.123456Z","cursor":"812/3"}"#
            ),
            "{line}"
        );
        let parsed = parse_event_line(&line, false).expect("parse");
        assert_eq!(parsed.occurred_at, None);
        let kept = parse_event_line(&line, true).expect("parse");
        assert_eq!(Some(event().occurred_at), kept.occurred_at);
        assert_eq!(parsed.event_type, "CourseDefined");
        assert_eq!(parsed.tags, event().tags);
        assert_eq!(parsed.data, event().data);
        assert_eq!(parsed.metadata, None);
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let err = parse_event_line("{\"type\":\"A\"", false).expect_err("truncated");
        assert!(err.starts_with("invalid JSON"), "{err}");
        let err = parse_event_line("{\"type\":\"A\"}", false).expect_err("no data");
        assert!(err.contains("missing field `data`"), "{err}");
        let err =
            parse_event_line("{\"type\":\"A\",\"data\":1,\"x\":2}", false).expect_err("unknown");
        assert!(err.contains("unknown field `x`"), "{err}");
        let err = parse_event_line("{\"type\":\"A\",\"data\":1,\"tags\":[\"novalue\"]}", false)
            .expect_err("tag");
        assert!(err.contains("tags[0]"), "{err}");
    }

    #[test]
    fn tables_fit_their_width() {
        let table = EventTable::new(100, true);
        let row = table.row(&event());
        assert!(
            row.chars().count() <= 100,
            "{} > 100: {row}",
            row.chars().count()
        );
        assert!(row.ends_with('…'));
        let wide = EventTable::new(100, false).row(&event());
        assert!(wide.contains(&"x".repeat(300)));
        assert_eq!(fit("a\nb", None), "a\\nb");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
