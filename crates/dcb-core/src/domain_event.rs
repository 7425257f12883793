use crate::{
    Cursor, DecodeError, DecodeErrorKind, Error, Event, NewEvent, Tag, Upcasters, ValidationError,
    ValidationKind,
};
use serde_json::Value;
use std::borrow::Cow;

/// The metadata key that carries a typed event's schema version.
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

/// A typed event: a Rust struct or enum that encodes to [`NewEvent`]s and decodes from stored
/// [`Event`]s. Derive it with `#[derive(DomainEvent)]` (crate `dcb-derive`, re-exported by
/// `crablet`), which documents the attributes.
///
/// The derive makes the struct's name (or each variant's name) the event type, the fields
/// marked `#[crablet(tag)]` tags ([`TagValue`](crate::TagValue)), and every other field the
/// JSON payload, through serde. Decoding upcasts old payloads first ([`Upcasters`]).
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// The event types this Rust type encodes to, in declaration order (current names only).
    fn event_types() -> Vec<&'static str>;

    /// The upcasters applied before decoding. None unless the derive names some.
    fn upcasters() -> &'static Upcasters {
        Upcasters::none()
    }

    /// The event type of this value.
    fn event_type(&self) -> &'static str;

    /// The schema version this value is encoded at (1 unless declared).
    fn schema_version(&self) -> u32;

    /// Encodes the value without metadata (beyond its schema version, when above 1).
    fn encode(&self) -> Result<NewEvent, Error>;

    /// Decodes a view that the caller has not yet upcast. Generated code applies
    /// [`upcasters`](Self::upcasters) first; call [`decode`](Self::decode) instead.
    fn decode_view(view: EventView<'_>) -> Result<Self, DecodeErrorKind>;

    /// The event types a read must select to see every event this type decodes: the current
    /// names and every old name the upcasters rename.
    fn read_types() -> Vec<String> {
        let mut types: Vec<String> = Vec::new();
        for current in Self::event_types() {
            for name in std::iter::once(current).chain(Self::upcasters().old_names(current)) {
                if !types.iter().any(|t| t == name) {
                    types.push(name.to_string());
                }
            }
        }
        types
    }

    /// True when this type decodes events stored with type `event_type` (a current or an old
    /// name).
    fn decodes(event_type: &str) -> bool {
        Self::read_types().iter().any(|t| t == event_type)
    }

    /// Decodes a stored event, upcasting it first. The error names the event's cursor, its type
    /// and what did not fit.
    fn decode(event: &Event) -> Result<Self, Error> {
        let view = EventView::of(event).map_err(|kind| decode_error::<Self>(event, kind))?;
        Self::decode_view(view).map_err(|kind| decode_error::<Self>(event, kind))
    }

    /// Encodes the value with `metadata` (a JSON object, or `null` for none). The schema
    /// version, when above 1, is added to the object under [`SCHEMA_VERSION_KEY`], which the
    /// object must not hold itself.
    fn encode_with_metadata(&self, metadata: Value) -> Result<NewEvent, Error> {
        let mut event = self.encode()?;
        let invalid = |message: String| {
            Error::Validation(ValidationError::new(
                "metadata",
                ValidationKind::NotSerializable,
                message,
            ))
        };
        let mut object = match metadata {
            Value::Null => return Ok(event),
            Value::Object(object) => object,
            other => {
                return Err(invalid(format!(
                    "the metadata of a typed {} event must be a JSON object, not {other}",
                    self.event_type()
                )))
            }
        };
        if object.contains_key(SCHEMA_VERSION_KEY) {
            return Err(invalid(format!(
                "the metadata key {SCHEMA_VERSION_KEY:?} is reserved for the typed event's schema version"
            )));
        }
        if let Some(Value::Object(versioned)) = event.metadata.take() {
            object.extend(versioned);
        }
        event.metadata = Some(Value::Object(object));
        Ok(event)
    }
}

