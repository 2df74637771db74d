//! The ledger role: what each export sent, kept by the hour for reconciliation, found lacking
//! and sent again once.

use super::export::pending_keys;
use super::*;
use crate::store::{ExportClaim, ExportSend, LedgerEntry, UsageInspect};

/// The ledger: each revision exported with a customer is kept by the hour of its timestamp,
/// with when it was exported; a lacking entry keeps the first time it was found so; a lost
/// entry is sent again as a new revision once; a dead letter under observation has an entry of
/// its own until cleared.
pub async fn the_ledger_keeps_each_exported_revision_and_reexports_a_lost_one_once<S: ?Sized + UsageInspect>(
    h: &mut StoreUnderTest<S>,
) {
    let w = DAY0 + 10 * HOUR;
    let (before, t) = (w + HOUR, w + 2 * HOUR);
    let records = vec![rec("a", "requests", w, 5), rec("b", "requests", w, 3), rec("c", "requests", w, 2)];
    h.s().commit_usage(&batch("f1", records)).await.unwrap();
    let pending = h.s().pending_exports(before, None, 10).await.unwrap();
    let (a, b, c) = (pending[0].clone(), pending[1].clone(), pending[2].clone());
    let send_a = ExportSend::new(5, w + HOUR - 1, Some("cus_a".into()), "api_requests").with_identifier("tg_a0");
    let a = h.s().begin_export(&a, &ExportClaim::new(1, t, t + 300), &send_a).await.unwrap().unwrap();
    assert!(h.s().finish_export(&a, t + 10).await.unwrap());
    // Without a customer nothing was sent: no entry.
    let send_b = ExportSend::new(3, w + HOUR - 1, None, "api_requests").with_identifier("tg_b0");
    let b = h.s().begin_export(&b, &ExportClaim::new(1, t, t + 300), &send_b).await.unwrap().unwrap();
    assert!(h.s().finish_export(&b, t + 10).await.unwrap());
    let entry = LedgerEntry::new(ek("a", "requests", w), 0, send_a.clone(), Some(t + 10));
    assert_eq!(h.s().ledger(w, None, 10).await.unwrap(), std::slice::from_ref(&entry));
    assert_eq!(h.s().ledger(w + HOUR, None, 10).await.unwrap(), [], "by the hour of the timestamp");
    assert_eq!(h.s().ledger(w, Some((&entry.key, 0)), 10).await.unwrap(), [], "paged after (key, revision)");
    h.restart().await;

    // Found lacking: the first time is kept, until cleared.
    assert_eq!(h.s().note_lacking(&entry, t + 100).await.unwrap(), t + 100);
    assert_eq!(h.s().note_lacking(&entry, t + 200).await.unwrap(), t + 100);
    assert_eq!(h.s().ledger(w, None, 10).await.unwrap()[0].lacking_since, Some(t + 100));
    h.s().clear_lacking(&entry).await.unwrap();
    let kept = h.s().ledger(w, None, 10).await.unwrap();
    assert_eq!(kept, std::slice::from_ref(&entry), "cleared, still kept");
    assert_eq!(h.s().note_lacking(&entry, t + 300).await.unwrap(), t + 300);

    // Proven lost: its value is back in line once, as a new revision.
    let a_read = h.s().usage(&entry.key).await.unwrap().unwrap();
    assert!(h.s().reexport(&entry).await.unwrap());
    assert!(!h.s().reexport(&entry).await.unwrap(), "once");
    let back = h.s().usage(&entry.key).await.unwrap().unwrap();
    assert_eq!((back.quantity, back.exported, back.revision, back.in_flight), (5, 0, 2, None));
    // An export that read the aggregate before cannot begin from the old `exported`.
    let stale = ExportSend::new(0, t + 350, Some("cus_a".into()), "api_requests").with_identifier("tg_stale");
    assert_eq!(h.s().begin_export(&a_read, &ExportClaim::new(2, t + 350, t + 650), &stale).await.unwrap(), None);
    assert_eq!(pending_keys(h.s(), before).await, [ek("a", "requests", w), ek("c", "requests", w)], "pending again");
    let listed = h.s().ledger(w, None, 10).await.unwrap();
    assert_eq!((listed.len(), listed[0].superseded, listed[0].lacking_since), (1, true, None));
    let send_a1 = ExportSend::new(5, t + 400, Some("cus_a".into()), "api_requests").with_identifier("tg_a1");
    let a1 = h.s().begin_export(&back, &ExportClaim::new(1, t + 400, t + 700), &send_a1).await.unwrap().unwrap();
    assert!(h.s().finish_export(&a1, t + 410).await.unwrap());
    let hour = (t + 400) - (t + 400).rem_euclid(HOUR);
    let again = h.s().ledger(hour, None, 10).await.unwrap();
    assert_eq!(again, [LedgerEntry::new(ek("a", "requests", w), 2, send_a1, Some(t + 410))]);
    assert_eq!(pending_keys(h.s(), before).await, [ek("c", "requests", w)]);

    // A dead letter under observation: its own entry, without an export time, until cleared;
    // never re-exported (it was never marked exported).
    let send_c = ExportSend::new(2, w + HOUR - 1, Some("cus_c".into()), "api_requests").with_identifier("tg_c0");
    let c = h.s().begin_export(&c, &ExportClaim::new(1, t, t + 300), &send_c).await.unwrap().unwrap();
    h.s().dead_letter(&c, "unconfirmed: test").await.unwrap();
    let letter = LedgerEntry::new(ek("c", "requests", w), 0, send_c, None);
    assert_eq!(h.s().note_lacking(&letter, t + 500).await.unwrap(), t + 500);
    assert_eq!(h.s().note_lacking(&letter, t + 600).await.unwrap(), t + 500);
    let observed = h.s().ledger(w, None, 10).await.unwrap();
    assert_eq!(observed.len(), 2);
    assert_eq!((observed[1].exported_at, observed[1].lacking_since), (None, Some(t + 500)));
    assert!(!h.s().reexport(&observed[1]).await.unwrap());
    h.s().clear_lacking(&letter).await.unwrap();
    assert_eq!(h.s().ledger(w, None, 10).await.unwrap().len(), 1, "the observation goes");
    // An entry whose aggregate has an export in flight is not re-exported.
    let entry1 = h.s().ledger(hour, None, 10).await.unwrap().remove(0);
    h.s().commit_usage(&batch("f2", vec![rec("a", "requests", w, 1)])).await.unwrap();
    let more = h.s().usage(&entry.key).await.unwrap().unwrap();
    let send_a2 = ExportSend::new(1, t + 800, Some("cus_a".into()), "api_requests").with_identifier("tg_a2");
    h.s().begin_export(&more, &ExportClaim::new(1, t + 800, t + 900), &send_a2).await.unwrap().unwrap();
    assert!(!h.s().reexport(&entry1).await.unwrap(), "an export in flight");
}
