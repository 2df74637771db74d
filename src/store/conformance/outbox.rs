//! The alerts role: an outbox row is written once per key (put-if-absent), claimed by one node
//! at a time until its claim expires, settled once by its claimer; dead letters come back by
//! hand; delivered and dead rows are pruned after their time, pending ones never.

use super::*;

use crate::store::{AlertClaim, AlertKey, AlertOutcome, AlertQuery, AlertState, OutboxEntry, OutboxStore};

/// A time in Unix seconds.
const NOW: i64 = DAY0;

fn row(id: &str, destination: &str, body: &str) -> OutboxEntry {
    OutboxEntry::new(AlertKey::new(id, destination), "t".into(), "quota.threshold_crossed", body, NOW, NOW + DAY)
}

/// Every node that sees a crossing writes its rows: the first write holds, whatever the
/// others carry, a re-sent write adds nothing, and a row settled since is not written over.
pub async fn alerts_are_written_once_per_key<S: ?Sized + OutboxStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    let first = [row("alert_a", "endpoint:ops", "{\"n\":1}"), row("alert_a", "tenant", "{\"n\":1}")];
    assert_eq!(s.put_alerts(&first).await.unwrap(), 2);
    assert_eq!(s.put_alerts(&first).await.unwrap(), 0, "re-sent");
    let other = [row("alert_a", "endpoint:ops", "{\"n\":2}"), row("alert_b", "endpoint:ops", "{}")];
    assert_eq!(s.put_alerts(&other).await.unwrap(), 1, "only the new key");
    let claimed = s.claim_alerts(&AlertClaim::new(1, NOW, NOW + 60, 10)).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let ops = claimed.iter().find(|e| e.key == AlertKey::new("alert_a", "endpoint:ops")).unwrap();
    assert_eq!(ops.body, "{\"n\":1}", "the first write's body");
    assert!(s.settle_alert(&ops.key, 1, &AlertOutcome::Delivered { at: NOW }).await.unwrap());
    // Written again after its delivery (a node that saw the crossing late): still delivered.
    assert_eq!(s.put_alerts(&first[..1]).await.unwrap(), 0);
    h.restart().await;
    let s = h.s();
    let listed = s.list_alerts(&AlertQuery::new(10).id("alert_a")).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].key.destination, "endpoint:ops", "key order");
    assert_eq!((listed[0].state, listed[0].delivered_at), (AlertState::Delivered, Some(NOW)));
}

/// Eight nodes claim at once: each row goes to one of them; a claim holds until it expires,
/// then another node may take the row (a node that died mid-delivery), and the first
/// claimer's settle no longer lands.
pub async fn a_row_is_claimed_by_one_node_at_a_time<S: ?Sized + OutboxStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    let rows: Vec<OutboxEntry> = (0..20).map(|i| row(&format!("alert_{i:02}"), "endpoint:ops", "{}")).collect();
    assert_eq!(s.put_alerts(&rows).await.unwrap(), 20);
    let mut tasks = tokio::task::JoinSet::new();
    for node in 1..=8u64 {
        let s = h.shared();
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = s.claim_alerts(&AlertClaim::new(node, NOW, NOW + 60, 3)).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                assert!(got.iter().all(|e| e.claim == (node, NOW + 60)));
                mine.extend(got.into_iter().map(|e| e.key));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(mine) = tasks.join_next().await {
        all.extend(mine.unwrap());
    }
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!((before, all.len()), (20, 20), "each row claimed once");
    let s = h.s();
    assert!(s.claim_alerts(&AlertClaim::new(9, NOW + 59, NOW + 120, 50)).await.unwrap().is_empty(), "claims hold");
    // A node id past i64::MAX (half of all) holds its claims and settles them as any other.
    let high = u64::MAX - 1;
    let got = s.claim_alerts(&AlertClaim::new(high, NOW + 60, NOW + 120, 1)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].claim, (high, NOW + 120));
    assert!(!s.settle_alert(&got[0].key, i64::MAX as u64, &AlertOutcome::Release).await.unwrap(), "another owner");
    assert!(s.settle_alert(&got[0].key, high, &AlertOutcome::Release).await.unwrap(), "its own claim");
    // Past the claims: node 9 takes every row; the first claimers' settles no longer land.
    let again = s.claim_alerts(&AlertClaim::new(9, NOW + 60, NOW + 120, 50)).await.unwrap();
    assert_eq!(again.len(), 20);
    let key = &again[0].key;
    for node in 1..=8 {
        assert!(!s.settle_alert(key, node, &AlertOutcome::Delivered { at: NOW + 61 }).await.unwrap());
    }
    assert!(s.settle_alert(key, 9, &AlertOutcome::Delivered { at: NOW + 61 }).await.unwrap());
}