fn decode_error<E>(event: &Event, kind: DecodeErrorKind) -> Error {
    Error::Decode(Box::new(DecodeError {
        cursor: event.cursor,
        event_type: event.event_type.clone(),
        target: std::any::type_name::<E>(),
        kind,
    }))
}

/// A stored event as a typed decoder sees it: its type name and payload after the upcasters
/// applied so far, its schema version, and its tags.
#[derive(Debug, Clone)]
pub struct EventView<'a> {
    /// The stored event's cursor.
    pub cursor: Cursor,
    /// The event type, renamed by the upcasters applied so far.
    pub event_type: Cow<'a, str>,
    /// The payload's schema version.
    pub version: u32,
    /// The event's tags (never upcast).
    pub tags: &'a [Tag],
    /// The payload, reshaped by the upcasters applied so far.
    pub data: Cow<'a, Value>,
}

impl<'a> EventView<'a> {
    /// The view of a stored event, with its version read from the metadata.
    pub fn of(event: &'a Event) -> Result<Self, DecodeErrorKind> {
        Ok(Self {
            cursor: event.cursor,
            event_type: Cow::Borrowed(&event.event_type),
            version: stored_version(event.metadata.as_ref())?,
            tags: &event.tags,
            data: Cow::Borrowed(&event.data),
        })
    }
}

/// The schema version recorded in `metadata`: its [`SCHEMA_VERSION_KEY`], 1 when absent.
pub fn stored_version(metadata: Option<&Value>) -> Result<u32, DecodeErrorKind> {
    match metadata.and_then(|m| m.get(SCHEMA_VERSION_KEY)) {
        None => Ok(1),
        Some(value) => value
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v >= 1)
            .ok_or_else(|| DecodeErrorKind::BadVersion {
                found: value.to_string(),
            }),
    }
}

/// The kind of a variant of an enum of typed events: `#[derive(DomainEvent)]` on an enum
/// generates its kind enum (`{Enum}Kind`, one unit variant per variant, or
/// `#[crablet(kind = Name)]`), for queries that select some of the variants
/// ([`QueryItem::of_kinds`](crate::QueryItem::of_kinds)).
pub trait EventKind: Copy {
    /// The event type names of this kind, old names included.
    fn read_types(self) -> Vec<String>;
}

/// One typed event type or a tuple of them: the types a typed query selects
/// ([`QueryItem::of`](crate::QueryItem::of)).
pub trait EventTypes {
    /// Every event type name to select, old names included.
    fn read_types() -> Vec<String>;
}

impl<E: DomainEvent> EventTypes for E {
    fn read_types() -> Vec<String> {
        <E as DomainEvent>::read_types()
    }
}

macro_rules! tuple_event_types {
    ($($name:ident),+) => {
        impl<$($name: DomainEvent),+> EventTypes for ($($name,)+) {
            fn read_types() -> Vec<String> {
                let mut types: Vec<String> = Vec::new();
                $(
                    for name in <$name as DomainEvent>::read_types() {
                        if !types.contains(&name) {
                            types.push(name);
                        }
                    }
                )+
                types
            }
        }
    };
}

tuple_event_types!(A);
tuple_event_types!(A, B);
tuple_event_types!(A, B, C);
tuple_event_types!(A, B, C, D);
tuple_event_types!(A, B, C, D, E);
tuple_event_types!(A, B, C, D, E, F);
tuple_event_types!(A, B, C, D, E, F, G);
tuple_event_types!(A, B, C, D, E, F, G, H);

/// Encodes every event of `events`, in order.
///
/// ```ignore
/// store.append(encode_all(&[CourseEvent::Defined { .. }, ...])?).await?;
/// ```
pub fn encode_all<'a, E: DomainEvent>(
    events: impl IntoIterator<Item = &'a E>,
) -> Result<Vec<NewEvent>, Error> {
    events.into_iter().map(DomainEvent::encode).collect()
}
