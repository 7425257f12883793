//! What `#[derive(DomainEvent)]` writes and reads: serde attributes shape the payload as serde
//! would, raw identifiers name tags without `r#`, non-finite floats are refused, unit events
//! have exactly the empty payload, and user names never collide with the generated code.
use crablet::{DecodeErrorKind, DomainEvent, Error, Event, NewEvent, ValidationKind};
use serde_json::{json, Value};
use std::time::SystemTime;

/// The stored event an append of `event` would read back as.
fn stored(event: NewEvent) -> Event {
    Event {
        cursor: crablet::Cursor::new(1, 1),
        event_type: event.event_type,
        tags: event.tags,
        data: event.data,
        metadata: event.metadata,
        occurred_at: SystemTime::now(),
    }
}

fn with_data(event_type: &str, data: Value) -> Event {
    stored(NewEvent::new(event_type, vec![], data))
}

fn decode_kind<E: DomainEvent + std::fmt::Debug>(event: &Event) -> (DecodeErrorKind, String) {
    match E::decode(event) {
        Err(Error::Decode(err)) => {
            let message = err.to_string();
            (err.kind, message)
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PriceChanged {
    #[crablet(tag)]
    product_id: String,
    new_price: u32,
    #[serde(rename = "was")]
    old_price: u32,
}

#[test]
fn container_rename_all_shapes_the_payload_as_serde_does() {
    let event = PriceChanged {
        product_id: "p1".into(),
        new_price: 12,
        old_price: 10,
    };
    let encoded = event.encode().expect("encode");
    // serde's camelCase, with the field's own rename winning.
    assert_eq!(encoded.data, json!({ "newPrice": 12, "was": 10 }));
    assert_eq!(encoded.tags, crablet::tags!["product_id" => "p1"]);
    assert_eq!(
        PriceChanged::decode(&stored(encoded)).expect("decode"),
        event
    );
}

#[test]
fn deny_unknown_fields_reaches_the_decoder() {
    let mut event = stored(
        PriceChanged {
            product_id: "p1".into(),
            new_price: 12,
            old_price: 10,
        }
        .encode()
        .expect("encode"),
    );
    event.data["extra"] = json!(true);
    let (kind, message) = decode_kind::<PriceChanged>(&event);
    assert!(matches!(kind, DecodeErrorKind::Payload { .. }), "{kind:?}");
    assert!(message.contains("unknown field `extra`"), "{message}");
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[serde(rename_all_fields = "camelCase")]
enum AccountEvent {
    Opened {
        #[crablet(tag)]
        account_id: String,
        opening_balance: i64,
    },
    /// The variant's own `rename_all` wins over the enum's, as in serde.
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    Closed {
        #[crablet(tag)]
        account_id: String,
        final_balance: i64,
    },
}

#[test]
fn enum_rename_all_fields_and_variant_rename_all() {
    let opened = AccountEvent::Opened {
        account_id: "a1".into(),
        opening_balance: 5,
    };
    let closed = AccountEvent::Closed {
        account_id: "a1".into(),
        final_balance: 0,
    };
    let (o, c) = (opened.encode().expect("o"), closed.encode().expect("c"));
    assert_eq!(o.data, json!({ "openingBalance": 5 }));
    assert_eq!(c.data, json!({ "FINAL_BALANCE": 0 }));
    assert_eq!(AccountEvent::decode(&stored(o)).expect("o"), opened);
    assert_eq!(AccountEvent::decode(&stored(c)).expect("c"), closed);
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

mod cents {
    pub fn serialize<S: serde::Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{value}c"))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        text.trim_end_matches('c')
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct Deposited {
    #[crablet(tag)]
    account_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    labels: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    fee: u32,
    #[serde(with = "cents")]
    amount: u64,
}

#[test]
fn field_attributes_that_call_functions_round_trip() {
    let bare = Deposited {
        account_id: "a1".into(),
        note: None,
        labels: vec![],
        fee: 0,
        amount: 250,
    };
    let encoded = bare.encode().expect("encode");
    assert_eq!(encoded.data, json!({ "amount": "250c" }));
    assert_eq!(Deposited::decode(&stored(encoded)).expect("decode"), bare);

    let full = Deposited {
        note: Some("rent".into()),
        labels: vec!["home".into()],
        fee: 1,
        ..bare
    };
    let encoded = full.encode().expect("encode");
    assert_eq!(
        encoded.data,
        json!({ "note": "rent", "labels": ["home"], "fee": 1, "amount": "250c" })
    );
    assert_eq!(Deposited::decode(&stored(encoded)).expect("decode"), full);
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct Classified {
    #[crablet(tag)]
    r#type: String,
    r#match: bool,
}

#[test]
fn raw_identifiers_name_tags_and_fields_without_the_prefix() {
    let event = Classified {
        r#type: "gold".into(),
        r#match: true,
    };
    let encoded = event.encode().expect("encode");
    assert_eq!(encoded.tags, crablet::tags!["type" => "gold"]);
    assert_eq!(encoded.data, json!({ "match": true }));
    assert_eq!(Classified::decode(&stored(encoded)).expect("decode"), event);
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum SensorEvent {
    Measured {
        #[crablet(tag)]
        sensor: String,
        value: f64,
        history: Vec<f32>,
    },
}

#[test]
fn non_finite_floats_are_refused_naming_the_event_type() {
    for (value, history) in [
        (f64::NAN, vec![]),
        (f64::INFINITY, vec![]),
        (1.0, vec![2.0, f32::NEG_INFINITY]),
    ] {
        let event = SensorEvent::Measured {
            sensor: "s1".into(),
            value,
            history,
        };
        let err = event.encode().expect_err("JSON has no such number");
        let validation = err.as_validation().expect("a validation error");
        assert_eq!(validation.kind, ValidationKind::NonFiniteFloat);
        assert_eq!(validation.field, "data");
        assert!(validation.message.contains("Measured"), "{err}");
    }
    let finite = SensorEvent::Measured {
        sensor: "s1".into(),
        value: 0.5,
        history: vec![1.5],
    };
    let encoded = finite.encode().expect("finite floats encode");
    assert_eq!(
        SensorEvent::decode(&stored(encoded)).expect("decode"),
        finite
    );
}

#[test]
fn the_dynamic_builder_refuses_non_finite_floats_too() {
    let err = NewEvent::builder("Measured")
        .data(&json!({ "ok": 1 }))
        .data(&[1.0, f64::NAN])
        .build()
        .expect_err("NaN");
    assert_eq!(
        err.as_validation().expect("validation").kind,
        ValidationKind::NonFiniteFloat
    );
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct Heartbeat;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Light {
    SwitchedOff,
    Dimmed {
        #[crablet(tag)]
        room: String,
    },
}

#[test]
fn unit_events_are_the_empty_object_and_nothing_else() {
    let encoded = Heartbeat.encode().expect("encode");
    assert_eq!(encoded.data, json!({}));
    assert_eq!(
        Heartbeat::decode(&stored(encoded)).expect("decode"),
        Heartbeat
    );
    let off = Light::SwitchedOff.encode().expect("encode");
    assert_eq!(off.data, json!({}));
    assert_eq!(
        Light::decode(&stored(off)).expect("decode"),
        Light::SwitchedOff
    );

    for data in [json!(null), json!({ "a": 1 }), json!(5), json!([])] {
        let (kind, message) = decode_kind::<Heartbeat>(&with_data("Heartbeat", data.clone()));
        assert!(matches!(kind, DecodeErrorKind::Payload { .. }), "{kind:?}");
        assert!(
            message.contains("Heartbeat has no payload fields"),
            "{message}"
        );
        let (_, message) = decode_kind::<Light>(&with_data("SwitchedOff", data));
        assert!(message.contains("Light::SwitchedOff"), "{message}");
    }
}

#[test]
fn payload_errors_name_the_users_type_not_a_generated_one() {
    let mut event = with_data("Dimmed", json!(null));
    event.tags = crablet::tags!["room" => "kitchen"];
    let (_, message) = decode_kind::<Light>(&event);
    assert!(message.contains("Light::Dimmed"), "{message}");
    assert!(!message.contains("Crablet"), "{message}");
}

/// Fields named like the generated code's locals.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
struct Shadowing {
    #[crablet(tag)]
    view: String,
    __tags: Vec<String>,
    tags: u8,
    payload: String,
    stored: u32,
}

#[test]
fn field_names_never_collide_with_generated_locals() {
    let event = Shadowing {
        view: "v".into(),
        __tags: vec!["x".into()],
        tags: 2,
        payload: "p".into(),
        stored: 3,
    };
    let encoded = event.encode().expect("encode");
    assert_eq!(encoded.tags, crablet::tags!["view" => "v"]);
    assert_eq!(
        encoded.data,
        json!({ "__tags": ["x"], "tags": 2, "payload": "p", "stored": 3 })
    );
    assert_eq!(Shadowing::decode(&stored(encoded)).expect("decode"), event);
}
