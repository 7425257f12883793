use crate::error::ValidationKind as K;
use crate::{AppendCondition, Error, NewEvent, Query, Tag, ValidationError};
use serde_json::Value;

/// The longest accepted event type, in characters.
pub const MAX_EVENT_TYPE_LEN: usize = 64;

/// Limits a store enforces on its input.
///
/// ```
/// let limits = dcb_core::Limits::default();
/// assert_eq!(limits.max_batch_size, 1000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most events one append may carry.
    pub max_batch_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_size: 1000,
        }
    }
}

fn invalid(field: impl Into<String>, kind: K, message: impl Into<String>) -> Error {
    Error::Validation(ValidationError::new(field, kind, message))
}

// Field paths (`events[3].tags[1].value`) are only built when a check fails: validating a
// 1,000-event batch must not allocate a path string per field.

fn check_type(field: &dyn Fn() -> String, event_type: &str) -> Result<(), Error> {
    if event_type.is_empty() {
        return Err(invalid(
            field(),
            K::EmptyEventType,
            "event type must not be empty",
        ));
    }
    let len = event_type.chars().count();
    if len > MAX_EVENT_TYPE_LEN {
        return Err(invalid(
            field(),
            K::EventTypeTooLong,
            format!("event type is {len} characters long; the maximum is {MAX_EVENT_TYPE_LEN}"),
        ));
    }
    check_no_nul(field, event_type)
}

fn check_no_nul(field: &dyn Fn() -> String, text: &str) -> Result<(), Error> {
    if text.contains('\0') {
        return Err(invalid(
            field(),
            K::NulCharacter,
            "contains a NUL character (\\0), which cannot be stored",
        ));
    }
    Ok(())
}

fn check_tag(field: &dyn Fn() -> String, tag: &Tag) -> Result<(), Error> {
    let key = || format!("{}.key", field());
    let value = || format!("{}.value", field());
    if tag.key.is_empty() {
        return Err(invalid(key(), K::EmptyTagKey, "tag key must not be empty"));
    }
    if tag.key.contains(':') {
        return Err(invalid(
            key(),
            K::ReservedCharacter,
            format!("tag key {:?} contains ':', which separates key from value; use another character in keys (values may contain ':')", tag.key),
        ));
    }
    check_no_nul(&key, &tag.key)?;
    if tag.value.is_empty() {
        return Err(invalid(
            value(),
            K::EmptyTagValue,
            format!("tag {:?} has an empty value", tag.key),
        ));
    }
    check_no_nul(&value, &tag.value)
}

// --- JSON payloads (data and metadata of events and commands) ---

/// The deepest nesting of arrays and objects accepted in the data and metadata of events and
/// commands: `[]` and `{"a": 1}` are one level deep, `{"a": [1]}` two, a scalar none.
///
/// Every backend must return what it accepted, and serde_json (which decodes jsonb on
/// PostgreSQL) refuses documents nested 128 levels or deeper. The limit leaves half of that
/// room, so a stored payload still decodes after it is wrapped again (an [`Event`](crate::Event)
/// serialized into a message, an envelope around a batch). Deeper input is rejected with
/// [`ValidationKind::JsonTooDeep`](crate::ValidationKind::JsonTooDeep).
///
/// ```
/// use dcb_core::{validate_events, Limits, NewEvent, ValidationKind, MAX_JSON_DEPTH};
/// let mut data = serde_json::json!(1);
/// for _ in 0..=MAX_JSON_DEPTH {
///     data = serde_json::Value::Array(vec![data]);
/// }
/// let err = validate_events(&[NewEvent::new("Deep", vec![], data)], &Limits::default()).unwrap_err();
/// assert_eq!(err.as_validation().unwrap().kind, ValidationKind::JsonTooDeep);
/// ```
pub const MAX_JSON_DEPTH: usize = 64;

/// One step from a JSON container to a child, for error paths.
enum Step<'a> {
    Index(usize),
    Key(&'a str),
}

