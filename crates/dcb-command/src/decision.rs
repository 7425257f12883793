use dcb_core::{AppendCondition, DomainEvent, NewEvent};

/// What a handler decided: the events to append and the [`AppendCondition`] that protects the
/// decision, if any.
///
/// The executor commits the events together with the command's audit record; with a condition,
/// the commit fails (and nothing is written) if an event matching it was appended since the
/// handler's read.
///
/// ```
/// use dcb_command::Decision;
/// use dcb_core::{AppendCondition, NewEvent, Query};
///
/// let event = NewEvent::builder("CourseDefined").tag("course_id", "c1").build()?;
/// let condition = AppendCondition::new(Query::types(["CourseDefined"]));
/// let decision = Decision::append([event]).guarded_by(condition);
/// assert_eq!(decision.events().len(), 1);
/// assert!(decision.condition().is_some());
///
/// // A command that only needs its audit record:
/// assert!(Decision::nothing().events().is_empty());
/// # Ok::<(), dcb_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[must_use = "a handler must return its decision"]
pub struct Decision {
    events: Vec<NewEvent>,
    condition: Option<AppendCondition>,
}

impl Decision {
    /// Appends `events`, unconditionally until [`guarded_by`](Self::guarded_by) adds a
    /// condition.
    pub fn append(events: impl IntoIterator<Item = NewEvent>) -> Self {
        Self {
            events: events.into_iter().collect(),
            condition: None,
        }
    }

    /// Appends typed events ([`DomainEvent`]), encoded in order; fails if one does not encode.
    pub fn append_typed<'a, E: DomainEvent>(
        events: impl IntoIterator<Item = &'a E>,
    ) -> Result<Self, dcb_core::Error> {
        Ok(Self::append(dcb_core::encode_all(events)?))
    }

    /// Appends no event; the command is still recorded in the audit trail (and, with an id,
    /// is idempotent).
    pub fn nothing() -> Self {
        Self::default()
    }

    /// Commits only if `condition` still holds: nothing matching it was appended after its
    /// cursor. Accepts an [`AppendCondition`] or an `Option` of one (`None` removes the guard).
    pub fn guarded_by(mut self, condition: impl Into<Option<AppendCondition>>) -> Self {
        self.condition = condition.into();
        self
    }

    /// The events to append.
    pub fn events(&self) -> &[NewEvent] {
        &self.events
    }

    /// The condition that protects the decision, if any.
    pub fn condition(&self) -> Option<&AppendCondition> {
        self.condition.as_ref()
    }

    /// The events and the condition.
    pub fn into_parts(self) -> (Vec<NewEvent>, Option<AppendCondition>) {
        (self.events, self.condition)
    }
}
