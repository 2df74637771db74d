//! The tenant directory as a running node sees it: unknown credentials cost bounded store
//! traffic, the tenant cap holds without the worker, and removed keys and plan changes reach
//! running nodes within `limits.directory_ttl` (at once through `invalidate_*`).

use crate::common;

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use common::{Faulty, Harness, NOON};
use tollgate::door::{Admission, Credential, RequestInfo};
use tollgate::store::KeyHash;
use tollgate::{clock::Clock, store::TenantRecord};

const PLANS: &str = "[limits]\nnegative_ttl = \"10s\"\ndirectory_ttl = \"60s\"\n[plans.free]\nrate = \"1000/s\"\n[plans.pro]\nrate = \"5000/s\"\n";

fn node(toml: &str) -> (Harness, Arc<Faulty>) {
    let store = Arc::new(Faulty::default());
    let (clock, handle) = Clock::fake_at_unix(NOON);
    (Harness::build(toml, store.clone(), clock, handle), store)
}

#[tokio::test]
async fn unknown_credentials_cause_bounded_store_traffic() {
    // Lookups per client address are limited apart (tests/engine/clients.rs): not here (a
    // public address of its own, with room for every lookup). The cache of unknown keys also
    // drops its entries `negative_ttl` after their insert by the machine's own clock (it keeps
    // nothing longer): a TTL of an hour, so that a slow machine's 100,000 requests all fall
    // within one.
    let plans = PLANS.replace("negative_ttl = \"10s\"", "negative_ttl = \"1h\"");
    assert_ne!(plans, PLANS);
    let (h, store) = node(&format!("[identify]\nunknown_key_rate = \"100000/s\"\n{plans}"));
    let status = |key: String| {
        let mut r = common::req("GET", "/", Some(&key), None);
        r.extensions_mut().insert(tollgate::door::ClientAddr("203.0.113.1".parse().unwrap()));
        let h = &h;
        async move { h.send(r).await.status.as_u16() }
    };
    for i in 0..100_000u32 {
        let r = status(format!("unknown-{}", i % 1000)).await;
        assert_eq!(r, 401);
    }
    let lookups = store.lookups.load(Ordering::SeqCst);
    assert!(lookups <= 1_050, "{lookups} lookups for 1,000 unknown keys within one TTL");
    assert!(h.tollgate.stats().negative_hits >= 99_000);
    // After the TTL, they are asked again (once each).
    h.clock.advance(Duration::from_secs(3601));
    for i in 0..1000u32 {
        assert_eq!(status(format!("unknown-{i}")).await, 401);
    }
    assert_eq!(store.lookups.load(Ordering::SeqCst) - lookups, 1_000);
}

/// A key refused as unknown and then issued is accepted `negative_ttl` after the lookup that
/// refused it, however often the client retries meanwhile (a hit does not renew the entry).
#[tokio::test]
async fn a_key_issued_after_it_was_refused_is_accepted_within_the_negative_ttl() {
    let (h, store) = node(PLANS);
    assert_eq!(h.status("/", "key-new").await, 401);
    let lookups = store.lookups.load(Ordering::SeqCst);
    let record = TenantRecord::new("acme".into(), "free".into());
    store.inner.put_tenant(&record, &[KeyHash::of(b"key-new")]).await.unwrap();
    // Retried every second: refused from the cache until the entry's 10 s are up.
    for second in 1..10 {
        h.clock.advance(Duration::from_secs(1));
        assert_eq!(h.status("/", "key-new").await, 401, "at {second} s: remembered as unknown");
    }
    assert_eq!(store.lookups.load(Ordering::SeqCst), lookups, "no lookup while remembered");
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(&h.get("/", "key-new").await.body[..], b"acme on free", "10 s after the lookup that refused it");
}

