//! The store contract as tests, role by role: a store written outside this crate runs them
//! (feature `test-util`), as this crate's own stores do.
//!
//! Each role has a module of async test functions, generic over the store under test: a store
//! of one role runs that role's module ([`directory`] for a directory of the team's own
//! database), a whole store runs them all. [`store_conformance!`](crate::store_conformance)
//! writes one `#[tokio::test]` per function:
//!
//! ```no_run
//! use std::sync::Arc;
//! use tollgate::store::{conformance::StoreUnderTest, MemoryStore, StoreInspect};
//!
//! /// A fresh store for each test (`None` skips the test, loudly, when its server is absent).
//! async fn make() -> Option<StoreUnderTest<dyn StoreInspect>> {
//!     let store: Arc<dyn StoreInspect> = Arc::new(MemoryStore::new());
//!     // Opened again at each restart point; a store living in memory stays the same.
//!     Some(StoreUnderTest::new(store, |same| async move { same }))
//! }
//!
//! tollgate::store_conformance!(memory, make());
//! # fn main() {}
//! ```
//!
//! Each test calls [`StoreUnderTest::restart`] where a store that outlives the process must
//! still hold what it was told (counters, answers to tokens, flush and event ids, claims, dead
//! letters, the directory): `reopen` closes the store and opens it again from where it keeps
//! its data. Tests use fixed times (a day in 2026) and their own tenants, so a store shared by
//! several tests at once (one table) still passes, as long as each test gets a fresh one.
//!
//! Modelled on object_store's `integration` module and tower-test.

