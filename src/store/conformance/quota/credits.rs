//! The quota role's prepaid balances: credit grants bound a balance, close at expiry, are spent
//! soonest-to-expire first; refunds, revokes and takes apart are applied once; auto-recharge
//! claims are made once per crossing.

use super::super::*;
use super::counters::{assert_tiles, keeping, report, reserved};
use crate::store::{Kept, QuotaInspect, QuotaStoreExt};

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
    // Another tenant's and another meter's grants are apart (one id is one grant on every
    // meter of a tenant: see `one_payment_grants_once_on_any_meter`).
    h.s().grant_credits(&credit("q", "inv_1", 7, None)).await.unwrap();
    let other_meter = crate::store::CreditGrant::new("p".into(), "requests".into(), "inv_2", 9, DAY0);
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
    h.s().release_units(&key, 20, ReserveToken::new(1, 3)).await.unwrap();
    assert_eq!(balance(h.s(), "p").await, CreditBalance::new(150, 140));
    // The next grant pays the debt first: 30 granted, 40 left after the 140 used of 180.
    let paid = h.s().grant_credits(&credit("p", "inv_3", 30, None)).await.unwrap();
    assert_eq!(paid, GrantOutcome::Granted(CreditBalance::new(180, 140)));
    let c = h.s().reserve(&ask(&key, 100, None, 2, 3)).await.unwrap();
    assert_eq!((c.granted, c.limit), (40, Some(180)));
    let (grants, balances) = h.s().credit_grants(&"p".into(), None).await.unwrap();
    let ids: Vec<(&str, &str)> = grants.iter().map(|g| (g.meter.as_str(), g.id.as_str())).collect();
    assert_eq!(ids, [("requests", "inv_2"), ("tokens", "inv_1"), ("tokens", "inv_3"), ("tokens", "pi_2")]);
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

/// Units used are taken from the soonest-to-expire grants first: each grant that expires loses
/// only what it still holds by that order.
pub async fn grants_are_spent_soonest_to_expire_first<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::CreditBalance;
    let key = prepaid_key("s", "tokens");
    h.s().grant_credits(&credit("s", "never", 100, None)).await.unwrap();
    h.s().grant_credits(&credit("s", "late", 100, Some(DAY0 + 2 * DAY))).await.unwrap();
    h.s().grant_credits(&credit("s", "soon", 100, Some(DAY0 + DAY))).await.unwrap();
    assert_eq!(h.s().reserve(&ask(&key, 150, None, 1, 1)).await.unwrap().granted, 150);
    let (t, m) = (&"s".into(), &"tokens".into());
    // soon: 100 spent; late: 50 spent, 50 held; never: 100 held.
    let soon = h.s().close_credits(t, m, "soon", false, DAY0 + DAY).await.unwrap().unwrap();
    assert_eq!((soon.revoked, soon.lost), (false, 0));
    assert_eq!(balance(h.s(), "s").await, CreditBalance::new(200, 50));
    let late = h.s().close_credits(t, m, "late", false, DAY0 + 2 * DAY).await.unwrap().unwrap();
    assert_eq!(late.lost, 50);
    assert_eq!(balance(h.s(), "s").await, CreditBalance::new(100, 0));
    assert_eq!(h.s().reserve(&ask(&key, 150, None, 1, 2)).await.unwrap().granted, 100);
    let (grants, _) = h.s().credit_grants(t, Some(m)).await.unwrap();
    let order: Vec<&str> = grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(order, ["soon", "late", "never"], "listed in spending order");
}

/// A refund takes back the units the refunded money bought, at the grant's price, once: half
/// the money half the units bought, first from what the grant still holds; a redelivery, or an
/// older refund delivered late, nothing; the rest of the money the rest of the units, those
/// counted used leaving the balance with the grant (forgiven: a release of them later does not
/// bring them back). A 1-cent refund of a 10-unit-per-dollar pack takes nothing.
pub async fn a_refund_takes_back_what_the_refunded_money_bought_once<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{CreditBalance, CreditRefund, RefundOutcome};
    let key = prepaid_key("r", "tokens");
    let at = DAY0 + 60;
    let refund = |refunded: u64| CreditRefund::new("pi_1", refunded, 1000, at);
    h.s().grant_credits(&credit("r", "soon", 40, Some(DAY0 + DAY))).await.unwrap();
    h.s().grant_credits(&credit("r", "pi_1", 100, None).paid_by("pi_1").costing(1000)).await.unwrap();
    // 60 used: soon's 40, then 20 of pi_1's (80 held).
    let lease = Reservation::new(key.clone(), 60, 0, None, ReserveToken::new(1, 1).at(at));
    assert_eq!(h.s().reserve(&lease).await.unwrap().granted, 60);
    // Half the money: 50 of the 100 bought, from the 80 held.
    let taken = RefundOutcome::Taken { tenant: "r".into(), meter: "tokens".into(), grant: "pi_1".into(), units: 50 };
    assert_eq!(h.s().refund_credits(&refund(500)).await.unwrap(), taken);
    assert_eq!(h.s().refund_credits(&refund(500)).await.unwrap(), RefundOutcome::Nothing, "once");
    assert_eq!(h.s().refund_credits(&refund(400)).await.unwrap(), RefundOutcome::Nothing, "older");
    h.restart().await;
    assert_eq!(balance(h.s(), "r").await, CreditBalance::new(90, 60));
    let (grants, _) = h.s().credit_grants(&"r".into(), Some(&"tokens".into())).await.unwrap();
    let g = grants.iter().find(|g| g.id == "pi_1").unwrap();
    assert_eq!((g.units, g.bought, g.taken, g.paid, g.payment.as_deref()), (50, 100, 50, Some(1000), Some("pi_1")));
    // The rest: 50 more, 30 held and 20 counted used, which leave with it.
    let rest = h.s().refund_credits(&refund(1000)).await.unwrap();
    assert!(matches!(rest, RefundOutcome::Taken { units: 30, .. }), "{rest:?}");
    assert_eq!(balance(h.s(), "r").await, CreditBalance::new(40, 40));
    // The node gives back 20 it had leased and not used: they were pi_1's, refunded.
    h.s().release_units(&key, 20, ReserveToken::new(1, 2).at(at + 60)).await.unwrap();
    assert_eq!(balance(h.s(), "r").await, CreditBalance::new(40, 40), "a refunded grant's lease does not come back");
    // A closed grant takes nothing; a payment no grant has is kept.
    h.s().close_credits(&"r".into(), &"tokens".into(), "pi_1", true, at).await.unwrap();
    assert_eq!(h.s().refund_credits(&refund(1000).naming_units(10)).await.unwrap(), RefundOutcome::Nothing);
    // A cent of a dollar's 10 units takes nothing; the dollar, all 10.
    h.s().grant_credits(&credit("r", "pi_2", 10, None).paid_by("pi_2").costing(100)).await.unwrap();
    assert_eq!(h.s().refund_credits(&CreditRefund::new("pi_2", 1, 100, at)).await.unwrap(), RefundOutcome::Nothing);
    let all = h.s().refund_credits(&CreditRefund::new("pi_2", 100, 100, at)).await.unwrap();
    assert!(matches!(all, RefundOutcome::Taken { units: 10, .. }), "{all:?}");
}

