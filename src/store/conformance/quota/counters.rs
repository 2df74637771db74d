//! The quota role's counters: reserve and release, atomic and applied once per token; a
//! tenant's own cap; what senders keep, and their expiry.

use super::super::*;
use crate::store::{Grant, Kept, QuotaInspect, QuotaStoreExt, Release};

pub(super) async fn reserved<S: ?Sized + QuotaInspect>(s: &S, key: &QuotaKey) -> u64 {
    s.reserved(key).await.unwrap()
}

/// Checks that the grants (all with units granted) tile `[0, total)` when ordered by the
/// count they left: each call's units sit right after the previous call's, so no two calls
/// were granted the same units and none was lost.
pub(super) fn assert_tiles(grants: &mut [Grant], total: u64, what: &str) {
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
pub async fn reserve_never_exceeds_a_limit<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    const TASKS: u64 = 32;
    const CALLS: u64 = 80;
    const LIMIT: u64 = 1000;
    let hard = day_key("crowd", "requests");
    let open = day_key("crowd", "tokens");
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = h.shared();
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
pub async fn owed_units_pass_the_limit<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
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
    h.s().release_units(&k, 7, ReserveToken::new(1, 4)).await.unwrap();
    assert_eq!(reserved(h.s(), &k).await, 8);
    assert_eq!(h.s().reserve(&owe(5, 0, 5)).await.unwrap(), Grant::new(2, 10));
    // Owed units of a retried call are added once too.
    assert_eq!(h.s().reserve(&owe(0, 6, 6)).await.unwrap(), Grant::new(0, 16));
    assert_eq!(h.s().reserve(&owe(0, 6, 6)).await.unwrap(), Grant::new(0, 16));
    assert_eq!(reserved(h.s(), &k).await, 16);
}

/// Without a limit, everything asked is granted.
pub async fn without_a_limit_everything_is_granted<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
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
pub async fn a_reserve_token_is_applied_once<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
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
    h.s().release_units(&k, 4, ReserveToken::new(1, 4)).await.unwrap();
    h.s().release_units(&k, 4, ReserveToken::new(1, 4)).await.unwrap();
    assert_eq!(reserved(h.s(), &k).await, 5);
    h.restart().await;
    h.s().release_units(&k, 4, ReserveToken::new(1, 4)).await.unwrap();
    assert_eq!(reserved(h.s(), &k).await, 5);
    // A reserve with the release's token, or a release with an older one, changes nothing.
    assert_eq!(h.s().reserve(&ask(&k, 3, Some(10), 1, 4)).await.unwrap().granted, 0);
    h.s().release_units(&k, 2, ReserveToken::new(1, 2)).await.unwrap();
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
pub async fn release_gives_units_back<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    let k = day_key("giver", "requests");
    assert_eq!(h.s().reserve(&ask(&k, 10, Some(10), 1, 1)).await.unwrap(), Grant::new(10, 10));
    assert_eq!(h.s().reserve(&ask(&k, 1, Some(10), 1, 2)).await.unwrap(), Grant::new(0, 10));
    h.s().release_units(&k, 4, ReserveToken::new(1, 3)).await.unwrap();
    assert_eq!(reserved(h.s(), &k).await, 6);
    h.restart().await;
    assert_eq!(reserved(h.s(), &k).await, 6);
    assert_eq!(h.s().reserve(&ask(&k, 9, Some(10), 2, 1)).await.unwrap(), Grant::new(4, 10));
    // Another node gives back everything.
    h.s().release_units(&k, 10, ReserveToken::new(2, 2)).await.unwrap();
    assert_eq!(reserved(h.s(), &k).await, 0);
    assert_eq!(h.s().reserve(&ask(&k, 3, Some(10), 1, 4)).await.unwrap(), Grant::new(3, 3));
}