/// Concurrent requests with one key the node does not hold cost one directory lookup, known
/// or not: the others wait for its answer (single-flight per key).
#[tokio::test]
async fn concurrent_lookups_of_one_key_ask_the_directory_once() {
    let (h, store) = node(PLANS);
    store.lookup_delay_ms.store(50, Ordering::SeqCst);
    let record = TenantRecord::new("acme".into(), "free".into());
    store.inner.put_tenant(&record, &[KeyHash::of(b"key-known")]).await.unwrap();
    for (key, status) in [("key-unknown", 401), ("key-known", 200)] {
        let before = store.lookups.load(Ordering::SeqCst);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let svc = h.svc.clone();
            tasks.spawn(async move {
                use tower::ServiceExt;
                svc.oneshot(common::req("GET", "/", Some(key), None)).await.unwrap().status().as_u16()
            });
        }
        let replies = tasks.join_all().await;
        assert!(replies.iter().all(|s| *s == status), "{key}: {replies:?}");
        assert_eq!(store.lookups.load(Ordering::SeqCst) - before, 1, "{key}: one lookup for 100 requests");
    }
}

#[tokio::test]
async fn the_tenant_cap_holds_without_the_worker() {
    let (h, store) = node(&format!("[limits]\nmax_tenants = 10\n{}", &PLANS[9..]));
    for i in 0..100 {
        let record = TenantRecord::new(format!("t{i}").into(), "free".into());
        store.inner.put_tenant(&record, &[KeyHash::of(format!("key-{i}").as_bytes())]).await.unwrap();
    }
    for i in 0..100 {
        assert_eq!(h.status("/", &format!("key-{i}")).await, 200);
        assert!(h.tollgate.stats().tracked_tenants <= 10, "at tenant {i}: {}", h.tollgate.stats().tracked_tenants);
    }
    // Nothing recorded was lost with the evicted states.
    h.tollgate.flush().await.unwrap();
    h.tollgate.flush().await.unwrap();
    let mut total = 0;
    for i in 0..100 {
        total += common::committed(&*store, &format!("t{i}"), "requests", NOON - 3600, NOON + 3600, 3600).await;
    }
    assert_eq!(total, 100);
}

#[tokio::test]
async fn removed_keys_and_plan_changes_reach_a_running_node() {
    let (h, store) = node(PLANS);
    let worker_less = h.tollgate.clone();
    let acme = TenantRecord::new("acme".into(), "free".into());
    let key = KeyHash::of(b"key-acme");
    store.inner.put_tenant(&acme, &[key, KeyHash::of(b"key-acme-2")]).await.unwrap();
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free");
    assert_eq!(h.status("/", "key-acme-2").await, 200);

    // The plan changes and a key is removed in the store (by another node, or the CLI).
    store.inner.put_tenant(&TenantRecord::new("acme".into(), "pro".into()), &[]).await.unwrap();
    store.inner.remove_key(&key).await.unwrap();
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free", "cached within the TTL");
    // The node keeps serving the tenant (seen every 10 s) past the TTL; revalidation runs
    // off the request path (the worker's, here called directly).
    for _ in 0..4 {
        h.clock.advance(Duration::from_secs(10));
        assert_eq!(&h.get("/", "key-acme-2").await.body[..], b"acme on free", "cached within the TTL");
        assert_eq!(worker_less.revalidate().await, 0, "not due yet");
    }
    h.clock.advance(Duration::from_secs(10));
    assert_eq!(worker_less.revalidate().await, 1, "due within the TTL: read again");
    assert_eq!(h.status("/", "key-acme").await, 401, "the removed key stops working");
    assert_eq!(&h.get("/", "key-acme-2").await.body[..], b"acme on pro", "the plan change reached the node");

    // At once through invalidate_tenant.
    store.inner.put_tenant(&TenantRecord::new("acme".into(), "free".into()), &[]).await.unwrap();
    h.tollgate.invalidate_tenant(&"acme".into());
    assert_eq!(&h.get("/", "key-acme-2").await.body[..], b"acme on free");
    // And a key at once through invalidate_key.
    store.inner.remove_key(&KeyHash::of(b"key-acme-2")).await.unwrap();
    h.tollgate.invalidate_key(b"key-acme-2");
    assert_eq!(h.status("/", "key-acme-2").await, 401);
    // Usage recorded under the old plan was kept.
    h.tollgate.flush().await.unwrap();
    h.tollgate.flush().await.unwrap();
    let billed = common::committed(&*store, "acme", "requests", NOON - 3600, NOON + 7200, 3600).await;
    assert_eq!(billed, 9);
}

/// A node whose directory holds acme on the free plan, reached by `key-acme`.
async fn acme_on_free() -> (Harness, Arc<Faulty>) {
    acme_on_free_of(PLANS).await
}