/// A refund or a revoke takes first from what the balance still holds (its granted units less
/// those used or leased), and only the rest from the units counted used, so the answer does not
/// depend on which of two identical packs it names: packs A (expiring first, so spent first)
/// and B of 1,000 each with 1,000 used, either refunded in full, leave 0 with 1,000 taken; so
/// does a revoke of either. The same units are never taken twice: after either's refund, the
/// other's expiry or revoke takes nothing more (its units were the ones used).
pub async fn a_refund_or_revoke_takes_what_the_balance_still_holds_first<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{CreditBalance, CreditRefund, RefundOutcome};
    let at = DAY0 + 60;
    let ends = DAY0 + DAY;
    let packs = |tenant: &str, a: &str, b: &str| {
        let a = credit(tenant, a, 1000, Some(ends)).paid_by(a).costing(1000);
        let b = credit(tenant, b, 1000, Some(ends + DAY)).paid_by(b).costing(1000);
        (a, b)
    };
    let taken = |o: RefundOutcome| match o {
        RefundOutcome::Taken { units, .. } => units,
        other => panic!("{other:?}"),
    };
    // (refunded, then closed, by a revoke or else by its expiry)
    let cases = [("pi_a", "pi_b", false), ("pi_a", "pi_b", true), ("pi_b", "pi_a", true), ("pi_b", "pi_a", false)];
    for (n, (refunded, other, revoke)) in cases.into_iter().enumerate() {
        let t = format!("two{n}");
        let key = prepaid_key(&t, "tokens");
        let (a, b) = packs(&t, &format!("{t}_pi_a"), &format!("{t}_pi_b"));
        h.s().grant_credits(&a).await.unwrap();
        h.s().grant_credits(&b).await.unwrap();
        let used = Reservation::new(key.clone(), 1000, 0, None, ReserveToken::new(1, 1).at(at));
        assert_eq!(h.s().reserve(&used).await.unwrap().granted, 1000);
        let (refunded, other) = (format!("{t}_{refunded}"), format!("{t}_{other}"));
        let full = CreditRefund::new(&refunded, 1000, 1000, at);
        assert_eq!(taken(h.s().refund_credits(&full).await.unwrap()), 1000, "refunding {refunded}");
        assert_eq!(balance(h.s(), &t).await.left(), 0, "refunding {refunded} leaves nothing");
        assert_eq!(h.s().refund_credits(&full).await.unwrap(), RefundOutcome::Nothing, "once");
        h.restart().await;
        // The other pack's units were the ones used: its close takes nothing more.
        let (tn, m) = (&t.as_str().into(), &"tokens".into());
        let close_at = if revoke { at } else { ends + 3 * DAY };
        let closed = h.s().close_credits(tn, m, &other, revoke, close_at).await.unwrap().unwrap();
        assert_eq!(closed.lost, 0, "{other} after {refunded}: nothing taken twice");
        assert_eq!(balance(h.s(), &t).await.left(), 0);
        let more = Reservation::new(key.clone(), 1, 0, None, ReserveToken::new(2, 1).at(at + 60));
        assert_eq!(h.s().reserve(&more).await.unwrap().granted, 0, "nothing left to spend");
    }
    // A revoke of the older (first spent) pack, as a manual answer to a chargeback.
    let key = prepaid_key("rv", "tokens");
    let (a, b) = packs("rv", "rv_a", "rv_b");
    h.s().grant_credits(&a).await.unwrap();
    h.s().grant_credits(&b).await.unwrap();
    let used = Reservation::new(key.clone(), 1000, 0, None, ReserveToken::new(1, 1).at(at));
    assert_eq!(h.s().reserve(&used).await.unwrap().granted, 1000);
    let (t, m) = (&"rv".into(), &"tokens".into());
    let closed = h.s().close_credits(t, m, "rv_a", true, at).await.unwrap().unwrap();
    assert_eq!(closed.lost, 1000, "the unused 1,000 leave with the revoke");
    assert_eq!(balance(h.s(), "rv").await, CreditBalance::new(1000, 1000));
    // Then B expires: its units were used, it loses nothing.
    let closed = h.s().close_credits(t, m, "rv_b", false, at + 3 * DAY).await.unwrap().unwrap();
    assert_eq!(closed.lost, 0);
    assert_eq!(balance(h.s(), "rv").await, CreditBalance::new(0, 0));
    // Part used, part leased: a refund of one of two packs, 500 used and 700 leased unused by
    // a node (1,200 counted used), takes the 800 unspent and 200 of the counted used, which
    // the node's release of its lease does not bring back.
    let key = prepaid_key("ls", "tokens");
    let (a, b) = packs("ls", "ls_a", "ls_b");
    h.s().grant_credits(&a).await.unwrap();
    h.s().grant_credits(&b).await.unwrap();
    let lease = Reservation::new(key.clone(), 1200, 0, None, ReserveToken::new(1, 1).at(at));
    assert_eq!(h.s().reserve(&lease).await.unwrap().granted, 1200);
    assert_eq!(taken(h.s().refund_credits(&CreditRefund::new("ls_b", 1000, 1000, at)).await.unwrap()), 800);
    assert_eq!(balance(h.s(), "ls").await, CreditBalance::new(1000, 1000));
    h.s().release_units(&key, 700, ReserveToken::new(1, 2).at(at + 60)).await.unwrap();
    assert_eq!(balance(h.s(), "ls").await.left(), 500, "700 unused come back less the 200 taken");
}

