//! The usage role: batches once per flush id, events once per id, usage over a range.

use std::collections::BTreeMap;

use super::*;
use crate::store::{CommitOutcome, EventOutcome, Tally, TallyQuery, TallyRead, TallyScope, UsageEvent, UsageInspect};

/// (key, quantity) of `tenant`'s aggregates in the windows starting in `[from, to)`.
pub(super) async fn range<S: ?Sized + UsageInspect>(s: &S, tenant: &str, from: i64, to: i64) -> Vec<(ExportKey, u64)> {
    s.usage_range(&tenant.into(), from, to).await.unwrap().into_iter().map(|a| (a.key, a.quantity)).collect()
}

/// A batch is applied once per flush id, whatever is retried under that id, and later
/// batches add to the same aggregates.
pub async fn usage_commits_once_per_flush_id<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
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

    let all_of_a = vec![(ek("a", "requests", w), 5), (ek("a", "requests", w + HOUR), 2), (ek("a", "tokens", w), 300)];
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
pub async fn a_flush_larger_than_a_batch_commits_once_per_chunk<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
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

/// Usage events apply once per id, within one call and across calls, with one outcome
/// per event in order.
pub async fn usage_events_apply_once_per_id<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
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

/// A tally read as (scope, start, its counts by outcome).
type Read = (TallyScope, i64, BTreeMap<String, u64>);

async fn tallies_of<S: ?Sized + UsageInspect>(s: &S, query: TallyQuery) -> Vec<Read> {
    let read = s.tallies(&query).await.unwrap();
    read.into_iter().map(|t| (t.scope, t.start, t.counts.into_iter().collect())).collect()
}

fn tally(scope: TallyScope, start: i64, counts: &[(&str, u64)]) -> Tally {
    Tally::new(scope, start, counts.iter().map(|(o, n)| ((*o).to_owned(), *n)).collect())
}

fn counts(counts: &[(&str, u64)]) -> BTreeMap<String, u64> {
    counts.iter().map(|(o, n)| ((*o).to_owned(), *n)).collect()
}

