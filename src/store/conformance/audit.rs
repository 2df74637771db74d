//! The audit role: each tenant's records numbered one after the other by the store, never the
//! same number twice, listed newest first (a tenant's by number, the fleet's by time, across
//! months), the newest [`AUDIT_PER_TENANT`] of a tenant kept, the old pruned.

use super::*;

use crate::store::{Actor, AuditQuery, AuditRecord, AuditStore, Setting, AUDIT_PER_TENANT};

/// A time in Unix milliseconds.
const NOW_MS: i64 = DAY0 * 1_000;
const DAY_MS: i64 = DAY * 1_000;

fn change(tenant: &str, at: i64, actor: Actor, before: Option<&str>, after: Option<&str>) -> AuditRecord {
    AuditRecord::new(tenant.into(), at, actor, Setting::Plan, before.map(Into::into), after.map(Into::into))
}

fn seqs(records: &[AuditRecord]) -> Vec<(String, i64)> {
    records.iter().map(|r| (r.tenant.to_string(), r.seq)).collect()
}

/// Records keep who, what, before and after; a tenant lists by number, the fleet by time
/// (across months: a change 40 days before the others), each in pages; a restart keeps them.
pub async fn records_are_numbered_per_tenant_and_listed_newest_first<S: ?Sized + AuditStore>(
    h: &mut StoreUnderTest<S>,
) {
    let s = h.s();
    let old = NOW_MS - 40 * DAY_MS;
    let a1 = change("a", old, Actor::Operator("ana".into()), None, Some("team"));
    assert_eq!(s.append_audit(&a1).await.unwrap(), 1);
    let mut spend = AuditRecord::new("a".into(), NOW_MS + 2, Actor::Key("k_9f".into()), Setting::SpendCap, None, None);
    spend.before = Some("5.00 hard".into());
    assert_eq!(
        s.append_audit(&change("b", NOW_MS + 1, Actor::Stripe("evt_1".into()), Some("free"), Some("pro")))
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.append_audit(&spend).await.unwrap(), 2);
    assert_eq!(
        s.append_audit(&change("a", NOW_MS + 3, Actor::Tollgate("grace-ended".into()), Some("team"), Some("free")))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        s.append_audit(&change("b", NOW_MS + 2, Actor::Operator("é ñ".into()), Some("pro"), None)).await.unwrap(),
        2
    );
    h.restart().await;
    let s = h.s();
    let now = NOW_MS + DAY_MS;
    let a = s.list_audit(&AuditQuery::new(now, 10).tenant("a".into())).await.unwrap();
    assert_eq!(seqs(&a), [("a".into(), 3), ("a".into(), 2), ("a".into(), 1)]);
    let mut kept_spend = spend.clone();
    kept_spend.seq = 2;
    assert_eq!(a[1], kept_spend, "who, what, before and after, as written");
    assert_eq!((a[2].before.as_deref(), a[2].after.as_deref()), (None, Some("team")));
    assert_eq!(a[2].actor, Actor::Operator("ana".into()));
    let page = s.list_audit(&AuditQuery::new(now, 2).tenant("a".into())).await.unwrap();
    let next = s.list_audit(&AuditQuery::new(now, 2).tenant("a".into()).before(page[1].cursor())).await.unwrap();
    assert_eq!(seqs(&next), [("a".into(), 1)], "the next page");
    // The fleet, newest first by time (a tenant and a number break a tie of time), in pages.
    let fleet = s.list_audit(&AuditQuery::new(now, 10)).await.unwrap();
    assert_eq!(
        seqs(&fleet),
        [("a".into(), 3), ("b".into(), 2), ("a".into(), 2), ("b".into(), 1), ("a".into(), 1)],
        "{fleet:?}"
    );
    let mut paged = Vec::new();
    let mut query = AuditQuery::new(now, 2);
    loop {
        let page = s.list_audit(&query).await.unwrap();
        let Some(last) = page.last() else { break };
        query = query.clone().before(last.cursor());
        paged.extend(page);
    }
    assert_eq!(paged, fleet, "pages of two, across the months");
    let recent = s.list_audit(&AuditQuery::new(now, 10).since(NOW_MS)).await.unwrap();
    assert_eq!(recent.len(), 4, "none older than since");
    assert!(s.list_audit(&AuditQuery::new(now, 10).tenant("c".into())).await.unwrap().is_empty());
}

