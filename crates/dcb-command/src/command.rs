use dcb_core::{Error, NewCommand, ValidationError, ValidationKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A command to execute: a type name, a typed payload, optional JSON metadata and an optional
/// idempotency id.
///
/// The payload is serialized to JSON with serde when the command is recorded; the handler sees
/// the typed value.
///
/// ```
/// use dcb_command::Command;
/// use serde_json::json;
///
/// #[derive(serde::Serialize)]
/// struct DefineCourse { course_id: String, capacity: u32 }
///
/// let command = Command::new("DefineCourse", DefineCourse { course_id: "c1".into(), capacity: 30 })
///     .with_id("request-7f3a")
///     .with_metadata(json!({ "user": "alice" }));
/// let recorded = command.to_new_command()?;
/// assert_eq!(recorded.data, json!({ "course_id": "c1", "capacity": 30 }));
/// assert_eq!(recorded.id.as_deref(), Some("request-7f3a"));
/// # Ok::<(), dcb_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command<T> {
    /// The command type, such as `DefineCourse`; recorded in the audit trail. Non-empty, at most
    /// 64 characters.
    pub command_type: String,
    /// The typed payload.
    pub payload: T,
    /// JSON metadata recorded with the command: request id, user, ...
    pub metadata: Option<Value>,
    /// The idempotency id: executing a command whose id was recorded before writes nothing and
    /// returns the original outcome.
    pub id: Option<String>,
}

impl<T> Command<T> {
    /// A command without metadata and without idempotency id.
    pub fn new(command_type: impl Into<String>, payload: T) -> Self {
        Self {
            command_type: command_type.into(),
            payload,
            metadata: None,
            id: None,
        }
    }

    /// Sets the idempotency id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the JSON metadata.
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

impl<T: Serialize> Command<T> {
    /// The command as the store records it, with the payload serialized to JSON.
    ///
    /// Fails with a [`ValidationKind::NotSerializable`] validation error if the payload does not
    /// serialize. Content rules (type length, NUL characters) are checked by
    /// [`dcb_core::validate_command`].
    pub fn to_new_command(&self) -> Result<NewCommand, Error> {
        let data = dcb_core::to_finite_json(&self.payload).map_err(|err| {
            let (kind, why) = match err {
                dcb_core::ToJsonError::NonFinite => (
                    ValidationKind::NonFiniteFloat,
                    "holds a NaN or infinite float, which JSON cannot represent".to_string(),
                ),
                other => (
                    ValidationKind::NotSerializable,
                    format!("could not be serialized to JSON: {other}"),
                ),
            };
            Error::Validation(ValidationError::new(
                "command.data",
                kind,
                format!("the payload of command {:?} {why}", self.command_type),
            ))
        })?;
        Ok(NewCommand {
            command_type: self.command_type.clone(),
            data,
            metadata: self.metadata.clone(),
            id: self.id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_payload_is_refused_not_written_as_null() {
        let err = Command::new("Measure", vec![1.0, f64::NAN])
            .to_new_command()
            .expect_err("NaN has no JSON");
        match err {
            Error::Validation(v) => {
                assert_eq!(v.kind, ValidationKind::NonFiniteFloat);
                assert!(v.to_string().contains("Measure"), "{v}");
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
        let ok = Command::new("Measure", vec![1.5])
            .to_new_command()
            .expect("finite");
        assert_eq!(ok.data, serde_json::json!([1.5]));
    }
}