/// Counters of a (tenant, meter) are kept for the current period and the one before (late
/// releases and owed units of the period that just ended still land); once a period starts
/// after the one before ended, the older ones are dropped, and late calls for them change
/// nothing and create nothing.
pub async fn a_period_two_periods_old_is_dropped_and_stays_dropped<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    let day =
        |n: i64| QuotaKey::new("late".into(), "requests".into(), Period::Day, DAY0 + n * DAY, DAY0 + (n + 1) * DAY);
    assert_eq!(h.s().reserve(&ask(&day(0), 5, Some(10), 1, 1)).await.unwrap(), Grant::new(5, 5));
    assert_eq!(h.s().reserve(&ask(&day(1), 4, Some(10), 1, 2)).await.unwrap(), Grant::new(4, 4));
    // The day before is still there: a late release and owed units land in it.
    h.s().release_units(&day(0), 2, ReserveToken::new(1, 3)).await.unwrap();
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
    h.s().release_units(&day(0), 3, ReserveToken::new(2, 2)).await.unwrap();
    assert_eq!(reserved(h.s(), &day(0)).await, 0);
    // Another meter of the same tenant is another counter, untouched.
    let other = day_key("late", "tokens");
    assert_eq!(h.s().reserve(&ask(&other, 2, None, 1, 6)).await.unwrap(), Grant::new(2, 2));
}

/// A minute's counter is kept while a later minute of its meter started less than
/// [`ENDED_PERIODS_KEPT_SECS`](crate::store::contract::ENDED_PERIODS_KEPT_SECS) after it ended
/// (nodes choose minutes by their own clocks: one a few minutes ahead must not drop the minute
/// the others are in), and dropped by the first call on a minute that started later.
pub async fn minutes_are_kept_ten_minutes_past_their_end<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    let kept = crate::store::contract::ENDED_PERIODS_KEPT_SECS;
    let minute =
        |n: i64| QuotaKey::new("tpm".into(), "tokens".into(), Period::Minute, DAY0 + n * 60, DAY0 + (n + 1) * 60);
    assert_eq!(h.s().reserve(&ask(&minute(0), 5, Some(10), 1, 1)).await.unwrap(), Grant::new(5, 5));
    // A node 3 minutes ahead: the others' minute stays, and keeps counting.
    assert_eq!(h.s().reserve(&ask(&minute(3), 4, Some(10), 2, 1)).await.unwrap(), Grant::new(4, 4));
    assert_eq!(h.s().reserve(&ask(&minute(0), 5, Some(10), 1, 2)).await.unwrap(), Grant::new(5, 10));
    assert_eq!(reserved(h.s(), &minute(0)).await, 10);
    h.restart().await;
    // The last minute that keeps minute 0: it starts `kept` seconds after minute 0 ended.
    let last = 1 + kept / 60;
    assert_eq!(h.s().reserve(&ask(&minute(last), 1, Some(10), 1, 3)).await.unwrap(), Grant::new(1, 1));
    assert_eq!(reserved(h.s(), &minute(0)).await, 10, "ended {kept} s before: kept");
    // One minute later: minute 0 is dropped, minute 3 (ended later) kept.
    assert_eq!(h.s().reserve(&ask(&minute(last + 1), 1, Some(10), 1, 4)).await.unwrap(), Grant::new(1, 1));
    assert_eq!(reserved(h.s(), &minute(0)).await, 0);
    assert_eq!(reserved(h.s(), &minute(3)).await, 4);
    h.restart().await;
    assert_eq!(h.s().reserve(&ask(&minute(0), 3, Some(10), 3, 1)).await.unwrap(), Grant::new(0, 0), "stays dropped");
    assert_eq!(reserved(h.s(), &minute(0)).await, 0);
}

/// The period's kind and anchor are part of a quota key: a day, a month from the 1st
/// and a month from the 15th are separate counters even where they overlap, and so are
/// other meters and other tenants.
pub async fn quota_keys_of_different_periods_are_separate_counters<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
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
    let counts = [(&day, 10), (&month1, 7), (&month15, 10), (&day_as_month, 1), (&other_meter, 2), (&other_tenant, 3)];
    for (k, n) in counts {
        assert_eq!(reserved(h.s(), k).await, n, "{k:?}");
    }
    // A release on one counter leaves the others alone.
    h.s().release_units(&month1, 7, ReserveToken::new(1, 100)).await.unwrap();
    assert_eq!(reserved(h.s(), &month1).await, 0);
    assert_eq!(reserved(h.s(), &day).await, 10);
    assert_eq!(reserved(h.s(), &month15).await, 10);
}

/// Near a hard limit a shrinking reserve is granted an eighth of what is left (rounded
/// up), never less than it needs (if that many are left), never more than it asked.
pub async fn near_the_limit_a_shrinking_reserve_gets_an_eighth_of_what_is_left<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
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

