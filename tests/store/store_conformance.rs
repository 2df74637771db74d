//! One set of behaviour tests over the store contract, role by role (the doc comments of
//! the role traits in `src/store/`), written once and run against every store by `conformance!`: adding a
//! store is one maker and one line below `conformance!(memory, ...)`.
//!
//! Each test takes a `Made` store and calls `Made::restart` at the points where a store that
//! outlives the process must still hold what it was told (counters, answers to tokens, flush and
//! event ids, claims, dead letters, the directory). The memory store lives as long as the process,
//! so its restart keeps the same store.

#[cfg(feature = "dynamodb")]
use crate::common;

use std::{future::Future, pin::Pin, sync::Arc};

use tollgate::store::KeyHash;
use tollgate::{
    config::Period,
    store::{
        ApiKeyRecord, CommitOutcome, DeadLetter, EventOutcome, ExportClaim, ExportKey, ExportSend, FlushId, Grant,
        IdempotencyClaim, IdempotencySettle, IdempotencyState, MemoryStore, PlanChange, PlanChangeOutcome, QuotaKey,
        Reservation, ReserveToken, StoreInspect, TenantRecord, UsageAggregate, UsageBatch, UsageEvent, UsageRecord,
    },
};

/// Opens the store again, given the one in use (dropped first by a store that outlives the
/// process, so that what it holds is read back from where it keeps it).
type Reopen =
    Box<dyn FnMut(Arc<dyn StoreInspect>) -> Pin<Box<dyn Future<Output = Arc<dyn StoreInspect>> + Send>> + Send>;

/// A store under test, with what it needs to live (a durable store keeps its file in `_dir`).
pub(crate) struct Made {
    pub(crate) store: Arc<dyn StoreInspect>,
    pub(crate) _dir: Option<tempfile::TempDir>,
    reopen: Reopen,
}

impl Made {
    /// A store reopened at each restart point by `reopen`.
    fn new<F, Fut>(store: Arc<dyn StoreInspect>, dir: Option<tempfile::TempDir>, mut reopen: F) -> Self
    where
        F: FnMut(Arc<dyn StoreInspect>) -> Fut + Send + 'static,
        Fut: Future<Output = Arc<dyn StoreInspect>> + Send + 'static,
    {
        Self { store, _dir: dir, reopen: Box::new(move |old| Box::pin(reopen(old))) }
    }

    fn s(&self) -> &dyn StoreInspect {
        &*self.store
    }

    /// The restart point: the store is closed and opened again (a no-op for a store living in
    /// this process's memory). Nothing else may hold the store across it.
    async fn restart(&mut self) {
        assert_eq!(Arc::strong_count(&self.store), 1, "no task holds the store across a restart");
        let placeholder: Arc<dyn StoreInspect> = Arc::new(MemoryStore::new());
        let old = std::mem::replace(&mut self.store, placeholder);
        self.store = (self.reopen)(old).await;
    }
}

async fn memory_store() -> Option<Made> {
    // A memory store does not outlive the process: its restart keeps the same store.
    Some(Made::new(Arc::new(MemoryStore::new()), None, |same| async move { same }))
}

macro_rules! conformance {
    ($modname:ident, $make:expr) => {
        mod $modname {
            use super::*;
            conformance!(@tests $make;
                reserve_never_exceeds_a_limit,
                owed_units_pass_the_limit,
                without_a_limit_everything_is_granted,
                a_reserve_token_is_applied_once,
                release_gives_units_back,
                a_period_two_periods_old_is_dropped_and_stays_dropped,
                usage_commits_once_per_flush_id,
                a_flush_larger_than_a_batch_commits_once_per_chunk,
                pending_exports_page_in_key_order_before_a_window,
                an_export_claim_fixes_what_a_revision_exports,
                dead_letters_park_an_aggregate_until_requeued,
                the_directory_finds_tenants_by_key_id_and_customer,
                a_billing_customer_belongs_to_one_tenant,
                plan_changes_apply_once_and_in_order,
                tenant_overrides_are_kept_and_set_alone,
                usage_events_apply_once_per_id,
                quota_keys_of_different_periods_are_separate_counters,
                idempotency_keys_are_claimed_once_and_settled_by_their_owner,
                near_the_limit_a_shrinking_reserve_gets_an_eighth_of_what_is_left,
                api_keys_carry_an_id_a_prefix_and_an_expiry,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let Some(mut made) = $make.await else { return };
                suite::$test(&mut made).await;
            }
        )*
    };
}

conformance!(memory, memory_store());

/// SQLite on a real file; every restart point closes the store and opens the file again.
#[cfg(feature = "sqlite")]
async fn sqlite_store() -> Option<Made> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.db");
    let open = move || {
        let path = path.clone();
        async move { Arc::new(tollgate::store::SqliteStore::open(&path).await.unwrap()) as Arc<dyn StoreInspect> }
    };
    let store = open().await;
    Some(Made::new(store, Some(dir), move |old| {
        drop(old);
        open()
    }))
}
#[cfg(feature = "sqlite")]
conformance!(sqlite, sqlite_store());

/// DynamoDB: a table of its own per test on the local DynamoDB-compatible server that
/// `scripts/test.sh` starts (`TOLLGATE_DYNAMODB_ENDPOINT`); every restart point makes a new
/// client. Without a server the tests skip loudly, and fail under CI.
#[cfg(feature = "dynamodb")]
async fn dynamo_store() -> Option<Made> {
    let store = common::dynamo::table().await?;
    let (client, table) = (store.client().clone(), store.table().to_owned());
    Some(Made::new(Arc::new(store), None, move |old| {
        drop(old);
        let store = tollgate::store::DynamoStore::new(common::dynamo::client_like(&client), table.clone());
        async move { Arc::new(store) as Arc<dyn StoreInspect> }
    }))
}
#[cfg(feature = "dynamodb")]
conformance!(dynamodb, dynamo_store());

/// 2026-03-14T00:00:00Z.
const DAY0: i64 = 1_773_446_400;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn day_key(tenant: &str, meter: &str) -> QuotaKey {
    QuotaKey::new(tenant.into(), meter.into(), Period::Day, DAY0, DAY0 + DAY)
}

fn ask(key: &QuotaKey, units: u64, limit: Option<u64>, node: u64, seq: u64) -> Reservation {
    Reservation::new(key.clone(), units, 0, limit, ReserveToken::new(node, seq))
}

fn rec(tenant: &str, meter: &str, window_start: i64, quantity: u64) -> UsageRecord {
    UsageRecord::new(tenant.into(), meter.into(), window_start, quantity)
}

fn ek(tenant: &str, meter: &str, window_start: i64) -> ExportKey {
    ExportKey::new(tenant.into(), meter.into(), window_start)
}

fn batch(id: &str, records: Vec<UsageRecord>) -> UsageBatch {
    UsageBatch::new(FlushId::new(id), records)
}

/// An aggregate as a store should list it when nothing of it was exported or begun.
fn fresh(key: ExportKey, quantity: u64) -> UsageAggregate {
    UsageAggregate::new(key, quantity)
}

/// What an export of `value` units for `cus_a` sends.
fn sent(value: u64) -> ExportSend {
    ExportSend::new(value, DAY0 + 11 * HOUR - 1, Some("cus_a".into()), "api_requests")
}

/// Small deterministic pseudo-random numbers (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

mod suite {
    use std::collections::BTreeMap;

    use super::*;

    async fn reserved(s: &dyn StoreInspect, key: &QuotaKey) -> u64 {
        s.reserved(key).await.unwrap()
    }

    async fn quantity(s: &dyn StoreInspect, key: &ExportKey) -> Option<u64> {
        s.usage(key).await.unwrap().map(|a| a.quantity)
    }

    /// (key, quantity) of `tenant`'s aggregates in the windows starting in `[from, to)`.
    async fn range(s: &dyn StoreInspect, tenant: &str, from: i64, to: i64) -> Vec<(ExportKey, u64)> {
        s.usage_range(&tenant.into(), from, to).await.unwrap().into_iter().map(|a| (a.key, a.quantity)).collect()
    }

    async fn pending_keys(s: &dyn StoreInspect, before: i64) -> Vec<ExportKey> {
        s.pending_exports(before, None, 1000).await.unwrap().into_iter().map(|a| a.key).collect()
    }

