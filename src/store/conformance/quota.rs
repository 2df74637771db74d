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

fn prepaid_key(tenant: &str, meter: &str) -> QuotaKey {
    let (start, end) = Period::Prepaid.bounds(0);
    QuotaKey::new(tenant.into(), meter.into(), Period::Prepaid, start, end)
}

fn credit(tenant: &str, id: &str, units: u64, expires_at: Option<i64>) -> crate::store::CreditGrant {
    crate::store::CreditGrant::new(tenant.into(), "tokens".into(), id, units, DAY0).expiring(expires_at)
}

async fn balance<S: ?Sized + QuotaInspect>(s: &S, tenant: &str) -> crate::store::CreditBalance {
    let (_, balances) = s.credit_grants(&tenant.into(), Some(&"tokens".into())).await.unwrap();
    balances.first().map_or_else(Default::default, |(_, b)| *b)
}

/// Grants apply once per id; a prepaid counter is held to its open grants whatever limit a
/// call names, answers that limit, goes below zero only through owed units, and the next
/// grant pays that debt first. Grants of another tenant or meter are apart.
pub async fn credit_grants_apply_once_and_bound_a_prepaid_balance<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::{CreditBalance, GrantOutcome};
    let key = prepaid_key("p", "tokens");
    // Nothing granted: nothing leased.
    let none = h.s().reserve(&ask(&key, 5, None, 1, 1)).await.unwrap();
    assert_eq!((none.granted, none.limit), (0, Some(0)), "{none:?}");
    let g1 = credit("p", "inv_1", 100, Some(DAY0 + DAY));
    assert_eq!(h.s().grant_credits(&g1).await.unwrap(), GrantOutcome::Granted(CreditBalance::new(100, 0)));
    assert_eq!(
        h.s().grant_credits(&credit("p", "pi_2", 50, None)).await.unwrap(),
        GrantOutcome::Granted(CreditBalance::new(150, 0))
    );
    h.restart().await;
    // Sent again (a webhook redelivered): nothing added, the grant as stored.
    match h.s().grant_credits(&credit("p", "inv_1", 999, None)).await.unwrap() {
        GrantOutcome::Duplicate(g) => assert_eq!((g.units, g.expires_at), (100, Some(DAY0 + DAY))),
        other => panic!("{other:?}"),
    }
    // Another tenant's and another meter's grants are apart.
    h.s().grant_credits(&credit("q", "inv_1", 7, None)).await.unwrap();
    let other_meter = crate::store::CreditGrant::new("p".into(), "requests".into(), "inv_1", 9, DAY0);
    assert!(matches!(h.s().grant_credits(&other_meter).await.unwrap(), GrantOutcome::Granted(_)));
    // A limit the caller names is not the prepaid one.
    let a = h.s().reserve(&ask(&key, 60, Some(10_000), 1, 2)).await.unwrap();
    assert_eq!((a.granted, a.reserved, a.limit), (60, 60, Some(150)));
    let b = h.s().reserve(&ask(&key, 200, None, 2, 1)).await.unwrap();
    assert_eq!((b.granted, b.reserved), (90, 150), "held to the balance: {b:?}");
    assert_eq!(h.s().reserve(&ask(&key, 1, None, 2, 2)).await.unwrap().granted, 0, "spent");
    // Owed units (work done) take it below zero.
    let owed = Reservation::new(key.clone(), 0, 10, None, ReserveToken::new(3, 1));
    assert_eq!(h.s().reserve(&owed).await.unwrap().reserved, 160);
    assert_eq!(balance(h.s(), "p").await.left(), -10);
    // A release gives units back to the balance.
    h.s().release(&key, 20, ReserveToken::new(1, 3)).await.unwrap();
    assert_eq!(balance(h.s(), "p").await, CreditBalance::new(150, 140));
    // The next grant pays the debt first: 30 granted, 40 left after the 140 used of 180.
    let paid = h.s().grant_credits(&credit("p", "inv_3", 30, None)).await.unwrap();
    assert_eq!(paid, GrantOutcome::Granted(CreditBalance::new(180, 140)));
    let c = h.s().reserve(&ask(&key, 100, None, 2, 3)).await.unwrap();
    assert_eq!((c.granted, c.limit), (40, Some(180)));
    let (grants, balances) = h.s().credit_grants(&"p".into(), None).await.unwrap();
    let ids: Vec<(&str, &str)> = grants.iter().map(|g| (g.meter.as_str(), g.id.as_str())).collect();
    assert_eq!(ids, [("requests", "inv_1"), ("tokens", "inv_1"), ("tokens", "inv_3"), ("tokens", "pi_2")]);
    assert_eq!(balances.len(), 2, "{balances:?}");
    assert_eq!(balance(h.s(), "q").await, CreditBalance::new(7, 0));
}

