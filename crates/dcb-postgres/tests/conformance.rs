//! The backend-agnostic conformance suite, on PostgreSQL.
mod support;

dcb_testkit::conformance_tests!(support::PgFactory::default());
