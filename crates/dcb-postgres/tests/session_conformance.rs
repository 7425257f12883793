//! The backend-agnostic conformance suite (its barrier-synchronized races included) with every
//! append, conditional append and read running in a store session of its own.
mod support;

dcb_testkit::conformance_tests!(
    support::SessionFactory::default(),
    disjoint_for = std::time::Duration::from_millis(500),
);