/// The worked examples of docs/credits.md, as a store applies them: a refund of the other
/// lines of a mixed payment takes nothing when credit notes say so, half its money pro rata, all
/// of it credits first; "the unused 40%" takes 40% of the units bought; partial refunds
/// delivered out of order take each unit once; `tollgate_units` named on a refund add to it.
pub async fn refunds_are_attributed_to_the_credit_lines<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::{CreditBalance, CreditRefund, RefundAttribution, RefundOutcome};
    let at = DAY0 + 60;
    let units = |o: RefundOutcome| match o {
        RefundOutcome::Taken { units, .. } => units,
        RefundOutcome::Nothing => 0,
        other => panic!("{other:?}"),
    };
    // in_9: 300 units for 500 beside seats for 500, paid 1000 by pi_9.
    h.s().grant_credits(&credit("mix", "in_9", 300, None).paid_by("pi_9").costing(500)).await.unwrap();
    let seats = CreditRefund::new("pi_9", 0, 1000, at).of_invoice("in_9").of_credit_lines(0);
    assert_eq!(units(h.s().refund_credits(&seats).await.unwrap()), 0, "the seats' credit note");
    let pro_rata = CreditRefund::new("pi_9", 500, 1000, at);
    assert_eq!(units(h.s().refund_credits(&pro_rata).await.unwrap()), 150, "half the money, pro rata");
    let first = CreditRefund::new("pi_9", 500, 1000, at).attributed(RefundAttribution::CreditsFirst);
    assert_eq!(units(h.s().refund_credits(&first).await.unwrap()), 150, "the credits' 500, credits first");
    assert_eq!(balance(h.s(), "mix").await, CreditBalance::new(0, 0));
    // 1,000 units for 10,000, 600 used; the unused 40% refunded: 400 taken, none left.
    let key = prepaid_key("used", "tokens");
    h.s().grant_credits(&credit("used", "pi_4", 1000, None).paid_by("pi_4").costing(10_000)).await.unwrap();
    let used = Reservation::new(key, 600, 0, None, ReserveToken::new(1, 1).at(at));
    assert_eq!(h.s().reserve(&used).await.unwrap().granted, 600);
    let forty = CreditRefund::new("pi_4", 4000, 10_000, at);
    assert_eq!(units(h.s().refund_credits(&forty).await.unwrap()), 400);
    assert_eq!(balance(h.s(), "used").await, CreditBalance::new(600, 600));
    // Two partial refunds, the later (cumulative 300) delivered first, and 7 units named.
    h.s().grant_credits(&credit("late", "pi_5", 100, None).paid_by("pi_5").costing(1000)).await.unwrap();
    assert_eq!(units(h.s().refund_credits(&CreditRefund::new("pi_5", 300, 1000, at)).await.unwrap()), 30);
    assert_eq!(units(h.s().refund_credits(&CreditRefund::new("pi_5", 100, 1000, at)).await.unwrap()), 0);
    let named = CreditRefund::new("pi_5", 300, 1000, at).naming_units(7);
    assert_eq!(units(h.s().refund_credits(&named).await.unwrap()), 7);
    assert_eq!(balance(h.s(), "late").await, CreditBalance::new(63, 0));
}

/// A refund delivered before its grant (the grant's event is still being retried) is kept by
/// its payment, the newer copy winning, and the grant applies it in its own write when it
/// lands; delivered again after, it takes nothing more.
pub async fn a_refund_before_its_grant_is_applied_when_the_grant_lands<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{CreditBalance, CreditRefund, GrantOutcome, RefundOutcome};
    let at = DAY0 + 60;
    let early = |refunded| CreditRefund::new("pi_e", refunded, 1000, at).of_invoice("in_e");
    assert_eq!(h.s().refund_credits(&early(400)).await.unwrap(), RefundOutcome::Kept);
    assert_eq!(h.s().refund_credits(&early(600)).await.unwrap(), RefundOutcome::Kept, "the newer copy");
    assert_eq!(h.s().refund_credits(&early(500)).await.unwrap(), RefundOutcome::Kept, "an older one late");
    h.restart().await;
    let grant = credit("early", "in_e", 100, None).paid_by("pi_e").costing(1000);
    let landed = h.s().grant_credits(&grant).await.unwrap();
    assert_eq!(landed, GrantOutcome::Granted(CreditBalance::new(40, 0)), "60 of 100 refunded before it landed");
    assert_eq!(h.s().refund_credits(&early(600)).await.unwrap(), RefundOutcome::Nothing, "applied once");
    // Kept under its invoice too: a grant made without the payment intent finds it.
    let by_invoice = CreditRefund::new("pi_f", 1000, 1000, at).of_invoice("in_f");
    assert_eq!(h.s().refund_credits(&by_invoice).await.unwrap(), RefundOutcome::Kept);
    let landed = h.s().grant_credits(&credit("early", "in_f", 50, None).costing(1000)).await.unwrap();
    assert_eq!(landed, GrantOutcome::Granted(CreditBalance::new(40, 0)), "refunded in full before it landed");
    assert_eq!(balance(h.s(), "early").await, CreditBalance::new(40, 0));
    // A dispute concerns a grant already made: of a payment no grant has, nothing is kept,
    // and the grant that lands later keeps all its units.
    let dispute = CreditRefund::new("pi_g", 1000, 1000, at).only_if_granted();
    assert_eq!(h.s().refund_credits(&dispute).await.unwrap(), RefundOutcome::Unknown);
    let landed = h.s().grant_credits(&credit("early", "pi_g", 10, None).paid_by("pi_g").costing(1000)).await.unwrap();
    assert_eq!(landed, GrantOutcome::Granted(CreditBalance::new(50, 0)), "nothing was kept for it");
    // Once granted, the dispute takes it all back, once.
    assert!(matches!(h.s().refund_credits(&dispute).await.unwrap(), RefundOutcome::Taken { units: 10, .. }));
    assert_eq!(h.s().refund_credits(&dispute).await.unwrap(), RefundOutcome::Nothing);
}

