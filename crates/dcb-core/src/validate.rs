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

fn check_type(field: &str, event_type: &str) -> Result<(), Error> {
    if event_type.is_empty() {
        return Err(invalid(
            field,
            K::EmptyEventType,
            "event type must not be empty",
        ));
    }
    let len = event_type.chars().count();
    if len > MAX_EVENT_TYPE_LEN {
        return Err(invalid(
            field,
            K::EventTypeTooLong,
            format!("event type is {len} characters long; the maximum is {MAX_EVENT_TYPE_LEN}"),
        ));
    }
    check_no_nul(field, event_type)
}

fn check_no_nul(field: &str, text: &str) -> Result<(), Error> {
    if text.contains('\0') {
        return Err(invalid(
            field,
            K::NulCharacter,
            "contains a NUL character (\\0), which cannot be stored",
        ));
    }
    Ok(())
}

fn check_tag(field: &str, tag: &Tag) -> Result<(), Error> {
    if tag.key.is_empty() {
        return Err(invalid(
            format!("{field}.key"),
            K::EmptyTagKey,
            "tag key must not be empty",
        ));
    }
    if tag.key.contains(':') {
        return Err(invalid(
            format!("{field}.key"),
            K::ReservedCharacter,
            format!("tag key {:?} contains ':', which separates key from value; use another character in keys (values may contain ':')", tag.key),
        ));
    }
    check_no_nul(&format!("{field}.key"), &tag.key)?;
    if tag.value.is_empty() {
        return Err(invalid(
            format!("{field}.value"),
            K::EmptyTagValue,
            format!("tag {:?} has an empty value", tag.key),
        ));
    }
    check_no_nul(&format!("{field}.value"), &tag.value)
}

fn check_json(field: &str, value: &Value) -> Result<(), Error> {
    match value {
        Value::String(s) => check_no_nul(field, s),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_json(&format!("{field}[{i}]"), v)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            check_no_nul(&format!("{field}.{k}"), k)?;
            check_json(&format!("{field}.{k}"), v)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// Checks a batch of events before an append: non-empty, within `limits`, valid types, tags and
/// payloads. The first problem found is returned with the path of the offending field.
///
/// ```
/// use dcb_core::{validate_events, Limits, NewEvent, Tag, ValidationKind};
/// let bad = NewEvent::new("Opened", vec![Tag::new("id", "1"), Tag::new("id", "2")], serde_json::json!({}));
/// let err = validate_events(&[bad], &Limits::default()).unwrap_err();
/// assert_eq!(err.as_validation().unwrap().kind, ValidationKind::DuplicateTagKey);
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
        check_type(&format!("events[{i}].event_type"), &event.event_type)?;
        for (j, tag) in event.tags.iter().enumerate() {
            let field = format!("events[{i}].tags[{j}]");
            check_tag(&field, tag)?;
            if event.tags[..j].iter().any(|t| t.key == tag.key) {
                return Err(invalid(
                    field,
                    K::DuplicateTagKey,
                    format!("tag key {:?} appears twice on one event", tag.key),
                ));
            }
        }
        check_json(&format!("events[{i}].data"), &event.data)?;
        if let Some(metadata) = &event.metadata {
            check_json(&format!("events[{i}].metadata"), metadata)?;
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
            check_type(&format!("{field}.items[{i}].types[{j}]"), t)?;
        }
        for (j, tag) in item.tags.iter().enumerate() {
            check_tag(&format!("{field}.items[{i}].tags[{j}]"), tag)?;
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

/// Checks a command before it is recorded: a valid type, JSON without NUL characters and, if
/// present, a non-empty idempotency id.
pub fn validate_command(command: &crate::NewCommand) -> Result<(), Error> {
    check_type("command.command_type", &command.command_type)?;
    check_json("command.data", &command.data)?;
    if let Some(metadata) = &command.metadata {
        check_json("command.metadata", metadata)?;
    }
    if let Some(id) = &command.id {
        if id.is_empty() {
            return Err(invalid(
                "command.id",
                K::EmptyTagValue,
                "a command id must not be empty",
            ));
        }
        check_no_nul("command.id", id)?;
    }
    Ok(())
}

/// Checks read options: a limit, when given, must be at least 1.
pub fn validate_read_options(options: &crate::ReadOptions) -> Result<(), Error> {
    if options.limit == Some(0) {
        return Err(invalid(
            "options.limit",
            K::InvalidReadOption,
            "limit must be at least 1 (use None for no limit)",
        ));
    }
    Ok(())
}
