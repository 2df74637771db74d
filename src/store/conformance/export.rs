//! The export role: pending exports, claims that fix what a revision sends, finish, dead
//! letters and requeue.

use super::*;
use crate::store::{CommitOutcome, DeadLetter, Deferral, ExportClaim, ExportSend, UsageInspect};

pub(super) async fn pending_keys<S: ?Sized + UsageInspect>(s: &S, before: i64) -> Vec<ExportKey> {
    s.pending_exports(before, None, 1000).await.unwrap().into_iter().map(|a| a.key).collect()
}

/// Pending aggregates: only windows started before the bound, in key order (tenant,
/// meter, window start), paged by a cursor. (The customer is the directory's: the export role
/// holds none.)
pub async fn pending_exports_page_in_key_order_before_a_window<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let w = DAY0 + 10 * HOUR;
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
    // A page after a cursor.
    let b = h.s().pending_exports(before, Some(&expected[2].key), 10).await.unwrap();
    assert_eq!(b, [fresh(ek("b", "requests", w), 7)]);
}

/// `begin_export` claims a revision and fixes what it exports; another node waits for
/// the claim to expire; `finish_export` moves the revision once; late usage is the next
/// revision's delta.
pub async fn an_export_claim_fixes_what_a_revision_exports<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let w = DAY0 + 10 * HOUR;
    let before = w + HOUR;
    let t = w + 2 * HOUR;
    let key = ek("a", "requests", w);
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
    assert!(h.s().defer_export(&read, &ExportClaim::new(1, t + 130, t + 420), Deferral::Unknown).await.unwrap());
    assert!(
        !h.s().defer_export(&read, &ExportClaim::new(2, t + 130, t + 900), Deferral::Failed).await.unwrap(),
        "held by 1"
    );
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

    assert!(h.s().finish_export(&taken, 1_000).await.unwrap());
    let done = h.s().usage(&key).await.unwrap().unwrap();
    assert_eq!(
        (done.quantity, done.exported, done.revision, done.in_flight, done.attempts, done.first_attempt_at),
        (9, 5, 1, None, 0, None)
    );
    assert_eq!((done.unknown_failures, done.send.clone()), (0, None));
    assert!(!h.s().finish_export(&taken, 1_000).await.unwrap(), "a stale revision");
    assert!(!h.s().finish_export(&read, 1_000).await.unwrap(), "a stale revision");
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
        !h.s().defer_export(&next, &ExportClaim::new(1, t + 600, t + 900), Deferral::Failed).await.unwrap(),
        "not in flight"
    );
    let rev1 = h.s().begin_export(&next, &ExportClaim::new(1, t + 600, t + 900), &sent(4)).await.unwrap().unwrap();
    assert_eq!(
        (rev1.revision, rev1.in_flight, rev1.exported, rev1.attempts, rev1.first_attempt_at, rev1.claimed_until),
        (1, Some(9), 5, 1, Some(t + 600), Some(t + 900))
    );
    assert_eq!(rev1.send, Some(sent(4)));
    assert_eq!(rev1.in_flight.unwrap() - rev1.exported, 4, "the delta");
    assert!(h.s().finish_export(&rev1, 1_000).await.unwrap());
    assert!(!h.s().finish_export(&rev1, 1_000).await.unwrap());
    let last = h.s().usage(&key).await.unwrap().unwrap();
    assert_eq!((last.quantity, last.exported, last.revision, last.in_flight, last.send), (9, 9, 2, None, None));
    assert_eq!(h.s().pending_exports(before, None, 10).await.unwrap(), [], "all exported");
}