/// Takes apart from a payment's refunds (a dispute's withdrawal, a proration credit), once per
/// id: a dispute takes what the payment bought from what the balance holds first, and its
/// reversal gives back once what it took of the unspent units; a reversal that comes first
/// leaves the take nothing; proration credits take what their money bought, each once, and a
/// later refund takes only what the grant still holds. Restarts between them lose nothing.
pub async fn a_take_apart_is_applied_once_and_given_back_once<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::{CreditBalance, CreditRefund, CreditTake, RefundOutcome};
    let at = DAY0 + 60;
    let units = |o: RefundOutcome| match o {
        RefundOutcome::Taken { units, .. } => ("taken", units),
        RefundOutcome::GivenBack { units, .. } => ("given back", units),
        other => panic!("{other:?}"),
    };
    let key = prepaid_key("dp", "tokens");
    h.s().grant_credits(&credit("dp", "pi_1", 1000, None).paid_by("pi_1").costing(1000)).await.unwrap();
    let used = Reservation::new(key.clone(), 300, 0, None, ReserveToken::new(1, 1).at(at));
    assert_eq!(h.s().reserve(&used).await.unwrap().granted, 300);
    let withdrawn = CreditRefund::new("pi_1", 1000, 1000, at).only_if_granted().taking_once("dp_1");
    assert_eq!(units(h.s().refund_credits(&withdrawn).await.unwrap()), ("taken", 700));
    assert_eq!(balance(h.s(), "dp").await, CreditBalance::new(0, 0));
    assert_eq!(h.s().refund_credits(&withdrawn).await.unwrap(), RefundOutcome::Nothing, "once per dispute");
    h.restart().await;
    let won = CreditRefund::new("pi_1", 0, 1000, at + 60).only_if_granted().giving_back("dp_1");
    assert_eq!(units(h.s().refund_credits(&won).await.unwrap()), ("given back", 700));
    assert_eq!(balance(h.s(), "dp").await.left(), 700, "the balance as before the dispute");
    assert_eq!(h.s().refund_credits(&won).await.unwrap(), RefundOutcome::Nothing, "given back once");
    assert_eq!(h.s().refund_credits(&withdrawn).await.unwrap(), RefundOutcome::Nothing, "a late redelivery");
    let (grants, _) = h.s().credit_grants(&"dp".into(), None).await.unwrap();
    let g = grants.iter().find(|g| g.id == "pi_1").unwrap();
    assert_eq!((g.units, g.taken), (700, 0));
    let mut take = CreditTake::new("dp_1", 1000, 1000, 700);
    take.given_back = true;
    assert_eq!(g.takes, vec![take]);
    // A refund after it takes what the grant holds, never more.
    assert_eq!(units(h.s().refund_credits(&CreditRefund::new("pi_1", 1000, 1000, at)).await.unwrap()), ("taken", 700));
    assert_eq!(balance(h.s(), "dp").await.left(), 0);
    // A proration credit and a refund while the withdrawal held the grant empty: the win gives
    // back only what they leave (1,000 less 300 used, 250 credited and 100 refunded).
    let key = prepaid_key("cap", "tokens");
    h.s().grant_credits(&credit("cap", "pi_4", 1000, None).paid_by("pi_4").costing(1000)).await.unwrap();
    let used = Reservation::new(key.clone(), 300, 0, None, ReserveToken::new(1, 1).at(at));
    assert_eq!(h.s().reserve(&used).await.unwrap().granted, 300);
    let withdrawn = CreditRefund::new("pi_4", 1000, 1000, at).taking_once("dp_4");
    assert_eq!(units(h.s().refund_credits(&withdrawn).await.unwrap()), ("taken", 700));
    let credit_line = CreditRefund::new("pi_4", 0, 0, at).of_credit_lines(250).taking_once("il_4");
    assert_eq!(units(h.s().refund_credits(&credit_line).await.unwrap()), ("taken", 0));
    let _ = h.s().refund_credits(&CreditRefund::new("pi_4", 100, 1000, at)).await.unwrap();
    let won = CreditRefund::new("pi_4", 0, 1000, at).giving_back("dp_4");
    assert_eq!(units(h.s().refund_credits(&won).await.unwrap()), ("given back", 350));
    assert_eq!(balance(h.s(), "cap").await.left(), 350);
    // Won before its withdrawal was delivered: the withdrawal then takes nothing.
    h.s().grant_credits(&credit("dp", "pi_2", 500, None).paid_by("pi_2").costing(500)).await.unwrap();
    let won = CreditRefund::new("pi_2", 0, 500, at).only_if_granted().giving_back("dp_2");
    assert_eq!(units(h.s().refund_credits(&won).await.unwrap()), ("given back", 0));
    let withdrawn = CreditRefund::new("pi_2", 500, 500, at).only_if_granted().taking_once("dp_2");
    assert_eq!(h.s().refund_credits(&withdrawn).await.unwrap(), RefundOutcome::Nothing);
    assert_eq!(balance(h.s(), "dp").await.left(), 500);
    // Proration credits on an invoice's grant: each line once, by the money it credits.
    h.s().grant_credits(&credit("pr", "in_3", 1000, None).paid_by("pi_3").costing(1000)).await.unwrap();
    // (By the grant's id, the credited invoice, of the tenant: a store that finds grants by
    // payment looks among the tenant's.)
    let prorated = |line: &str| {
        CreditRefund::new("in_3", 0, 0, at)
            .of_credit_lines(250)
            .for_tenant("pr".into())
            .only_if_granted()
            .taking_once(line)
    };
    assert_eq!(units(h.s().refund_credits(&prorated("il_a")).await.unwrap()), ("taken", 250));
    assert_eq!(h.s().refund_credits(&prorated("il_a")).await.unwrap(), RefundOutcome::Nothing);
    h.restart().await;
    assert_eq!(units(h.s().refund_credits(&prorated("il_b")).await.unwrap()), ("taken", 250));
    assert_eq!(balance(h.s(), "pr").await, CreditBalance::new(500, 0));
    // A refund of half the payment: what the grant still holds, at most.
    let half = CreditRefund::new("pi_3", 500, 1000, at).of_invoice("in_3");
    assert_eq!(units(h.s().refund_credits(&half).await.unwrap()), ("taken", 500));
    assert_eq!(balance(h.s(), "pr").await, CreditBalance::new(0, 0));
    // Of a payment no grant has: nothing, nothing kept.
    let unknown = CreditRefund::new("pi_x", 0, 500, at).only_if_granted().giving_back("dp_x");
    assert_eq!(h.s().refund_credits(&unknown).await.unwrap(), RefundOutcome::Unknown);
    // A take is never kept for a grant to come, whatever `keep` says.
    let mut take = CreditRefund::new("pi_y", 500, 500, at).taking_once("dp_y");
    take.keep = true;
    assert_eq!(h.s().refund_credits(&take).await.unwrap(), RefundOutcome::Unknown);
    h.s().grant_credits(&credit("dp", "pi_y", 50, None).paid_by("pi_y").costing(500)).await.unwrap();
    assert_eq!(balance(h.s(), "dp").await.left(), 550, "nothing was kept for it");
}

/// One grant per payment: a second grant of a payment, under another id or on another meter,
/// adds nothing and answers the first; so does one under the same id on another meter.
pub async fn one_payment_grants_once_on_any_meter<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::GrantOutcome;
    let first = credit("once", "cs_1", 100, None).paid_by("pi_1");
    assert!(matches!(h.s().grant_credits(&first).await.unwrap(), GrantOutcome::Granted(_)));
    let invoice = credit("once", "in_1", 100, None).paid_by("pi_1");
    let GrantOutcome::Duplicate(seen) = h.s().grant_credits(&invoice).await.unwrap() else { panic!("granted twice") };
    assert_eq!(seen.id, "cs_1");
    let mut other_meter = credit("once", "in_1", 100, None).paid_by("pi_1");
    other_meter.meter = "images".into();
    assert!(matches!(h.s().grant_credits(&other_meter).await.unwrap(), GrantOutcome::Duplicate(_)));
    let mut same_id = credit("once", "cs_1", 100, None);
    same_id.meter = "images".into();
    assert!(matches!(h.s().grant_credits(&same_id).await.unwrap(), GrantOutcome::Duplicate(_)));
    assert_eq!(balance(h.s(), "once").await, crate::store::CreditBalance::new(100, 0));
    let (images, _) = h.s().credit_grants(&"once".into(), Some(&"images".into())).await.unwrap();
    assert!(images.is_empty(), "{images:?}");
    // Another tenant's manual grant may reuse an id.
    assert!(matches!(h.s().grant_credits(&credit("other", "cs_1", 5, None)).await.unwrap(), GrantOutcome::Granted(_)));
}

