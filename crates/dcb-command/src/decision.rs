use dcb_core::{AppendCondition, DomainEvent, NewEvent, TransactionWork};

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
///
/// On PostgreSQL a decision can also carry the application's own statements, committed in the
/// same transaction as its events: see [`in_transaction`](Self::in_transaction).
#[derive(Debug, Default)]
#[must_use = "a handler must return its decision"]
pub struct Decision {
    events: Vec<NewEvent>,
    condition: Option<AppendCondition>,
    work: Option<TransactionWork>,
}

impl Decision {
    /// Appends `events`, unconditionally until [`guarded_by`](Self::guarded_by) adds a
    /// condition.
    pub fn append(events: impl IntoIterator<Item = NewEvent>) -> Self {
        Self {
            events: events.into_iter().collect(),
            condition: None,
            work: None,
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

    /// Runs `work`, the application's own statements (an outbox row, a read model, a
    /// uniqueness table), in the transaction that commits the decision: after the events are
    /// inserted and the condition has held, before the commit, so that the events, the command
    /// record and the work's writes commit together or not at all. A failing work rolls all of
    /// it back and the executor returns
    /// [`CommandError::TransactionWork`](crate::CommandError::TransactionWork); a conflict or a
    /// replay does not run it.
    ///
    /// The work is written for a backend's connection: on PostgreSQL build it with
    /// `dcb_postgres::transaction_work`. A store that cannot run it (the in-memory store)
    /// refuses the commit with [`dcb_core::Error::Session`] and writes nothing. The command's
    /// lock keys are held while the work runs, so keep it short.
    pub fn in_transaction(mut self, work: TransactionWork) -> Self {
        self.work = Some(work);
        self
    }

    /// The application's work to run in the commit's transaction, if any.
    pub fn work(&self) -> Option<&TransactionWork> {
        self.work.as_ref()
    }

    /// The events to append.
    pub fn events(&self) -> &[NewEvent] {
        &self.events
    }

    /// The condition that protects the decision, if any.
    pub fn condition(&self) -> Option<&AppendCondition> {
        self.condition.as_ref()
    }

    /// The events, the condition and the transaction work.
    pub fn into_parts(
        self,
    ) -> (
        Vec<NewEvent>,
        Option<AppendCondition>,
        Option<TransactionWork>,
    ) {
        (self.events, self.condition, self.work)
    }
}