/// A tenant's own cap (a spend cap) is stored beside its meter's counters: a reserve that
/// reads it is held to it in place of its own limit (at most the call's maximum; a soft one
/// leaves the call's own limit), whatever the period; a reserve that does not read it ignores it; a raised cap is seen by the next call,
/// a lowered one bounds every call after it; removing it brings the call's limit back.
pub async fn a_tenants_own_cap_holds_every_reserve_that_reads_it<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::{CapMode, SpendCap};
    let key = day_key("capped", "spend");
    let s = h.s();
    let call = |units, seq, cap| ask(&key, units, Some(100), 1, seq).capped(cap);
    // Nothing stored: the call's limit, and the answer says no cap.
    let g = s.reserve(&call(40, 1, CapMode::Stored)).await.unwrap();
    assert_eq!((g.granted, g.reserved, g.cap), (40, 40, None));
    // Lowered to 50: what is left under it, and the answer carries it.
    let g = s.reserve(&call(40, 2, CapMode::Set(Some(SpendCap::new(50, true))))).await.unwrap();
    assert_eq!((g.granted, g.reserved, g.cap), (10, 50, Some(SpendCap::new(50, true))), "held to the tenant's cap");
    let g = s.reserve(&call(1, 3, CapMode::Stored)).await.unwrap();
    assert_eq!((g.granted, g.reserved), (0, 50), "the cap is spent");
    // A call that reads no cap keeps its own limit.
    let g = s.reserve(&call(10, 4, CapMode::Ignored)).await.unwrap();
    assert_eq!((g.granted, g.reserved, g.cap), (10, 60, None), "ignored: the call's limit");
    // Raised past the call's limit: the next call sees it.
    s.reserve(&call(0, 5, CapMode::Set(Some(SpendCap::new(500, true))))).await.unwrap();
    let g = s.reserve(&call(100, 6, CapMode::Stored)).await.unwrap();
    assert_eq!((g.granted, g.reserved), (100, 160), "raised: past the call's own limit");
    // The same token sent again changes nothing and answers the same grant, with the cap.
    let again = s.reserve(&call(100, 6, CapMode::Stored)).await.unwrap();
    assert_eq!(again, g, "applied once");
    // Within the maximum in force (a plan the tenant was moved to): held to it.
    let g = s.reserve(&call(100, 7, CapMode::Stored).cap_within(170)).await.unwrap();
    assert_eq!((g.granted, g.reserved), (10, 170), "the stored cap, at most the maximum in force");
    let again = s.reserve(&call(100, 7, CapMode::Stored).cap_within(170)).await.unwrap();
    assert_eq!(again, g, "a resent call within a maximum: applied once");
    // A maximum above the stored cap: the cap holds.
    s.reserve(&call(0, 8, CapMode::Set(Some(SpendCap::new(200, true))))).await.unwrap();
    let g = s.reserve(&call(50, 9, CapMode::Stored).cap_within(1_000)).await.unwrap();
    assert_eq!((g.granted, g.reserved), (30, 200), "the stored cap, under the maximum");
    // A soft cap never lifts the call's own limit (a hard plan's); a call without one (a
    // soft plan's) is granted everything asked, whatever its maximum.
    s.reserve(&call(0, 10, CapMode::Set(Some(SpendCap::new(10, false))))).await.unwrap();
    let g = s.reserve(&call(1, 11, CapMode::Stored)).await.unwrap();
    assert_eq!((g.granted, g.cap), (0, Some(SpendCap::new(10, false))), "soft: the call's own limit holds");
    let g = s.reserve(&ask(&key, 1_000, None, 1, 12).capped(CapMode::Stored).cap_within(5)).await.unwrap();
    assert_eq!((g.granted, g.cap), (1_000, Some(SpendCap::new(10, false))), "soft, no limit: everything asked");
    // Another period of the same meter reads the same cap; another tenant reads none.
    let next = QuotaKey::new("capped".into(), "spend".into(), Period::Day, DAY0 + DAY, DAY0 + 2 * DAY);
    let g = s.reserve(&ask(&next, 5, Some(100), 1, 9).capped(CapMode::Stored)).await.unwrap();
    assert_eq!(g.cap, Some(SpendCap::new(10, false)), "one cap for every period");
    let other = day_key("other", "spend");
    assert_eq!(s.reserve(&ask(&other, 5, Some(100), 1, 1).capped(CapMode::Stored)).await.unwrap().cap, None);
    let counters = s.counters(&"capped".into(), &"spend".into()).await.unwrap();
    assert!(counters.iter().all(|c| c.cap == Some(SpendCap::new(10, false))), "the counters show it: {counters:?}");
    // Removed: the call's limit holds again.
    let g = s.reserve(&ask(&next, 500, Some(100), 1, 10).capped(CapMode::Set(None))).await.unwrap();
    assert_eq!((g.granted, g.reserved, g.cap), (95, 100, None), "removed: the call's limit again");
}

