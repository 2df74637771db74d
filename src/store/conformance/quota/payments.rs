//! The quota role's payments: each tenant's row of what it has paid, net, and since when; a
//! payment counts once whatever calls race it, and the row outlives a restart.

use super::super::*;
use crate::store::{DisputeStep, PaymentCall, PaymentOutcome, QuotaStore, Standing};

/// 2026-03-14T12:00:00Z.
const AT: i64 = 1_773_489_600;

fn paid(tenant: &str, payment: &str, amount: u64, at: i64) -> PaymentCall {
    PaymentCall::Record {
        tenant: tenant.into(),
        payment: payment.into(),
        amount,
        currency: "usd".into(),
        billing: "USD".into(),
        at,
    }
}

fn read(tenant: &str) -> PaymentCall {
    PaymentCall::Read { tenant: tenant.into() }
}

/// A payment counts once however often it is sent; a refund is its charge's running total; a
/// dispute takes once and its funds reinstated give back once; a payment in another currency
/// is not counted; each tenant's row is its own, outlives a restart of the store, and a read
/// answers it whole.
pub async fn payments_count_once_net_of_refunds_and_disputes<S: ?Sized + QuotaStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    assert_eq!(s.payments(&read("t"), AT).await.unwrap().standing, Standing::default(), "no row yet");
    let first = s.payments(&paid("t", "pi_1", 500, AT), AT).await.unwrap();
    assert_eq!((first.outcome, first.standing), (PaymentOutcome::Applied, Standing::new(500, Some(AT))));
    let again = s.payments(&paid("t", "pi_1", 500, AT), AT).await.unwrap();
    assert_eq!((again.outcome, again.standing), (PaymentOutcome::Duplicate, Standing::new(500, Some(AT))));
    let later = AT + 86_400;
    assert_eq!(s.payments(&paid("t", "pi_2", 4_500, later), later).await.unwrap().standing.paid, 5_000);
    let refund = |refunded| PaymentCall::Refund { tenant: "t".into(), payment: "pi_2".into(), refunded, at: later };
    assert_eq!(s.payments(&refund(1_000), later).await.unwrap().standing.paid, 4_000);
    assert_eq!(s.payments(&refund(1_000), later).await.unwrap().outcome, PaymentOutcome::Duplicate);
    let dispute = |step| PaymentCall::Dispute {
        tenant: "t".into(),
        payment: "pi_1".into(),
        dispute: "dp_1".into(),
        amount: 500,
        step,
        at: later,
    };
    let taken = s.payments(&dispute(DisputeStep::Withdrawn), later).await.unwrap();
    assert_eq!(taken.standing, Standing::new(3_500, Some(later)), "pi_1 charged back: paying since pi_2");
    assert_eq!(s.payments(&dispute(DisputeStep::Withdrawn), later).await.unwrap().outcome, PaymentOutcome::Duplicate);
    let eur = PaymentCall::Record {
        tenant: "t".into(),
        payment: "pi_3".into(),
        amount: 9_999,
        currency: "eur".into(),
        billing: "usd".into(),
        at: later,
    };
    assert_eq!(s.payments(&eur, later).await.unwrap().outcome, PaymentOutcome::OtherCurrency);
    assert_eq!(s.payments(&paid("u", "pi_1", 700, AT), AT).await.unwrap().standing.paid, 700, "u's own row");
    // A tier pinned by an operator is kept with the row, and its version counts each change.
    let pin = |plan: Option<&str>| PaymentCall::Pin { tenant: "t".into(), plan: plan.map(str::to_owned) };
    let pinned = s.payments(&pin(Some("tier2")), later).await.unwrap();
    assert_eq!((pinned.outcome, pinned.pinned.as_deref()), (PaymentOutcome::Applied, Some("tier2")));
    assert_eq!(s.payments(&pin(Some("tier2")), later).await.unwrap().outcome, PaymentOutcome::Duplicate);
    h.restart().await;
    let s = h.s();
    let kept = s.payments(&read("t"), later).await.unwrap();
    assert_eq!(kept.standing, Standing::new(3_500, Some(later)));
    assert_eq!((kept.pinned.as_deref(), kept.changes), (Some("tier2"), pinned.changes));
    // A read hands over the row itself, each payment with its refunds and disputes (the
    // dashboard's money page lists them); a write answers without it.
    let row = kept.row.expect("a read answers the row");
    let ids: Vec<(&str, u64, u64, usize)> =
        row.payments.iter().map(|p| (p.id.as_str(), p.amount, p.refunded, p.disputes.len())).collect();
    assert_eq!(ids, [("pi_1", 500, 0, 1), ("pi_2", 4_500, 1_000, 0)]);
    assert_eq!(row.payments[0].disputed(), 500);
    assert_eq!(pinned.row, None, "a write answers no row");
    assert_eq!(s.payments(&pin(None), later).await.unwrap().pinned, None, "unpinned");
    let back = s.payments(&dispute(DisputeStep::Reinstated), later).await.unwrap();
    assert_eq!(back.standing, Standing::new(4_000, Some(AT)), "won: pi_1 counts again");
    assert_eq!(s.payments(&read("u"), later).await.unwrap().standing.paid, 700);
}

/// Eight writers record eight payments each at once, every one sent twice, for one tenant: the
/// row counts each payment once (64 of them), whatever the race.
pub async fn concurrent_payments_each_count_once<S: ?Sized + QuotaStore>(h: &mut StoreUnderTest<S>) {
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..8u64 {
        let s = h.shared();
        tasks.spawn(async move {
            for i in 0..8u64 {
                let call = paid("t", &format!("pi_{}", (writer * 8 + i) % 64), 100 + writer * 8 + i, AT + i as i64);
                // Each payment sent by two writers: itself, and its neighbour's copy below.
                s.payments(&call, AT).await.unwrap();
                let copy = paid(
                    "t",
                    &format!("pi_{}", ((writer + 1) % 8) * 8 + i),
                    100 + ((writer + 1) % 8) * 8 + i,
                    AT + i as i64,
                );
                s.payments(&copy, AT).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let expected: u64 = (0..64).map(|i| 100 + i).sum();
    let standing = h.s().payments(&read("t"), AT).await.unwrap().standing;
    assert_eq!(standing, Standing::new(expected, Some(AT)));
}