    /// Checks that the grants (all with units granted) tile `[0, total)` when ordered by the
    /// count they left: each call's units sit right after the previous call's, so no two calls
    /// were granted the same units and none was lost.
    fn assert_tiles(grants: &mut [Grant], total: u64, what: &str) {
        grants.sort_by_key(|g| g.reserved);
        let mut end = 0;
        for g in grants.iter() {
            assert_eq!(g.reserved - g.granted, end, "{what}: grants overlap or leave a gap at {g:?}");
            end = g.reserved;
        }
        assert_eq!(end, total, "{what}: the grants end at the total");
    }

    /// Many concurrent callers on one hard-limited key (and on an unlimited one beside it):
    /// the limit is reached exactly and never passed, and every grant is consistent.
    pub(crate) async fn reserve_never_exceeds_a_limit(h: &mut Made) {
        const TASKS: u64 = 32;
        const CALLS: u64 = 80;
        const LIMIT: u64 = 1000;
        let hard = day_key("crowd", "requests");
        let open = day_key("crowd", "tokens");
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let store = h.store.clone();
            let (hard, open) = (hard.clone(), open.clone());
            tasks.push(tokio::spawn(async move {
                let node = 1000 + task;
                let mut rng = Rng(task + 1);
                let mut out = Vec::new();
                for seq in 1..=CALLS {
                    let units = 1 + rng.below(8);
                    // One sequence per node across both keys, as an engine sends them.
                    let on_hard = seq % 2 == 0;
                    let r = if on_hard {
                        ask(&hard, units, Some(LIMIT), node, seq)
                    } else {
                        ask(&open, units, None, node, seq)
                    };
                    let g = store.reserve(&r).await.unwrap();
                    out.push((on_hard, units, g));
                    if seq % 5 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                out
            }));
        }
        let (mut hard_asked, mut open_asked) = (0, 0);
        let (mut hard_grants, mut open_grants) = (Vec::new(), Vec::new());
        for t in tasks {
            for (on_hard, units, g) in t.await.unwrap() {
                assert!(g.granted <= units, "granted more than asked: {g:?} for {units}");
                assert!(g.reserved >= g.granted, "{g:?}");
                if on_hard {
                    hard_asked += units;
                    assert!(g.reserved <= LIMIT, "past the limit: {g:?}");
                    if g.granted < units {
                        assert_eq!(g.reserved, LIMIT, "a call short of what it asked leaves the limit reached");
                    }
                    if g.granted > 0 {
                        hard_grants.push(g);
                    }
                } else {
                    open_asked += units;
                    assert_eq!(g.granted, units, "no limit: everything asked is granted");
                    open_grants.push(g);
                }
            }
        }
        assert!(hard_asked > LIMIT, "the callers ask for more than the limit ({hard_asked})");
        let hard_granted: u64 = hard_grants.iter().map(|g| g.granted).sum();
        assert_eq!(hard_granted, LIMIT.min(hard_asked));
        assert_eq!(reserved(h.s(), &hard).await, hard_granted);
        assert_eq!(reserved(h.s(), &open).await, open_asked);
        assert_tiles(&mut hard_grants, LIMIT, "hard");
        assert_tiles(&mut open_grants, open_asked, "unlimited");

        // Spent: a new caller gets nothing, and sees the limit reached.
        assert_eq!(h.s().reserve(&ask(&hard, 1, Some(LIMIT), 7, 1)).await.unwrap(), Grant::new(0, LIMIT));
        h.restart().await;
        assert_eq!(reserved(h.s(), &hard).await, LIMIT);
        assert_eq!(reserved(h.s(), &open).await, open_asked);
        assert_eq!(h.s().reserve(&ask(&hard, 1, Some(LIMIT), 7, 2)).await.unwrap(), Grant::new(0, LIMIT));
    }

    /// Owed units are added first and unconditionally, past the limit if need be; only
    /// `units` is held to it.
    pub(crate) async fn owed_units_pass_the_limit(h: &mut Made) {
        let k = day_key("owing", "requests");
        let owe = |units, owed, seq| Reservation::new(k.clone(), units, owed, Some(10), ReserveToken::new(1, seq));
        // Owed first, then what is left under the limit.
        assert_eq!(h.s().reserve(&owe(10, 4, 1)).await.unwrap(), Grant::new(6, 10));
        // At the limit: owed units still count, nothing more is granted.
        assert_eq!(h.s().reserve(&owe(3, 5, 2)).await.unwrap(), Grant::new(0, 15));
        assert_eq!(reserved(h.s(), &k).await, 15);
        assert_eq!(h.s().reserve(&owe(1, 0, 3)).await.unwrap(), Grant::new(0, 15));
        h.restart().await;
        assert_eq!(reserved(h.s(), &k).await, 15);
        // Back under the limit: units are granted up to it again.
        h.s().release(&k, 7, ReserveToken::new(1, 4)).await.unwrap();
        assert_eq!(reserved(h.s(), &k).await, 8);
        assert_eq!(h.s().reserve(&owe(5, 0, 5)).await.unwrap(), Grant::new(2, 10));
        // Owed units of a retried call are added once too.
        assert_eq!(h.s().reserve(&owe(0, 6, 6)).await.unwrap(), Grant::new(0, 16));
        assert_eq!(h.s().reserve(&owe(0, 6, 6)).await.unwrap(), Grant::new(0, 16));
        assert_eq!(reserved(h.s(), &k).await, 16);
    }

    /// Without a limit, everything asked is granted.
    pub(crate) async fn without_a_limit_everything_is_granted(h: &mut Made) {
        let k = day_key("unbounded", "requests");
        assert_eq!(h.s().reserve(&ask(&k, 1_000_000, None, 1, 1)).await.unwrap(), Grant::new(1_000_000, 1_000_000));
        let owing = Reservation::new(k.clone(), 5, 3, None, ReserveToken::new(1, 2));
        assert_eq!(h.s().reserve(&owing).await.unwrap(), Grant::new(5, 1_000_008));
        h.restart().await;
        // The same counter under a limit (a plan change): already past it, nothing granted.
        assert_eq!(h.s().reserve(&ask(&k, 1, Some(10), 1, 3)).await.unwrap(), Grant::new(0, 1_000_008));
        assert_eq!(reserved(h.s(), &k).await, 1_000_008);
    }

    /// A call is applied at most once per (node, key) token; its retry answers the same.
    pub(crate) async fn a_reserve_token_is_applied_once(h: &mut Made) {
        let k = day_key("retry", "requests");
        let first = ask(&k, 6, Some(10), 1, 1);
        assert_eq!(h.s().reserve(&first).await.unwrap(), Grant::new(6, 6));
        assert_eq!(h.s().reserve(&first).await.unwrap(), Grant::new(6, 6), "the same answer, applied once");
        assert_eq!(reserved(h.s(), &k).await, 6);
        h.restart().await;
        assert_eq!(h.s().reserve(&first).await.unwrap(), Grant::new(6, 6), "remembered across a restart");
        assert_eq!(reserved(h.s(), &k).await, 6);

        // Another node's tokens are its own: its seq 1 is new.
        let other = ask(&k, 2, Some(10), 2, 1);
        assert_eq!(h.s().reserve(&other).await.unwrap(), Grant::new(2, 8));
        // The retry answers what the call got, not the count now.
        assert_eq!(h.s().reserve(&first).await.unwrap(), Grant::new(6, 6));
        assert_eq!(reserved(h.s(), &k).await, 8);

        // A higher seq applies; a lower one after it changes nothing.
        assert_eq!(h.s().reserve(&ask(&k, 1, Some(10), 1, 3)).await.unwrap(), Grant::new(1, 9));
        assert_eq!(h.s().reserve(&ask(&k, 1, Some(10), 1, 2)).await.unwrap(), Grant::new(0, 9), "lower seq");
        assert_eq!(reserved(h.s(), &k).await, 9);
        // An older call of that node, already applied, is not applied again.
        let again = h.s().reserve(&first).await.unwrap();
        assert_eq!(again.reserved, 9, "{again:?}");
        assert_eq!(reserved(h.s(), &k).await, 9);
        // Node 2's last call is still answered as it was.
        assert_eq!(h.s().reserve(&other).await.unwrap(), Grant::new(2, 8));
        assert_eq!(reserved(h.s(), &k).await, 9);

        // Release is applied once per token too.
        h.s().release(&k, 4, ReserveToken::new(1, 4)).await.unwrap();
        h.s().release(&k, 4, ReserveToken::new(1, 4)).await.unwrap();
        assert_eq!(reserved(h.s(), &k).await, 5);
        h.restart().await;
        h.s().release(&k, 4, ReserveToken::new(1, 4)).await.unwrap();
        assert_eq!(reserved(h.s(), &k).await, 5);
        // A reserve with the release's token, or a release with an older one, changes nothing.
        assert_eq!(h.s().reserve(&ask(&k, 3, Some(10), 1, 4)).await.unwrap().granted, 0);
        h.s().release(&k, 2, ReserveToken::new(1, 2)).await.unwrap();
        assert_eq!(reserved(h.s(), &k).await, 5);

        // Tokens are per key: node 1's seq 1 on another key is new there.
        let k2 = day_key("retry", "tokens");
        assert_eq!(h.s().reserve(&ask(&k2, 3, Some(10), 1, 1)).await.unwrap(), Grant::new(3, 3));
        // And the sequence goes on on the first key.
        assert_eq!(h.s().reserve(&ask(&k, 3, Some(10), 1, 5)).await.unwrap(), Grant::new(3, 8));
        assert_eq!(reserved(h.s(), &k).await, 8);
        assert_eq!(reserved(h.s(), &k2).await, 3);
    }

