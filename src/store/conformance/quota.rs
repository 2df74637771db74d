//! The quota role: reserve and release, atomic and applied once per token.

use super::*;
use crate::store::{Grant, QuotaInspect};

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
    h.s().release(&k, 7, ReserveToken::new(1, 4)).await.unwrap();
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
pub async fn release_gives_units_back<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
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
pub async fn a_period_two_periods_old_is_dropped_and_stays_dropped<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
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
    h.s().release(&month1, 7, ReserveToken::new(1, 100)).await.unwrap();
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
