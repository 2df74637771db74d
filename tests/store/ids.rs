//! Usage event ids and webhook event ids are never forgotten inside their 35 days: at the cap
//! a new one is refused as retryable (`StoreError::Full`), the ones held still answer as
//! duplicates, and room comes back as ids age out.

use crate::common::NOON;

use tollgate::store::prelude::*;
use tollgate::store::{EventOutcome, PlanChange, PlanChangeOutcome, StoreError, TenantRecord, UsageEvent, UsageRecord};

const DAY: i64 = 86_400;

fn event(id: &str, at: i64) -> UsageEvent {
    UsageEvent::new(id, UsageRecord::new("t".into(), "requests".into(), at - at.rem_euclid(3600), 1), at)
}

async fn ids_are_refused_at_the_cap_never_forgotten<S: UsageStore + DirectoryStore + ?Sized>(store: &S) {
    for i in 0..3 {
        assert_eq!(store.commit_events(&[event(&format!("e{i}"), NOON + i)]).await.unwrap(), [EventOutcome::Applied]);
    }
    let full = store.commit_events(&[event("e3", NOON + 10)]).await;
    assert!(matches!(full, Err(StoreError::Full(_))), "refused, retryable: {full:?}");
    // Past the cap, nothing was forgotten: a redelivery is still a duplicate.
    for i in 0..3 {
        assert_eq!(
            store.commit_events(&[event(&format!("e{i}"), NOON + i)]).await.unwrap(),
            [EventOutcome::Duplicate],
            "e{i} is remembered"
        );
    }
    let usage = store.usage_range(&"t".into(), NOON - DAY, NOON + DAY).await.unwrap();
    assert_eq!(usage.iter().map(|a| a.quantity).sum::<u64>(), 3, "nothing counted twice, the refused one not at all");
    // 36 days on, the first ids are past their horizon: room again.
    assert_eq!(store.commit_events(&[event("e4", NOON + 36 * DAY)]).await.unwrap(), [EventOutcome::Applied]);

    // Webhook event ids alike.
    store.put_tenant(&TenantRecord::new("t".into(), "free".into()).with_customer("cus_t"), &[]).await.unwrap();
    for i in 0..3 {
        let change = PlanChange::new(format!("evt_{i}"), "cus_t", NOON + i, "pro".into());
        assert!(matches!(store.apply_plan_change(&change).await.unwrap(), PlanChangeOutcome::Applied(_)));
    }
    let full = store.apply_plan_change(&PlanChange::new("evt_3", "cus_t", NOON + 10, "free".into())).await;
    assert!(matches!(full, Err(StoreError::Full(_))), "{full:?}");
    assert_eq!(store.tenant(&"t".into()).await.unwrap().unwrap().plan.as_str(), "pro", "nothing changed");
    let again = store.apply_plan_change(&PlanChange::new("evt_0", "cus_t", NOON, "free".into())).await.unwrap();
    assert_eq!(again, PlanChangeOutcome::Duplicate);
    let later = PlanChange::new("evt_4", "cus_t", NOON + 36 * DAY, "team".into());
    assert!(matches!(store.apply_plan_change(&later).await.unwrap(), PlanChangeOutcome::Applied(_)));
}

#[tokio::test]
async fn memory() {
    let store = tollgate::store::MemoryStore::new();
    store.set_event_id_cap(3);
    ids_are_refused_at_the_cap_never_forgotten(&store).await;
}

#[tokio::test]
async fn sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate::store::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    store.set_event_id_cap(3);
    ids_are_refused_at_the_cap_never_forgotten(&store).await;
    // Reopened: the ids are counted from the file.
    drop(store);
    let store = tollgate::store::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    store.set_event_id_cap(1);
    let full = store.commit_events(&[event("e5", NOON + 36 * DAY + 1)]).await;
    assert!(matches!(full, Err(StoreError::Full(_))), "{full:?}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres() {
    let Some((store, options)) = crate::common::postgres::store().await else { return };
    store.set_event_id_cap(3);
    ids_are_refused_at_the_cap_never_forgotten(&store).await;
    // Reopened: the ids are counted in the schema.
    drop(store);
    let store = tollgate::store::PostgresStore::open(&options).await.unwrap();
    store.set_event_id_cap(1);
    let full = store.commit_events(&[event("e5", NOON + 36 * DAY + 1)]).await;
    assert!(matches!(full, Err(StoreError::Full(_))), "{full:?}");
}