/// Writes one `#[tokio::test]` (multi-threaded) per function of the store conformance suite
/// ([`store::conformance`](crate::store::conformance)), in a module `$name` with a module per
/// role. `$make` is an expression giving a fresh `Option<StoreUnderTest<_>>` for each test
/// (`None` skips it). The roles default to all ten; name some to test a store of those roles
/// only: `store_conformance!(my_directory, make(), directory)`.
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! store_conformance {
    ($name:ident, $make:expr) => {
        $crate::store_conformance!($name, $make, quota, usage, export, ledger, directory, idempotency, rate, place, outbox, audit);
    };
    ($name:ident, $make:expr, $($role:ident),+ $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $( $crate::store_conformance!(@role $role, $make); )+
        }
    };
    (@role quota, $make:expr) => {
        $crate::store_conformance!(@tests quota, $make;
            reserve_never_exceeds_a_limit,
            owed_units_pass_the_limit,
            without_a_limit_everything_is_granted,
            a_reserve_token_is_applied_once,
            release_gives_units_back,
            a_period_two_periods_old_is_dropped_and_stays_dropped,
            minutes_are_kept_ten_minutes_past_their_end,
            quota_keys_of_different_periods_are_separate_counters,
            near_the_limit_a_shrinking_reserve_gets_an_eighth_of_what_is_left,
            credit_grants_apply_once_and_bound_a_prepaid_balance,
            an_expired_grant_closes_once_losing_what_it_still_holds,
            grants_are_spent_soonest_to_expire_first,
            concurrent_reserves_never_pass_a_prepaid_balance,
            a_prepaid_balance_leaves_the_calendar_periods_beside_it,
            racing_grants_and_closes_apply_once,
            a_refund_takes_back_what_the_refunded_money_bought_once,
            a_refund_or_revoke_takes_what_the_balance_still_holds_first,
            refunds_are_attributed_to_the_credit_lines,
            a_refund_before_its_grant_is_applied_when_the_grant_lands,
            a_take_apart_is_applied_once_and_given_back_once,
            used_up_grants_close_to_make_room_losing_nothing,
            one_payment_grants_once_on_any_meter,
            a_closed_grants_leased_units_do_not_come_back_through_a_release,
            only_a_closed_grants_own_lease_is_drawn_on_what_it_forgave,
            a_grant_after_an_empty_balance_is_spendable_at_once,
            a_resent_call_is_applied_once_among_many_senders,
            a_retry_after_its_sender_was_forgotten_is_not_applied_again,
            a_tenants_own_cap_holds_every_reserve_that_reads_it,
            concurrent_reserves_never_pass_a_tenants_own_cap,
            what_senders_keep_is_reserved_not_used,
            an_expired_reservation_gives_back_its_lease_and_holds_once,
            a_batch_of_releases_applies_each_once,
            an_expired_sender_is_told_by_its_next_answered_call,
            a_forgotten_sender_keeps_nothing,
            an_expired_lease_of_a_closed_grant_is_not_given_back_twice,
            reservations_expire_one_after_another,
            a_sender_keeping_jobs_is_remembered_for_its_late_releases,
            a_recharge_is_claimed_once_per_crossing_beside_the_balance,
            callers_crossing_together_claim_one_recharge,
            a_values_claim_is_idempotent_and_answers_the_row,
            concurrent_claims_never_pass_the_values_cap,
            values_rows_are_apart_outlive_a_restart_and_free_a_place_when_forgotten,
            payments_count_once_net_of_refunds_and_disputes,
            concurrent_payments_each_count_once,
        );
    };
    (@role usage, $make:expr) => {
        $crate::store_conformance!(@tests usage, $make;
            usage_commits_once_per_flush_id,
            a_flush_larger_than_a_batch_commits_once_per_chunk,
            usage_events_apply_once_per_id,
            tallies_add_once_per_batch_and_read_by_scope,
            tallies_past_their_time_are_not_read,
        );
    };
    (@role export, $make:expr) => {
        $crate::store_conformance!(@tests export, $make;
            pending_exports_page_in_key_order_before_a_window,
            an_export_claim_fixes_what_a_revision_exports,
            dead_letters_park_an_aggregate_until_requeued,
            the_identifier_namespace_is_kept_and_changed_only_over_what_was_read,
            a_deferral_never_sent_clears_the_first_attempt,
            an_aggregate_is_listed_once_billable_usage_is_added,
            dead_letters_outlive_the_retention,
            an_export_never_sent_is_fixed_anew_at_its_next_begin,
            a_stale_read_never_re_fixes_an_export,
        );
    };
    (@role ledger, $make:expr) => {
        $crate::store_conformance!(@tests ledger, $make;
            the_ledger_keeps_each_exported_revision_and_reexports_a_lost_one_once,
        );
    };
    (@role directory, $make:expr) => {
        $crate::store_conformance!(@tests directory, $make;
            the_directory_finds_tenants_by_key_id_and_customer,
            a_billing_customer_belongs_to_one_tenant,
            a_metronome_customer_is_kept_beside_the_stripe_one,
            plan_changes_apply_once_and_in_order,
            a_plan_is_set_only_over_what_was_read,
            a_customer_is_set_only_over_what_was_read,
            a_subscription_change_applies_over_the_subscriptions_read,
            tenant_overrides_are_kept_and_set_alone,
            a_tenant_update_writes_one_setting_always_or_over_what_was_read,
            api_keys_carry_an_id_a_prefix_and_an_expiry,
            api_keys_carry_their_scopes,
            the_feed_keeps_each_tenants_last_change_within_its_bound,
            concurrent_tells_each_keep_their_tenant_and_a_stamp_of_their_own,
        );
    };
    (@role idempotency, $make:expr) => {
        $crate::store_conformance!(@tests idempotency, $make;
            idempotency_keys_are_claimed_once_and_settled_by_their_owner,
            stored_responses_are_bounded_in_bytes,
            a_claim_renewed_by_its_owner_holds_while_the_request_runs,
            a_live_binding_is_never_forgotten_to_make_room,
        );
    };
    (@role rate, $make:expr) => {
        $crate::store_conformance!(@tests rate, $make;
            cells_are_never_granted_twice,
            a_return_never_gives_back_cells_whose_time_has_passed,
            a_resent_rate_call_is_applied_once,
        );
    };
    (@role place, $make:expr) => {
        $crate::store_conformance!(@tests place, $make;
            places_are_never_held_past_the_limit,
            places_expire_unless_renewed,
            a_resent_places_call_is_applied_once,
            a_spare_is_taken_before_an_acquire_is_refused,
        );
    };
    (@role outbox, $make:expr) => {
        $crate::store_conformance!(@tests outbox, $make;
            alerts_are_written_once_per_key,
            a_row_is_claimed_by_one_node_at_a_time,
            retries_dead_letters_and_prunes_apply_once,
        );
    };
    (@role audit, $make:expr) => {
        $crate::store_conformance!(@tests audit, $make;
            records_are_numbered_per_tenant_and_listed_newest_first,
            a_tenant_keeps_its_newest_records_within_the_bound,
            concurrent_appends_get_numbers_of_their_own,
            a_prune_removes_what_is_older_than_its_cutoff,
        );
    };
    (@tests $role:ident, $make:expr; $($test:ident),+ $(,)?) => {
        mod $role {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(mut made) = $make.await else { return };
                    $crate::store::conformance::$role::$test(&mut made).await;
                }
            )+
        }
    };
}

pub mod audit;
pub mod directory;
pub mod export;
pub mod idempotency;
pub mod ledger;
pub mod outbox;
pub mod place;
pub mod quota;
pub mod rate;
pub mod usage;