    /// Released units can be reserved again.
    pub(crate) async fn release_gives_units_back(h: &mut Made) {
        let k = day_key("giver", "requests");
        assert_eq!(h.s().reserve(&ask(&k, 10, Some(10), 1, 1)).await.unwrap(), Grant::new(10, 10));
        assert_eq!(h.s().reserve(&ask(&k, 1, Some(10), 1, 2)).await.unwrap(), Grant::new(0, 10));
        h.s().release(&k, 4, ReserveToken::new(1, 3)).await.unwrap();
        assert_eq!(reserved(h.s(), &k).await, 6);
        h.restart().await;
        assert_eq!(reserved(h.s(), &k).await, 6);
        assert_eq!(h.s().reserve(&ask(&k, 9, Some(10), 2, 1)).await.unwrap(), Grant::new(4, 10));
        // Another node gives back everything.
        h.s().release(&k, 10, ReserveToken::new(2, 2)).await.unwrap();
        assert_eq!(reserved(h.s(), &k).await, 0);
        assert_eq!(h.s().reserve(&ask(&k, 3, Some(10), 1, 4)).await.unwrap(), Grant::new(3, 3));
    }

    /// Counters of a (tenant, meter) are kept for the current period and the one before (late
    /// releases and owed units of the period that just ended still land); once a period starts
    /// after the one before ended, the older ones are dropped, and late calls for them change
    /// nothing and create nothing.
    pub(crate) async fn a_period_two_periods_old_is_dropped_and_stays_dropped(h: &mut Made) {
        let day =
            |n: i64| QuotaKey::new("late".into(), "requests".into(), Period::Day, DAY0 + n * DAY, DAY0 + (n + 1) * DAY);
        assert_eq!(h.s().reserve(&ask(&day(0), 5, Some(10), 1, 1)).await.unwrap(), Grant::new(5, 5));
        assert_eq!(h.s().reserve(&ask(&day(1), 4, Some(10), 1, 2)).await.unwrap(), Grant::new(4, 4));
        // The day before is still there: a late release and owed units land in it.
        h.s().release(&day(0), 2, ReserveToken::new(1, 3)).await.unwrap();
        let owed = Reservation::new(day(0), 0, 1, Some(10), ReserveToken::new(1, 4));
        assert_eq!(h.s().reserve(&owed).await.unwrap(), Grant::new(0, 4));
        h.restart().await;
        // Day 2 starts: day 0 ended before it, and is dropped; day 1 stays.
        assert_eq!(h.s().reserve(&ask(&day(2), 1, Some(10), 1, 5)).await.unwrap(), Grant::new(1, 1));
        assert_eq!(reserved(h.s(), &day(0)).await, 0);
        assert_eq!(reserved(h.s(), &day(1)).await, 4);
        h.restart().await;
        // Late calls for day 0 change nothing and do not bring it back.
        assert_eq!(h.s().reserve(&ask(&day(0), 3, Some(10), 2, 1)).await.unwrap(), Grant::new(0, 0));
        h.s().release(&day(0), 3, ReserveToken::new(2, 2)).await.unwrap();
        assert_eq!(reserved(h.s(), &day(0)).await, 0);
        // Another meter of the same tenant is another counter, untouched.
        let other = day_key("late", "tokens");
        assert_eq!(h.s().reserve(&ask(&other, 2, None, 1, 6)).await.unwrap(), Grant::new(2, 2));
    }

    /// A batch is applied once per flush id, whatever is retried under that id, and later
    /// batches add to the same aggregates.
    pub(crate) async fn usage_commits_once_per_flush_id(h: &mut Made) {
        let w = DAY0 + 10 * HOUR;
        let f1 = batch(
            "f1",
            vec![
                rec("a", "requests", w, 5),
                rec("a", "tokens", w, 300),
                rec("a", "requests", w + HOUR, 2),
                rec("b", "requests", w, 7),
            ],
        );
        assert_eq!(h.s().commit_usage(&f1).await.unwrap(), CommitOutcome::Applied);
        assert_eq!(h.s().commit_usage(&f1).await.unwrap(), CommitOutcome::AlreadyApplied);
        // The same id with other records: already applied, nothing changes.
        let forged = batch("f1", vec![rec("a", "requests", w, 1000), rec("z", "requests", w, 1)]);
        assert_eq!(h.s().commit_usage(&forged).await.unwrap(), CommitOutcome::AlreadyApplied);

        assert_eq!(h.s().usage(&ek("a", "requests", w)).await.unwrap(), Some(fresh(ek("a", "requests", w), 5)));
        assert_eq!(quantity(h.s(), &ek("a", "tokens", w)).await, Some(300));
        assert_eq!(quantity(h.s(), &ek("a", "requests", w + HOUR)).await, Some(2));
        assert_eq!(quantity(h.s(), &ek("b", "requests", w)).await, Some(7));
        assert_eq!(quantity(h.s(), &ek("z", "requests", w)).await, None);
        assert_eq!(quantity(h.s(), &ek("a", "requests", w + 2 * HOUR)).await, None);

        let all_of_a =
            vec![(ek("a", "requests", w), 5), (ek("a", "requests", w + HOUR), 2), (ek("a", "tokens", w), 300)];
        assert_eq!(range(h.s(), "a", w, w + 2 * HOUR).await, all_of_a, "in key order");
        assert_eq!(range(h.s(), "a", w, w + HOUR).await, [(ek("a", "requests", w), 5), (ek("a", "tokens", w), 300)]);
        assert_eq!(range(h.s(), "a", w + HOUR, w + 2 * HOUR).await, [(ek("a", "requests", w + HOUR), 2)]);
        assert_eq!(range(h.s(), "a", w - HOUR, w).await, [], "`to` is excluded");

        h.restart().await;
        assert_eq!(h.s().commit_usage(&f1).await.unwrap(), CommitOutcome::AlreadyApplied, "after a restart");
        assert_eq!(range(h.s(), "a", w, w + 2 * HOUR).await, all_of_a);

        // A later batch adds to the aggregates it shares with earlier ones.
        let f2 = batch("f2", vec![rec("a", "requests", w, 4), rec("c", "requests", w, 1)]);
        assert_eq!(h.s().commit_usage(&f2).await.unwrap(), CommitOutcome::Applied);
        assert_eq!(h.s().commit_usage(&f2).await.unwrap(), CommitOutcome::AlreadyApplied);
        assert_eq!(quantity(h.s(), &ek("a", "requests", w)).await, Some(9));
        assert_eq!(quantity(h.s(), &ek("c", "requests", w)).await, Some(1));
        assert_eq!(quantity(h.s(), &ek("b", "requests", w)).await, Some(7));
        let b_range = h.s().usage_range(&"b".into(), w, w + DAY).await.unwrap();
        assert_eq!(b_range, [fresh(ek("b", "requests", w), 7)]);

        // An empty batch is applied once as well.
        assert_eq!(h.s().commit_usage(&batch("f3", vec![])).await.unwrap(), CommitOutcome::Applied);
        assert_eq!(h.s().commit_usage(&batch("f3", vec![])).await.unwrap(), CommitOutcome::AlreadyApplied);
    }