/// Units a close counted used leave with the grant, and a node's later release of those it
/// had leased does not bring them back inside the other grants (the review's example: 150
/// spendable, not 200). Once the forgiven window has passed, releases lower the used units in
/// full again.
pub async fn a_closed_grants_leased_units_do_not_come_back_through_a_release<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::CreditBalance;
    let key = prepaid_key("fg", "tokens");
    let at = DAY0 + 60;
    let token = |node, seq, at| ReserveToken::new(node, seq).at(at);
    h.s().grant_credits(&credit("fg", "a", 100, Some(DAY0 + 30))).await.unwrap();
    h.s().grant_credits(&credit("fg", "b", 100, None)).await.unwrap();
    // X leases 50 and uses none; Y leases 100 and uses them all.
    assert_eq!(h.s().reserve(&Reservation::new(key.clone(), 50, 0, None, token(1, 1, at))).await.unwrap().granted, 50);
    assert_eq!(
        h.s().reserve(&Reservation::new(key.clone(), 100, 0, None, token(2, 1, at))).await.unwrap().granted,
        100
    );
    let closed = h.s().close_credits(&"fg".into(), &"tokens".into(), "a", false, at).await.unwrap().unwrap();
    assert_eq!(closed.lost, 0);
    assert_eq!(balance(h.s(), "fg").await, CreditBalance::new(100, 50));
    h.s().release_units(&key, 50, token(1, 2, at + 60)).await.unwrap();
    let rest = h.s().reserve(&Reservation::new(key.clone(), 200, 0, None, token(3, 1, at + 60))).await.unwrap();
    assert_eq!(rest.granted, 50, "150 spendable in all: {rest:?}");
    // Past the window, a release is given back in full.
    let later = at + crate::store::contract::FORGIVEN_SECS + 1;
    h.s().release_units(&key, 10, token(3, 2, later)).await.unwrap();
    assert_eq!(balance(h.s(), "fg").await, CreditBalance::new(100, 90));
}

/// What a close forgives is held for the nodes whose last lease lies inside the units that
/// left, and drawn only by that node's release of that lease. A release of a lease taken from
/// the other grants, by another node or by the same node after a later call, lowers the used
/// units in full: no unit of the other grants is lost.
pub async fn only_a_closed_grants_own_lease_is_drawn_on_what_it_forgave<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::CreditBalance;
    let key = prepaid_key("fo", "tokens");
    let at = DAY0 + 60;
    let call = |node, seq, units| Reservation::new(key.clone(), units, 0, None, ReserveToken::new(node, seq).at(at));
    h.s().grant_credits(&credit("fo", "a", 100, Some(DAY0 + 30))).await.unwrap();
    h.s().grant_credits(&credit("fo", "b", 100, None)).await.unwrap();
    // Z leases a's 100 and uses them all; X then leases 50, which are b's.
    assert_eq!(h.s().reserve(&call(1, 1, 100)).await.unwrap().granted, 100);
    assert_eq!(h.s().reserve(&call(2, 1, 50)).await.unwrap().granted, 50);
    let closed = h.s().close_credits(&"fo".into(), &"tokens".into(), "a", false, at).await.unwrap().unwrap();
    assert_eq!(closed.lost, 0);
    h.restart().await;
    assert_eq!(balance(h.s(), "fo").await, CreditBalance::new(100, 50));
    // X gives its 50 back: b's, they come back.
    h.s().release_units(&key, 50, ReserveToken::new(2, 2).at(at + 60)).await.unwrap();
    assert_eq!(balance(h.s(), "fo").await, CreditBalance::new(100, 0), "b's units come back");
    // Z leases again, from b, and gives back 20 it did not use: they come back too.
    assert_eq!(h.s().reserve(&call(1, 2, 30)).await.unwrap().granted, 30);
    h.s().release_units(&key, 20, ReserveToken::new(1, 3).at(at + 120)).await.unwrap();
    assert_eq!(balance(h.s(), "fo").await, CreditBalance::new(100, 10), "Z's later lease was b's");
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

/// An expiry gives a sender's units back as its release would: what is forgiven to it (the
/// units of a grant closed while it held them, taken out of the balance then) is drawn
/// first, not given back twice (issue 52).
pub async fn an_expired_lease_of_a_closed_grant_is_not_given_back_twice<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    let key = prepaid_key("fx", "tokens");
    let at = DAY0 + 60;
    h.s().grant_credits(&credit("fx", "a", 100, Some(DAY0 + 30))).await.unwrap();
    h.s().grant_credits(&credit("fx", "b", 100, None)).await.unwrap();
    // Z leases a's 100, X 50 of b's; each keeps its lease.
    assert_eq!(h.s().reserve(&keeping(&key, 100, 1, 1, at, Kept::default(), at + 100)).await.unwrap().granted, 100);
    assert_eq!(h.s().reserve(&keeping(&key, 50, 2, 1, at, Kept::default(), at + 1000)).await.unwrap().granted, 50);
    let closed = h.s().close_credits(&"fx".into(), &"tokens".into(), "a", false, at).await.unwrap().unwrap();
    assert_eq!(closed.lost, 0, "a's units are all leased");
    let b = balance(h.s(), "fx").await;
    assert_eq!((b.granted, b.reserved), (100, 50), "a's 100 left with a: Z's lease is forgiven");
    // Z dies; past its expiry, X's call gives Z's lease back: a's 100 went with a, not again.
    h.s().release_one(report(&key, 2, 2, at + 101, Kept::new(50, 0, 0), at + 1001)).await.unwrap();
    assert_eq!(balance(h.s(), "fx").await.reserved, 50, "X's 50 still reserved");
}

