//! # dcb-derive
//!
//! Derive macros of crablet, re-exported by the `crablet` crate:
//!
//! - [`DomainEvent`](derive@DomainEvent): a struct or enum as typed events, encoded to and
//!   decoded from the store's events, with typed queries and schema evolution;
//! - [`DecisionModel`](derive@DecisionModel): a struct of projectors as one named decision
//!   model, folded in one read with one append condition.
//!
//! Generated code refers to `::crablet` (or to `::dcb_core` when the crate depends on that and
//! not on crablet; `#[crablet(crate = path)]` names another path).
#![warn(missing_docs)]

mod attrs;
mod decision_model;
mod domain_event;
mod krate;
mod serde_attrs;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Derives `DomainEvent`: the struct, or each variant of the enum, is one event type.
///
/// - **Event type**: the struct's or variant's name, or `#[crablet(event_type = "...")]`. Two
///   variants with one event type do not compile.
/// - **Tags**: fields marked `#[crablet(tag)]` (key: the field's name without `r#`) or
///   `#[crablet(tag = "key")]`. The field holds a [`TagValue`] (`String`, an integer, `bool`,
///   `char`, or your own type implementing it), a `Vec` of them (several values for one key;
///   distinct and non-empty, or the append fails with a validation error and writes nothing)
///   or an `Option` of one. Any other field type does not compile; nor do serde attributes on
///   a tag field, which is not part of the payload.
/// - **Payload**: every other field, as a JSON object through serde, as serde would write it.
///   Field attributes apply as serde applies them (`skip_serializing_if` and `skip_serializing`
///   only with `default` or on an `Option`, so that what is written decodes); container
///   attributes `rename_all` (on an enum `rename_all_fields`, or per variant `rename_all`),
///   `deny_unknown_fields` and `expecting` are forwarded, and the others that would change the
///   payload do not compile. NaN and infinite floats fail encoding (`NonFiniteFloat`). A unit
///   struct or variant is the payload `{}`, and decodes from nothing else.
/// - **Schema version**: `#[crablet(version = N)]` (default 1) on the struct or variant. Above
///   1 it is written to the event's metadata (`schema_version`); reading an older version needs
///   an upcaster, reading a newer one fails with a clear error.
/// - **Upcasters**: `#[crablet(upcasters = path)]` on the struct or enum names a
///   `fn() -> Upcasters`, called once.
/// - **Wrapping**: an enum variant `Name(Inner)` wraps a struct that derives `DomainEvent`
///   itself, so event structs can be shared by several enums.
///
/// A struct also gets the constant `EVENT_TYPE`. An enum also gets a kind enum
/// (`{Enum}Kind`, or `#[crablet(kind = Name)]`): one unit variant per variant,
/// `{Enum}Kind::from(&event)` and `event.kind()` (`#[crablet(kind_method = name)]` renames the
/// method, `#[crablet(no_kind_method)]` leaves it out, for an enum with a `kind` of its own), so
/// `QueryItem::of_kinds([CourseEventKind::Enrolled])?` selects some variants without spelling
/// their event types.
///
/// ```
/// use crablet::memory::InMemoryEventStore;
/// use crablet::{DomainEvent, EventReaderExt, EventStore, Query, QueryItem, ReadOptions, Upcasters};
///
/// #[derive(Debug, Clone, PartialEq, DomainEvent)]
/// #[crablet(upcasters = course_upcasters)]
/// enum CourseEvent {
///     CourseDefined {
///         #[crablet(tag)]
///         course_id: String,
///         capacity: u32,
///     },
///     /// Version 2 added the enrollment's channel.
///     #[crablet(event_type = "StudentEnrolled", version = 2)]
///     Enrolled {
///         #[crablet(tag)]
///         course_id: String,
///         #[crablet(tag = "student_id")]
///         student: u64,
///         channel: String,
///     },
/// }
///
/// fn course_upcasters() -> Upcasters {
///     Upcasters::new().step("StudentEnrolled", 1, |mut data| {
///         data["channel"] = "unknown".into();
///         Ok(data)
///     })
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> crablet::Result<()> {
/// let store = InMemoryEventStore::new();
/// let defined = CourseEvent::CourseDefined { course_id: "c1".into(), capacity: 30 };
/// let event = defined.encode()?;
/// assert_eq!(event.event_type, "CourseDefined");
/// assert_eq!(event.tags, crablet::tags!["course_id" => "c1"]);
/// assert_eq!(event.data, serde_json::json!({ "capacity": 30 }));
/// store.append(vec![event]).await?;
///
/// // A version-1 enrollment, appended by the dynamic API, is read as version 2.
/// let v1 = crablet::NewEvent::builder("StudentEnrolled").tag("course_id", "c1").tag("student_id", "7").build()?;
/// store.append(vec![v1]).await?;
///
/// let query = Query::from(QueryItem::of::<CourseEvent>().tag("course_id", "c1"));
/// let events = store.query_typed::<CourseEvent>(&query, ReadOptions::default()).await?;
/// assert_eq!(events[0].event, defined);
/// assert_eq!(
///     events[1].event,
///     CourseEvent::Enrolled { course_id: "c1".into(), student: 7, channel: "unknown".into() }
/// );
/// # Ok(()) }
/// ```
///
/// A tag field whose type is no tag value does not compile:
///
/// ```compile_fail
/// #[derive(crablet::DomainEvent)]
/// struct PriceChanged {
///     #[crablet(tag)]
///     price: f64, // error: `f64` cannot be a tag value
/// }
/// ```
///
/// [`TagValue`]: https://docs.rs/dcb-core/latest/dcb_core/trait.TagValue.html
#[proc_macro_derive(DomainEvent, attributes(crablet, serde))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    domain_event::expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Derives `Projectors` for a struct whose fields are projectors (a `StateProjector`, or any
/// other `Projectors`, including another decision model): a named decision model.
///
/// Projecting it folds every field over ONE read of their combined query and returns ONE
/// append condition, like a tuple of projectors, but its states come back as a struct with
/// the same field names (`{Name}State` unless `#[crablet(state = Name)]` says otherwise;
/// it derives `Debug` and `Clone` unless `#[crablet(state_derive(...))]` lists others), so
/// two counters cannot be swapped by accident. The state struct and its fields have the
/// model's visibility, whatever the projector fields' own.
///
/// ```
/// use crablet::memory::InMemoryEventStore;
/// use crablet::{DecisionModel, EventReaderExt, EventStore, NewEvent, Query, QueryItem, StateProjector};
///
/// #[derive(DecisionModel)]
/// struct Enrollment {
///     /// Whether the course exists.
///     course_exists: StateProjector<bool>,
///     /// How many students are enrolled.
///     enrolled: StateProjector<u64>,
/// }
///
/// fn enrollment(course: &str) -> Enrollment {
///     let item = |event_type: &str| Query::from(QueryItem::new().types([event_type]).tag("course_id", course));
///     Enrollment {
///         course_exists: StateProjector::exists(item("CourseDefined")),
///         enrolled: StateProjector::counter(item("StudentEnrolled")),
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> crablet::Result<()> {
/// let store = InMemoryEventStore::new();
/// store.append(vec![NewEvent::builder("CourseDefined").tag("course_id", "c1").build()?]).await?;
/// let model = store.project(enrollment("c1")).await?;
/// let EnrollmentState { course_exists, enrolled } = model.states;
/// assert!(course_exists);
/// assert_eq!(enrolled, 0);
/// // model.condition protects a decision taken on both.
/// # Ok(()) }
/// ```
#[proc_macro_derive(DecisionModel, attributes(crablet))]
pub fn derive_decision_model(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    decision_model::expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