/// A dead letter is listed (paged), no longer pending, and pending again once requeued.
pub async fn dead_letters_park_an_aggregate_until_requeued<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
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
    assert!(h.s().finish_export(&c, 1_000).await.unwrap());
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
    assert_eq!(pending.iter().map(|p| p.key.clone()).collect::<Vec<_>>(), [dl_a.key.clone(), ek("d", "requests", w)]);
    // As a new revision (a new identifier), nothing in flight: parameters are fixed anew.
    assert_eq!(
        (pending[0].quantity, pending[0].exported, pending[0].revision, pending[0].in_flight, pending[0].send.clone()),
        (5, 0, 1, None, None)
    );
    // And exported like any other.
    let again =
        h.s().begin_export(&pending[0], &ExportClaim::new(1, t + 10, t + 310), &sent(5)).await.unwrap().unwrap();
    assert_eq!(again.in_flight, Some(5));
    assert!(h.s().finish_export(&again, 1_000).await.unwrap());
    assert_eq!(pending_keys(h.s(), before).await, [ek("d", "requests", w)]);

    assert!(h.s().requeue_dead_letter(&dl_c.key).await.unwrap());
    let pending = h.s().pending_exports(before, None, 10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!((&pending[0].key, pending[0].quantity, pending[0].exported, pending[0].revision), (&dl_c.key, 5, 2, 2));
}

