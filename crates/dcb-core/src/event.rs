use crate::{error::ValidationKind, Cursor, Error, Tag, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::SystemTime;

/// An event to append: what the application supplies.
///
/// The store assigns the [`Cursor`] and the time it occurred at. Build one with
/// [`NewEvent::builder`] (any `serde::Serialize` payload) or [`NewEvent::new`] (a ready JSON value).
///
/// ```
/// use dcb_core::NewEvent;
/// #[derive(serde::Serialize)]
/// struct CourseDefined { course_id: String, capacity: u32 }
///
/// let event = NewEvent::builder("CourseDefined")
///     .tag("course_id", "c1")
///     .data(&CourseDefined { course_id: "c1".into(), capacity: 30 })
///     .build()?;
/// assert_eq!(event.data["capacity"], 30);
/// # Ok::<(), dcb_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// The event type, such as `CourseDefined`. Non-empty, at most 64 characters.
    pub event_type: String,
    /// The event's tags; keys must be unique within one event.
    pub tags: Vec<Tag>,
    /// The JSON payload.
    pub data: Value,
    /// Optional JSON metadata (correlation id, user, ...).
    pub metadata: Option<Value>,
    /// The time to record as the event's `occurred_at`, for imports that keep the times of
    /// another log (`crablet import --keep-occurred-at`). `None`, the normal case: the store's
    /// clock when the append's transaction started. A kept time is taken as given, so
    /// `occurred_at` then no longer grows with the cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<SystemTime>,
}

impl NewEvent {
    /// Creates an event from its parts without metadata.
    pub fn new(event_type: impl Into<String>, tags: Vec<Tag>, data: Value) -> Self {
        Self {
            event_type: event_type.into(),
            tags,
            data,
            metadata: None,
            occurred_at: None,
        }
    }

    /// Starts a builder for an event of the given type with an empty JSON object as payload.
    pub fn builder(event_type: impl Into<String>) -> NewEventBuilder {
        NewEventBuilder {
            event: NewEvent::new(event_type, Vec::new(), Value::Object(Default::default())),
            error: None,
        }
    }
}

/// Builder for [`NewEvent`]; serialization errors are kept and reported by [`build`](Self::build).
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the event"]
pub struct NewEventBuilder {
    event: NewEvent,
    error: Option<ValidationError>,
}

impl NewEventBuilder {
    /// Adds a tag.
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.event.tags.push(Tag::new(key, value));
        self
    }

    /// Adds several tags.
    pub fn tags(mut self, tags: impl IntoIterator<Item = Tag>) -> Self {
        self.event.tags.extend(tags);
        self
    }

    /// Sets the payload by serializing `data` to JSON. A NaN or infinite float in it fails
    /// [`build`](Self::build) with [`ValidationKind::NonFiniteFloat`] (JSON has no such
    /// numbers).
    pub fn data<T: Serialize + ?Sized>(mut self, data: &T) -> Self {
        match crate::finite::to_finite_json(data) {
            Ok(value) => self.event.data = value,
            Err(err) => self.keep_error("data", err),
        }
        self
    }

    /// Sets the metadata by serializing `metadata` to JSON, refusing non-finite floats as
    /// [`data`](Self::data) does.
    pub fn metadata<T: Serialize + ?Sized>(mut self, metadata: &T) -> Self {
        match crate::finite::to_finite_json(metadata) {
            Ok(value) => self.event.metadata = Some(value),
            Err(err) => self.keep_error("metadata", err),
        }
        self
    }

    /// Records `at` as the event's `occurred_at` instead of the store's clock: for imports
    /// ([`NewEvent::occurred_at`]).
    pub fn occurred_at(mut self, at: SystemTime) -> Self {
        self.event.occurred_at = Some(at);
        self
    }

    fn keep_error(&mut self, field: &str, err: crate::finite::ToJsonError) {
        if self.error.is_none() {
            self.error = Some(match err {
                crate::finite::ToJsonError::NonFinite => ValidationError::new(
                    field,
                    ValidationKind::NonFiniteFloat,
                    "holds a NaN or infinite float, which JSON cannot represent",
                ),
                crate::finite::ToJsonError::Serde(err) => ValidationError::new(
                    field,
                    ValidationKind::NotSerializable,
                    format!("could not serialize to JSON: {err}"),
                ),
            });
        }
    }

    /// Finishes the event, failing if a payload could not be serialized.
    ///
    /// Content rules (type length, tags) are checked by the store at append time.
    pub fn build(self) -> Result<NewEvent, Error> {
        match self.error {
            Some(err) => Err(Error::Validation(err)),
            None => Ok(self.event),
        }
    }
}

/// A stored event, as returned by reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Where the event stands in the log.
    pub cursor: Cursor,
    /// The event type.
    pub event_type: String,
    /// The event's tags, in the order they were appended.
    pub tags: Vec<Tag>,
    /// The JSON payload.
    pub data: Value,
    /// The JSON metadata, if any was appended.
    pub metadata: Option<Value>,
    /// When the appending transaction started (PostgreSQL) or the append ran (in memory).
    pub occurred_at: SystemTime,
}

impl Event {
    /// Deserializes the payload into `T`.
    ///
    /// ```
    /// # use dcb_core::{Cursor, Event};
    /// # let event = Event { cursor: Cursor::new(1, 1), event_type: "Deposited".into(), tags: vec![],
    /// #     data: serde_json::json!({"amount": 5}), metadata: None, occurred_at: std::time::SystemTime::now() };
    /// #[derive(serde::Deserialize)]
    /// struct Deposited { amount: u64 }
    /// let deposited: Deposited = event.data_as()?;
    /// assert_eq!(deposited.amount, 5);
    /// # Ok::<(), dcb_core::Error>(())
    /// ```
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.data).map_err(|err| {
            Error::Validation(ValidationError::new(
                "data",
                ValidationKind::NotSerializable,
                format!(
                    "event {} of type {} does not deserialize: {err}",
                    self.cursor, self.event_type
                ),
            ))
        })
    }

    /// The first value of the tag `key`, if the event carries one (see
    /// [`tag_values`](Self::tag_values) for keys with several values).
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }

    /// Every value of the tag `key`, in the order the event was appended with. A key may carry
    /// several values: `ProductsOrdered` tagged `product:p1` and `product:p2`.
    ///
    /// ```
    /// use dcb_core::{Cursor, Event, Tag};
    /// let event = Event {
    ///     cursor: Cursor::new(1, 1),
    ///     event_type: "ProductsOrdered".into(),
    ///     tags: vec![Tag::new("product", "p1"), Tag::new("cart", "c1"), Tag::new("product", "p2")],
    ///     data: serde_json::json!({}),
    ///     metadata: None,
    ///     occurred_at: std::time::SystemTime::UNIX_EPOCH,
    /// };
    /// assert_eq!(event.tag_values("product").collect::<Vec<_>>(), ["p1", "p2"]);
    /// assert_eq!(event.tag("product"), Some("p1"));
    /// ```
    pub fn tag_values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tags
            .iter()
            .filter(move |t| t.key == key)
            .map(|t| t.value.as_str())
    }
}