/// [`acme_on_free`] under the configuration `toml`.
async fn acme_on_free_of(toml: &str) -> (Harness, Arc<Faulty>) {
    let (h, store) = node(toml);
    store
        .inner
        .put_tenant(&TenantRecord::new("acme".into(), "free".into()), &[KeyHash::of(b"key-acme")])
        .await
        .unwrap();
    (h, store)
}

/// A key lookup that read the directory before the key was removed there, and before the
/// node was told (`invalidate_key`), must not leave the key working: the request in flight
/// may be served (it was sent before the removal), the next one is refused.
#[tokio::test]
async fn a_key_removed_while_its_lookup_is_in_flight_stops_working() {
    let (h, store) = node(PLANS);
    let key = KeyHash::of(b"key-acme");
    store.inner.put_tenant(&TenantRecord::new("acme".into(), "free".into()), &[key]).await.unwrap();
    let (entered, release) = store.hold_next_key_lookup();
    let (first, ()) = tokio::join!(h.status("/", "key-acme"), async {
        // The lookup has the record; the key is removed and the node told before it answers.
        entered.notified().await;
        store.inner.remove_key(&key).await.unwrap();
        h.tollgate.invalidate_key(b"key-acme");
        release.notify_one();
    });
    assert!(first == 200 || first == 401, "{first}");
    assert_eq!(h.tollgate.stats().tracked_tenants, 0, "nothing of the older read is held");
    assert_eq!(h.status("/", "key-acme").await, 401, "the removed key stops working at once");
    assert_eq!(h.status("/", "key-acme").await, 401);
}

/// The same for a plan changed while a lookup of one of the tenant's keys is in flight, the
/// node told (`invalidate_tenant`): the next request is served on the new plan, not on the
/// record the lookup read before the change.
#[tokio::test]
async fn a_plan_changed_while_a_lookup_is_in_flight_is_served_at_once() {
    let (h, store) = acme_on_free().await;
    let (entered, release) = store.hold_next_key_lookup();
    let (first, ()) = tokio::join!(h.get("/", "key-acme"), async {
        entered.notified().await;
        store.inner.put_tenant(&TenantRecord::new("acme".into(), "pro".into()), &[]).await.unwrap();
        h.tollgate.invalidate_tenant(&"acme".into());
        release.notify_one();
    });
    let first = first.body;
    assert!(&first[..] == b"acme on free" || &first[..] == b"acme on pro", "{first:?}");
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on pro", "the change applies at once");
}

/// A tenant that changes in the directory during every read of a lookup (three reads) is
/// refused with a 503 to send again, and nothing of it is held: the next request reads it
/// once and is served.
#[tokio::test]
async fn a_lookup_overtaken_by_a_change_at_every_read_is_refused_to_send_again() {
    let (h, store) = acme_on_free().await;
    let gate = || store.hold_next_key_lookup();
    let (mut entered, mut release) = gate();
    let lookups = store.lookups.load(Ordering::SeqCst);
    // Bounded in real time: a lookup that read only once would leave the second wait alone.
    let both = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(h.send(common::req("GET", "/", Some("key-acme"), None)), async {
            for read in 0..3 {
                entered.notified().await;
                h.tollgate.invalidate_tenant(&"acme".into());
                let this = release.clone();
                if read < 2 {
                    (entered, release) = gate();
                }
                this.notify_one();
            }
        })
    });
    let (refused, ()) = both.await.expect("the lookup read three times");
    assert_eq!(refused.status.as_u16(), 503);
    assert!(refused.headers.get("retry-after").is_some());
    assert_eq!(store.lookups.load(Ordering::SeqCst) - lookups, 3, "three reads");
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free");
    assert_eq!(store.lookups.load(Ordering::SeqCst) - lookups, 4, "nothing was held of it");
}

