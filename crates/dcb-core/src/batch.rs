//! Multi-command appends: several commands, each with its own events and condition, appended
//! in one transaction, all or nothing ([`EventStore::append_batch`](crate::EventStore::append_batch)).
use crate::{matches, validate_condition, validate_events, AppendCondition, Error, NewEvent};
use crate::{ConflictInfo, Limits, ValidationError, ValidationKind};

/// One command of a multi-command append: the events it appends and, optionally, the condition
/// that must hold for it.
///
/// ```
/// use dcb_core::{AppendCommand, AppendCondition, NewEvent, Query, QueryItem};
///
/// let user = Query::from(QueryItem::new().types(["UserCreated"]).tag("user_id", "u1"));
/// let event = NewEvent::builder("UserCreated").tag("user_id", "u1").build()?;
/// let command = AppendCommand::new(vec![event]).only_if(AppendCondition::new(user));
/// assert!(command.condition.is_some());
/// # Ok::<(), dcb_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AppendCommand {
    /// The command's events (at least one).
    pub events: Vec<NewEvent>,
    /// Fails the whole batch when an event matching it exists after its cursor, or when an
    /// earlier command of the same batch appends one.
    pub condition: Option<AppendCondition>,
}

impl AppendCommand {
    /// An unconditional command.
    pub fn new(events: Vec<NewEvent>) -> Self {
        Self {
            events,
            condition: None,
        }
    }

    /// The command with `condition`.
    pub fn only_if(mut self, condition: AppendCondition) -> Self {
        self.condition = Some(condition);
        self
    }
}

/// Checks a multi-command append before anything is sent: at least one command, every
/// command's events and condition valid (the error's field names the command, such as
/// `commands[3].events[0].tags[1]`), and at most `limits.max_batch_size` events in all (one
/// transaction).
pub fn validate_batch(commands: &[AppendCommand], limits: &Limits) -> Result<(), Error> {
    if commands.is_empty() {
        return Err(Error::Validation(ValidationError::new(
            "commands",
            ValidationKind::EmptyAppend,
            "a multi-command append needs at least one command",
        )));
    }
    let total: usize = commands.iter().map(|c| c.events.len()).sum();
    if total > limits.max_batch_size {
        return Err(Error::Validation(ValidationError::new(
            "commands",
            ValidationKind::BatchTooLarge,
            format!(
                "the commands carry {total} events; one append takes at most {} \
                 (max_batch_size)",
                limits.max_batch_size
            ),
        )));
    }
    for (index, command) in commands.iter().enumerate() {
        let checked = validate_events(&command.events, limits).and_then(|()| {
            command
                .condition
                .as_ref()
                .map_or(Ok(()), validate_condition)
        });
        if let Err(err) = checked {
            return Err(match err {
                Error::Validation(mut v) => {
                    v.field = format!("commands[{index}].{}", v.field);
                    Error::Validation(v)
                }
                other => other,
            });
        }
    }
    Ok(())
}

/// The first command whose condition matches an event of an earlier command of the same batch:
/// the commands take effect in order, so it conflicts as if they had been appended one after
/// the other. Returns the conflict, naming both commands.
pub fn conflict_within_batch(commands: &[AppendCommand]) -> Option<ConflictInfo> {
    commands.iter().enumerate().find_map(|(index, command)| {
        let condition = command.condition.as_ref()?;
        let earlier = commands[..index].iter().position(|c| {
            c.events
                .iter()
                .any(|e| matches(&condition.fail_if_events_match, &e.event_type, &e.tags))
        })?;
        Some(ConflictInfo {
            conflicting: None,
            after: condition.after,
            command: Some(index),
            earlier_command: Some(earlier),
        })
    })
}

/// Drops the events of rejected commands the way rejected payloads must be dropped.
pub fn discard_commands(commands: Vec<AppendCommand>) {
    for command in commands {
        crate::discard_events(command.events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Query, QueryItem};

    fn booked(slot: &str) -> NewEvent {
        NewEvent::builder("Booked")
            .tag("slot", slot)
            .build()
            .expect("event")
    }

    fn slot(s: &str) -> AppendCondition {
        AppendCondition::new(Query::from(
            QueryItem::new().types(["Booked"]).tag("slot", s),
        ))
    }

    #[test]
    fn a_command_matching_an_earlier_one_conflicts_and_names_both() {
        let commands = vec![
            AppendCommand::new(vec![booked("a")]).only_if(slot("a")),
            AppendCommand::new(vec![booked("b")]).only_if(slot("b")),
            AppendCommand::new(vec![booked("c")]).only_if(slot("b")),
        ];
        let info = conflict_within_batch(&commands).expect("conflict");
        assert_eq!((info.command, info.earlier_command), (Some(2), Some(1)));
        assert!(conflict_within_batch(&commands[..2]).is_none());
    }

    #[test]
    fn invalid_commands_are_named_by_index() {
        let limits = Limits::default();
        let err = validate_batch(&[], &limits).unwrap_err();
        assert!(err.is_validation());
        let commands = vec![
            AppendCommand::new(vec![booked("a")]),
            AppendCommand::new(Vec::new()),
        ];
        match validate_batch(&commands, &limits) {
            Err(Error::Validation(v)) => assert_eq!(v.field, "commands[1].events"),
            other => panic!("{other:?}"),
        }
        let many = vec![AppendCommand::new(vec![booked("a"); 600]); 2];
        match validate_batch(&many, &limits) {
            Err(Error::Validation(v)) => assert_eq!(v.kind, ValidationKind::BatchTooLarge),
            other => panic!("{other:?}"),
        }
    }
}