/// The identifier namespace: drawn when the store was made, kept across a restart, replaced
/// only over the one read; an export in flight keeps the identifier it began with.
pub async fn the_identifier_namespace_is_kept_and_changed_only_over_what_was_read<S: ?Sized + UsageInspect>(
    h: &mut StoreUnderTest<S>,
) {
    let drawn = h.s().identifier_namespace().await.unwrap();
    assert!(!drawn.is_empty(), "a new store draws its namespace");
    h.restart().await;
    assert_eq!(h.s().identifier_namespace().await.unwrap(), drawn, "kept");

    let w = DAY0 + 10 * HOUR;
    h.s().commit_usage(&batch("f", vec![rec("a", "requests", w, 5)])).await.unwrap();
    let read = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().remove(0);
    let t = w + 2 * HOUR;
    let begun = h
        .s()
        .begin_export(&read, &ExportClaim::new(1, t, t + 300), &sent(5).with_identifier("tg_first"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(begun.send.as_ref().and_then(|s| s.identifier.as_deref()), Some("tg_first"));

    assert!(!h.s().set_identifier_namespace("not-it", "x").await.unwrap(), "only over the one read");
    assert_eq!(h.s().identifier_namespace().await.unwrap(), drawn);
    assert!(h.s().set_identifier_namespace(&drawn, "restored").await.unwrap());
    assert!(!h.s().set_identifier_namespace(&drawn, "again").await.unwrap(), "the read one is gone");
    h.restart().await;
    assert_eq!(h.s().identifier_namespace().await.unwrap(), "restored");
    // Begun again after the change (a retry): the identifier fixed first is kept.
    let again = h
        .s()
        .begin_export(&read, &ExportClaim::new(1, t + 400, t + 700), &sent(5).with_identifier("tg_second"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.send.and_then(|s| s.identifier).as_deref(), Some("tg_first"));
}

/// An attempt nothing of which may have reached the billing system clears the time of the
/// first attempt, so the next one counts from itself; the other deferrals keep it.
pub async fn a_deferral_never_sent_clears_the_first_attempt<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let w = DAY0 + 10 * HOUR;
    h.s().commit_usage(&batch("f", vec![rec("a", "requests", w, 5)])).await.unwrap();
    let read = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().remove(0);
    let t = w + 2 * HOUR;
    let begun = h.s().begin_export(&read, &ExportClaim::new(1, t, t + 300), &sent(5)).await.unwrap().unwrap();
    assert_eq!(begun.first_attempt_at, Some(t));
    // Another attempt began since (the count is not the one given): the time is kept.
    assert!(h.s().defer_export(&read, &ExportClaim::new(1, t + 1, t + 60), Deferral::NeverSent(0)).await.unwrap());
    assert_eq!(h.s().usage(&read.key).await.unwrap().unwrap().first_attempt_at, Some(t));
    assert!(h.s().defer_export(&read, &ExportClaim::new(1, t + 1, t + 60), Deferral::NeverSent(1)).await.unwrap());
    let stored = h.s().usage(&read.key).await.unwrap().unwrap();
    assert_eq!((stored.first_attempt_at, stored.unknown_failures, stored.attempts), (None, 0, 1));
    h.restart().await;
    let again = h.s().begin_export(&read, &ExportClaim::new(1, t + 60, t + 360), &sent(5)).await.unwrap().unwrap();
    assert_eq!((again.first_attempt_at, again.attempts, again.in_flight), (Some(t + 60), 2, Some(5)));
    assert!(h.s().defer_export(&read, &ExportClaim::new(1, t + 61, t + 120), Deferral::Failed).await.unwrap());
    assert!(h.s().defer_export(&read, &ExportClaim::new(1, t + 62, t + 120), Deferral::Unknown).await.unwrap());
    let stored = h.s().usage(&read.key).await.unwrap().unwrap();
    assert_eq!((stored.first_attempt_at, stored.unknown_failures), (Some(t + 60), 1));
}

/// Usage that is not billable is kept (a tenant's usage, its retention) but its aggregate is not
/// listed for export until billable usage is added to it; then all of it is.
pub async fn an_aggregate_is_listed_once_billable_usage_is_added<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let w = DAY0 + 10 * HOUR;
    let free = |q| rec("f", "requests", w, q).with_billable(false);
    h.s().commit_usage(&batch("f1", vec![free(3), rec("p", "requests", w, 2)])).await.unwrap();
    h.restart().await;
    assert_eq!(pending_keys(h.s(), w + HOUR).await, [ExportKey::new("p".into(), "requests".into(), w)]);
    let kept = h.s().usage(&ExportKey::new("f".into(), "requests".into(), w)).await.unwrap().unwrap();
    assert_eq!((kept.quantity, kept.exported), (3, 0), "kept, not exported");
    h.s().commit_usage(&batch("f2", vec![free(4)])).await.unwrap();
    assert_eq!(pending_keys(h.s(), w + HOUR).await.len(), 1, "still not listed");
    // Billable usage is added (the tenant got a customer): the aggregate is listed, all of it.
    h.s().commit_usage(&batch("f3", vec![rec("f", "requests", w, 1)])).await.unwrap();
    h.restart().await;
    let listed = h.s().pending_exports(w + HOUR, None, 10).await.unwrap();
    let f = listed.iter().find(|a| a.key.tenant.as_str() == "f").expect("listed");
    assert_eq!(f.quantity, 8);
    // And stays a candidate when usage that is not billable follows.
    h.s().commit_usage(&batch("f4", vec![free(2)])).await.unwrap();
    assert_eq!(pending_keys(h.s(), w + HOUR).await.len(), 2);
    // Exported whole: no longer a candidate; usage that is not billable after that is not
    // listed (in every store alike), billable usage is.
    let f = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().into_iter().find(|a| a.key.tenant.as_str() == "f");
    let t = w + 2 * HOUR;
    let begun = h.s().begin_export(&f.unwrap(), &ExportClaim::new(1, t, t + 300), &sent(10)).await.unwrap().unwrap();
    assert!(h.s().finish_export(&begun, 1_000).await.unwrap());
    h.s().commit_usage(&batch("f5", vec![free(3)])).await.unwrap();
    h.restart().await;
    assert_eq!(pending_keys(h.s(), w + HOUR).await.len(), 1, "only p's");
    h.s().commit_usage(&batch("f6", vec![rec("f", "requests", w, 1)])).await.unwrap();
    let listed = h.s().pending_exports(w + HOUR, None, 10).await.unwrap();
    let f = listed.iter().find(|a| a.key.tenant.as_str() == "f").expect("a candidate again");
    assert_eq!((f.quantity, f.exported), (14, 10));
}

/// Dead letters outlive the store's retention: kept until requeued or confirmed, never dropped
/// unseen with the windows of their age.
pub async fn dead_letters_outlive_the_retention<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let w = DAY0 + 10 * HOUR;
    h.s().commit_usage(&batch("f1", vec![rec("a", "requests", w, 5), rec("b", "requests", w, 2)])).await.unwrap();
    let read = h.s().pending_exports(w + HOUR, None, 10).await.unwrap();
    let a = read.iter().find(|x| x.key.tenant.as_str() == "a").unwrap();
    h.s().dead_letter(a, "no customer: …").await.unwrap();
    // 40 days on: the windows of that age are pruned, the letter stays.
    for day in [36, 40] {
        let later = batch(&format!("f{day}"), vec![rec("c", "requests", w + day * 86_400, 1)]);
        h.s().commit_usage(&later).await.unwrap();
    }
    h.restart().await;
    let dead = h.s().dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.iter().map(|d| (d.key.tenant.as_str(), d.units)).collect::<Vec<_>>(), [("a", 5)]);
}