    /// A flush of more records than one batch takes, split into batches of at most
    /// `max_batch_records()`, each with its own id and each committed twice, counts every
    /// aggregate once.
    pub(crate) async fn a_flush_larger_than_a_batch_commits_once_per_chunk(h: &mut Made) {
        const TENANTS: usize = 40;
        let max = h.s().max_batch_records();
        assert!(max >= 1);
        let chunk = max.min(5000);
        let n = 3 * chunk;
        let w0 = DAY0 - 5 * DAY;
        let records: Vec<UsageRecord> = (0..n)
            .map(|i| {
                let tenant = format!("bulk-{:02}", i % TENANTS);
                let window = w0 + (i / TENANTS) as i64 * HOUR;
                rec(&tenant, "requests", window, (i % 97) as u64 + 1)
            })
            .collect();
        let batches: Vec<UsageBatch> =
            records.chunks(chunk).enumerate().map(|(i, c)| batch(&format!("bulk-flush-{i}"), c.to_vec())).collect();
        assert_eq!(batches.len(), 3);
        for b in &batches {
            assert!(b.records.len() <= max);
            assert_eq!(h.s().commit_usage(b).await.unwrap(), CommitOutcome::Applied, "{}", b.id);
            assert_eq!(h.s().commit_usage(&batches[0]).await.unwrap(), CommitOutcome::AlreadyApplied);
        }
        h.restart().await;
        for b in batches.iter().rev() {
            assert_eq!(h.s().commit_usage(b).await.unwrap(), CommitOutcome::AlreadyApplied, "{}", b.id);
        }

        for r in &records {
            let key = ExportKey::new(r.tenant.clone(), r.meter.clone(), r.window_start);
            assert_eq!(quantity(h.s(), &key).await, Some(r.quantity), "{key:?}");
        }
        let mut by_tenant: BTreeMap<String, Vec<(i64, u64)>> = BTreeMap::new();
        for r in &records {
            by_tenant.entry(r.tenant.to_string()).or_default().push((r.window_start, r.quantity));
        }
        for (tenant, expected) in &by_tenant {
            let got: Vec<(i64, u64)> = h
                .s()
                .usage_range(&tenant.as_str().into(), w0, w0 + 30 * DAY)
                .await
                .unwrap()
                .into_iter()
                .map(|a| (a.key.window_start, a.quantity))
                .collect();
            assert_eq!(&got, expected, "{tenant}");
        }
        // Every aggregate is pending once, in key order, page after page.
        let mut expected: Vec<ExportKey> =
            records.iter().map(|r| ExportKey::new(r.tenant.clone(), r.meter.clone(), r.window_start)).collect();
        expected.sort();
        let mut listed = Vec::new();
        loop {
            let page = h.s().pending_exports(w0 + 30 * DAY, listed.last(), 500).await.unwrap();
            assert!(page.len() <= 500);
            if page.is_empty() {
                break;
            }
            listed.extend(page.into_iter().map(|a| a.key));
        }
        assert_eq!(listed, expected);
    }

    /// Pending aggregates: only windows started before the bound, in key order (tenant,
    /// meter, window start), paged by a cursor, with the customer the directory knows.
    pub(crate) async fn pending_exports_page_in_key_order_before_a_window(h: &mut Made) {
        let w = DAY0 + 10 * HOUR;
        h.s().put_tenant(&TenantRecord::new("a".into(), "free".into()).with_customer("cus_a"), &[]).await.unwrap();
        h.s().put_tenant(&TenantRecord::new("b".into(), "free".into()), &[]).await.unwrap();
        let f = batch(
            "f",
            vec![
                rec("b", "requests", w + 3 * HOUR, 1),
                rec("a", "tokens", w, 50),
                rec("a", "requests", w + 2 * HOUR, 8),
                rec("b", "requests", w, 7),
                rec("a", "requests", w + HOUR, 6),
                rec("a", "requests", w, 5),
            ],
        );
        assert_eq!(h.s().commit_usage(&f).await.unwrap(), CommitOutcome::Applied);
        let expected = vec![
            fresh(ek("a", "requests", w), 5),
            fresh(ek("a", "requests", w + HOUR), 6),
            fresh(ek("a", "tokens", w), 50),
            fresh(ek("b", "requests", w), 7),
        ];
        let before = w + 2 * HOUR;
        assert_eq!(h.s().pending_exports(before, None, 10).await.unwrap(), expected);

        // Paging by the last key of the previous page.
        let p1 = h.s().pending_exports(before, None, 2).await.unwrap();
        assert_eq!(p1, expected[..2]);
        let p2 = h.s().pending_exports(before, Some(&p1[1].key), 2).await.unwrap();
        assert_eq!(p2, expected[2..]);
        assert_eq!(h.s().pending_exports(before, Some(&p2[1].key), 2).await.unwrap(), []);
        let p1 = h.s().pending_exports(before, None, 3).await.unwrap();
        assert_eq!(p1, expected[..3]);
        assert_eq!(h.s().pending_exports(before, Some(&p1[2].key), 3).await.unwrap(), expected[3..]);
        // A cursor between stored keys.
        let between = ek("a", "requests", w + HOUR / 2);
        assert_eq!(h.s().pending_exports(before, Some(&between), 10).await.unwrap(), expected[1..]);
        assert_eq!(h.s().pending_exports(before, None, 0).await.unwrap(), []);

        // Only windows started strictly before the bound.
        assert_eq!(h.s().pending_exports(w, None, 10).await.unwrap(), []);
        let at_w = vec![expected[0].clone(), expected[2].clone(), expected[3].clone()];
        assert_eq!(h.s().pending_exports(w + 1, None, 10).await.unwrap(), at_w);
        assert_eq!(pending_keys(h.s(), w + 4 * HOUR).await.len(), 6);

        h.restart().await;
        assert_eq!(h.s().pending_exports(before, None, 10).await.unwrap(), expected);
        // The customer is the directory's: b gets one.
        h.s().put_tenant(&TenantRecord::new("b".into(), "free".into()).with_customer("cus_b"), &[]).await.unwrap();
        let b = h.s().pending_exports(before, Some(&expected[2].key), 10).await.unwrap();
        assert_eq!(b, [fresh(ek("b", "requests", w), 7)]);
    }