/// Many concurrent callers reserving under a tenant's own cap that one of them lowers and
/// another raises meanwhile: the total reserved never passes the highest cap in force, and
/// after the last change every grant is held to it.
pub async fn concurrent_reserves_never_pass_a_tenants_own_cap<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::{CapMode, SpendCap};
    const TASKS: u64 = 16;
    const CALLS: u64 = 40;
    let key = day_key("crowd", "spend");
    // The plan's limit (the call's) is far above the tenant's cap of 300.
    let set = |limit, seq| ask(&key, 0, Some(100_000), 999, seq).capped(CapMode::Set(Some(SpendCap::new(limit, true))));
    h.s().reserve(&set(300, 1)).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = h.shared();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for seq in 1..=CALLS {
                let r = ask(&key, 1 + (seq + task) % 5, Some(100_000), 1000 + task, seq).capped(CapMode::Stored);
                let g = store.reserve(&r).await.unwrap();
                if g.granted > 0 {
                    out.push(g);
                }
            }
            out
        }));
    }
    let mut grants = Vec::new();
    for t in tasks {
        grants.extend(t.await.unwrap());
    }
    let total = reserved(h.s(), &key).await;
    assert_eq!(total, 300, "the cap is reached exactly and never passed");
    assert_tiles(&mut grants, total, "under a tenant's cap");
    assert!(grants.iter().all(|g| g.cap == Some(SpendCap::new(300, true))));
    // Raised by 50: exactly 50 more go out.
    h.s().reserve(&set(350, 2)).await.unwrap();
    let g = h.s().reserve(&ask(&key, 1_000, Some(100_000), 5000, 1).capped(CapMode::Stored)).await.unwrap();
    assert_eq!((g.granted, g.reserved), (50, 350));
}

/// A call re-sent after its sender was forgotten (a node that held an unanswered call while
/// its tenant went idle, then 64 other senders called) is not applied again: a counter keeps
/// the latest last-call time of the senders it forgot, and a call from a sender it does not
/// remember that is no later is answered as an older call. A new sender's first call, later
/// than that, is applied.
pub async fn a_retry_after_its_sender_was_forgotten_is_not_applied_again<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::contract::{FORGOTTEN_SLACK_SECS, SENDERS_KEPT, SENDER_QUIET_SECS};
    let key = day_key("gone", "requests");
    let at = DAY0 + 60;
    let call = |node: u64, seq: u64, units: u64, at: i64| {
        Reservation::new(key.clone(), units, 0, Some(1000), ReserveToken::new(node, seq).at(at))
    };
    let mine = call(7, 1, 10, at);
    assert_eq!(h.s().reserve(&mine).await.unwrap().reserved, 10);
    let later = at + SENDER_QUIET_SECS + 60;
    for node in 0..SENDERS_KEPT as u64 {
        h.s().reserve(&call(1000 + node, 1, 1, later)).await.unwrap();
    }
    h.restart().await;
    let again = h.s().reserve(&mine).await.unwrap();
    assert_eq!((again.granted, again.reserved), (0, 74), "not applied again: {again:?}");
    // Its next call, dated within the rule's slack after the last sender forgotten (a store on
    // its own clock moves a call sent again a second or two): taken for an older call too.
    let within = h.s().reserve(&call(7, 2, 10, at + FORGOTTEN_SLACK_SECS)).await.unwrap();
    assert_eq!((within.granted, within.reserved), (0, 74), "within the slack: {within:?}");
    let first = h.s().reserve(&call(8, 1, 10, later + 1)).await.unwrap();
    assert_eq!((first.granted, first.reserved), (10, 84), "a new sender's call is applied: {first:?}");
}