/// A revalidation that read a tenant's record before a change the node was told of
/// (`invalidate_tenant`) does not undo the change with its older record.
#[tokio::test]
async fn a_revalidation_that_read_before_a_change_does_not_undo_it() {
    let (h, store) = node(PLANS);
    let free = TenantRecord::new("acme".into(), "free".into());
    store.inner.put_tenant(&free, &[KeyHash::of(b"key-acme")]).await.unwrap();
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free");
    // The plan moves to pro in the store; the revalidation due reads that, and is held.
    store.inner.put_tenant(&TenantRecord::new("acme".into(), "pro".into()), &[]).await.unwrap();
    h.clock.advance(Duration::from_secs(60));
    let (entered, release) = store.hold_next_key_lookup();
    let both = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(h.tollgate.revalidate(), async {
            entered.notified().await;
            // Moved back to free before the revalidation answers, and the node told.
            store.inner.put_tenant(&free, &[]).await.unwrap();
            h.tollgate.invalidate_tenant(&"acme".into());
            assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free");
            release.notify_one();
        })
    });
    let (read, ()) = both.await.expect("the revalidation read the tenant");
    assert_eq!(read, 1);
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free", "the older read does not undo the change");
}

/// A reload while a lookup reads the directory: the tenant is served under the configuration
/// in force, not attached under the one the lookup began with (here the reload drops its plan:
/// refused, and not served the dropped plan on later requests).
#[tokio::test]
async fn a_reload_while_a_lookup_reads_the_directory_wins_over_it() {
    let (h, store) = acme_on_free().await;
    let (entered, release) = store.hold_next_key_lookup();
    let without_free = PLANS.replace("[plans.free]\nrate = \"1000/s\"\n", "");
    assert_ne!(without_free, PLANS);
    let (first, ()) = tokio::join!(h.status("/", "key-acme"), async {
        entered.notified().await;
        h.tollgate.reload(tollgate::Config::from_toml_str(&without_free).unwrap()).await.unwrap();
        release.notify_one();
    });
    assert!(first == 200 || first == 503, "{first}");
    assert_eq!(h.status("/", "key-acme").await, 503, "the dropped plan is not served");
}

/// A directory record named like the anonymous tenant (or outside the tenant id grammar) is
/// never served as another tenant: unknown callers keep the anonymous tenant to themselves.
#[tokio::test]
async fn a_record_that_would_share_the_anonymous_tenant_is_refused() {
    let toml = format!("[identify]\nunknown = \"anonymous\"\nanonymous_plan = \"free\"\n{PLANS}");
    let (h, store) = node(&toml);
    store
        .inner
        .put_tenant(&TenantRecord::new("anonymous".into(), "pro".into()), &[KeyHash::of(b"key-x")])
        .await
        .unwrap();
    store.inner.put_tenant(&TenantRecord::new("a b".into(), "pro".into()), &[KeyHash::of(b"key-y")]).await.unwrap();
    assert_eq!(h.status("/", "key-x").await, 503);
    assert_eq!(h.status("/", "key-y").await, 503);
    assert_eq!(&h.get("/", "key-unknown").await.body[..], b"anonymous on free");
}

/// A request routed under one configuration and served by a tenant state of the next (a
/// reload while it waited on the directory) is charged on the meter of the same name.
#[tokio::test]
async fn a_request_waiting_across_a_reload_keeps_its_meter() {
    let a = "[meters.tokens]\n[plans.free]\n[[routes]]\npath = \"/gen\"\nmeter = \"tokens\"\n";
    let b = "[meters.images]\n[meters.tokens]\n[plans.free]\n[[routes]]\npath = \"/gen\"\nmeter = \"tokens\"\n";
    let (h, store) = acme_on_free_of(a).await;
    let info = tollgate::door::RequestInfo::new("GET", "/gen", tollgate::door::Credential::ApiKey(b"key-acme"));
    let tollgate::door::Admission::Pending(pending) = h.tollgate.admit(&info) else { panic!("an unseen tenant waits") };
    h.tollgate.reload(tollgate::Config::from_toml_str(b).unwrap()).await.unwrap();
    let ticket = h.tollgate.resolve(pending).await.unwrap();
    assert!(ticket.complete(200));
    h.tollgate.flush().await.unwrap();
    assert_eq!(common::committed(&*store, "acme", "tokens", NOON - 3600, NOON + 3600, 3600).await, 1);
    assert_eq!(common::committed(&*store, "acme", "images", NOON - 3600, NOON + 3600, 3600).await, 0);
}