    /// `begin_export` claims a revision and fixes what it exports; another node waits for
    /// the claim to expire; `finish_export` moves the revision once; late usage is the next
    /// revision's delta.
    pub(crate) async fn an_export_claim_fixes_what_a_revision_exports(h: &mut Made) {
        let w = DAY0 + 10 * HOUR;
        let before = w + HOUR;
        let t = w + 2 * HOUR;
        let key = ek("a", "requests", w);
        h.s().put_tenant(&TenantRecord::new("a".into(), "free".into()).with_customer("cus_a"), &[]).await.unwrap();
        h.s().commit_usage(&batch("f1", vec![rec("a", "requests", w, 5)])).await.unwrap();
        let read = h.s().pending_exports(before, None, 10).await.unwrap();
        assert_eq!(read, [fresh(key.clone(), 5)]);
        let read = read[0].clone();

        let mut begun = fresh(key.clone(), 5);
        begun.in_flight = Some(5);
        begun.send = Some(sent(5));
        begun.attempts = 1;
        begun.first_attempt_at = Some(t);
        begun.claimed_until = Some(t + 300);
        assert_eq!(
            h.s().begin_export(&read, &ExportClaim::new(1, t, t + 300), &sent(5)).await.unwrap(),
            Some(begun.clone())
        );
        assert_eq!(h.s().usage(&key).await.unwrap(), Some(begun.clone()));

        // Another node is refused while the claim holds, and changes nothing.
        assert_eq!(h.s().begin_export(&read, &ExportClaim::new(2, t + 100, t + 400), &sent(5)).await.unwrap(), None);
        assert_eq!(h.s().begin_export(&read, &ExportClaim::new(2, t + 299, t + 599), &sent(5)).await.unwrap(), None);
        assert_eq!(h.s().usage(&key).await.unwrap(), Some(begun.clone()));
        h.restart().await;
        assert_eq!(h.s().usage(&key).await.unwrap(), Some(begun.clone()), "the claim outlives a restart");
        assert_eq!(h.s().begin_export(&read, &ExportClaim::new(2, t + 299, t + 599), &sent(5)).await.unwrap(), None);

        // The holder may begin again (a retry): one more attempt, the claim extended, and
        // what the first begin fixed is kept (other parameters given now are not taken).
        let again = h.s().begin_export(&read, &ExportClaim::new(1, t + 120, t + 420), &sent(6)).await.unwrap().unwrap();
        assert_eq!(
            (again.in_flight, again.send, again.attempts, again.first_attempt_at, again.claimed_until),
            (Some(5), Some(sent(5)), 2, Some(t), Some(t + 420))
        );
        // A failed attempt holds it until its next one, for the holder only.
        assert!(h.s().defer_export(&read, &ExportClaim::new(1, t + 130, t + 420), true).await.unwrap());
        assert!(!h.s().defer_export(&read, &ExportClaim::new(2, t + 130, t + 900), false).await.unwrap(), "held by 1");
        let deferred = h.s().usage(&key).await.unwrap().unwrap();
        assert_eq!((deferred.unknown_failures, deferred.claimed_until, deferred.attempts), (1, Some(t + 420), 2));

        // Late usage does not change what the in-flight revision exports.
        h.s().commit_usage(&batch("f2", vec![rec("a", "requests", w, 4)])).await.unwrap();
        let stored = h.s().usage(&key).await.unwrap().unwrap();
        assert_eq!((stored.quantity, stored.in_flight, stored.exported, stored.revision), (9, Some(5), 0, 0));
        let listed = h.s().pending_exports(before, None, 10).await.unwrap();
        assert_eq!(listed, std::slice::from_ref(&stored), "an export in flight is still pending");

        // After the claim expired another node takes over the same revision and amount.
        let taken = h.s().begin_export(&read, &ExportClaim::new(2, t + 421, t + 721), &sent(5)).await.unwrap().unwrap();
        let mut expected = stored.clone();
        expected.attempts = 3;
        expected.claimed_until = Some(t + 721);
        assert_eq!(taken, expected);
        assert_eq!(h.s().begin_export(&read, &ExportClaim::new(1, t + 500, t + 800), &sent(5)).await.unwrap(), None);

        assert!(h.s().finish_export(&taken).await.unwrap());
        let done = h.s().usage(&key).await.unwrap().unwrap();
        assert_eq!(
            (done.quantity, done.exported, done.revision, done.in_flight, done.attempts, done.first_attempt_at),
            (9, 5, 1, None, 0, None)
        );
        assert_eq!((done.unknown_failures, done.send.clone()), (0, None));
        assert!(!h.s().finish_export(&taken).await.unwrap(), "a stale revision");
        assert!(!h.s().finish_export(&read).await.unwrap(), "a stale revision");
        assert_eq!(h.s().usage(&key).await.unwrap().unwrap(), done, "a stale finish changes nothing");
        assert_eq!(h.s().begin_export(&read, &ExportClaim::new(1, t + 900, t + 1200), &sent(5)).await.unwrap(), None);

        h.restart().await;
        // The late usage is pending as revision 1, and that revision exports up to all of it:
        // the delta is quantity - exported.
        let next = h.s().pending_exports(before, None, 10).await.unwrap();
        assert_eq!(next.len(), 1);
        let next = next[0].clone();
        assert_eq!((next.quantity, next.exported, next.revision, next.in_flight), (9, 5, 1, None));
        // The claim was on revision 0: revision 1 is free to begin at once.
        assert!(
            !h.s().defer_export(&next, &ExportClaim::new(1, t + 600, t + 900), false).await.unwrap(),
            "not in flight"
        );
        let rev1 = h.s().begin_export(&next, &ExportClaim::new(1, t + 600, t + 900), &sent(4)).await.unwrap().unwrap();
        assert_eq!(
            (rev1.revision, rev1.in_flight, rev1.exported, rev1.attempts, rev1.first_attempt_at, rev1.claimed_until),
            (1, Some(9), 5, 1, Some(t + 600), Some(t + 900))
        );
        assert_eq!(rev1.send, Some(sent(4)));
        assert_eq!(rev1.in_flight.unwrap() - rev1.exported, 4, "the delta");
        assert!(h.s().finish_export(&rev1).await.unwrap());
        assert!(!h.s().finish_export(&rev1).await.unwrap());
        let last = h.s().usage(&key).await.unwrap().unwrap();
        assert_eq!((last.quantity, last.exported, last.revision, last.in_flight, last.send), (9, 9, 2, None, None));
        assert_eq!(h.s().pending_exports(before, None, 10).await.unwrap(), [], "all exported");
    }

    /// A dead letter is listed (paged), no longer pending, and pending again once requeued.
    pub(crate) async fn dead_letters_park_an_aggregate_until_requeued(h: &mut Made) {
        let w = DAY0 + 10 * HOUR;
        let before = w + HOUR;
        let t = w + 2 * HOUR;
        let records = vec![
            rec("a", "requests", w, 5),
            rec("b", "requests", w, 3),
            rec("c", "requests", w, 2),
            rec("d", "requests", w, 1),
        ];
        h.s().commit_usage(&batch("f1", records)).await.unwrap();
        let pending = h.s().pending_exports(before, None, 10).await.unwrap();
        assert_eq!(pending.len(), 4);
        let (a, b, c) = (pending[0].clone(), pending[1].clone(), pending[2].clone());

        // c: exported once, then late usage.
        let c = h.s().begin_export(&c, &ExportClaim::new(1, t, t + 300), &sent(5)).await.unwrap().unwrap();
        assert!(h.s().finish_export(&c).await.unwrap());
        h.s().commit_usage(&batch("f2", vec![rec("c", "requests", w, 3)])).await.unwrap();
        let c = h.s().usage(&ek("c", "requests", w)).await.unwrap().unwrap();
        assert_eq!((c.quantity, c.exported, c.revision), (5, 2, 1));

        // a: refused while in flight; b and c: refused from what was read.
        let a = h.s().begin_export(&a, &ExportClaim::new(1, t, t + 300), &sent(5)).await.unwrap().unwrap();
        h.s().dead_letter(&a, "card declined").await.unwrap();
        h.s().dead_letter(&b, "no such customer").await.unwrap();
        h.s().dead_letter(&c, "amount too small").await.unwrap();
        // Parking a revision that moved on changes nothing.
        let mut stale = c.clone();
        stale.revision = 0;
        h.s().dead_letter(&stale, "a stale revision").await.unwrap();

        // What was in flight stays with the dead letter, for reconciliation.
        let mut dl_a = DeadLetter::new(ek("a", "requests", w), 5, "card declined");
        dl_a.send = Some(sent(5));
        let dl_b = DeadLetter::new(ek("b", "requests", w), 3, "no such customer");
        let mut dl_c = DeadLetter::new(ek("c", "requests", w), 3, "amount too small");
        dl_c.revision = 1;
        let all = vec![dl_a.clone(), dl_b.clone(), dl_c.clone()];
        assert_eq!(h.s().dead_letters(None, 10).await.unwrap(), all);
        assert_eq!(h.s().dead_letters(None, 2).await.unwrap(), all[..2]);
        assert_eq!(h.s().dead_letters(Some(&dl_b.key), 2).await.unwrap(), all[2..]);
        assert_eq!(h.s().dead_letters(Some(&dl_c.key), 2).await.unwrap(), []);
        assert_eq!(h.s().dead_letters(None, 0).await.unwrap(), []);
        assert_eq!(pending_keys(h.s(), before).await, [ek("d", "requests", w)], "dead letters are not pending");

        h.restart().await;
        assert_eq!(h.s().dead_letters(None, 10).await.unwrap(), all);
        assert_eq!(pending_keys(h.s(), before).await, [ek("d", "requests", w)]);

        // Late usage of a dead letter stays parked with it.
        h.s().commit_usage(&batch("f3", vec![rec("b", "requests", w, 4)])).await.unwrap();
        let mut dl_b7 = dl_b.clone();
        dl_b7.units = 7;
        assert_eq!(h.s().dead_letters(None, 10).await.unwrap(), [dl_a.clone(), dl_b7.clone(), dl_c.clone()]);
        assert_eq!(pending_keys(h.s(), before).await, [ek("d", "requests", w)]);

        // Requeued once.
        assert!(h.s().requeue_dead_letter(&dl_a.key).await.unwrap());
        assert!(!h.s().requeue_dead_letter(&dl_a.key).await.unwrap());
        assert!(!h.s().requeue_dead_letter(&ek("d", "requests", w)).await.unwrap(), "not a dead letter");
        assert!(!h.s().requeue_dead_letter(&ek("zz", "requests", w)).await.unwrap(), "no such aggregate");
        assert_eq!(h.s().dead_letters(None, 10).await.unwrap(), [dl_b7, dl_c.clone()]);
        let pending = h.s().pending_exports(before, None, 10).await.unwrap();
        assert_eq!(
            pending.iter().map(|p| p.key.clone()).collect::<Vec<_>>(),
            [dl_a.key.clone(), ek("d", "requests", w)]
        );
        // As a new revision (a new identifier), nothing in flight: parameters are fixed anew.
        assert_eq!(
            (
                pending[0].quantity,
                pending[0].exported,
                pending[0].revision,
                pending[0].in_flight,
                pending[0].send.clone()
            ),
            (5, 0, 1, None, None)
        );
        // And exported like any other.
        let again =
            h.s().begin_export(&pending[0], &ExportClaim::new(1, t + 10, t + 310), &sent(5)).await.unwrap().unwrap();
        assert_eq!(again.in_flight, Some(5));
        assert!(h.s().finish_export(&again).await.unwrap());
        assert_eq!(pending_keys(h.s(), before).await, [ek("d", "requests", w)]);

        assert!(h.s().requeue_dead_letter(&dl_c.key).await.unwrap());
        let pending = h.s().pending_exports(before, None, 10).await.unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(
            (&pending[0].key, pending[0].quantity, pending[0].exported, pending[0].revision),
            (&dl_c.key, 5, 2, 2)
        );
    }

