use crate::domain_event::EventView;
use crate::DecodeErrorKind;
use serde_json::Value;
use std::fmt;
use std::sync::{Arc, OnceLock};

type Step = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// Schema evolution for typed events: turns payloads stored at older versions, and events
/// stored under old type names, into the current shape when they are read.
///
/// A typed event type declares its current version (`#[crablet(version = 2)]`) and its
/// upcasters (`#[crablet(upcasters = path::to::fn)]`, a `fn() -> Upcasters`). Every typed read
/// path (typed queries and streams, typed projectors, [`DomainEvent::decode`] in subscriptions
/// and handlers) decodes through them; the stored events are never changed, and the dynamic
/// API keeps returning them as they were appended.
///
/// A stored event's version is the `schema_version` of its metadata, 1 when it has none (so
/// events appended by the dynamic API are version 1). Reading applies, until none applies:
/// the step registered for the event's type and version (which yields the next version), else
/// the rename registered for its type (which keeps the version, and with
/// [`rename_with`](Self::rename_with) also reshapes the payload). Tags are never upcast:
/// queries select on them.
///
/// A step always yields the next version, so an old name whose payload must change shape
/// without a new version (a rename that also moves fields, say) is a
/// [`rename_with`](Self::rename_with), not a step on the old name:
///
/// ```
/// use dcb_core::Upcasters;
/// use serde_json::json;
///
/// let upcasters = Upcasters::new()
///     // v1 had one `name`; v2 splits it.
///     .step("StudentRegistered", 1, |mut data| {
///         let name = data["name"].take();
///         let name = name.as_str().ok_or("name is not a string")?;
///         let (first, last) = name.split_once(' ').unwrap_or((name, ""));
///         Ok(json!({ "first_name": first, "last_name": last }))
///     })
///     // Events were called StudentSignedUp before.
///     .rename("StudentSignedUp", "StudentRegistered");
/// assert_eq!(upcasters.old_names("StudentRegistered"), ["StudentSignedUp"]);
///
/// // CourseOpened events are now CourseDefined, still at version 1, with `seats` called
/// // `capacity`.
/// let renamed = Upcasters::new().rename_with("CourseOpened", "CourseDefined", |mut data| {
///     data["capacity"] = data["seats"].take();
///     data.as_object_mut().ok_or("not an object")?.remove("seats");
///     Ok(data)
/// });
/// assert_eq!(renamed.old_names("CourseDefined"), ["CourseOpened"]);
/// ```
///
/// [`DomainEvent::decode`]: crate::DomainEvent::decode
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: Vec<(String, u32, Step)>,
    /// `(old, current, reshape)`.
    renames: Vec<(String, String, Option<Step>)>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcasters")
            .field(
                "steps",
                &self
                    .steps
                    .iter()
                    .map(|(t, v, _)| format!("{t} v{v}->v{}", v + 1))
                    .collect::<Vec<_>>(),
            )
            .field(
                "renames",
                &self
                    .renames
                    .iter()
                    .map(|(old, new, reshape)| {
                        let with = if reshape.is_some() { " (reshaped)" } else { "" };
                        format!("{old}->{new}{with}")
                    })
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared empty set, for types without upcasters.
    pub fn none() -> &'static Upcasters {
        static NONE: OnceLock<Upcasters> = OnceLock::new();
        NONE.get_or_init(Upcasters::new)
    }

    /// Payloads of `event_type` stored at version `from` are turned into version `from + 1` by
    /// `step`. Its error aborts the read with [`DecodeErrorKind::Upcast`].
    pub fn step(
        mut self,
        event_type: impl Into<String>,
        from: u32,
        step: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.steps.push((event_type.into(), from, Arc::new(step)));
        self
    }

    /// Events stored as `old` are read as `current`, at the version they were stored with
    /// (register steps on `old` to reshape them first). Typed queries also select `old`.
    pub fn rename(mut self, old: impl Into<String>, current: impl Into<String>) -> Self {
        self.renames.push((old.into(), current.into(), None));
        self
    }

    /// Events stored as `old` are read as `current` at the version they were stored with (or
    /// that the steps on `old` brought them to), their payload reshaped by `reshape` on the
    /// way: a rename and a change of shape that is not a new version. Its error aborts the
    /// read with [`DecodeErrorKind::Reshape`]. Typed queries also select `old`.
    pub fn rename_with(
        mut self,
        old: impl Into<String>,
        current: impl Into<String>,
        reshape: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.renames
            .push((old.into(), current.into(), Some(Arc::new(reshape))));
        self
    }

    /// Every old name that is read as `current`, directly or through other renames.
    pub fn old_names(&self, current: &str) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        let mut frontier = vec![current];
        while let Some(name) = frontier.pop() {
            for (old, new, _) in &self.renames {
                if new == name && old != current && !names.contains(&old.as_str()) {
                    names.push(old);
                    frontier.push(old);
                }
            }
        }
        names
    }

    /// Brings `view` to its current type name and the newest version the steps reach.
    pub fn apply<'a>(&self, mut view: EventView<'a>) -> Result<EventView<'a>, DecodeErrorKind> {
        if self.steps.is_empty() && self.renames.is_empty() {
            return Ok(view);
        }
        for _ in 0..=(self.steps.len() + self.renames.len()) {
            let step = self
                .steps
                .iter()
                .find(|(t, v, _)| *t == view.event_type && *v == view.version);
            if let Some((_, from, step)) = step {
                let data = view.data.into_owned();
                view.data = std::borrow::Cow::Owned(step(data).map_err(|reason| {
                    DecodeErrorKind::Upcast {
                        from: *from,
                        reason,
                    }
                })?);
                view.version += 1;
                continue;
            }
            match self
                .renames
                .iter()
                .find(|(old, _, _)| *old == view.event_type)
            {
                Some((old, current, reshape)) => {
                    if let Some(reshape) = reshape {
                        let data = view.data.into_owned();
                        view.data = std::borrow::Cow::Owned(reshape(data).map_err(|reason| {
                            DecodeErrorKind::Reshape {
                                old: old.clone(),
                                current: current.clone(),
                                reason,
                            }
                        })?);
                    }
                    view.event_type = std::borrow::Cow::Owned(current.clone());
                }
                None => return Ok(view),
            }
        }
        Err(DecodeErrorKind::UpcastCycle)
    }
}
