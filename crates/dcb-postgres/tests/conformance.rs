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

/// Again with REPEATABLE READ appends: conditional appends take session locks in a transaction
/// of their own before the checking transaction takes its snapshot.
mod repeatable_read_appends {
    use super::support;
    use dcb_postgres::{IsolationLevel, StoreConfig};

    dcb_testkit::conformance_tests!(
        support::PgFactory::with_config(
            StoreConfig::default().append_isolation(IsolationLevel::RepeatableRead)
        ),
        disjoint_for = std::time::Duration::from_millis(500),
    );
}

/// Again with SERIALIZABLE appends (and reads): a transaction that fails to serialize is run
/// again, so disjoint boundaries still never conflict.
mod serializable_appends {
    use super::support;
    use dcb_postgres::{IsolationLevel, StoreConfig};

    dcb_testkit::conformance_tests!(
        support::PgFactory::with_config(
            StoreConfig::default()
                .append_isolation(IsolationLevel::Serializable)
                .read_isolation(IsolationLevel::Serializable)
        ),
        disjoint_for = std::time::Duration::from_millis(500),
    );
}