/// An expired grant closes once, by the worker's call at or after its expiry: it loses what it
/// still holds (units leased count as spent), listed as closed and still known by its id.
pub async fn an_expired_grant_closes_once_losing_what_it_still_holds<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{CreditBalance, GrantOutcome};
    let key = prepaid_key("e", "tokens");
    let at = DAY0 + DAY;
    h.s().grant_credits(&credit("e", "g1", 100, Some(at))).await.unwrap();
    h.s().grant_credits(&credit("e", "g2", 50, None)).await.unwrap();
    h.s().grant_credits(&credit("other", "g1", 10, Some(at + HOUR))).await.unwrap();
    assert_eq!(h.s().reserve(&ask(&key, 30, None, 1, 1)).await.unwrap().granted, 30);
    let (t, m) = (&"e".into(), &"tokens".into());
    assert_eq!(h.s().close_credits(t, m, "g1", false, at - 1).await.unwrap(), None, "not expired yet");
    assert!(h.s().expired_credits(at - 1, 10).await.unwrap().is_empty());
    let due = h.s().expired_credits(at, 10).await.unwrap();
    assert_eq!(due.iter().map(|g| (g.tenant.as_str(), g.id.as_str())).collect::<Vec<_>>(), [("e", "g1")]);
    let closed = h.s().close_credits(t, m, "g1", false, at + 5).await.unwrap().unwrap();
    assert_eq!((closed.at, closed.revoked, closed.lost), (at + 5, false, 70));
    assert_eq!(h.s().close_credits(t, m, "g1", false, at + 6).await.unwrap(), None, "once");
    assert_eq!(h.s().close_credits(t, m, "g1", true, at + 6).await.unwrap(), None, "closed is closed");
    h.restart().await;
    assert_eq!(balance(h.s(), "e").await, CreditBalance::new(50, 0), "the 30 used were g1's");
    assert!(h.s().expired_credits(at + HOUR - 1, 10).await.unwrap().is_empty());
    let (grants, _) = h.s().credit_grants(t, Some(m)).await.unwrap();
    let g1 = grants.iter().find(|g| g.id == "g1").unwrap();
    assert_eq!(g1.closed, Some(closed));
    assert!(matches!(h.s().grant_credits(&credit("e", "g1", 5, None)).await.unwrap(), GrantOutcome::Duplicate(_)));
    assert_eq!(h.s().close_credits(t, m, "nope", true, at).await.unwrap(), None);
    assert_eq!(h.s().reserve(&ask(&key, 80, None, 1, 2)).await.unwrap().granted, 50);
}