/// A tenant that changes its settings in a loop pushes out its own oldest changes, never what
/// an operator or a webhook did to it, nor another tenant's records; no number is reused.
pub async fn a_tenant_keeps_its_newest_records_within_the_bound<S: ?Sized + AuditStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    assert_eq!(s.append_audit(&change("other", NOW_MS, Actor::Key("k".into()), None, Some("x"))).await.unwrap(), 1);
    let by_operator = change("busy", NOW_MS, Actor::Operator("ana".into()), None, Some("team"));
    assert_eq!(s.append_audit(&by_operator).await.unwrap(), 1);
    let total = AUDIT_PER_TENANT + 3;
    for i in 2..=total + 1 {
        let at = NOW_MS + i;
        let own = change("busy", at, Actor::Key("k".into()), None, Some(&i.to_string()));
        assert_eq!(s.append_audit(&own).await.unwrap(), i);
    }
    let kept = s.list_audit(&AuditQuery::new(NOW_MS + DAY_MS, 10_000).tenant("busy".into())).await.unwrap();
    assert_eq!(kept.len() as i64, AUDIT_PER_TENANT + 1, "the tenant's newest and the operator's");
    assert_eq!(kept[0].seq, total + 1, "the newest kept");
    assert_eq!(kept[kept.len() - 2].seq, 5, "the tenant's own oldest pushed out");
    assert_eq!(kept.last().unwrap().actor, Actor::Operator("ana".into()), "the operator's change is kept");
    let other = s.list_audit(&AuditQuery::new(NOW_MS + DAY_MS, 10).tenant("other".into())).await.unwrap();
    assert_eq!(seqs(&other), [("other".into(), 1)]);
}

/// Writers appending for one tenant at once each get a number of their own.
pub async fn concurrent_appends_get_numbers_of_their_own<S: ?Sized + AuditStore>(h: &mut StoreUnderTest<S>) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..4 {
        let s = h.shared();
        tasks.spawn(async move {
            let mut got = Vec::new();
            for i in 0..5 {
                let r = change("t", NOW_MS + w * 10 + i, Actor::Operator(format!("w{w}")), None, Some("p"));
                got.push(s.append_audit(&r).await.unwrap());
            }
            got
        });
    }
    let mut all: Vec<i64> = tasks.join_all().await.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=20).collect::<Vec<_>>());
    let listed = h.s().list_audit(&AuditQuery::new(NOW_MS + DAY_MS, 100).tenant("t".into())).await.unwrap();
    assert_eq!(listed.len(), 20);
}

/// A prune removes the records older than its cutoff, of every tenant, and no other.
pub async fn a_prune_removes_what_is_older_than_its_cutoff<S: ?Sized + AuditStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    for (t, at) in [("a", NOW_MS - 50 * DAY_MS), ("b", NOW_MS - 3 * DAY_MS), ("a", NOW_MS - DAY_MS), ("b", NOW_MS)] {
        s.append_audit(&change(t, at, Actor::Operator("ana".into()), None, Some("p"))).await.unwrap();
    }
    assert_eq!(s.prune_audit(NOW_MS - 2 * DAY_MS).await.unwrap(), 2);
    assert_eq!(s.prune_audit(NOW_MS - 2 * DAY_MS).await.unwrap(), 0, "again: nothing");
    let left = s.list_audit(&AuditQuery::new(NOW_MS + DAY_MS, 10).since(0)).await.unwrap();
    assert_eq!(seqs(&left), [("b".into(), 2), ("a".into(), 2)]);
    assert_eq!(
        s.append_audit(&change("a", NOW_MS + 1, Actor::Operator("ana".into()), None, None)).await.unwrap(),
        3,
        "never reused"
    );
}