/// A re-sent quota call is applied once however many senders a counter has seen: senders are
/// forgotten by the time of their last call, never by sequence number (each node numbers its
/// own), and never one within the quiet window. The review's case: 64 busy senders, then a
/// new one's call sent twice.
pub async fn a_resent_call_is_applied_once_among_many_senders<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::contract::{SENDERS_KEPT, SENDER_QUIET_SECS};
    let key = day_key("busy", "requests");
    let at = DAY0 + 60;
    let call = |node: u64, seq: u64, at: i64| {
        Reservation::new(key.clone(), 1, 0, Some(1000), ReserveToken::new(node, seq).at(at))
    };
    for node in 0..SENDERS_KEPT as u64 {
        h.s().reserve(&call(1000 + node, 1_000_000, at)).await.unwrap();
    }
    // A new, quiet node: its sequence numbers are low.
    let mine = Reservation::new(key.clone(), 10, 0, Some(1000), ReserveToken::new(7, 1).at(at));
    assert_eq!(h.s().reserve(&mine).await.unwrap().reserved, 74);
    for node in 0..SENDERS_KEPT as u64 {
        h.s().reserve(&call(1000 + node, 1_000_001, at + 1)).await.unwrap();
    }
    let again = h.s().reserve(&mine).await.unwrap();
    assert_eq!((again.granted, again.reserved), (10, 74), "answered again, not applied: {again:?}");
    // Far later, the old senders are forgotten and the counter stays bounded; the
    // newest are remembered.
    let later = at + SENDER_QUIET_SECS * 2;
    for node in 0..SENDERS_KEPT as u64 {
        h.s().reserve(&call(5000 + node, 1, later)).await.unwrap();
    }
    let fresh = Reservation::new(key.clone(), 1, 0, Some(1000), ReserveToken::new(5000, 1).at(later));
    let answered = h.s().reserve(&fresh).await.unwrap();
    assert_eq!((answered.granted, answered.reserved), (1, 74 + 64 + 1), "the same call answered again");
}

/// A call that keeps a reservation, made by sender `node` with `seq` at `at`.
pub(super) fn keeping(
    key: &QuotaKey,
    units: u64,
    node: u64,
    seq: u64,
    at: i64,
    kept: Kept,
    expires_at: i64,
) -> Reservation {
    Reservation::new(key.clone(), units, 0, None, ReserveToken::new(node, seq).at(at)).keeping(kept, expires_at)
}

/// A report of what sender `node` keeps (a release of none), at `at`.
pub(super) fn report(key: &QuotaKey, node: u64, seq: u64, at: i64, kept: Kept, expires_at: i64) -> Release {
    Release::new(key.clone(), 0, ReserveToken::new(node, seq).at(at)).keeping(kept, expires_at)
}

/// The counter of `key` as `counters` reads it.
async fn counter_of<S: ?Sized + QuotaInspect>(s: &S, key: &QuotaKey) -> crate::store::QuotaCounter {
    let all = s.counters(&key.tenant, &key.meter).await.unwrap();
    all.into_iter().find(|c| c.key == *key).expect("the counter exists")
}