/// Units used are taken from the soonest-to-expire grants first: revoking a later grant
/// takes only what it still holds.
pub async fn grants_are_spent_soonest_to_expire_first<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::CreditBalance;
    let key = prepaid_key("s", "tokens");
    h.s().grant_credits(&credit("s", "never", 100, None)).await.unwrap();
    h.s().grant_credits(&credit("s", "late", 100, Some(DAY0 + 2 * DAY))).await.unwrap();
    h.s().grant_credits(&credit("s", "soon", 100, Some(DAY0 + DAY))).await.unwrap();
    assert_eq!(h.s().reserve(&ask(&key, 150, None, 1, 1)).await.unwrap().granted, 150);
    let (t, m) = (&"s".into(), &"tokens".into());
    // soon: 100 spent; late: 50 spent, 50 held; never: 100 held.
    let late = h.s().close_credits(t, m, "late", true, DAY0).await.unwrap().unwrap();
    assert_eq!((late.revoked, late.lost), (true, 50));
    assert_eq!(balance(h.s(), "s").await, CreditBalance::new(200, 100));
    let never = h.s().close_credits(t, m, "never", true, DAY0).await.unwrap().unwrap();
    assert_eq!(never.lost, 100);
    assert_eq!(balance(h.s(), "s").await, CreditBalance::new(100, 100));
    assert_eq!(h.s().reserve(&ask(&key, 1, None, 1, 2)).await.unwrap().granted, 0);
    let (grants, _) = h.s().credit_grants(t, Some(m)).await.unwrap();
    let order: Vec<&str> = grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(order, ["soon", "late", "never"], "listed in spending order");
}

/// A refund takes back its share of what the grant still holds, once per refunded amount:
/// half a payment refunded takes half of what is left of its grant, a redelivery nothing, the
/// rest of the payment all of it; the units used stay used.
pub async fn a_refund_takes_back_its_share_of_what_a_grant_still_holds_once<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{CreditBalance, CreditRefund};
    let key = prepaid_key("r", "tokens");
    let (t, m) = (&"r".into(), &"tokens".into());
    h.s().grant_credits(&credit("r", "soon", 40, Some(DAY0 + DAY))).await.unwrap();
    h.s().grant_credits(&credit("r", "pi_1", 100, None).paid_by("pi_1")).await.unwrap();
    // 60 used: soon's 40, then 20 of pi_1's (80 held).
    assert_eq!(h.s().reserve(&ask(&key, 60, None, 1, 1)).await.unwrap().granted, 60);
    assert_eq!(h.s().refund_credits(t, m, "nope", CreditRefund::new(500, 1000)).await.unwrap(), None);
    // Half of a 1,000 payment refunded: half of the 80 held.
    assert_eq!(h.s().refund_credits(t, m, "pi_1", CreditRefund::new(500, 1000)).await.unwrap(), Some(40));
    assert_eq!(h.s().refund_credits(t, m, "pi_1", CreditRefund::new(500, 1000)).await.unwrap(), None, "once");
    assert_eq!(h.s().refund_credits(t, m, "pi_1", CreditRefund::new(400, 1000)).await.unwrap(), None, "older");
    h.restart().await;
    assert_eq!(balance(h.s(), "r").await, CreditBalance::new(100, 60));
    let (grants, _) = h.s().credit_grants(t, Some(m)).await.unwrap();
    let g = grants.iter().find(|g| g.id == "pi_1").unwrap();
    assert_eq!((g.units, g.refunded, g.payment.as_deref()), (60, 500, Some("pi_1")));
    // 250 more of the 500 left: half of the 40 it still holds.
    assert_eq!(h.s().refund_credits(t, m, "pi_1", CreditRefund::new(750, 1000)).await.unwrap(), Some(20));
    assert_eq!(h.s().reserve(&ask(&key, 30, None, 1, 2)).await.unwrap().granted, 20, "20 left to spend");
    // The rest refunded while all of it is spent: nothing to take back, and recorded.
    assert_eq!(h.s().refund_credits(t, m, "pi_1", CreditRefund::new(1000, 1000)).await.unwrap(), Some(0));
    assert_eq!(balance(h.s(), "r").await, CreditBalance::new(80, 80));
    // A closed grant is not refunded.
    h.s().close_credits(t, m, "pi_1", true, DAY0).await.unwrap();
    assert_eq!(h.s().refund_credits(t, m, "pi_1", CreditRefund::new(2000, 2000)).await.unwrap(), None);
}

