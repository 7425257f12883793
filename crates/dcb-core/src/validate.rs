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

fn check_json(field: &dyn Fn() -> String, value: &Value) -> Result<(), Error> {
    match value {
        Value::String(s) => check_no_nul(field, s),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_json(&|| format!("{}[{i}]", field()), v)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            let path = || format!("{}.{k}", field());
            check_no_nul(&path, k)?;
            check_json(&path, v)
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
        check_type(&|| format!("events[{i}].event_type"), &event.event_type)?;
        for (j, tag) in event.tags.iter().enumerate() {
            let field = || format!("events[{i}].tags[{j}]");
            check_tag(&field, tag)?;
            if event.tags[..j].iter().any(|t| t.key == tag.key) {
                return Err(invalid(
                    field(),
                    K::DuplicateTagKey,
                    format!("tag key {:?} appears twice on one event", tag.key),
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

/// Checks a command before it is recorded: a valid type, JSON without NUL characters and, if
/// present, a non-empty idempotency id.
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
        let twice = NewEvent::new("A", vec![Tag::new("k", "1"), Tag::new("k", "2")], json!({}));
        assert_eq!(
            field_of(validate_events(&[twice], &limits)),
            ("events[0].tags[1]".to_string(), K::DuplicateTagKey)
        );
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
}
