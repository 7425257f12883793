//! The backend-agnostic conformance suite, on PostgreSQL.
mod support;

dcb_testkit::conformance_tests!(support::PgFactory::default());

/// Again with REPEATABLE READ reads: their fence runs in a transaction of its own, before the
/// read's transaction takes its snapshot.
mod repeatable_read_reads {
    use super::support;
    use dcb_postgres::{IsolationLevel, StoreConfig};

    dcb_testkit::conformance_tests!(
        support::PgFactory::with_config(
            StoreConfig::default().read_isolation(IsolationLevel::RepeatableRead)
        ),
        disjoint_for = std::time::Duration::from_millis(500),
    );
}

/// Again on pools the store did not build: their sessions keep the server's settings, so
/// unconditional appends run in explicit transactions.
mod from_pool {
    use super::support;

    dcb_testkit::conformance_tests!(
        support::PgFactory::from_pool(),
        disjoint_for = std::time::Duration::from_millis(500),
    );
}