/// Many callers spend one prepaid balance at once while a grant lands among them: every unit
/// of the grants is leased once, none past them.
pub async fn concurrent_reserves_never_pass_a_prepaid_balance<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    const TASKS: u64 = 12;
    const CALLS: u64 = 30;
    let key = prepaid_key("crowd", "tokens");
    h.s().grant_credits(&credit("crowd", "first", 300, None)).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = h.shared();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(task + 7);
            let mut out = Vec::new();
            for seq in 1..=CALLS {
                let g = store.reserve(&ask(&key, 1 + rng.below(6), None, 500 + task, seq)).await.unwrap();
                if g.granted > 0 {
                    out.push(g);
                }
                tokio::task::yield_now().await;
            }
            out
        }));
    }
    tokio::task::yield_now().await;
    h.s().grant_credits(&credit("crowd", "second", 200, Some(DAY0 + DAY))).await.unwrap();
    let mut grants = Vec::new();
    for t in tasks {
        grants.extend(t.await.unwrap());
    }
    let leased: u64 = grants.iter().map(|g| g.granted).sum();
    assert!(leased <= 500, "{leased} leased of 500 granted");
    assert_tiles(&mut grants, leased, "prepaid leases");
    assert!(grants.iter().all(|g| g.limit.is_some_and(|l| g.reserved <= l)), "every grant within the limit it answers");
    // What is left is leased to whoever asks next.
    let rest = h.s().reserve(&ask(&key, 1000, None, 9999, 1)).await.unwrap();
    assert_eq!(leased + rest.granted, 500);
}

/// A balance made on a tenant and meter that also has a day quota ends nothing: the day's
/// counter keeps its count and goes on. A balance never holds more than
/// [`MAX_BALANCE`](crate::store::contract::MAX_BALANCE), nor a grant of no units.
pub async fn a_prepaid_balance_leaves_the_calendar_periods_beside_it<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{contract::MAX_BALANCE, GrantOutcome};
    let day = QuotaKey::new("both".into(), "tokens".into(), Period::Day, DAY0, DAY0 + DAY);
    assert_eq!(h.s().reserve(&ask(&day, 40, Some(100), 1, 1)).await.unwrap().granted, 40);
    assert!(matches!(h.s().grant_credits(&credit("both", "g", 500, None)).await.unwrap(), GrantOutcome::Granted(_)));
    h.restart().await;
    assert_eq!(reserved(h.s(), &day).await, 40, "the day's count is kept");
    let next = h.s().reserve(&ask(&day, 100, Some(100), 1, 2)).await.unwrap();
    assert_eq!((next.granted, next.reserved), (60, 100), "the day goes on to its limit");
    assert_eq!(h.s().reserve(&ask(&prepaid_key("both", "tokens"), 10, None, 1, 3)).await.unwrap().granted, 10);
    // The most a balance holds, and no empty grant.
    let big = credit("big", "all", MAX_BALANCE, None);
    assert!(matches!(h.s().grant_credits(&big).await.unwrap(), GrantOutcome::Granted(_)));
    assert_eq!(h.s().grant_credits(&credit("big", "one", 1, None)).await.unwrap(), GrantOutcome::TooLarge);
    assert_eq!(h.s().grant_credits(&credit("big", "zero", 0, None)).await.unwrap(), GrantOutcome::TooLarge);
    assert_eq!(balance(h.s(), "big").await.granted, MAX_BALANCE);
}

