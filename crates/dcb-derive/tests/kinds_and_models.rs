//! The generated kind method can be renamed or left out, and a decision model's states are as
//! visible as the model.
use crablet::{DomainEvent, EventKind, QueryItem};

/// An enum with a method of its own called `kind`.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(kind_method = event_kind)]
enum Shipment {
    Sent {
        #[crablet(tag)]
        parcel: String,
        kind: String,
    },
    Lost {
        #[crablet(tag)]
        parcel: String,
    },
}

impl Shipment {
    /// The user's own `kind`: what was shipped.
    fn kind(&self) -> &str {
        match self {
            Shipment::Sent { kind, .. } => kind,
            Shipment::Lost { .. } => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[crablet(no_kind_method, kind = AlarmSort)]
enum Alarm {
    Raised {
        #[crablet(tag)]
        zone: u8,
    },
    Cleared {
        #[crablet(tag)]
        zone: u8,
    },
}

impl Alarm {
    #[allow(dead_code)]
    fn kind(&self) -> u8 {
        7
    }
}

#[test]
fn the_kind_method_can_be_renamed() {
    let sent = Shipment::Sent {
        parcel: "p1".into(),
        kind: "books".into(),
    };
    assert_eq!(sent.kind(), "books");
    assert_eq!(sent.event_kind(), ShipmentKind::Sent);
    assert_eq!(ShipmentKind::from(&sent), ShipmentKind::Sent);
}

#[test]
fn the_kind_method_can_be_left_out_and_from_remains() {
    let raised = Alarm::Raised { zone: 3 };
    assert_eq!(raised.kind(), 7);
    assert_eq!(AlarmSort::from(&raised), AlarmSort::Raised);
    assert_eq!(AlarmSort::Cleared.read_types(), ["Cleared"]);
}

#[test]
fn of_kinds_without_kinds_is_refused() {
    let err = QueryItem::of_kinds(Vec::<AlarmSort>::new()).expect_err("no kinds");
    let validation = err.as_validation().expect("a validation error");
    assert_eq!(validation.kind, crablet::ValidationKind::EmptyQuery);
    assert_eq!(validation.field, "kinds");
    let some = QueryItem::of_kinds([AlarmSort::Cleared, AlarmSort::Cleared]).expect("one kind");
    assert_eq!(some.types, ["Cleared"]);
}

mod models {
    use crablet::{DecisionModel, Query, StateProjector};

    /// A public model whose projectors are private: its states are public all the same.
    #[derive(DecisionModel)]
    pub struct Stock {
        on_hand: StateProjector<u64>,
        reserved: StateProjector<u64>,
    }

    pub fn stock() -> Stock {
        let count = |event_type: &str| StateProjector::counter(Query::types([event_type]));
        Stock {
            on_hand: count("Received"),
            reserved: count("Reserved"),
        }
    }

    /// A private model: its state is private to this module, and usable in it.
    #[derive(DecisionModel)]
    struct Audit {
        seen: StateProjector<u64>,
    }

    pub async fn audit_count(store: &crablet::memory::InMemoryEventStore) -> u64 {
        use crablet::EventReaderExt;
        let model = Audit {
            seen: StateProjector::counter(Query::all()),
        };
        let AuditState { seen } = store.project(model).await.expect("project").states;
        seen
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_public_models_states_are_public_and_a_private_one_works() {
    use crablet::{EventReaderExt, EventStore, NewEvent};
    let store = crablet::memory::InMemoryEventStore::new();
    store
        .append(vec![NewEvent::builder("Received").build().expect("event")])
        .await
        .expect("append");
    let models::StockState { on_hand, reserved } = store
        .project(models::stock())
        .await
        .expect("project")
        .states;
    assert_eq!((on_hand, reserved), (1, 0));
    assert_eq!(models::audit_count(&store).await, 1);
}