/// What each sender keeps of a counter (its lease with its grants, its holds, its jobs) is
/// reserved and not used: every answer, and the counters read, tell the units used apart.
pub async fn what_senders_keep_is_reserved_not_used<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    let key = day_key("keeps", "requests");
    let at = DAY0 + 60;
    // A leases 10 and keeps them: none used.
    let a = h.s().reserve(&keeping(&key, 10, 1, 1, at, Kept::default(), at + 1800)).await.unwrap();
    assert_eq!((a.granted, a.reserved, a.used, a.expired), (10, 10, 0, false));
    // It used 4: it keeps 5 in its lease and 1 in a hold.
    h.s().release_one(report(&key, 1, 2, at + 1, Kept::new(5, 1, 0), at + 1801)).await.unwrap();
    // B leases 5 keeping 2 of a job's reservation besides.
    let b = h.s().reserve(&keeping(&key, 5, 2, 1, at + 2, Kept::new(0, 0, 2), at + 1802)).await.unwrap();
    assert_eq!((b.reserved, b.used), (15, 15 - 6 - 7), "used: 15 reserved, less A's 6 and B's 5 + 2");
    let c = counter_of(h.s(), &key).await;
    assert_eq!((c.reserved, c.kept, c.used()), (15, Kept::new(10, 1, 2), 2));
    // A caller that keeps nothing (it says no expiry) counts its grant used: as before.
    let d = h.s().reserve(&keeping(&key, 3, 3, 1, at + 3, Kept::default(), 0)).await.unwrap();
    assert_eq!((d.reserved, d.used), (18, 5));
    // What a grant's waiting request takes of it at once is used, not kept: C leases 4, 3 of
    // them taken at once (it keeps 1).
    let e = h.s().reserve(&keeping(&key, 4, 4, 1, at + 4, Kept::default(), at + 1804).taking(3)).await.unwrap();
    assert_eq!((e.granted, e.reserved, e.used), (4, 22, 5 + 3));
    let c = counter_of(h.s(), &key).await;
    assert_eq!((c.kept, c.used()), (Kept::new(11, 1, 2), 8));
}

/// A sender's reservation past its expiry gives back its lease and its holds at the counter's
/// next call by another sender (once), its jobs' reservations staying spent; a sender that
/// calls after its own expired owes again what it used since its last call, drops the rest,
/// and is told so.
pub async fn an_expired_reservation_gives_back_its_lease_and_holds_once<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    let key = day_key("expires", "requests");
    let at = DAY0 + 60;
    h.s().reserve(&keeping(&key, 10, 1, 1, at, Kept::default(), at + 100)).await.unwrap();
    // A keeps 5 in its lease, 3 in holds and 1 in a job's reservation; it used 1.
    h.s().release_one(report(&key, 1, 2, at + 1, Kept::new(5, 3, 1), at + 100)).await.unwrap();
    // Before A's expiry, B's call changes nothing of A's.
    let b = h.s().reserve(&keeping(&key, 1, 2, 1, at + 50, Kept::default(), at + 500)).await.unwrap();
    assert_eq!(b.reserved, 11);
    // Past it, B's next call gives A's lease and holds back: 8.
    let b = h.s().reserve(&keeping(&key, 1, 2, 2, at + 101, Kept::new(1, 0, 0), at + 501)).await.unwrap();
    assert_eq!((b.reserved, b.used), (11 + 1 - 8, 4 - 2), "A's 8 back; used: A's 1 and its job's 1");
    assert_eq!(reserved(h.s(), &key).await, 4);
    // Once: B again, nothing more.
    let b = h.s().reserve(&keeping(&key, 1, 2, 3, at + 102, Kept::new(2, 0, 0), at + 502)).await.unwrap();
    assert_eq!(b.reserved, 5);
    // A, cut off meanwhile, spent 2 more of its lease (it keeps 3 and its holds' 3): owed
    // again; it drops what it keeps, and leases 2 anew.
    let a = h.s().reserve(&keeping(&key, 2, 1, 3, at + 110, Kept::new(3, 3, 1), at + 210)).await.unwrap();
    assert!(a.expired, "A is told its reservation expired");
    assert_eq!(a.reserved, 5 + 2 + 2, "its 2 used since owed again, and its new 2");
    let c = counter_of(h.s(), &key).await;
    assert_eq!(c.kept, Kept::new(3 + 2, 0, 1), "B's lease 3, A's new 2; A's job's 1");
    // Its next call is a live one again.
    let a = h.s().reserve(&keeping(&key, 1, 1, 4, at + 111, Kept::new(2, 0, 1), at + 211)).await.unwrap();
    assert!(!a.expired);
}