/// An export nothing of which may have reached the billing system (its `first_attempt_at`
/// cleared by a never-sent deferral) is fixed anew at its next begin: what it sends up to, and
/// its parameters (a late stamp, more usage). One that may have reached it keeps them.
pub async fn an_export_never_sent_is_fixed_anew_at_its_next_begin<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let w = DAY0 + 10 * HOUR;
    h.s().commit_usage(&batch("f1", vec![rec("a", "requests", w, 5)])).await.unwrap();
    let read = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().remove(0);
    let t = w + 2 * HOUR;
    let begun = h.s().begin_export(&read, &ExportClaim::new(1, t, t + 300), &sent(5)).await.unwrap().unwrap();
    assert!(h.s().defer_export(&begun, &ExportClaim::new(1, t, t + 60), Deferral::NeverSent(1)).await.unwrap());
    h.s().commit_usage(&batch("f2", vec![rec("a", "requests", w, 2)])).await.unwrap();
    h.restart().await;
    let read = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().remove(0);
    let restamped = ExportSend::new(7, t + 7200, Some("cus_a".into()), "api_requests");
    let again = h.s().begin_export(&read, &ExportClaim::new(1, t + 7200, t + 7500), &restamped).await.unwrap().unwrap();
    assert_eq!(
        (again.in_flight, again.send.clone(), again.first_attempt_at),
        (Some(7), Some(restamped.clone()), Some(t + 7200))
    );
    // This attempt may reach it (a 500): a later begin keeps what it fixed.
    assert!(h.s().defer_export(&again, &ExportClaim::new(1, t + 7200, t + 7300), Deferral::Failed).await.unwrap());
    h.s().commit_usage(&batch("f3", vec![rec("a", "requests", w, 1)])).await.unwrap();
    let read = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().remove(0);
    let kept = h.s().begin_export(&read, &ExportClaim::new(1, t + 7400, t + 7700), &sent(8)).await.unwrap().unwrap();
    assert_eq!((kept.in_flight, kept.send, kept.first_attempt_at), (Some(7), Some(restamped), Some(t + 7200)));
}

/// A begin by a caller whose read still shows a first attempt (it planned up to what was in
/// flight) keeps what is in flight, even if the first attempt was cleared since: what is sent
/// and what is marked exported never differ.
pub async fn a_stale_read_never_re_fixes_an_export<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let w = DAY0 + 10 * HOUR;
    h.s().commit_usage(&batch("f1", vec![rec("a", "requests", w, 5)])).await.unwrap();
    let read = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().remove(0);
    let t = w + 2 * HOUR;
    let begun = h.s().begin_export(&read, &ExportClaim::new(1, t, t + 300), &sent(5)).await.unwrap().unwrap();
    h.s().commit_usage(&batch("f2", vec![rec("a", "requests", w, 2)])).await.unwrap();
    // Read by another node now (a first attempt recorded), then cleared by the first node.
    let mut stale = h.s().pending_exports(w + HOUR, None, 10).await.unwrap().remove(0);
    assert!(h.s().defer_export(&begun, &ExportClaim::new(1, t, t + 60), Deferral::NeverSent(1)).await.unwrap());
    stale.claimed_until = None;
    let kept = h.s().begin_export(&stale, &ExportClaim::new(2, t + 120, t + 420), &sent(5)).await.unwrap().unwrap();
    assert_eq!((kept.in_flight, kept.send), (Some(5), Some(sent(5))), "what it planned, what is in flight");
}