    /// The directory: keys, ids and customers lead to the tenant as stored now.
    /// A customer given to a second tenant leaves the first (its record no longer names it), and
    /// the first tenant's later changes do not take the customer from the second.
    pub(crate) async fn a_billing_customer_belongs_to_one_tenant(h: &mut Made) {
        let x = TenantRecord::new("x".into(), "free".into()).with_customer("cus_c");
        let y = TenantRecord::new("y".into(), "pro".into()).with_customer("cus_c");
        h.s().put_tenant(&x, &[]).await.unwrap();
        h.s().put_tenant(&y, &[]).await.unwrap();
        h.restart().await;
        assert_eq!(h.s().tenant_by_customer("cus_c").await.unwrap(), Some(y.clone()));
        assert_eq!(h.s().tenant(&"x".into()).await.unwrap().unwrap().customer, None, "x no longer names cus_c");
        // x moves to another customer: cus_c stays with y.
        let x2 = TenantRecord::new("x".into(), "free".into()).with_customer("cus_d");
        h.s().put_tenant(&x2, &[]).await.unwrap();
        assert_eq!(h.s().tenant_by_customer("cus_c").await.unwrap(), Some(y.clone()));
        assert_eq!(h.s().tenant_by_customer("cus_d").await.unwrap(), Some(x2.clone()));
        // y drops its customer: nobody has cus_c.
        h.s().put_tenant(&TenantRecord::new("y".into(), "pro".into()), &[]).await.unwrap();
        assert_eq!(h.s().tenant_by_customer("cus_c").await.unwrap(), None);
        let plan = PlanChange::new("evt_c", "cus_c", 10, "pro".into());
        assert_eq!(h.s().apply_plan_change(&plan).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
    }

    pub(crate) async fn the_directory_finds_tenants_by_key_id_and_customer(h: &mut Made) {
        let (k1, k2, k3) = (KeyHash::of(b"key-1"), KeyHash::of(b"key-2"), KeyHash::of(b"key-3"));
        let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_1");
        h.s().put_tenant(&acme, &[k1, k2]).await.unwrap();
        assert_eq!(h.s().find_key(&k1).await.unwrap(), Some(acme.clone()));
        assert_eq!(h.s().find_key(&k2).await.unwrap(), Some(acme.clone()));
        assert_eq!(h.s().find_key(&k3).await.unwrap(), None);
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(acme.clone()));
        assert_eq!(h.s().tenant(&"nobody".into()).await.unwrap(), None);
        assert_eq!(h.s().tenant_by_customer("cus_1").await.unwrap(), Some(acme.clone()));
        assert_eq!(h.s().tenant_by_customer("cus_none").await.unwrap(), None);

        for id in ["t03", "t01", "zeta", "t02"] {
            h.s().put_tenant(&TenantRecord::new(id.into(), "free".into()), &[]).await.unwrap();
        }
        h.restart().await;
        let ids = |page: Vec<TenantRecord>| page.into_iter().map(|t| t.id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(h.s().list_tenants(None, 10).await.unwrap()), ["acme", "t01", "t02", "t03", "zeta"]);
        assert_eq!(ids(h.s().list_tenants(None, 2).await.unwrap()), ["acme", "t01"]);
        assert_eq!(ids(h.s().list_tenants(Some(&"t01".into()), 2).await.unwrap()), ["t02", "t03"]);
        assert_eq!(ids(h.s().list_tenants(Some(&"t03".into()), 2).await.unwrap()), ["zeta"]);
        assert_eq!(ids(h.s().list_tenants(Some(&"zeta".into()), 2).await.unwrap()), Vec::<String>::new());
        assert_eq!(ids(h.s().list_tenants(Some(&"t015".into()), 10).await.unwrap()), ["t02", "t03", "zeta"]);
        assert_eq!(h.s().list_tenants(None, 0).await.unwrap(), []);
        assert_eq!(h.s().list_tenants(None, 10).await.unwrap()[0], acme, "listed as stored");

        // A removed key no longer finds its tenant; the others still do.
        h.s().remove_key(&k1).await.unwrap();
        h.s().remove_key(&k3).await.unwrap();
        assert_eq!(h.s().find_key(&k1).await.unwrap(), None);
        assert_eq!(h.s().find_key(&k2).await.unwrap(), Some(acme.clone()));

        // Replaced: another plan and another customer.
        let moved = TenantRecord::new("acme".into(), "pro".into()).with_customer("cus_2");
        h.s().put_tenant(&moved, &[k2, k3]).await.unwrap();
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(moved.clone()));
        assert_eq!(h.s().find_key(&k2).await.unwrap(), Some(moved.clone()));
        assert_eq!(h.s().find_key(&k3).await.unwrap(), Some(moved.clone()));
        assert_eq!(h.s().find_key(&k1).await.unwrap(), None);
        assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), Some(moved.clone()));
        assert_eq!(h.s().tenant_by_customer("cus_1").await.unwrap(), None, "the old customer no longer finds it");
        h.restart().await;
        assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), Some(moved.clone()));
        assert_eq!(h.s().tenant_by_customer("cus_1").await.unwrap(), None);
        assert_eq!(h.s().list_tenants(None, 10).await.unwrap().len(), 5, "replaced, not added");

        // Replaced without a customer.
        let plain = TenantRecord::new("acme".into(), "pro".into());
        h.s().put_tenant(&plain, &[]).await.unwrap();
        assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), None);
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(plain));
        // The customer may then belong to another tenant.
        let other = TenantRecord::new("t01".into(), "free".into()).with_customer("cus_2");
        h.s().put_tenant(&other, &[]).await.unwrap();
        assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), Some(other));
    }

    /// Plan changes: applied once per event id, never older than the last applied, and an
    /// event for an unknown customer is not marked seen.
    /// A tenant's overrides are kept with it (by every read of the directory), set or removed
    /// alone (a plan change made meanwhile is kept), and outlive a restart.
    pub(crate) async fn tenant_overrides_are_kept_and_set_alone(h: &mut Made) {
        let json = r#"{"rate":"100/s","features":["sso"]}"#;
        let mut acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_o");
        acme.overrides = Some(json.into());
        let key = KeyHash::of(b"key-o");
        h.s().put_tenant(&acme, &[key]).await.unwrap();
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(acme.clone()));
        assert_eq!(h.s().find_key(&key).await.unwrap().and_then(|t| t.overrides).as_deref(), Some(json));
        assert_eq!(h.s().tenant_by_customer("cus_o").await.unwrap().and_then(|t| t.overrides).as_deref(), Some(json));
        // A plan change by a billing event keeps them.
        let change = PlanChange::new("evt_o", "cus_o", 100, "pro".into());
        let PlanChangeOutcome::Applied(after) = h.s().apply_plan_change(&change).await.unwrap() else {
            panic!("applied")
        };
        assert_eq!((after.plan.as_str(), after.overrides.as_deref()), ("pro", Some(json)));
        // Set alone: the plan stays.
        let other = r#"{"burst":7}"#;
        assert!(h.s().set_overrides(&"acme".into(), Some(other)).await.unwrap());
        h.restart().await;
        let now = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
        assert_eq!((now.plan.as_str(), now.overrides.as_deref(), now.last_event_at), ("pro", Some(other), Some(100)));
        let listed = h.s().list_tenants(None, 10).await.unwrap();
        assert_eq!(listed.iter().find(|t| t.id.as_str() == "acme").and_then(|t| t.overrides.as_deref()), Some(other));
        // Removed.
        assert!(h.s().set_overrides(&"acme".into(), None).await.unwrap());
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap().unwrap().overrides, None);
        // An unknown tenant: nothing created.
        assert!(!h.s().set_overrides(&"nobody".into(), Some(other)).await.unwrap());
        assert_eq!(h.s().tenant(&"nobody".into()).await.unwrap(), None);
    }

    pub(crate) async fn plan_changes_apply_once_and_in_order(h: &mut Made) {
        let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_a");
        h.s().put_tenant(&acme, &[]).await.unwrap();
        let change = |id: &str, customer: &str, at, plan: &str| PlanChange::new(id, customer, at, plan.into());
        let as_of = |plan: &str, at| {
            let mut r = TenantRecord::new("acme".into(), plan.into()).with_customer("cus_a");
            r.last_event_at = Some(at);
            r
        };

        let applied = h.s().apply_plan_change(&change("evt_2", "cus_a", 200, "metered")).await.unwrap();
        assert_eq!(applied, PlanChangeOutcome::Applied(as_of("metered", 200)));
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("metered", 200)));
        assert_eq!(h.s().tenant_by_customer("cus_a").await.unwrap(), Some(as_of("metered", 200)));
        let dup = h.s().apply_plan_change(&change("evt_2", "cus_a", 200, "metered")).await.unwrap();
        assert_eq!(dup, PlanChangeOutcome::Duplicate);

        // An older event: stale, its id marked seen, nothing else changed.
        let old = change("evt_1", "cus_a", 100, "free");
        assert_eq!(h.s().apply_plan_change(&old).await.unwrap(), PlanChangeOutcome::Stale);
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("metered", 200)));
        h.restart().await;
        assert_eq!(h.s().apply_plan_change(&old).await.unwrap(), PlanChangeOutcome::Duplicate);
        let dup = h.s().apply_plan_change(&change("evt_2", "cus_a", 200, "metered")).await.unwrap();
        assert_eq!(dup, PlanChangeOutcome::Duplicate, "seen ids outlive a restart");

        // An event as old as the last applied is not older: applied.
        let same_time = h.s().apply_plan_change(&change("evt_2b", "cus_a", 200, "pro")).await.unwrap();
        assert_eq!(same_time, PlanChangeOutcome::Applied(as_of("pro", 200)));
        // A duplicate with other contents changes nothing.
        let dup = h.s().apply_plan_change(&change("evt_2", "cus_a", 900, "free")).await.unwrap();
        assert_eq!(dup, PlanChangeOutcome::Duplicate);
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("pro", 200)));

        // An unknown customer: nothing changed, the id not marked seen.
        let early = change("evt_9", "cus_new", 300, "pro");
        assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
        assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
        assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("pro", 200)));
        assert_eq!(h.s().tenant(&"beta".into()).await.unwrap(), None);
        h.s().put_tenant(&TenantRecord::new("beta".into(), "free".into()).with_customer("cus_new"), &[]).await.unwrap();
        h.restart().await;
        let mut beta = TenantRecord::new("beta".into(), "pro".into()).with_customer("cus_new");
        beta.last_event_at = Some(300);
        assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::Applied(beta.clone()));
        assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::Duplicate);
        assert_eq!(h.s().tenant_by_customer("cus_new").await.unwrap(), Some(beta));
        // Customers keep their own order: beta's newer event does not make acme's older ones stale.
        let acme_next = h.s().apply_plan_change(&change("evt_3", "cus_a", 250, "free")).await.unwrap();
        assert_eq!(acme_next, PlanChangeOutcome::Applied(as_of("free", 250)));
    }

    /// Usage events apply once per id, within one call and across calls, with one outcome
    /// per event in order.
    pub(crate) async fn usage_events_apply_once_per_id(h: &mut Made) {
        let w = DAY0 + 10 * HOUR;
        let ev = |id: &str, meter: &str, window, q| UsageEvent::new(id, rec("t", meter, window, q), window + 10);
        let first = [ev("e1", "requests", w, 5), ev("e2", "requests", w, 2), ev("e1", "requests", w, 5)];
        let out = h.s().commit_events(&first).await.unwrap();
        assert_eq!(out, [EventOutcome::Applied, EventOutcome::Applied, EventOutcome::Duplicate]);
        assert_eq!(quantity(h.s(), &ek("t", "requests", w)).await, Some(7));

        // A seen id with other contents is a duplicate all the same.
        let second = [ev("e2", "requests", w, 2), ev("e3", "tokens", w + HOUR, 4), ev("e1", "requests", w, 100)];
        let out = h.s().commit_events(&second).await.unwrap();
        assert_eq!(out, [EventOutcome::Duplicate, EventOutcome::Applied, EventOutcome::Duplicate]);
        assert_eq!(quantity(h.s(), &ek("t", "requests", w)).await, Some(7));
        assert_eq!(quantity(h.s(), &ek("t", "tokens", w + HOUR)).await, Some(4));
        assert_eq!(h.s().commit_events(&[]).await.unwrap(), []);

        h.restart().await;
        let out = h.s().commit_events(&[ev("e3", "tokens", w + HOUR, 4), ev("e4", "requests", w, 1)]).await.unwrap();
        assert_eq!(out, [EventOutcome::Duplicate, EventOutcome::Applied]);
        // Events and batches add to the same aggregates.
        h.s().commit_usage(&batch("f1", vec![rec("t", "requests", w, 10)])).await.unwrap();
        let range = h.s().usage_range(&"t".into(), w, w + 2 * HOUR).await.unwrap();
        assert_eq!(
            range.into_iter().map(|a| (a.key, a.quantity)).collect::<Vec<_>>(),
            [(ek("t", "requests", w), 18), (ek("t", "tokens", w + HOUR), 4)]
        );
    }

    /// The period's kind and anchor are part of a quota key: a day, a month from the 1st
    /// and a month from the 15th are separate counters even where they overlap, and so are
    /// other meters and other tenants.
    pub(crate) async fn quota_keys_of_different_periods_are_separate_counters(h: &mut Made) {
        let now = DAY0 + 12 * HOUR; // 2026-03-14T12:00:00Z
        let key = |tenant: &str, meter: &str, period: Period| {
            let (start, end) = period.bounds(now);
            QuotaKey::new(tenant.into(), meter.into(), period, start, end)
        };
        let day = key("t", "requests", Period::Day);
        let month1 = key("t", "requests", Period::Month { anchor_day: 1 });
        let month15 = key("t", "requests", Period::Month { anchor_day: 15 });
        // The bounds overlap: all three contain `now`.
        for k in [&day, &month1, &month15] {
            assert!(k.start <= now && now < k.end, "{k:?}");
        }
        assert_ne!((month1.start, month1.end), (month15.start, month15.end));
        // Same bounds, another kind of period: still another counter.
        let day_as_month =
            QuotaKey::new("t".into(), "requests".into(), Period::Month { anchor_day: 14 }, day.start, day.end);
        let other_meter = key("t", "tokens", Period::Day);
        let other_tenant = key("u", "requests", Period::Day);

        let limit = Some(10);
        let mut seq = 0;
        let mut take = |k: &QuotaKey, units| {
            seq += 1;
            ask(k, units, limit, 1, seq)
        };
        assert_eq!(h.s().reserve(&take(&month15, 10)).await.unwrap(), Grant::new(10, 10));
        assert_eq!(h.s().reserve(&take(&day, 4)).await.unwrap(), Grant::new(4, 4));
        assert_eq!(h.s().reserve(&take(&month1, 7)).await.unwrap(), Grant::new(7, 7));
        assert_eq!(h.s().reserve(&take(&day_as_month, 1)).await.unwrap(), Grant::new(1, 1));
        assert_eq!(h.s().reserve(&take(&other_meter, 2)).await.unwrap(), Grant::new(2, 2));
        assert_eq!(h.s().reserve(&take(&other_tenant, 3)).await.unwrap(), Grant::new(3, 3));
        h.restart().await;
        assert_eq!(h.s().reserve(&take(&day, 10)).await.unwrap(), Grant::new(6, 10));
        assert_eq!(h.s().reserve(&take(&month15, 1)).await.unwrap(), Grant::new(0, 10));
        let counts =
            [(&day, 10), (&month1, 7), (&month15, 10), (&day_as_month, 1), (&other_meter, 2), (&other_tenant, 3)];
        for (k, n) in counts {
            assert_eq!(reserved(h.s(), k).await, n, "{k:?}");
        }
        // A release on one counter leaves the others alone.
        h.s().release(&month1, 7, ReserveToken::new(1, 100)).await.unwrap();
        assert_eq!(reserved(h.s(), &month1).await, 0);
        assert_eq!(reserved(h.s(), &day).await, 10);
        assert_eq!(reserved(h.s(), &month15).await, 10);
    }

    /// An `Idempotency-Key` is bound by the first claim; the others learn what it is bound to;
    /// only its owner settles it; a claim left in flight, or an expired binding, is free again.
    pub(crate) async fn idempotency_keys_are_claimed_once_and_settled_by_their_owner(h: &mut Made) {
        let now = 1_773_489_600;
        let claim = |key: &str, request: &str, owner: u64, at: i64| {
            IdempotencyClaim::new(key, request, owner, at, at + 300, at + 86_400)
        };
        let s = h.s();
        assert_eq!(s.claim_idempotency(&claim("k1", "r1", 1, now)).await.unwrap(), IdempotencyState::Claimed);
        assert_eq!(s.claim_idempotency(&claim("k1", "r1", 2, now)).await.unwrap(), IdempotencyState::InFlight);
        assert_eq!(s.claim_idempotency(&claim("k1", "r2", 2, now)).await.unwrap(), IdempotencyState::Mismatch);
        // Only the owner settles.
        s.settle_idempotency("k1", 2, IdempotencySettle::Completed).await.unwrap();
        assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now)).await.unwrap(), IdempotencyState::InFlight);
        s.settle_idempotency("k1", 1, IdempotencySettle::Completed).await.unwrap();
        h.restart().await;
        let s = h.s();
        assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now + 10)).await.unwrap(), IdempotencyState::Completed);
        assert_eq!(s.claim_idempotency(&claim("k1", "r2", 3, now + 10)).await.unwrap(), IdempotencyState::Mismatch);
        // A completed key is not released by anyone.
        s.settle_idempotency("k1", 1, IdempotencySettle::Released).await.unwrap();
        assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now + 20)).await.unwrap(), IdempotencyState::Completed);
        // Released: free again, for any request.
        assert_eq!(s.claim_idempotency(&claim("k2", "r1", 4, now)).await.unwrap(), IdempotencyState::Claimed);
        s.settle_idempotency("k2", 4, IdempotencySettle::Released).await.unwrap();
        assert_eq!(s.claim_idempotency(&claim("k2", "r9", 5, now)).await.unwrap(), IdempotencyState::Claimed);
        // Left in flight past its time (its node died): free again.
        assert_eq!(s.claim_idempotency(&claim("k2", "r1", 6, now + 299)).await.unwrap(), IdempotencyState::Mismatch);
        assert_eq!(s.claim_idempotency(&claim("k2", "r1", 6, now + 300)).await.unwrap(), IdempotencyState::Claimed);
        // The old owner can no longer settle it.
        s.settle_idempotency("k2", 5, IdempotencySettle::Released).await.unwrap();
        assert_eq!(s.claim_idempotency(&claim("k2", "r1", 7, now + 301)).await.unwrap(), IdempotencyState::InFlight);
        // A completed binding expires.
        assert_eq!(s.claim_idempotency(&claim("k1", "r2", 8, now + 86_400)).await.unwrap(), IdempotencyState::Claimed);
    }

    /// Keys carry an id, a display prefix and an expiry; an expired key no longer finds its
    /// tenant but stays listed; a key of one tenant cannot be given to another.
    pub(crate) async fn api_keys_carry_an_id_a_prefix_and_an_expiry(h: &mut Made) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let (a, b) = (TenantRecord::new("a".into(), "free".into()), TenantRecord::new("b".into(), "free".into()));
        h.s().put_tenant(&a, &[KeyHash::of(b"old-a")]).await.unwrap();
        h.s().put_tenant(&b, &[]).await.unwrap();
        let live = ApiKeyRecord::new(KeyHash::of(b"tg_live_aaaa1111"), "a".into(), now).with_prefix("tg_live_aaaa");
        let rotating = ApiKeyRecord::new(KeyHash::of(b"old-a"), "a".into(), now).with_expiry(Some(now + 3600));
        let expired = ApiKeyRecord::new(KeyHash::of(b"gone-a"), "a".into(), now - 10).with_expiry(Some(now - 1));
        for k in [&live, &rotating, &expired] {
            h.s().put_key(k).await.unwrap();
        }
        h.restart().await;
        let s = h.s();
        assert_eq!(s.find_key(&live.hash).await.unwrap().map(|t| t.id), Some("a".into()));
        assert_eq!(s.find_key(&rotating.hash).await.unwrap().map(|t| t.id), Some("a".into()), "within its grace");
        assert_eq!(s.find_key(&expired.hash).await.unwrap(), None, "expired");
        let mut want = vec![live.clone(), rotating.clone(), expired.clone()];
        want.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(s.list_keys(&"a".into()).await.unwrap(), want);
        assert!(s.list_keys(&"b".into()).await.unwrap().is_empty());
        assert_eq!(live.id, live.hash.id());
        assert!(live.id.starts_with("k_") && live.id.len() == 14);
        // Another tenant cannot take the key; its owner can change its expiry.
        let stolen = ApiKeyRecord::new(live.hash, "b".into(), now);
        assert!(matches!(s.put_key(&stolen).await, Err(tollgate::store::StoreError::Conflict(_))));
        assert_eq!(s.find_key(&live.hash).await.unwrap().map(|t| t.id), Some("a".into()));
        s.put_key(&live.clone().with_expiry(Some(now - 1))).await.unwrap();
        assert_eq!(s.find_key(&live.hash).await.unwrap(), None);
        // put_tenant keeps what a key carries.
        s.put_tenant(&a, &[rotating.hash]).await.unwrap();
        let listed = s.list_keys(&"a".into()).await.unwrap();
        assert_eq!(listed.iter().find(|k| k.hash == rotating.hash).unwrap().expires_at, Some(now + 3600));
        s.remove_key(&rotating.hash).await.unwrap();
        assert_eq!(s.list_keys(&"a".into()).await.unwrap().len(), 2);
    }

    /// Near a hard limit a shrinking reserve is granted an eighth of what is left (rounded
    /// up), never less than it needs (if that many are left), never more than it asked.
    pub(crate) async fn near_the_limit_a_shrinking_reserve_gets_an_eighth_of_what_is_left(h: &mut Made) {
        let key = day_key("t", "requests");
        let s = h.s();
        let shrink = |units, at_least, seq| ask(&key, units, Some(100), 1, seq).shrinking(at_least);
        assert_eq!(s.reserve(&shrink(50, 1, 1)).await.unwrap(), Grant::new(13, 13), "⌈100 / 8⌉");
        assert_eq!(s.reserve(&shrink(5, 1, 2)).await.unwrap(), Grant::new(5, 18), "what it asked");
        assert_eq!(s.reserve(&shrink(50, 20, 3)).await.unwrap(), Grant::new(20, 38), "what it needs");
        assert_eq!(s.reserve(&ask(&key, 50, Some(100), 1, 4)).await.unwrap(), Grant::new(50, 88), "not shrinking");
        assert_eq!(s.reserve(&shrink(50, 1, 5)).await.unwrap(), Grant::new(2, 90), "⌈12 / 8⌉");
        assert_eq!(s.reserve(&shrink(50, 30, 6)).await.unwrap(), Grant::new(10, 100), "the rest, short of its need");
        assert_eq!(s.reserve(&shrink(50, 1, 7)).await.unwrap(), Grant::new(0, 100));
    }
}