/// A plan change that the tenant's overrides do not fit (here a `burst` over a plan without a
/// rate) is served without the overrides, logged and counted: never the old plan (a running
/// node kept it for as long as it ran), never a 503 (a node meeting the tenant anew refused it).
#[tokio::test]
async fn a_plan_change_the_overrides_do_not_fit_is_served_without_them() {
    let toml = format!("{PLANS}[plans.norate]\n");
    let (h, store) = node(&toml);
    let mut acme = TenantRecord::new("acme".into(), "free".into());
    acme.overrides = Some(r#"{"burst": 50}"#.into());
    store.inner.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free");
    // The plan changes in the store (a webhook on another node), the overrides kept.
    acme.plan = "norate".into();
    store.inner.put_tenant(&acme, &[]).await.unwrap();
    h.clock.advance(Duration::from_secs(61));
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on free", "until revalidated");
    h.tollgate.revalidate().await;
    assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on norate", "the new plan, without the overrides");
    assert_eq!(h.tollgate.stats().overrides_not_served, 1);
    // A node meeting the tenant for the first time serves it the same.
    let (other, other_store) = node(&toml);
    other_store.inner.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    assert_eq!(&other.get("/", "key-acme").await.body[..], b"acme on norate");
    assert_eq!(other.tollgate.stats().overrides_not_served, 1);
}

/// Only the part of the overrides that does not fit goes: a quota the overrides tightened
/// stays tight when their burst no longer fits the tenant's new plan.
#[tokio::test]
async fn overrides_that_partly_fit_keep_the_part_that_fits() {
    let toml = format!("{PLANS}[plans.norate]\n");
    let (h, store) = node(&toml);
    let mut acme = TenantRecord::new("acme".into(), "norate".into());
    acme.overrides =
        Some(r#"{"burst": 50, "quotas": {"requests": {"limit": 3, "period": "day", "mode": "hard"}}}"#.into());
    store.inner.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    for _ in 0..3 {
        assert_eq!(&h.get("/", "key-acme").await.body[..], b"acme on norate");
    }
    assert_eq!(h.status("/", "key-acme").await, 429, "the overridden quota holds");
    assert_eq!(h.tollgate.stats().overrides_not_served, 1);
}

/// `Admin::set_plan` writes only over what it read: a webhook applied between its read and its
/// write is kept (its event time too, so an older event delivered late stays stale); the
/// operator's plan is written over it.
#[tokio::test]
async fn set_plan_keeps_a_webhook_applied_between_its_read_and_its_write() {
    use tollgate::store::prelude::*;
    use tollgate::store::{PlanChange, PlanChangeOutcome};
    let store = std::sync::Arc::new(common::Faulty::default());
    let tenant = TenantRecord::new("t".into(), "free".into()).with_customer("cus_t");
    store.put_tenant(&tenant, &[]).await.unwrap();
    *store.plan_change_after_read.lock().unwrap() = Some(PlanChange::new("evt_2", "cus_t", NOON, "pro".into()));
    let admin = tollgate::admin::Admin::new(store.clone());
    let record = admin.set_plan("t", "team").await.unwrap();
    assert_eq!(record.plan.as_str(), "team");
    let stored = store.tenant(&"t".into()).await.unwrap().unwrap();
    assert_eq!((stored.plan.as_str(), stored.last_event_at), ("team", Some(NOON)), "the webhook's mark kept");
    // An event older than the webhook's, delivered late, does not undo the operator's plan.
    let late = store.apply_plan_change(&PlanChange::new("evt_1", "cus_t", NOON - 60, "free".into())).await.unwrap();
    assert_eq!(late, PlanChangeOutcome::Stale);
    assert_eq!(store.tenant(&"t".into()).await.unwrap().unwrap().plan.as_str(), "team");
}

/// `Admin::set_overrides` writes only over the plan it checked the overrides against: a plan
/// changed between its check and its write (a webhook) is read and checked again, and
/// overrides that do not fit the new plan are refused, nothing written. (Before, both writes
/// landed and left overrides the plan cannot take.)
#[tokio::test]
async fn set_overrides_checks_them_against_the_plan_they_are_written_over() {
    use tollgate::store::prelude::*;
    use tollgate::store::PlanChange;
    let config = tollgate::Config::from_toml_str(
        "[plans.free]\nrate = \"10/s\"\n[plans.norate]\nquotas.requests = { limit = 100, period = \"day\" }\n",
    )
    .unwrap();
    let store = std::sync::Arc::new(common::Faulty::default());
    let tenant = TenantRecord::new("t".into(), "free".into()).with_customer("cus_t");
    store.put_tenant(&tenant, &[]).await.unwrap();
    // A webhook moves the tenant to a plan without a rate just after the admin read it.
    *store.plan_change_after_read.lock().unwrap() = Some(PlanChange::new("evt_1", "cus_t", NOON, "norate".into()));
    let admin = tollgate::admin::Admin::new(store.clone()).with_config(config);
    let e = admin.set_overrides("t", Some(r#"{"burst": 5}"#)).await.unwrap_err().to_string();
    assert!(e.contains("a burst needs a rate"), "{e}");
    let stored = store.tenant(&"t".into()).await.unwrap().unwrap();
    assert_eq!((stored.plan.as_str(), stored.overrides), ("norate", None), "the webhook's plan, no overrides");
    // Over the plan as it is now, overrides that fit it are written.
    let record = admin.set_overrides("t", Some(r#"{"rate": "5/s"}"#)).await.unwrap();
    assert_eq!(record.plan.as_str(), "norate");
    assert!(store.tenant(&"t".into()).await.unwrap().unwrap().overrides.unwrap().contains("5/s"));
}

/// A key refused as unknown that a reload then declares (`[tenants.NAME] keys`) is served on
/// the next request: the reload forgets what the node remembered as unknown, as it lets go of
/// every tenant, instead of refusing the key for the rest of `negative_ttl`.
#[tokio::test]
async fn a_key_a_reload_declares_is_served_at_once_after_a_refusal() {
    let (h, _store) = node(PLANS);
    assert_eq!(h.status("/", "key-declared").await, 401);
    let declared = format!("{PLANS}[tenants.acme]\nplan = \"free\"\nkeys = [\"key-declared\"]\n");
    h.tollgate.reload(tollgate::Config::from_toml_str(&declared).unwrap()).await.unwrap();
    assert_eq!(&h.get("/", "key-declared").await.body[..], b"acme on free", "served within the negative TTL");
}

/// A request to `/` with `credential`, on `h`'s engine: its ticket, or why it was refused.
async fn ticket_for(h: &Harness, credential: Credential<'_>) -> Result<tollgate::door::Ticket, tollgate::Rejection> {
    let info = RequestInfo::new("GET", "/", credential);
    match h.tollgate.admit(&info) {
        Admission::Admitted(t) => Ok(t),
        Admission::Pending(p) => h.tollgate.resolve(p).await,
        Admission::Rejected(r) => Err(r),
    }
}

/// Refused as unknown, whatever the caller retries.
async fn refused_as_unknown(h: &Harness, credential: Credential<'_>) {
    let refused = ticket_for(h, credential).await.expect_err("unknown");
    assert_eq!(refused.kind(), tollgate::RejectionKind::UnknownCredentials);
}

/// A tenant id refused as unknown (its identity given by an earlier layer) and then created in
/// the directory is served at once when the node is told (`invalidate_tenant`), as a key is
/// after `invalidate_key`.
#[tokio::test]
async fn a_tenant_created_after_a_refusal_is_served_once_the_node_is_told() {
    let (h, store) = node(PLANS);
    refused_as_unknown(&h, Credential::Tenant("acme")).await;
    store.inner.put_tenant(&TenantRecord::new("acme".into(), "free".into()), &[]).await.unwrap();
    h.tollgate.invalidate_tenant(&"acme".into());
    let ticket = ticket_for(&h, Credential::Tenant("acme")).await;
    assert!(ticket.expect("the tenant the node was told of is served").complete(200));
}

/// The same through `Admin` on the engine's node: a tenant id refused as unknown and then
/// added is served at once, not after `negative_ttl`.
#[tokio::test]
async fn a_tenant_admin_adds_after_a_refusal_is_served_at_once() {
    let (h, _store) = node(PLANS);
    let admin = tollgate::admin::Admin::for_engine(&h.tollgate);
    refused_as_unknown(&h, Credential::Tenant("acme")).await;
    admin.add_tenant("acme", "free", None).await.unwrap();
    let ticket = ticket_for(&h, Credential::Tenant("acme")).await;
    assert!(ticket.expect("the tenant Admin added is served").complete(200));
}

/// A key refused as unknown and then imported (a cut-over from another gateway, whose clients
/// kept sending their keys) is served at once on the node that imported it, whether the file
/// gives the key or only its SHA-256.
#[tokio::test]
async fn keys_admin_imports_after_a_refusal_are_served_at_once() {
    let (h, _store) = node(PLANS);
    let admin = tollgate::admin::Admin::for_engine(&h.tollgate);
    assert_eq!(h.status("/", "key-imported").await, 401);
    assert_eq!(h.status("/", "key-hashed").await, 401);
    let sha = tollgate::store::KeyHash::of(b"key-hashed").to_hex();
    admin.import_csv("tenant,plan,key\nacme,free,key-imported\n").await.unwrap();
    assert_eq!(&h.get("/", "key-imported").await.body[..], b"acme on free", "served within the negative TTL");
    assert_eq!(h.status("/", "key-hashed").await, 401, "refused again before its import");
    admin.import_csv(&format!("tenant,key_sha256\nacme,{sha}\n")).await.unwrap();
    assert_eq!(&h.get("/", "key-hashed").await.body[..], b"acme on free", "served within the negative TTL");
}

/// A billing customer `Admin` moves to another tenant leaves the tenant that held it at once
/// on the engine's node (its handlers no longer see it, its usage is no longer flushed as an
/// export candidate), as the tenant that takes it gets it: both are told.
#[tokio::test]
async fn a_customer_admin_moves_leaves_its_former_tenant_at_once() {
    let (h, store) = node(PLANS);
    let admin = tollgate::admin::Admin::for_engine(&h.tollgate);
    admin.add_tenant("acme", "free", Some("cus_1")).await.unwrap();
    store
        .inner
        .put_tenant(&store.inner.tenant(&"acme".into()).await.unwrap().unwrap(), &[KeyHash::of(b"key-acme")])
        .await
        .unwrap();
    async fn customer(h: &Harness) -> Option<String> {
        let ticket = ticket_for(h, Credential::ApiKey(b"key-acme")).await.expect("served");
        let customer = ticket.context().customer().map(str::to_owned);
        assert!(ticket.complete(200));
        customer
    }
    assert_eq!(customer(&h).await.as_deref(), Some("cus_1"));
    admin.add_tenant_moving_customer("beta", "free", "cus_1").await.unwrap();
    assert_eq!(customer(&h).await, None, "moved away with add_tenant_moving_customer");
    let held = admin.set_customer("acme", Some("cus_1"), false).await.unwrap_err();
    assert!(matches!(held, tollgate::admin::AdminError::CustomerHeld { .. }), "{held:?}");
    admin.set_customer("beta", None, false).await.unwrap();
    admin.set_customer("acme", Some("cus_2"), false).await.unwrap();
    assert_eq!(customer(&h).await.as_deref(), Some("cus_2"));
    admin.set_customer("beta", Some("cus_2"), true).await.unwrap();
    assert_eq!(customer(&h).await, None, "moved away with set_customer(take)");
}

/// A tenant of the directory moved down and up between plans while four engines on one memory
/// store serve it: every engine applies each move once it follows the directory's feed, and
/// the day's counter ends at what was recorded (tests/common/plan_change.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_change_applies_on_four_engines_on_one_memory_store() {
    let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let whole: std::sync::Arc<dyn tollgate::store::Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::plan_change::a_plan_change_applies_on_every_node_within_a_second(nodes, whole, store).await;
}

/// The same on four engines sharing one SQLite file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_change_applies_on_four_engines_on_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(tollgate::store::SqliteStore::open(dir.path().join("moves.db")).await.unwrap());
    let whole: std::sync::Arc<dyn tollgate::store::Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::plan_change::a_plan_change_applies_on_every_node_within_a_second(nodes, whole, store).await;
}

/// Four engines on one memory store serve a tenant moved between plans every few milliseconds,
/// from 16 tasks while the clock moves: the day's counter ends at exactly what was recorded
/// (tests/common/plan_change.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moves_under_traffic_keep_the_count_exact_on_one_memory_store() {
    let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let whole: std::sync::Arc<dyn tollgate::store::Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::plan_change::moves_under_traffic_keep_the_count_exact(nodes, whole, store).await;
}

/// The same on four engines sharing one SQLite file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moves_under_traffic_keep_the_count_exact_on_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(tollgate::store::SqliteStore::open(dir.path().join("moves.db")).await.unwrap());
    let whole: std::sync::Arc<dyn tollgate::store::Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::plan_change::moves_under_traffic_keep_the_count_exact(nodes, whole, store).await;
}