/// Tallies are added exactly once per batch id, summed per (scope, window) across batches,
/// and read by scope: the fleet's minutes in a range, every tenant's days in (day, tenant)
/// order, one tenant's, at most `max`. A batch with a tally no store takes changes nothing.
pub async fn tallies_add_once_per_batch_and_read_by_scope<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    // Tallies are kept by the wall clock: written now.
    let now = crate::store::unix_now();
    let m = now - now.rem_euclid(60) - 120;
    let day = m - m.rem_euclid(86_400);
    let (a, b) = (TallyScope::Tenant("a".into()), TallyScope::Tenant("b".into()));
    let t1 = batch("t1", vec![]).with_tallies(vec![
        tally(TallyScope::Fleet, m, &[("admitted", 5), ("quota_exceeded", 2)]),
        tally(TallyScope::Fleet, m + 60, &[("admitted", 1)]),
        tally(b.clone(), day, &[("admitted", 2)]),
        tally(a.clone(), day, &[("admitted", 3), ("rate_limited", 1)]),
    ]);
    assert_eq!(h.s().commit_usage(&t1).await.unwrap(), CommitOutcome::Applied);
    assert_eq!(h.s().commit_usage(&t1).await.unwrap(), CommitOutcome::AlreadyApplied, "once per id");
    let t2 = batch("t2", vec![rec("a", "requests", m, 4)]).with_tallies(vec![
        tally(TallyScope::Fleet, m, &[("admitted", 4)]),
        tally(a.clone(), day, &[("admitted", 1), ("spent_nanos", 500)]),
    ]);
    assert_eq!(h.s().commit_usage(&t2).await.unwrap(), CommitOutcome::Applied);
    assert_eq!(quantity(h.s(), &ek("a", "requests", m)).await, Some(4), "the records of a batch with tallies");

    let fleet = vec![
        (TallyScope::Fleet, m, counts(&[("admitted", 9), ("quota_exceeded", 2)])),
        (TallyScope::Fleet, m + 60, counts(&[("admitted", 1)])),
    ];
    assert_eq!(tallies_of(h.s(), TallyQuery::new(TallyRead::Fleet, m, m + 120)).await, fleet);
    assert_eq!(tallies_of(h.s(), TallyQuery::new(TallyRead::Fleet, m + 60, m + 120)).await, fleet[1..]);
    assert_eq!(tallies_of(h.s(), TallyQuery::new(TallyRead::Fleet, m, m + 60)).await, fleet[..1], "`to` excluded");
    assert_eq!(tallies_of(h.s(), TallyQuery::new(TallyRead::Fleet, m, m + 120).with_max(1)).await, fleet[..1]);
    let tenants = vec![
        (a.clone(), day, counts(&[("admitted", 4), ("rate_limited", 1), ("spent_nanos", 500)])),
        (b.clone(), day, counts(&[("admitted", 2)])),
    ];
    let whole_day = TallyQuery::new(TallyRead::Tenants, day, day + 86_400);
    assert_eq!(tallies_of(h.s(), whole_day.clone()).await, tenants, "in tenant order, no fleet minute among them");
    assert_eq!(tallies_of(h.s(), whole_day.clone().with_max(1)).await, tenants[..1]);
    let of_b = TallyQuery::new(TallyRead::Tenant("b".into()), day, day + 86_400);
    assert_eq!(tallies_of(h.s(), of_b.clone()).await, tenants[1..]);
    let next_day = TallyQuery::new(TallyRead::Tenants, day + 86_400, day + 2 * 86_400);
    assert_eq!(tallies_of(h.s(), next_day).await, []);

    // A tally off its window, or with an outcome that is no name, is refused with its batch.
    for bad in [
        tally(TallyScope::Fleet, m + 1, &[("admitted", 1)]),
        tally(a.clone(), day + 60, &[("admitted", 1)]),
        tally(TallyScope::Fleet, m, &[("Admitted", 1)]),
        tally(TallyScope::Fleet, m, &[("admitted", 1), ("admitted", 1)]),
    ] {
        let refused = batch("t3", vec![rec("a", "requests", m, 100)])
            .with_tallies(vec![tally(TallyScope::Fleet, m, &[("admitted", 100)]), bad]);
        assert!(h.s().commit_usage(&refused).await.is_err());
    }
    assert_eq!(quantity(h.s(), &ek("a", "requests", m)).await, Some(4), "nothing of a refused batch");
    assert_eq!(tallies_of(h.s(), TallyQuery::new(TallyRead::Fleet, m, m + 120)).await, fleet);

    h.restart().await;
    assert_eq!(h.s().commit_usage(&t2).await.unwrap(), CommitOutcome::AlreadyApplied, "after a restart");
    assert_eq!(tallies_of(h.s(), whole_day).await, tenants);
    assert_eq!(tallies_of(h.s(), of_b).await, tenants[1..]);
}

/// Tallies older than `TALLY_KEPT_SECS` by the wall clock are never read, whatever the range
/// asked.
pub async fn tallies_past_their_time_are_not_read<S: ?Sized + UsageInspect>(h: &mut StoreUnderTest<S>) {
    let now = crate::store::unix_now();
    let horizon = now - crate::store::contract::TALLY_KEPT_SECS;
    let old_minute = horizon - horizon.rem_euclid(60) - 3_600;
    let old_day = horizon - horizon.rem_euclid(86_400) - 86_400;
    let m = now - now.rem_euclid(60);
    let old = batch("old", vec![]).with_tallies(vec![
        tally(TallyScope::Fleet, old_minute, &[("admitted", 7)]),
        tally(TallyScope::Tenant("a".into()), old_day, &[("admitted", 7)]),
        tally(TallyScope::Fleet, m, &[("admitted", 1)]),
    ]);
    assert_eq!(h.s().commit_usage(&old).await.unwrap(), CommitOutcome::Applied);
    let fleet = tallies_of(h.s(), TallyQuery::new(TallyRead::Fleet, 0, now + 86_400)).await;
    assert_eq!(fleet, [(TallyScope::Fleet, m, counts(&[("admitted", 1)]))]);
    assert_eq!(tallies_of(h.s(), TallyQuery::new(TallyRead::Tenants, 0, now + 86_400)).await, []);
    assert_eq!(tallies_of(h.s(), TallyQuery::new(TallyRead::Tenant("a".into()), 0, now + 86_400)).await, []);
}