/// A container being walked, with the children still to visit.
enum Frame<'a> {
    Array(std::iter::Enumerate<std::slice::Iter<'a, Value>>),
    Object(serde_json::map::Iter<'a>),
}

/// `field` followed by the steps of `path`: `events[0].data.a[1].b`.
fn json_path(field: &dyn Fn() -> String, path: &[Step<'_>]) -> String {
    let mut out = field();
    for step in path {
        match step {
            Step::Index(i) => out.push_str(&format!("[{i}]")),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
        }
    }
    out
}

/// Whether `value`, found `depth` containers deep, passes [`check_json`]: the common case,
/// answered without allocating (the walk below keeps a stack and a path for its error).
/// Recursion stops at [`MAX_JSON_DEPTH`], so the stack stays bounded.
fn json_is_clean(value: &Value, depth: usize) -> bool {
    match value {
        Value::String(s) => !s.contains('\0'),
        Value::Null | Value::Bool(_) | Value::Number(_) => true,
        _ if depth >= MAX_JSON_DEPTH => false,
        Value::Array(items) => items.iter().all(|v| json_is_clean(v, depth + 1)),
        Value::Object(map) => map
            .iter()
            .all(|(k, v)| !k.contains('\0') && json_is_clean(v, depth + 1)),
    }
}

/// Checks a JSON value: no NUL in strings or object keys, at most [`MAX_JSON_DEPTH`] levels of
/// arrays and objects.
///
/// The walk keeps its own stack instead of recursing, so a value nested any number of levels
/// deep is rejected without exhausting the thread's stack.
fn check_json(field: &dyn Fn() -> String, value: &Value) -> Result<(), Error> {
    if json_is_clean(value, 0) {
        return Ok(());
    }
    let mut frames: Vec<Frame<'_>> = Vec::new();
    // `path[i]` is the child of `frames[i]` being visited.
    let mut path: Vec<Step<'_>> = Vec::new();
    let mut next = Some(value);
    loop {
        if let Some(value) = next.take() {
            // `nests`: an array or object, a level of its own even when empty.
            let (frame, nests) = match value {
                Value::String(s) => {
                    check_no_nul(&|| json_path(field, &path), s)?;
                    (None, false)
                }
                Value::Array(items) => (
                    (!items.is_empty()).then(|| Frame::Array(items.iter().enumerate())),
                    true,
                ),
                Value::Object(map) => ((!map.is_empty()).then(|| Frame::Object(map.iter())), true),
                Value::Null | Value::Bool(_) | Value::Number(_) => (None, false),
            };
            // Every frame is a non-empty container on the way to `value`.
            if nests && frames.len() >= MAX_JSON_DEPTH {
                return Err(invalid(
                    json_path(field, &path),
                    K::JsonTooDeep,
                    format!(
                        "JSON nests arrays and objects more than {MAX_JSON_DEPTH} levels deep \
                         (MAX_JSON_DEPTH); deeper documents could not be read back. Flatten the \
                         structure or store the deep part as a JSON string"
                    ),
                ));
            }
            if let Some(frame) = frame {
                frames.push(frame);
            }
        }
        path.truncate(frames.len().saturating_sub(1));
        let Some(top) = frames.last_mut() else {
            return Ok(());
        };
        let child = match top {
            Frame::Array(items) => items.next().map(|(i, v)| (Step::Index(i), v)),
            Frame::Object(entries) => entries.next().map(|(k, v)| (Step::Key(k.as_str()), v)),
        };
        match child {
            Some((step, value)) => {
                let key = match step {
                    Step::Key(key) => Some(key),
                    Step::Index(_) => None,
                };
                path.push(step);
                if let Some(key) = key {
                    check_no_nul(&|| json_path(field, &path), key)?;
                }
                next = Some(value);
            }
            None => {
                frames.pop();
            }
        }
    }
}

/// Drops a JSON value without recursing: serde_json's own drop recurses once per level and
/// overflows a 2 MiB thread stack at about 12,000 nested arrays or 5,000 nested objects.
fn drop_json(value: Value) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// Drops events without recursing into their JSON, however deep it nests.
///
/// Stores call it on a batch that [`validate_events`] rejected: the batch was handed over by
/// value, and dropping a payload nested thousands of levels deep (which validation rejects as
/// [`ValidationKind::JsonTooDeep`](crate::ValidationKind::JsonTooDeep)) the ordinary way could
/// overflow the stack.
///
/// ```
/// let mut data = serde_json::json!(null);
/// for _ in 0..100_000 {
///     data = serde_json::Value::Array(vec![data]);
/// }
/// dcb_core::discard_events(vec![dcb_core::NewEvent::new("Deep", vec![], data)]);
/// ```
pub fn discard_events(events: Vec<NewEvent>) {
    for event in events {
        drop_json(event.data);
        if let Some(metadata) = event.metadata {
            drop_json(metadata);
        }
    }
}

/// Checks a batch of events before an append: non-empty, within `limits`, valid types, tags and
/// payloads (data and metadata without NUL characters, at most [`MAX_JSON_DEPTH`] levels deep).
/// The first problem found is returned with the path of the offending field.
///
/// ```
/// use dcb_core::{validate_events, Limits, NewEvent, Tag, ValidationKind};
/// // One key, several values: a cart of two products.
/// let cart = NewEvent::new("Ordered", vec![Tag::new("product", "p1"), Tag::new("product", "p2")], serde_json::json!({}));
/// assert!(validate_events(&[cart], &Limits::default()).is_ok());
/// let bad = NewEvent::new("Opened", vec![Tag::new("id", "1"), Tag::new("id", "1")], serde_json::json!({}));
/// let err = validate_events(&[bad], &Limits::default()).unwrap_err();
/// assert_eq!(err.as_validation().unwrap().kind, ValidationKind::DuplicateTag);
/// ```
pub fn validate_events(events: &[NewEvent], limits: &Limits) -> Result<(), Error> {
    if events.is_empty() {
        return Err(invalid(
            "events",
            K::EmptyAppend,
            "an append needs at least one event",
        ));
    }
    if events.len() > limits.max_batch_size {
        return Err(invalid(
            "events",
            K::BatchTooLarge,
            format!(
                "{} events exceed the maximum batch size of {}; split the append or raise max_batch_size",
                events.len(),
                limits.max_batch_size
            ),
        ));
    }
    for (i, event) in events.iter().enumerate() {
        check_type(&|| format!("events[{i}].event_type"), &event.event_type)?;
        for (j, tag) in event.tags.iter().enumerate() {
            let field = || format!("events[{i}].tags[{j}]");
            check_tag(&field, tag)?;
            // Tags are a set: a key may carry several values, but a pair is given once.
            if event.tags[..j].contains(tag) {
                return Err(invalid(
                    field(),
                    K::DuplicateTag,
                    format!(
                        "tag {:?} = {:?} appears twice on one event; tags are a set of \
                         key/value pairs (one key may carry several values): give each pair once",
                        tag.key, tag.value
                    ),
                ));
            }
        }
        check_json(&|| format!("events[{i}].data"), &event.data)?;
        if let Some(metadata) = &event.metadata {
            check_json(&|| format!("events[{i}].metadata"), metadata)?;
        }
    }
    Ok(())
}

/// Checks a query: at least one item, and valid types and tags in every item.
pub fn validate_query(query: &Query) -> Result<(), Error> {
    validate_query_at("query", query)
}

fn validate_query_at(field: &str, query: &Query) -> Result<(), Error> {
    if query.items.is_empty() {
        return Err(invalid(
            field,
            K::EmptyQuery,
            "a query needs at least one item; use Query::all() to select every event",
        ));
    }
    for (i, item) in query.items.iter().enumerate() {
        for (j, t) in item.types.iter().enumerate() {
            check_type(&|| format!("{field}.items[{i}].types[{j}]"), t)?;
        }
        for (j, tag) in item.tags.iter().enumerate() {
            check_tag(&|| format!("{field}.items[{i}].tags[{j}]"), tag)?;
        }
    }
    Ok(())
}

/// Checks an append condition's query.
pub fn validate_condition(condition: &AppendCondition) -> Result<(), Error> {
    validate_query_at(
        "condition.fail_if_events_match",
        &condition.fail_if_events_match,
    )
}

/// Checks a command before it is recorded: a valid type, JSON data and metadata without NUL
/// characters and at most [`MAX_JSON_DEPTH`] levels deep and, if present, a non-empty
/// idempotency id.
pub fn validate_command(command: &crate::NewCommand) -> Result<(), Error> {
    check_type(&|| "command.command_type".into(), &command.command_type)?;
    check_json(&|| "command.data".into(), &command.data)?;
    if let Some(metadata) = &command.metadata {
        check_json(&|| "command.metadata".into(), metadata)?;
    }
    if let Some(id) = &command.id {
        if id.is_empty() {
            return Err(invalid(
                "command.id",
                K::EmptyTagValue,
                "a command id must not be empty",
            ));
        }
        check_no_nul(&|| "command.id".into(), id)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(result: Result<(), Error>) -> (String, K) {
        match result {
            Err(Error::Validation(v)) => (v.field, v.kind),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn error_paths_name_the_offending_field() {
        let ok = NewEvent::new("A", vec![Tag::new("k", "v")], json!({"a": [1, "x"]}));
        let limits = Limits::default();
        assert!(validate_events(std::slice::from_ref(&ok), &limits).is_ok());

        let nested = NewEvent::new("A", vec![], json!({"a": [1, {"b\0": 2}]}));
        assert_eq!(
            field_of(validate_events(&[ok.clone(), nested], &limits)),
            ("events[1].data.a[1].b\0".to_string(), K::NulCharacter)
        );
        let value = NewEvent::new("A", vec![Tag::new("k", "v"), Tag::new("j", "")], json!({}));
        assert_eq!(
            field_of(validate_events(&[value], &limits)),
            ("events[0].tags[1].value".to_string(), K::EmptyTagValue)
        );
        let key = NewEvent::new("A", vec![Tag::new("a:b", "v")], json!({}));
        assert_eq!(
            field_of(validate_events(&[key], &limits)),
            ("events[0].tags[0].key".to_string(), K::ReservedCharacter)
        );
        let twice = NewEvent::new("A", vec![Tag::new("k", "1"), Tag::new("k", "1")], json!({}));
        assert_eq!(
            field_of(validate_events(&[twice], &limits)),
            ("events[0].tags[1]".to_string(), K::DuplicateTag)
        );
        let values = NewEvent::new("A", vec![Tag::new("k", "1"), Tag::new("k", "2")], json!({}));
        assert!(validate_events(&[values], &limits).is_ok());
        let mut meta = NewEvent::new("A", vec![], json!({}));
        meta.metadata = Some(json!(["\0"]));
        assert_eq!(
            field_of(validate_events(&[meta], &limits)),
            ("events[0].metadata[0]".to_string(), K::NulCharacter)
        );
        let query = Query::from(crate::QueryItem::new().types(["ok", ""]));
        assert_eq!(
            field_of(validate_query(&query)),
            ("query.items[0].types[1]".to_string(), K::EmptyEventType)
        );
    }

    /// `depth` levels: arrays, or objects under key "k", around `inner`.
    fn nested(depth: usize, objects: bool, inner: Value) -> Value {
        (0..depth).fold(inner, |v, _| {
            if objects {
                // Not `json!`: it would serialize `v` again, recursively.
                Value::Object(std::iter::once(("k".to_string(), v)).collect())
            } else {
                Value::Array(vec![v])
            }
        })
    }

    #[test]
    fn json_depth_is_limited_in_data_metadata_and_commands() {
        let limits = Limits::default();
        let data = |v: Value| validate_events(&[NewEvent::new("A", vec![], v)], &limits);
        for objects in [false, true] {
            assert!(data(nested(MAX_JSON_DEPTH, objects, json!(1))).is_ok());
            assert!(data(nested(MAX_JSON_DEPTH - 1, objects, json!([]))).is_ok());
            let (_, kind) = field_of(data(nested(MAX_JSON_DEPTH + 1, objects, json!(1))));
            assert_eq!(kind, K::JsonTooDeep);
            // An empty container is a level too.
            let (_, kind) = field_of(data(nested(MAX_JSON_DEPTH, objects, json!({}))));
            assert_eq!(kind, K::JsonTooDeep);
        }
        // The path names the container that is one level too deep.
        let deep = nested(MAX_JSON_DEPTH, false, json!(1));
        let (field, _) = field_of(data(Value::Object(
            std::iter::once(("a".to_string(), deep)).collect(),
        )));
        assert_eq!(
            field,
            format!("events[0].data.a{}", "[0]".repeat(MAX_JSON_DEPTH - 1))
        );
        // Siblings do not add up: breadth is not depth.
        let wide = Value::Array(vec![nested(MAX_JSON_DEPTH - 1, true, json!(1)); 3]);
        assert!(data(wide).is_ok());

        let mut meta = NewEvent::new("A", vec![], json!({}));
        meta.metadata = Some(nested(MAX_JSON_DEPTH + 1, false, json!(null)));
        assert_eq!(
            field_of(validate_events(&[meta], &limits)).1,
            K::JsonTooDeep
        );
        let mut command = crate::NewCommand {
            command_type: "C".into(),
            data: nested(MAX_JSON_DEPTH + 1, true, json!(1)),
            metadata: None,
            id: None,
        };
        assert_eq!(field_of(validate_command(&command)).1, K::JsonTooDeep);
        command.data = json!({});
        command.metadata = Some(nested(MAX_JSON_DEPTH + 1, false, json!(1)));
        assert_eq!(
            field_of(validate_command(&command)),
            (
                format!("command.metadata{}", "[0]".repeat(MAX_JSON_DEPTH)),
                K::JsonTooDeep
            )
        );
    }

    #[test]
    fn very_deep_json_is_rejected_without_recursion() {
        // 10,000 levels, validated on a thread with a 64 KiB stack: a recursive walk would
        // overflow it long before. (Building and dropping the value happens on this thread.)
        for objects in [false, true] {
            let deep = nested(10_000, objects, json!("\0"));
            let mut event = vec![NewEvent::new("A", vec![], deep)];
            let result = std::thread::scope(|scope| {
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn_scoped(scope, || {
                        validate_events(&event, &Limits::default())
                            .map_err(|e| e.as_validation().map(|v| v.kind))
                    })
                    .expect("spawn")
                    .join()
                    .expect("no stack overflow")
            });
            assert_eq!(result, Err(Some(K::JsonTooDeep)));
            // A 10,000-deep object would overflow this thread's stack if dropped normally.
            discard_events(std::mem::take(&mut event));
        }
    }
}