/// Two grants under one id at once: one applies, the other is its duplicate. Two closes of
/// one expired grant at once: one closes it. Expired grants are listed soonest first, at most
/// as many as asked. A prepaid reserve sent again with its token is answered as it was.
pub async fn racing_grants_and_closes_apply_once<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::GrantOutcome;
    let (a, b) = (h.shared(), h.shared());
    let (g70, g90) = (credit("race", "inv", 70, Some(DAY0 + HOUR)), credit("race", "inv", 90, Some(DAY0 + HOUR)));
    let (x, y) = tokio::join!(a.grant_credits(&g70), b.grant_credits(&g90));
    let (x, y) = (x.unwrap(), y.unwrap());
    let granted: Vec<u64> = [&x, &y]
        .iter()
        .filter_map(|o| match o {
            GrantOutcome::Granted(b) => Some(b.granted),
            _ => None,
        })
        .collect();
    assert_eq!(granted.len(), 1, "one applies: {x:?} {y:?}");
    assert!(matches!(x, GrantOutcome::Duplicate(_)) || matches!(y, GrantOutcome::Duplicate(_)), "{x:?} {y:?}");
    assert_eq!(balance(h.s(), "race").await.granted, granted[0]);

    let key = prepaid_key("race", "tokens");
    let first = h.s().reserve(&ask(&key, 20, None, 42, 7)).await.unwrap();
    let again = h.s().reserve(&ask(&key, 20, None, 42, 7)).await.unwrap();
    assert_eq!((again.granted, again.reserved), (first.granted, first.reserved), "answered as it was");
    assert_eq!(again.limit, Some(granted[0]));
    assert_eq!(balance(h.s(), "race").await.reserved, 20, "applied once");

    let (t, m) = (&"race".into(), &"tokens".into());
    let (c, d) = tokio::join!(
        a.close_credits(t, m, "inv", false, DAY0 + 2 * HOUR),
        b.close_credits(t, m, "inv", false, DAY0 + 2 * HOUR)
    );
    let closed: Vec<_> = [c.unwrap(), d.unwrap()].into_iter().flatten().collect();
    assert_eq!(closed.len(), 1, "closed once: {closed:?}");
    assert_eq!(closed[0].lost, granted[0] - 20);

    for (i, at) in [(3, DAY0 + 3 * HOUR), (1, DAY0 + HOUR), (2, DAY0 + 2 * HOUR)] {
        h.s().grant_credits(&credit("due", &format!("g{i}"), 5, Some(at))).await.unwrap();
    }
    let due = h.s().expired_credits(DAY0 + 3 * HOUR, 2).await.unwrap();
    assert_eq!(due.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["g1", "g2"], "soonest first, as many as asked");
}

/// A grant after a balance was spent is spendable at once, by the very next reserve of any
/// sender: the store's answers carry the new limit and the room left, so a node that was told
/// "spent" is told otherwise on its next call (its state clears on such an answer).
pub async fn a_grant_after_an_empty_balance_is_spendable_at_once<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    let key = prepaid_key("topped", "tokens");
    h.s().grant_credits(&credit("topped", "pi_1", 50, None)).await.unwrap();
    let all = h.s().reserve(&ask(&key, 50, None, 1, 1)).await.unwrap();
    assert_eq!((all.granted, all.reserved, all.limit), (50, 50, Some(50)));
    let spent = h.s().reserve(&ask(&key, 1, None, 1, 2).shrinking(1)).await.unwrap();
    assert_eq!((spent.granted, spent.reserved, spent.limit), (0, 50, Some(50)), "spent");
    // Another process (the CLI, a webhook) tops it up.
    h.s().grant_credits(&credit("topped", "pi_2", 300, None)).await.unwrap();
    let next = h.s().reserve(&ask(&key, 1, None, 1, 3).shrinking(1)).await.unwrap();
    assert_eq!((next.granted, next.reserved, next.limit), (1, 51, Some(350)), "{next:?}");
    // And leases grow again from there: an eighth of what is left, asked by another sender.
    let lease = h.s().reserve(&ask(&key, 100, None, 2, 1).shrinking(1)).await.unwrap();
    assert_eq!((lease.granted, lease.limit), ((350 - 51_u64).div_ceil(8), Some(350)), "{lease:?}");
}