/// The tenant's recharge of a prepaid meter ([`RechargeMode`](crate::store::RechargeMode)) is
/// kept beside the balance and survives a restart: a call that watches the balance claims
/// recharge n once when the balance it leaves (granted − reserved) is below `below`, of the
/// packs that bring it to `to`; one is open at a time; a lapsed claim is taken again with its
/// number; paid closes it, a failure gives its amount back to the month and waits
/// [`RETRY_AFTER_FAILURE_SECS`](crate::store::RETRY_AFTER_FAILURE_SECS); turning it off
/// claims nothing more; a balance with no grant yet is listed with the recharge.
pub async fn a_recharge_is_claimed_once_per_crossing_beside_the_balance<S: ?Sized + QuotaInspect>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{
        RechargeFailure, RechargeMode, RechargePack, RechargeSeen, RechargeSetting, CLAIM_TAKEN_SECS,
        RETRY_AFTER_FAILURE_SECS,
    };
    let key = prepaid_key("topped", "tokens");
    let pack = RechargePack::new(1000, 500);
    let watch = |units, seq, now| ask(&key, units, None, 1, seq).recharging(RechargeMode::Watch { now });
    let mode = |seq, mode| ask(&key, 0, None, 2, seq).recharging(mode);
    h.s().grant_credits(&credit("topped", "first", 10_000, None)).await.unwrap();
    let setting = RechargeSetting::new(2000, 5000, 10_000, pack).with_price("price_pack");
    let g = h.s().reserve(&mode(1, RechargeMode::Set(Some(setting.clone())))).await.unwrap();
    assert_eq!((g.granted, g.recharge), (0, RechargeSeen::Nothing));
    let listed = |cs: Vec<crate::store::QuotaCounter>| cs.into_iter().find_map(|c| c.recharge).expect("listed");
    let state = listed(h.s().counters(&"topped".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.setting, state.n, state.open), (Some(setting.clone()), 0, None));
    let g = h.s().reserve(&watch(7000, 1, DAY0)).await.unwrap();
    assert_eq!((g.granted, g.recharge), (7000, RechargeSeen::Nothing), "3,000 left: not below");
    h.restart().await;
    let g = h.s().reserve(&watch(1500, 2, DAY0)).await.unwrap();
    assert_eq!(g.granted, 1500);
    assert_eq!(g.recharge, RechargeSeen::Claimed { n: 1, packs: 4, amount: 2000 }, "1,500 left: 4 packs reach 5,000");
    assert_eq!(h.s().reserve(&watch(10, 3, DAY0 + 1)).await.unwrap().recharge, RechargeSeen::Open { n: 1 });
    let plain = h.s().reserve(&ask(&key, 10, None, 3, 1)).await.unwrap();
    assert_eq!((plain.granted, plain.recharge), (10, RechargeSeen::Nothing), "a call that does not watch sees nothing");
    // Its node died: taken again, with its number, once its delivery lapsed.
    let later = DAY0 + CLAIM_TAKEN_SECS;
    assert_eq!(
        h.s().reserve(&watch(0, 4, later)).await.unwrap().recharge,
        RechargeSeen::Claimed { n: 1, packs: 4, amount: 2000 }
    );
    assert_eq!(h.s().reserve(&watch(0, 5, later)).await.unwrap().recharge, RechargeSeen::Open { n: 1 });
    let paid = h.s().reserve(&mode(2, RechargeMode::Paid { n: 1 })).await.unwrap().recharge;
    assert_eq!(paid, RechargeSeen::Paid { n: 1, first: true }, "closed by this call");
    h.restart().await;
    let repeat = ask(&key, 0, None, 12, 1).recharging(RechargeMode::Paid { n: 1 });
    let again = h.s().reserve(&repeat).await.unwrap().recharge;
    assert_eq!(again, RechargeSeen::Paid { n: 1, first: false }, "paid once: a repeat is told, not first");
    let state = listed(h.s().counters(&"topped".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.n, state.open, state.spent, state.count), (1, None, 2000, 1));
    // Paid: the grant lands, and the next crossing claims number 2.
    h.s().grant_credits(&credit("topped", "recharge-1", 4000, None)).await.unwrap();
    let g = h.s().reserve(&watch(3600, 6, later)).await.unwrap();
    assert_eq!(g.recharge, RechargeSeen::Claimed { n: 2, packs: 4, amount: 2000 }, "{g:?}");
    let failed = RechargeMode::Failed { n: 2, why: RechargeFailure::Declined, now: later };
    let first = h.s().reserve(&mode(3, failed.clone())).await.unwrap().recharge;
    let why = RechargeFailure::Declined;
    assert_eq!(first, RechargeSeen::Failed { n: 2, off: false, first: true, why });
    let again = h.s().reserve(&mode(4, failed)).await.unwrap().recharge;
    assert_eq!(again, RechargeSeen::Failed { n: 2, off: false, first: false, why }, "alike, counted once");
    let state = listed(h.s().counters(&"topped".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.failures, state.open, state.spent), (1, None, 2000), "a failed one is not spent");
    assert_eq!(h.s().reserve(&watch(0, 7, later + 1)).await.unwrap().recharge, RechargeSeen::Nothing, "it waits");
    let retry = later + RETRY_AFTER_FAILURE_SECS;
    let g = h.s().reserve(&watch(0, 8, retry)).await.unwrap();
    assert_eq!(g.recharge, RechargeSeen::Claimed { n: 3, packs: 4, amount: 2000 });
    h.s().reserve(&mode(5, RechargeMode::Paid { n: 3 })).await.unwrap();
    // Turned off: nothing more is claimed.
    h.s().reserve(&mode(6, RechargeMode::Set(None))).await.unwrap();
    assert_eq!(h.s().reserve(&watch(0, 9, retry)).await.unwrap().recharge, RechargeSeen::Nothing);
    let state = listed(h.s().counters(&"topped".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.setting, state.failures, state.n, state.open), (None, 0, 3, None));
    // A claim whose delivery lapsed after the balance was topped up by hand is not taken again
    // (never charged by another node), and stays open and counted in its month: its node may
    // have paid it. Its `invoice.paid`, late, closes it, counted once.
    let lapsed = prepaid_key("lapsed", "tokens");
    h.s().grant_credits(&credit("lapsed", "first", 1000, None)).await.unwrap();
    let on = ask(&lapsed, 0, None, 2, 1).recharging(RechargeMode::Set(Some(setting.clone())));
    h.s().reserve(&on).await.unwrap();
    let watch_lapsed = |seq, now| ask(&lapsed, 0, None, 1, seq).recharging(RechargeMode::Watch { now });
    let g = h.s().reserve(&watch_lapsed(1, DAY0)).await.unwrap();
    assert_eq!(g.recharge, RechargeSeen::Claimed { n: 1, packs: 4, amount: 2000 });
    h.s().grant_credits(&credit("lapsed", "by-hand", 5000, None)).await.unwrap();
    let lapsed_watch = h.s().reserve(&watch_lapsed(2, later)).await.unwrap().recharge;
    assert_eq!(lapsed_watch, RechargeSeen::Nothing, "not taken again");
    let state = listed(h.s().counters(&"lapsed".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.open.map(|c| c.n), state.unpaid, state.spent, state.count), (Some(1), None, 2000, 1));
    h.s().reserve(&ask(&lapsed, 0, None, 2, 2).recharging(RechargeMode::Paid { n: 1 })).await.unwrap();
    let state = listed(h.s().counters(&"lapsed".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.open, state.unpaid, state.spent, state.count), (None, None, 2000, 1), "paid late: once");
    // The same setting stored again while on keeps the failures in a row.
    let g =
        h.s().reserve(&ask(&lapsed, 5500, None, 1, 3).recharging(RechargeMode::Watch { now: later })).await.unwrap();
    assert_eq!(g.recharge, RechargeSeen::Claimed { n: 2, packs: 5, amount: 2500 });
    let failed = RechargeMode::Failed { n: 2, why: RechargeFailure::NoPaymentMethod, now: later };
    h.s().reserve(&ask(&lapsed, 0, None, 2, 3).recharging(failed)).await.unwrap();
    h.s().reserve(&ask(&lapsed, 0, None, 2, 4).recharging(RechargeMode::Set(Some(setting.clone())))).await.unwrap();
    let state = listed(h.s().counters(&"lapsed".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.failures, state.spent), (1, 2000), "re-setting the same values clears nothing");
    // A tenant that turns recharge on before any grant: listed on a balance of nothing, and
    // its first watch claims the packs that reach `to`.
    let bare = prepaid_key("bare", "tokens");
    let set = ask(&bare, 0, None, 2, 1).recharging(RechargeMode::Set(Some(setting.clone())));
    h.s().reserve(&set).await.unwrap();
    let counters = h.s().counters(&"bare".into(), &"tokens".into()).await.unwrap();
    assert_eq!(counters.len(), 1);
    assert_eq!((counters[0].key.clone(), counters[0].granted, counters[0].reserved), (bare.clone(), Some(0), 0));
    assert_eq!(counters[0].recharge.clone().and_then(|r| r.setting), Some(setting.clone()));
    let g = h.s().reserve(&ask(&bare, 5, None, 1, 1).recharging(RechargeMode::Watch { now: DAY0 })).await.unwrap();
    assert_eq!((g.granted, g.recharge), (0, RechargeSeen::Claimed { n: 1, packs: 5, amount: 2500 }));
    // Stopped at once (its price changed: nothing charged): the claim closed unpaid, its
    // amount back to the month, no failure counted, told first once; turned on again, cleared.
    let why = RechargeFailure::PriceChanged;
    let stop = |seq| ask(&bare, 0, None, 2, seq).recharging(RechargeMode::Stop { n: 1, why });
    let stopped = h.s().reserve(&stop(2)).await.unwrap().recharge;
    assert_eq!(stopped, RechargeSeen::Failed { n: 1, off: true, first: true, why });
    let again = h.s().reserve(&stop(3)).await.unwrap().recharge;
    assert_eq!(again, RechargeSeen::Failed { n: 1, off: true, first: false, why }, "told once");
    let state = listed(h.s().counters(&"bare".into(), &"tokens".into()).await.unwrap());
    assert_eq!((state.off, state.open, state.spent, state.failures), (Some(why), None, 0, 0));
    let watch_bare = |seq, now| ask(&bare, 0, None, 1, seq).recharging(RechargeMode::Watch { now });
    assert_eq!(h.s().reserve(&watch_bare(2, DAY0)).await.unwrap().recharge, RechargeSeen::Nothing, "off");
    h.s().reserve(&ask(&bare, 0, None, 2, 4).recharging(RechargeMode::Set(Some(setting.clone())))).await.unwrap();
    let g = h.s().reserve(&watch_bare(3, DAY0)).await.unwrap();
    assert_eq!(g.recharge, RechargeSeen::Claimed { n: 2, packs: 5, amount: 2500 }, "on again, no hour waited");
    // A balance in debt (usage reported past it): the claim's packs reach `to` from the debt,
    // once (seeing the debt as 0, a claim bought 5 packs to 5,000 and left the balance at
    // -3,000 after its grant: a second recharge at once for one crossing).
    let debt = prepaid_key("debt", "tokens");
    h.s().grant_credits(&credit("debt", "first", 1000, None)).await.unwrap();
    h.s().reserve(&ask(&debt, 0, None, 2, 1).recharging(RechargeMode::Set(Some(setting.clone())))).await.unwrap();
    let owed = Reservation::new(debt.clone(), 0, 9000, None, ReserveToken::new(3, 1));
    h.s().reserve(&owed).await.unwrap();
    let g = h.s().reserve(&ask(&debt, 0, None, 1, 1).recharging(RechargeMode::Watch { now: DAY0 })).await.unwrap();
    assert_eq!(g.recharge, RechargeSeen::Claimed { n: 1, packs: 13, amount: 6500 }, "-8,000 to 5,000: 13 packs");
}