/// A failed delivery is due again when its settle says; a settle re-sent after it landed is
/// not applied again; a dead letter is listed as one, comes back when requeued, and is pruned
/// after its time (a pending row never is).
pub async fn retries_dead_letters_and_prunes_apply_once<S: ?Sized + OutboxStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    s.put_alerts(&[row("alert_r", "tenant", "{}"), row("alert_p", "tenant", "{}")]).await.unwrap();
    let key = AlertKey::new("alert_r", "tenant");
    let claim = |now: i64| AlertClaim::new(4, now, now + 30, 1);
    let got = s.claim_alerts(&claim(NOW)).await.unwrap();
    assert_eq!(got.len(), 1);
    let first = got[0].key.clone();
    let retry = AlertOutcome::Retry { at: NOW + 100, error: "503 Service Unavailable".into() };
    assert!(s.settle_alert(&first, 4, &retry).await.unwrap());
    assert!(!s.settle_alert(&first, 4, &retry).await.unwrap(), "re-sent: applied once");
    // The other row is due; the retried one from NOW + 100.
    let got = s.claim_alerts(&claim(NOW + 1)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_ne!(got[0].key, first);
    assert!(s.settle_alert(&got[0].key, 4, &AlertOutcome::Release).await.unwrap());
    let _ = s.claim_alerts(&claim(NOW + 2)).await.unwrap();
    let got = s.claim_alerts(&AlertClaim::new(5, NOW + 100, NOW + 130, 5)).await.unwrap();
    let retried = got.iter().find(|e| e.key == first).expect("due again");
    assert_eq!((retried.attempts, retried.last_error.as_deref()), (1, Some("503 Service Unavailable")));
    for e in &got {
        let outcome = if e.key == key {
            AlertOutcome::Dead { error: "gone".into() }
        } else {
            AlertOutcome::Delivered { at: NOW + 100 }
        };
        assert!(s.settle_alert(&e.key, 5, &outcome).await.unwrap());
    }
    h.restart().await;
    let s = h.s();
    let dead = s.list_alerts(&AlertQuery::new(10).state(AlertState::Dead)).await.unwrap();
    assert_eq!(dead.iter().map(|e| &e.key).collect::<Vec<_>>(), [&key]);
    assert!(s.claim_alerts(&claim(NOW + 10_000)).await.unwrap().is_empty(), "nothing pending");
    assert!(s.requeue_alert(&key, NOW + 200).await.unwrap());
    assert!(!s.requeue_alert(&key, NOW + 200).await.unwrap(), "pending already");
    assert!(!s.requeue_alert(&AlertKey::new("alert_none", "tenant"), NOW).await.unwrap());
    let got = s.claim_alerts(&claim(NOW + 200)).await.unwrap();
    assert_eq!(got.iter().map(|e| &e.key).collect::<Vec<_>>(), [&key]);
    // Pending rows outlive their keep time; delivered ones go after it.
    assert_eq!(s.prune_alerts(NOW + DAY).await.unwrap(), 0, "not past keep_until yet");
    assert_eq!(s.prune_alerts(NOW + 2 * DAY).await.unwrap(), 1, "the delivered row");
    let left = s.list_alerts(&AlertQuery::new(10)).await.unwrap();
    assert_eq!(left.iter().map(|e| e.key.clone()).collect::<Vec<_>>(), [key]);
    // Listing pages in key order.
    let more: Vec<OutboxEntry> = (0..5).map(|i| row(&format!("alert_z{i}"), "tenant", "{}")).collect();
    s.put_alerts(&more).await.unwrap();
    let page = s.list_alerts(&AlertQuery::new(2)).await.unwrap();
    assert_eq!(page.len(), 2);
    let next = s.list_alerts(&AlertQuery::new(10).after(page[1].key.clone())).await.unwrap();
    assert_eq!(next.len(), 4);
    assert!(next[0].key > page[1].key);
}