use std::{future::Future, pin::Pin, sync::Arc};

use crate::{
    base::Period,
    store::{
        ExportKey, ExportSend, FlushId, QuotaKey, Reservation, ReserveToken, UsageAggregate, UsageBatch, UsageRecord,
    },
};

/// Opens the store again, given the one in use.
type Reopen<S> = Box<dyn FnMut(Arc<S>) -> Pin<Box<dyn Future<Output = Arc<S>> + Send>> + Send>;

/// A store under test, and how to open it again at a restart point.
pub struct StoreUnderTest<S: ?Sized> {
    store: Option<Arc<S>>,
    reopen: Reopen<S>,
    /// What the store needs to live (a durable store's directory of files), dropped last.
    _keep: Option<Box<dyn std::any::Any + Send>>,
}

impl<S: ?Sized> std::fmt::Debug for StoreUnderTest<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreUnderTest").finish_non_exhaustive()
    }
}

impl<S: ?Sized + Send + Sync + 'static> StoreUnderTest<S> {
    /// A store, opened again at each restart point by `reopen`, which is given the store in use
    /// (drop it first when the store outlives the process, so that what it holds is read back
    /// from where it keeps it; return it when it lives in memory).
    pub fn new<F, Fut>(store: Arc<S>, mut reopen: F) -> Self
    where
        F: FnMut(Arc<S>) -> Fut + Send + 'static,
        Fut: Future<Output = Arc<S>> + Send + 'static,
    {
        Self { store: Some(store), reopen: Box::new(move |old| Box::pin(reopen(old))), _keep: None }
    }

    /// Keeps `value` alive as long as the store under test (a temporary directory).
    #[must_use]
    pub fn keeping(mut self, value: impl std::any::Any + Send) -> Self {
        self._keep = Some(Box::new(value));
        self
    }

    /// The store.
    ///
    /// # Panics
    /// Never outside a restart.
    #[must_use]
    pub fn s(&self) -> &S {
        self.store.as_deref().expect("a store outside a restart")
    }

    /// The store, shared (for tasks that call it at once).
    ///
    /// # Panics
    /// Never outside a restart.
    #[must_use]
    pub fn shared(&self) -> Arc<S> {
        self.store.clone().expect("a store outside a restart")
    }

    /// The restart point: the store is closed and opened again (the same store, for a store
    /// living in this process's memory).
    ///
    /// # Panics
    /// When a task still holds the store: nothing may hold it across a restart.
    pub async fn restart(&mut self) {
        let old = self.store.take().expect("a store outside a restart");
        assert_eq!(Arc::strong_count(&old), 1, "no task holds the store across a restart");
        self.store = Some((self.reopen)(old).await);
    }
}

pub(super) const DAY0: i64 = 1_773_446_400;
pub(super) const HOUR: i64 = 3600;
pub(super) const DAY: i64 = 86_400;

pub(super) fn day_key(tenant: &str, meter: &str) -> QuotaKey {
    QuotaKey::new(tenant.into(), meter.into(), Period::Day, DAY0, DAY0 + DAY)
}

pub(super) fn ask(key: &QuotaKey, units: u64, limit: Option<u64>, node: u64, seq: u64) -> Reservation {
    Reservation::new(key.clone(), units, 0, limit, ReserveToken::new(node, seq))
}

pub(super) fn rec(tenant: &str, meter: &str, window_start: i64, quantity: u64) -> UsageRecord {
    UsageRecord::new(tenant.into(), meter.into(), window_start, quantity)
}

pub(super) fn ek(tenant: &str, meter: &str, window_start: i64) -> ExportKey {
    ExportKey::new(tenant.into(), meter.into(), window_start)
}

pub(super) fn batch(id: &str, records: Vec<UsageRecord>) -> UsageBatch {
    UsageBatch::new(FlushId::new(id), records)
}

/// An aggregate as a store should list it when nothing of it was exported or begun.
pub(super) fn fresh(key: ExportKey, quantity: u64) -> UsageAggregate {
    UsageAggregate::new(key, quantity)
}

/// What an export of `value` units for `cus_a` sends.
pub(super) fn sent(value: u64) -> ExportSend {
    ExportSend::new(value, DAY0 + 11 * HOUR - 1, Some("cus_a".into()), "api_requests")
}

/// Small deterministic pseudo-random numbers (SplitMix64).
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(super) async fn quantity<S: ?Sized + crate::store::UsageInspect>(s: &S, key: &ExportKey) -> Option<u64> {
    s.usage(key).await.unwrap().map(|a| a.quantity)
}