/// Many callers spend a balance across `below` at once: exactly one of them claims the
/// recharge, and every other call that watches after it sees it open.
pub async fn callers_crossing_together_claim_one_recharge<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::{RechargeMode, RechargePack, RechargeSeen, RechargeSetting};
    const TASKS: u64 = 8;
    const CALLS: u64 = 12;
    let key = prepaid_key("crossing", "tokens");
    h.s().grant_credits(&credit("crossing", "first", 1000, None)).await.unwrap();
    let setting = RechargeSetting::new(600, 2000, 1_000_000, RechargePack::new(100, 1));
    let set = ask(&key, 0, None, 1, 1).recharging(RechargeMode::Set(Some(setting)));
    h.s().reserve(&set).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = h.shared();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for seq in 1..=CALLS {
                let watch = RechargeMode::Watch { now: DAY0 };
                let g = store.reserve(&ask(&key, 10, None, 700 + task, seq).recharging(watch)).await.unwrap();
                seen.push((g.reserved, g.recharge));
                tokio::task::yield_now().await;
            }
            seen
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    let claims: Vec<_> = seen.iter().filter(|(_, r)| matches!(r, RechargeSeen::Claimed { .. })).collect();
    assert_eq!(claims.len(), 1, "one claim among {} calls: {claims:?}", seen.len());
    let (reserved, RechargeSeen::Claimed { n, packs, amount }) = *claims[0] else { unreachable!() };
    assert_eq!(n, 1);
    // The packs that reach `to` from a balance below 600: what the claiming call left, or
    // less (a store that writes the claim apart from the reserve reads the balance again and
    // claims only if it is still below).
    assert!((15..=20).contains(&packs), "{packs} packs after {reserved} reserved");
    if reserved > 400 {
        assert!(packs >= (2000 - (1000 - reserved)).div_ceil(100), "{packs} packs after {reserved} reserved");
    }
    assert_eq!(amount, packs);
    let missed: Vec<_> = seen
        .iter()
        .filter(|(r, s)| *r > 400 && !matches!(s, RechargeSeen::Claimed { .. } | RechargeSeen::Open { n: 1 }))
        .collect();
    assert!(missed.is_empty(), "every call that left the balance below 600 saw the claim or made it: {missed:?}");
    // Its payment told by several callers at once (a webhook redelivered while the worker
    // reports): one is first, the others are told it was paid.
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = h.shared();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            store.reserve(&ask(&key, 0, None, 800 + task, 1).recharging(RechargeMode::Paid { n: 1 })).await.unwrap()
        }));
    }
    let mut firsts = 0;
    for t in tasks {
        match t.await.unwrap().recharge {
            RechargeSeen::Paid { n: 1, first } => firsts += usize::from(first),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(firsts, 1, "paid first once");
}
/// A tenant at [`OPEN_GRANTS_MAX`](crate::store::contract::OPEN_GRANTS_MAX) open grants gets
/// its next grant: the grants used up close first, losing nothing, in its write. A grant is
/// used up when the units counted used that no sender keeps cover it and every grant spent
/// before it: units a node keeps leased are not (the node gives them back afterwards, and they
/// come back whole). With none used up, the grant is refused. A refund or a dispute of a
/// payment whose grant closed used up still takes what it would have had the grant stayed
/// open (the balance's unspent units), once; the dispute's reversal gives them back once.
pub async fn used_up_grants_close_to_make_room_losing_nothing<S: ?Sized + QuotaInspect>(h: &mut StoreUnderTest<S>) {
    use crate::store::{contract::OPEN_GRANTS_MAX, Closed, CreditBalance, CreditRefund, GrantOutcome, RefundOutcome};
    let key = prepaid_key("full", "tokens");
    let at = DAY0 + 60;
    // (Those refunded below name their payments; the others are as an operator grants.)
    let pack = |id: &str| credit("full", id, 10, None).costing(100);
    for i in 0..OPEN_GRANTS_MAX {
        let id = format!("pi_{i:04}");
        let g = if i < 2 || i == OPEN_GRANTS_MAX - 1 { pack(&id).paid_by(&id) } else { pack(&id) };
        assert!(matches!(h.s().grant_credits(&g).await.unwrap(), GrantOutcome::Granted(_)), "{id}");
    }
    let total = 10 * OPEN_GRANTS_MAX as u64;
    // Nothing used: nothing closes, the grant is refused.
    assert_eq!(h.s().grant_credits(&pack("pi_new")).await.unwrap(), GrantOutcome::TooMany);
    // Node 1 uses 5,005 units (500 packs and half the next); node 2 keeps a lease of 100.
    let used = keeping(&key, 5005, 1, 1, at, Kept::default(), at + HOUR);
    assert_eq!(h.s().reserve(&used).await.unwrap().granted, 5005);
    h.s().release(&[report(&key, 1, 2, at, Kept::default(), at + HOUR)]).await.pop().unwrap().unwrap();
    let leased = keeping(&key, 100, 2, 1, at, Kept::default(), at + HOUR);
    assert_eq!(h.s().reserve(&leased).await.unwrap().granted, 100);
    assert_eq!(balance(h.s(), "full").await, CreditBalance::new(total, 5105));
    h.restart().await;
    // 500 packs used up close (not the one half used, nor what node 2 keeps leased): what the
    // balance holds is as before, plus the new pack.
    let granted = h.s().grant_credits(&pack("pi_new")).await.unwrap();
    assert_eq!(granted, GrantOutcome::Granted(CreditBalance::new(total - 5000 + 10, 105)));
    let (grants, _) = h.s().credit_grants(&"full".into(), Some(&"tokens".into())).await.unwrap();
    let closed: Vec<&crate::store::CreditGrant> = grants.iter().filter(|g| g.closed.is_some()).collect();
    assert_eq!(closed.len(), 500, "the used-up packs closed");
    assert!(closed.iter().all(|g| g.closed_as() == Some(Closed::UsedUp) && g.closed.unwrap().lost == 0));
    assert!(closed.iter().all(|g| g.id.as_str() < "pi_0500"), "the first spent");
    assert_eq!(grants.len() - closed.len(), OPEN_GRANTS_MAX - 500 + 1);
    // Node 2 gives its lease back: all of it comes back.
    h.s().release_units(&key, 100, ReserveToken::new(2, 2).at(at + 60)).await.unwrap();
    assert_eq!(balance(h.s(), "full").await.left(), i128::from(total + 10 - 5005));
    // A refund of a closed pack takes what it would have taken open: 10 of what is unspent.
    let refund = CreditRefund::new("pi_0000", 100, 100, at + 120);
    let taken = h.s().refund_credits(&refund).await.unwrap();
    assert!(matches!(taken, RefundOutcome::Taken { units: 10, .. }), "{taken:?}");
    assert_eq!(h.s().refund_credits(&refund).await.unwrap(), RefundOutcome::Nothing, "once");
    h.restart().await;
    assert_eq!(balance(h.s(), "full").await.left(), i128::from(total + 10 - 5005 - 10));
    // A dispute of another closed pack takes 10, its reversal gives them back, each once.
    let dispute = CreditRefund::new("pi_0001", 100, 100, at + 180).taking_once("dp_1");
    let took = h.s().refund_credits(&dispute).await.unwrap();
    assert!(matches!(took, RefundOutcome::Taken { units: 10, .. }), "{took:?}");
    assert_eq!(h.s().refund_credits(&dispute).await.unwrap(), RefundOutcome::Nothing, "once");
    assert_eq!(balance(h.s(), "full").await.left(), i128::from(total + 10 - 5005 - 20));
    let won = CreditRefund::new("pi_0001", 0, 100, at + 240).giving_back("dp_1");
    let back = h.s().refund_credits(&won).await.unwrap();
    assert!(matches!(back, RefundOutcome::GivenBack { units: 10, .. }), "{back:?}");
    assert_eq!(h.s().refund_credits(&won).await.unwrap(), RefundOutcome::Nothing, "once");
    assert_eq!(balance(h.s(), "full").await.left(), i128::from(total + 10 - 5005 - 10));
    // A revoked grant is never reached.
    let (t, m) = (&"full".into(), &"tokens".into());
    assert!(h.s().close_credits(t, m, "pi_0999", true, at + 300).await.unwrap().is_some());
    let refund = CreditRefund::new("pi_0999", 100, 100, at + 300);
    assert_eq!(h.s().refund_credits(&refund).await.unwrap(), RefundOutcome::Nothing);
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