/// A sender whose reservation expired is told so by the first call whose answer it reads,
/// whatever came before: a release sent first (its answer says nothing) gives nothing back
/// (its units went back at the expiry) and owes what the sender used since, and the sender's
/// next call is answered expired; a call sent again after a lost answer is answered as it
/// was, expired included (issue 52).
pub async fn an_expired_sender_is_told_by_its_next_answered_call<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    let key = day_key("told", "requests");
    let at = DAY0 + 60;
    h.s().reserve(&keeping(&key, 10, 1, 1, at, Kept::default(), at + 100)).await.unwrap();
    // A keeps 5 in its lease, 3 in holds and 1 in a job's reservation; it used 1.
    h.s().release_one(report(&key, 1, 2, at + 1, Kept::new(5, 3, 1), at + 100)).await.unwrap();
    // Past A's expiry, B's call gives A's lease and holds back: 8.
    let b = h.s().reserve(&keeping(&key, 1, 2, 1, at + 101, Kept::default(), at + 501)).await.unwrap();
    assert_eq!(b.reserved, 11 - 8);
    // A, cut off meanwhile, used 2 of its lease, and now gives back 1 of the 3 left: nothing
    // goes back (it went back at the expiry), its 2 used are owed again.
    let release =
        Release::new(key.clone(), 1, ReserveToken::new(1, 3).at(at + 110)).keeping(Kept::new(2, 3, 1), at + 210);
    h.s().release_one(release.clone()).await.unwrap();
    assert_eq!(reserved(h.s(), &key).await, 3 + 2, "nothing given back twice; the 2 used owed again");
    // Its next call is told, and owes nothing more.
    let a = h.s().reserve(&keeping(&key, 2, 1, 4, at + 111, Kept::new(2, 3, 1), at + 211)).await.unwrap();
    assert!(a.expired, "A is told its reservation expired: {a:?}");
    assert_eq!(a.reserved, 5 + 2, "its new 2 only");
    // Sent again (its answer lost), it is answered the same.
    let again = h.s().reserve(&keeping(&key, 2, 1, 4, at + 111, Kept::new(2, 3, 1), at + 211)).await.unwrap();
    assert!(again.expired, "the answer again says expired: {again:?}");
    assert_eq!(reserved(h.s(), &key).await, 7, "not applied again");
    // The release sent again changes nothing either.
    h.s().release_one(release).await.unwrap();
    assert_eq!(reserved(h.s(), &key).await, 7);
    let a = h.s().reserve(&keeping(&key, 1, 1, 5, at + 112, Kept::new(2, 0, 1), at + 212)).await.unwrap();
    assert!(!a.expired, "live again");
}

/// A sender keeping only jobs' reservations (a hold still open when its lease went back) is
/// remembered while 64 other senders call: its late release gives its units back (a sender
/// forgotten would keep nothing).
pub async fn a_sender_keeping_jobs_is_remembered_for_its_late_releases<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::contract::{SENDERS_KEPT, SENDER_QUIET_SECS};
    let key = day_key("late", "requests");
    let at = DAY0 + 60;
    h.s().reserve(&keeping(&key, 10, 1, 1, at, Kept::default(), at + 100_000)).await.unwrap();
    // Its lease goes back (6), a hold of 4 still open: kept as a job's.
    let back = Release::new(key.clone(), 6, ReserveToken::new(1, 2).at(at + 1)).keeping(Kept::new(0, 0, 4), 0);
    h.s().release_one(back).await.unwrap();
    let later = at + SENDER_QUIET_SECS + 60;
    for node in 0..SENDERS_KEPT as u64 {
        h.s().reserve(&keeping(&key, 1, 1000 + node, 1, later, Kept::default(), 0)).await.unwrap();
    }
    assert_eq!(reserved(h.s(), &key).await, 4 + 64);
    // The hold settles, using none of its 4: they come back.
    let late = Release::new(key.clone(), 4, ReserveToken::new(1, 3).at(later + 1)).keeping(Kept::default(), 0);
    h.s().release_one(late).await.unwrap();
    assert_eq!(reserved(h.s(), &key).await, 64, "the late release gave its units back");
}

/// Each sender's reservation expires in its turn, whether or not an earlier one was told:
/// A expires (and is not heard from again), then B does.
pub async fn reservations_expire_one_after_another<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    let key = day_key("in-turn", "requests");
    let at = DAY0 + 60;
    h.s().reserve(&keeping(&key, 10, 1, 1, at, Kept::default(), at + 100)).await.unwrap();
    h.s().reserve(&keeping(&key, 20, 2, 1, at, Kept::default(), at + 200)).await.unwrap();
    h.s().reserve(&keeping(&key, 1, 3, 1, at + 101, Kept::default(), at + 1000)).await.unwrap();
    assert_eq!(reserved(h.s(), &key).await, 31 - 10, "A's lease back");
    h.s().reserve(&keeping(&key, 1, 3, 2, at + 201, Kept::new(1, 0, 0), at + 1000)).await.unwrap();
    assert_eq!(reserved(h.s(), &key).await, 22 - 20, "then B's");
}

