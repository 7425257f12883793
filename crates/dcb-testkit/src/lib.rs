//! # dcb-testkit
//!
//! The backend-agnostic conformance suite of crablet: every [`EventStore`](dcb_core::EventStore)
//! backend must pass the same cases, so the in-memory store and the PostgreSQL store provably
//! share one semantics (matching, cursors, append conditions, validation, projections, commands,
//! and conditional appends under barrier-synchronized concurrency).
//!
//! A backend implements [`StoreFactory`] (a fresh, empty store per call) and expands
//! [`conformance_tests!`] in an integration test file:
//!
//! ```ignore
//! struct MemoryFactory;
//!
//! #[async_trait::async_trait]
//! impl dcb_testkit::StoreFactory for MemoryFactory {
//!     async fn new_store(&self) -> std::sync::Arc<dyn dcb_core::EventStore> {
//!         std::sync::Arc::new(dcb_memory::InMemoryEventStore::new())
//!     }
//! }
//!
//! dcb_testkit::conformance_tests!(MemoryFactory);
//! ```
//!
//! Every case is also a plain `pub async fn` in [`conformance`], taking `&dyn StoreFactory`, so a
//! backend can run single cases with its own parameters.
#![warn(missing_docs)]

use async_trait::async_trait;
use std::sync::Arc;

pub mod conformance;
pub mod pg;
pub mod prometheus;
pub mod scenario;

/// Creates stores for the conformance suite.
///
/// Every call must return a FRESH, EMPTY store that no other test uses: cases count events and
/// compare whole logs, and the cases of one backend run in parallel (one test per case).
#[async_trait]
pub trait StoreFactory: Send + Sync + 'static {
    /// A new, empty store, not shared with any other call.
    async fn new_store(&self) -> Arc<dyn dcb_core::EventStore>;
}

#[async_trait]
impl<F: StoreFactory + ?Sized> StoreFactory for Arc<F> {
    async fn new_store(&self) -> Arc<dyn dcb_core::EventStore> {
        (**self).new_store().await
    }
}

#[async_trait]
impl<F: StoreFactory + ?Sized> StoreFactory for Box<F> {
    async fn new_store(&self) -> Arc<dyn dcb_core::EventStore> {
        (**self).new_store().await
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each calling the case of the same
/// name in [`conformance`] with the factory `$factory` (evaluated once per test).
///
/// ```ignore
/// dcb_testkit::conformance_tests!(MyFactory);
/// // or, with a longer run of the disjoint-boundaries load test:
/// dcb_testkit::conformance_tests!(MyFactory, disjoint_for = std::time::Duration::from_secs(10));
/// ```
///
/// The calling crate needs `tokio` (with the `macros` and `rt-multi-thread` features) as a
/// dev-dependency. Tests run on a multi-threaded runtime with 4 workers.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr $(,)?) => {
        $crate::conformance_tests!($factory, disjoint_for = ::std::time::Duration::from_secs(2));
    };
    ($factory:expr, disjoint_for = $duration:expr $(,)?) => {
        $crate::__conformance_cases! { $factory;
            // query semantics
            query_or_of_items,
            query_or_of_types_within_item,
            query_and_of_tags,
            query_extra_event_tags_still_match,
            query_all_matches_everything_once,
            query_item_with_only_types,
            query_item_with_only_tags,
            query_without_match_is_empty,
            query_empty_is_rejected,
            query_after_is_exclusive,
            query_before_is_exclusive,
            query_after_and_before_together,
            query_limit,
            query_limit_zero_is_rejected,
            query_backwards,
            query_stream_equals_query,
            query_multi_valued_tag_keys,
            // appends
            append_returns_cursor_of_last_event,
            append_cursors_strictly_increase,
            append_batch_shares_transaction_id,
            append_batch_with_invalid_event_writes_nothing,
            append_accepts_batch_at_max_size,
            // multi-command appends
            batch_commits_every_command_in_one_transaction,
            batch_with_a_stale_command_writes_nothing_and_names_it,
            batch_command_depending_on_an_earlier_one_conflicts,
            batch_with_invalid_input_writes_nothing,
            batch_racers_on_a_shared_boundary_one_winner,
            // append conditions
            condition_on_empty_store_succeeds,
            condition_without_after_conflicts_with_any_match,
            condition_after_last_match_succeeds,
            condition_after_below_last_match_conflicts,
            condition_after_above_last_match_succeeds,
            condition_ignores_non_matching_events_after_cursor,
            condition_multi_item_second_item_matches_conflicts,
            condition_items_sharing_tags_each_conflict,
            condition_tags_superset_of_event_tags_does_not_conflict,
            condition_tags_subset_of_event_tags_conflicts,
            condition_type_only,
            condition_query_all,
            condition_conflict_reports_info,
            condition_finds_matches_beyond_many_events_after_cursor,
            condition_cursors_of_one_batch_stay_their_own,
            condition_multi_valued_tag_keys,
            // validation
            validation_event_type,
            validation_tags,
            validation_nul_characters,
            validation_batch_size_and_empty_append,
            validation_condition,
            validation_query,
            validation_before_condition_check,
            validation_json_depth,
            // round trips
            roundtrip_tags_byte_exact,
            roundtrip_tag_encoding_is_unambiguous,
            roundtrip_data_json,
            roundtrip_metadata,
            roundtrip_kept_occurred_at,
            roundtrip_numbers,
            roundtrip_large_payloads,
            // projections
            projection_routes_events_by_query,
            projection_tuple_of_three_typed_projectors,
            projection_vec_and_btreemap,
            projection_builtin_projectors,
            projection_condition_is_union_after_last_read_event,
            projection_condition_protects_decision,
            project_stream_progress_then_done,
            // commands
            command_commit_records_command,
            command_without_events,
            command_duplicate_id,
            command_condition_conflict_writes_nothing,
            command_invalid_input_writes_nothing,
            command_list_filters,
            // concurrency
            concurrent_single_boundary_one_winner_per_round,
            concurrent_capacity_never_overbooked,
            concurrent_unconditional_writer_beats_stale_decision,
            concurrent_post_hoc_validator,
            concurrent_cancelled_appends_tell_the_truth,
            concurrent_multi_valued_carts_never_oversell,
        }

        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_disjoint_boundaries_never_conflict() {
            let factory = $factory;
            $crate::conformance::concurrent_disjoint_boundaries_never_conflict(&factory, $duration)
                .await;
        }
    };
}

/// Implementation detail of [`conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let factory = $factory;
                $crate::conformance::$case(&factory).await;
            }
        )*
    };
}