/// A sender the counter no longer remembers keeps nothing of it: a counter forgets a sender
/// only once its reservation is no longer live (expired, or empty), so a call that says it
/// keeps leased or held units, from a sender forgotten, is answered expired, and a release
/// from one gives nothing back (issue 52: a node or Lambda environment back after its
/// expiry and 64 other senders).
pub async fn a_forgotten_sender_keeps_nothing<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::contract::{SENDERS_KEPT, SENDER_QUIET_SECS};
    let key = day_key("forgotten", "requests");
    let at = DAY0 + 60;
    h.s().reserve(&keeping(&key, 10, 1, 1, at, Kept::default(), at + 100)).await.unwrap();
    h.s().release_one(report(&key, 1, 2, at + 1, Kept::new(8, 0, 0), at + 100)).await.unwrap();
    // Far past A's expiry, 64 other senders: A's 8 go back, and A is forgotten.
    let later = at + 100 + SENDER_QUIET_SECS + 60;
    for node in 0..SENDERS_KEPT as u64 {
        h.s().reserve(&keeping(&key, 1, 1000 + node, 1, later, Kept::default(), 0)).await.unwrap();
    }
    assert_eq!(reserved(h.s(), &key).await, 10 - 8 + 64);
    // A comes back: a release of 3 of its 8 gives nothing back.
    h.s()
        .release_one(
            Release::new(key.clone(), 3, ReserveToken::new(1, 3).at(later + 1))
                .keeping(Kept::new(5, 0, 0), later + 100),
        )
        .await
        .unwrap();
    assert_eq!(reserved(h.s(), &key).await, 66, "nothing given back twice");
    // Its next call is told to drop what it keeps.
    let a = h.s().reserve(&keeping(&key, 1, 1, 4, later + 2, Kept::new(5, 0, 0), later + 100)).await.unwrap();
    assert!(a.expired, "A is told it keeps nothing: {a:?}");
    assert_eq!(a.reserved, 67);
    // A sender never seen before, keeping nothing, is a new one.
    let c = h.s().reserve(&keeping(&key, 1, 9, 1, later + 3, Kept::default(), later + 100)).await.unwrap();
    assert!(!c.expired);
}

/// A batch of releases applies each, once per token: one already applied (a retry) changes
/// nothing, the others go through.
pub async fn a_batch_of_releases_applies_each_once<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    let keys: Vec<QuotaKey> = (0..5).map(|i| day_key(&format!("batch-{i}"), "requests")).collect();
    for k in &keys {
        h.s().reserve(&ask(k, 10, None, 7, 1)).await.unwrap();
    }
    h.s().release_units(&keys[0], 4, ReserveToken::new(7, 2)).await.unwrap();
    let batch: Vec<Release> = keys.iter().map(|k| Release::new(k.clone(), 4, ReserveToken::new(7, 2))).collect();
    let results = h.s().release(&batch).await;
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for k in &keys {
        assert_eq!(reserved(h.s(), k).await, 6, "{k:?} released once");
    }
    // A batch that a store applies together on the whole fails one item's condition (a
    // counter that does not exist, a counter twice): the others still return, and those go
    // alone after.
    let missing = day_key("batch-missing", "requests");
    let batch = vec![
        Release::new(keys[1].clone(), 1, ReserveToken::new(7, 3)),
        Release::new(missing.clone(), 4, ReserveToken::new(7, 3)),
        Release::new(keys[2].clone(), 1, ReserveToken::new(7, 3)),
        Release::new(keys[1].clone(), 2, ReserveToken::new(7, 4)),
    ];
    let results = h.s().release(&batch).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(reserved(h.s(), &keys[1]).await, 6 - 1 - 2, "both releases of one counter");
    assert_eq!(reserved(h.s(), &keys[2]).await, 6 - 1);
    assert_eq!(reserved(h.s(), &missing).await, 0, "never below zero");
    assert_eq!(reserved(h.s(), &keys[3]).await, 6, "untouched");
}
