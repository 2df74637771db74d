//! The directory role: tenants, keys, customers, overrides and plan changes.

use super::*;
use crate::base::{PlanId, TenantId};
use crate::store::{
    ApiKeyRecord, DirectoryStore, KeyHash, PlanChange, PlanChangeOutcome, StoreError, TenantRecord, TenantUpdate,
    UpdateWhen,
};

/// `tenant`'s customer set to `customer` if it is still `read` (and nothing else changed).
async fn set_customer_if_unchanged<S: ?Sized + DirectoryStore>(
    s: &S,
    tenant: &TenantId,
    read: Option<&str>,
    customer: Option<&str>,
) -> Result<bool, StoreError> {
    // The tenant as stored, but for its customer: as given.
    let mut read_as =
        s.tenant(tenant).await?.unwrap_or_else(|| TenantRecord::new(tenant.clone(), PlanId::from("none")));
    read_as.customer = read.map(str::to_owned);
    let update = TenantUpdate::Customer(tenant.clone(), customer.map(str::to_owned));
    s.update_tenant(&update, UpdateWhen::Unchanged(&read_as)).await
}

/// The plan of the tenant `read` describes set to `plan`, if its plan and last billing event
/// are still those read.
async fn set_plan_if_unchanged<S: ?Sized + DirectoryStore>(
    s: &S,
    read: &TenantRecord,
    plan: &PlanId,
) -> Result<bool, StoreError> {
    s.update_tenant(&TenantUpdate::Plan(read.id.clone(), plan.clone()), UpdateWhen::Unchanged(read)).await
}

/// `tenant`'s overrides set, whatever they were.
async fn set_overrides<S: ?Sized + DirectoryStore>(
    s: &S,
    tenant: &TenantId,
    overrides: Option<&str>,
) -> Result<bool, StoreError> {
    let update = TenantUpdate::Overrides(tenant.clone(), overrides.map(str::to_owned));
    s.update_tenant(&update, UpdateWhen::Always).await
}

/// `tenant`'s Metronome customer set, whatever it was.
async fn set_metronome_customer<S: ?Sized + DirectoryStore>(
    s: &S,
    tenant: &TenantId,
    customer: Option<&str>,
) -> Result<bool, StoreError> {
    let update = TenantUpdate::MetronomeCustomer(tenant.clone(), customer.map(str::to_owned));
    s.update_tenant(&update, UpdateWhen::Always).await
}

/// A customer given to a second tenant leaves the first (its record no longer names it), and
/// the first tenant's later changes do not take the customer from the second.
pub async fn a_billing_customer_belongs_to_one_tenant<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let x = TenantRecord::new("x".into(), "free".into()).with_customer("cus_c");
    let y = TenantRecord::new("y".into(), "pro".into()).with_customer("cus_c");
    h.s().put_tenant(&x, &[]).await.unwrap();
    h.s().put_tenant(&y, &[]).await.unwrap();
    h.restart().await;
    assert_eq!(h.s().tenant_by_customer("cus_c").await.unwrap(), Some(y.clone()));
    assert_eq!(h.s().tenant(&"x".into()).await.unwrap().unwrap().customer, None, "x no longer names cus_c");
    // x moves to another customer: cus_c stays with y.
    let x2 = TenantRecord::new("x".into(), "free".into()).with_customer("cus_d");
    h.s().put_tenant(&x2, &[]).await.unwrap();
    assert_eq!(h.s().tenant_by_customer("cus_c").await.unwrap(), Some(y.clone()));
    assert_eq!(h.s().tenant_by_customer("cus_d").await.unwrap(), Some(x2.clone()));
    // y drops its customer: nobody has cus_c.
    h.s().put_tenant(&TenantRecord::new("y".into(), "pro".into()), &[]).await.unwrap();
    assert_eq!(h.s().tenant_by_customer("cus_c").await.unwrap(), None);
    let plan = PlanChange::new("evt_c", "cus_c", 10, "pro".into());
    assert_eq!(h.s().apply_plan_change(&plan).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
}

/// A tenant's Metronome customer is stored beside its Stripe customer, read back by every
/// lookup, kept by plan and customer changes, and cleared by a record without it.
pub async fn a_metronome_customer_is_kept_beside_the_stripe_one<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let key = KeyHash::of(b"key-m");
    let m = TenantRecord::new("m".into(), "free".into()).with_customer("cus_m").with_metronome_customer("acct-m");
    h.s().put_tenant(&m, &[key]).await.unwrap();
    h.restart().await;
    assert_eq!(h.s().tenant(&"m".into()).await.unwrap(), Some(m.clone()));
    assert_eq!(h.s().find_key(&key).await.unwrap(), Some(m.clone()));
    assert_eq!(h.s().tenant_by_customer("cus_m").await.unwrap(), Some(m.clone()));
    assert_eq!(h.s().list_tenants(None, 10).await.unwrap(), vec![m.clone()]);
    let change = PlanChange::new("evt_m", "cus_m", 10, "pro".into());
    assert!(matches!(h.s().apply_plan_change(&change).await.unwrap(), PlanChangeOutcome::Applied(_)));
    assert!(set_customer_if_unchanged(h.s(), &"m".into(), Some("cus_m"), Some("cus_n")).await.unwrap());
    let read = h.s().tenant(&"m".into()).await.unwrap().unwrap();
    assert_eq!(
        (read.plan.as_str(), read.customer.as_deref(), read.metronome_customer.as_deref()),
        ("pro", Some("cus_n"), Some("acct-m"))
    );
    // Set alone: the plan, the customers and the last event stay.
    assert!(set_metronome_customer(h.s(), &"m".into(), Some("acct-m2")).await.unwrap());
    assert!(!set_metronome_customer(h.s(), &"nobody".into(), Some("acct-x")).await.unwrap());
    assert_eq!(h.s().tenant(&"nobody".into()).await.unwrap(), None, "no tenant was made");
    h.restart().await;
    let mut expected = read.clone();
    expected.metronome_customer = Some("acct-m2".into());
    assert_eq!(h.s().tenant(&"m".into()).await.unwrap(), Some(expected));
    assert!(set_metronome_customer(h.s(), &"m".into(), None).await.unwrap());
    assert_eq!(h.s().tenant(&"m".into()).await.unwrap().unwrap().metronome_customer, None);
    h.s().put_tenant(&m, &[]).await.unwrap();
    h.s().put_tenant(&TenantRecord::new("m".into(), "pro".into()), &[]).await.unwrap();
    assert_eq!(h.s().tenant(&"m".into()).await.unwrap().unwrap().metronome_customer, None);
}

/// A tenant's customer is set over the one read only, alone: a customer given to it leaves
/// its holder, its old one leads nowhere, and nothing else of the tenant changes.
pub async fn a_customer_is_set_only_over_what_was_read<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let x = TenantRecord::new("x".into(), "free".into()).with_customer("cus_x");
    let y = TenantRecord::new("y".into(), "pro".into()).with_customer("cus_y");
    h.s().put_tenant(&x, &[]).await.unwrap();
    h.s().put_tenant(&y, &[]).await.unwrap();
    let moved = PlanChange::new("evt_1", "cus_x", 10, "pro".into());
    assert!(matches!(h.s().apply_plan_change(&moved).await.unwrap(), PlanChangeOutcome::Applied(_)));
    let mut x = TenantRecord::new("x".into(), "pro".into()).with_customer("cus_x");
    x.last_event_at = Some(10);
    assert!(!set_customer_if_unchanged(h.s(), &"x".into(), Some("cus_old"), Some("cus_z")).await.unwrap());
    assert!(!set_customer_if_unchanged(h.s(), &"x".into(), None, Some("cus_z")).await.unwrap());
    assert!(!set_customer_if_unchanged(h.s(), &"nobody".into(), None, Some("cus_z")).await.unwrap());
    assert_eq!(h.s().tenant(&"x".into()).await.unwrap(), Some(x.clone()), "refused: nothing changed");
    assert!(set_customer_if_unchanged(h.s(), &"x".into(), Some("cus_x"), Some("cus_z")).await.unwrap());
    h.restart().await;
    let mut expected = x.clone();
    expected.customer = Some("cus_z".into());
    assert_eq!(h.s().tenant(&"x".into()).await.unwrap(), Some(expected.clone()), "only the customer changed");
    assert_eq!(h.s().tenant_by_customer("cus_z").await.unwrap(), Some(expected.clone()));
    assert_eq!(h.s().tenant_by_customer("cus_x").await.unwrap(), None, "the old one leads nowhere");
    // Given y's customer: y loses it.
    assert!(set_customer_if_unchanged(h.s(), &"x".into(), Some("cus_z"), Some("cus_y")).await.unwrap());
    assert_eq!(h.s().tenant(&"y".into()).await.unwrap().unwrap().customer, None);
    assert_eq!(h.s().tenant_by_customer("cus_y").await.unwrap().map(|t| t.id), Some("x".into()));
    // Removed.
    assert!(set_customer_if_unchanged(h.s(), &"x".into(), Some("cus_y"), None).await.unwrap());
    assert_eq!(h.s().tenant(&"x".into()).await.unwrap().unwrap().customer, None);
    assert_eq!(h.s().tenant_by_customer("cus_y").await.unwrap(), None);
}

/// The directory: keys, ids and customers lead to the tenant as stored now.
pub async fn the_directory_finds_tenants_by_key_id_and_customer<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let (k1, k2, k3) = (KeyHash::of(b"key-1"), KeyHash::of(b"key-2"), KeyHash::of(b"key-3"));
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_1");
    h.s().put_tenant(&acme, &[k1, k2]).await.unwrap();
    assert_eq!(h.s().find_key(&k1).await.unwrap(), Some(acme.clone()));
    assert_eq!(h.s().find_key(&k2).await.unwrap(), Some(acme.clone()));
    assert_eq!(h.s().find_key(&k3).await.unwrap(), None);
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(acme.clone()));
    assert_eq!(h.s().tenant(&"nobody".into()).await.unwrap(), None);
    assert_eq!(h.s().tenant_by_customer("cus_1").await.unwrap(), Some(acme.clone()));
    assert_eq!(h.s().tenant_by_customer("cus_none").await.unwrap(), None);

    for id in ["t03", "t01", "zeta", "t02"] {
        h.s().put_tenant(&TenantRecord::new(id.into(), "free".into()), &[]).await.unwrap();
    }
    h.restart().await;
    let ids = |page: Vec<TenantRecord>| page.into_iter().map(|t| t.id.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(h.s().list_tenants(None, 10).await.unwrap()), ["acme", "t01", "t02", "t03", "zeta"]);
    assert_eq!(ids(h.s().list_tenants(None, 2).await.unwrap()), ["acme", "t01"]);
    assert_eq!(ids(h.s().list_tenants(Some(&"t01".into()), 2).await.unwrap()), ["t02", "t03"]);
    assert_eq!(ids(h.s().list_tenants(Some(&"t03".into()), 2).await.unwrap()), ["zeta"]);
    assert_eq!(ids(h.s().list_tenants(Some(&"zeta".into()), 2).await.unwrap()), Vec::<String>::new());
    assert_eq!(ids(h.s().list_tenants(Some(&"t015".into()), 10).await.unwrap()), ["t02", "t03", "zeta"]);
    assert_eq!(h.s().list_tenants(None, 0).await.unwrap(), []);
    assert_eq!(h.s().list_tenants(None, 10).await.unwrap()[0], acme, "listed as stored");

    // A removed key no longer finds its tenant; the others still do.
    h.s().remove_key(&k1).await.unwrap();
    h.s().remove_key(&k3).await.unwrap();
    assert_eq!(h.s().find_key(&k1).await.unwrap(), None);
    assert_eq!(h.s().find_key(&k2).await.unwrap(), Some(acme.clone()));

    // Replaced: another plan and another customer.
    let moved = TenantRecord::new("acme".into(), "pro".into()).with_customer("cus_2");
    h.s().put_tenant(&moved, &[k2, k3]).await.unwrap();
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(moved.clone()));
    assert_eq!(h.s().find_key(&k2).await.unwrap(), Some(moved.clone()));
    assert_eq!(h.s().find_key(&k3).await.unwrap(), Some(moved.clone()));
    assert_eq!(h.s().find_key(&k1).await.unwrap(), None);
    assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), Some(moved.clone()));
    assert_eq!(h.s().tenant_by_customer("cus_1").await.unwrap(), None, "the old customer no longer finds it");
    h.restart().await;
    assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), Some(moved.clone()));
    assert_eq!(h.s().tenant_by_customer("cus_1").await.unwrap(), None);
    assert_eq!(h.s().list_tenants(None, 10).await.unwrap().len(), 5, "replaced, not added");

    // Replaced without a customer.
    let plain = TenantRecord::new("acme".into(), "pro".into());
    h.s().put_tenant(&plain, &[]).await.unwrap();
    assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), None);
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(plain));
    // The customer may then belong to another tenant.
    let other = TenantRecord::new("t01".into(), "free".into()).with_customer("cus_2");
    h.s().put_tenant(&other, &[]).await.unwrap();
    assert_eq!(h.s().tenant_by_customer("cus_2").await.unwrap(), Some(other));
}

/// A tenant's overrides are kept with it (by every read of the directory), set or removed
/// alone (a plan change made meanwhile is kept), and outlive a restart.
pub async fn tenant_overrides_are_kept_and_set_alone<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let json = r#"{"rate":"100/s","features":["sso"]}"#;
    let mut acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_o");
    acme.overrides = Some(json.into());
    let key = KeyHash::of(b"key-o");
    h.s().put_tenant(&acme, &[key]).await.unwrap();
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(acme.clone()));
    assert_eq!(h.s().find_key(&key).await.unwrap().and_then(|t| t.overrides).as_deref(), Some(json));
    assert_eq!(h.s().tenant_by_customer("cus_o").await.unwrap().and_then(|t| t.overrides).as_deref(), Some(json));
    // A plan change by a billing event keeps them.
    let change = PlanChange::new("evt_o", "cus_o", 100, "pro".into());
    let PlanChangeOutcome::Applied(after) = h.s().apply_plan_change(&change).await.unwrap() else { panic!("applied") };
    assert_eq!((after.plan.as_str(), after.overrides.as_deref()), ("pro", Some(json)));
    // Set alone: the plan stays.
    let other = r#"{"burst":7}"#;
    assert!(set_overrides(h.s(), &"acme".into(), Some(other)).await.unwrap());
    h.restart().await;
    let now = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!((now.plan.as_str(), now.overrides.as_deref(), now.last_event_at), ("pro", Some(other), Some(100)));
    let listed = h.s().list_tenants(None, 10).await.unwrap();
    assert_eq!(listed.iter().find(|t| t.id.as_str() == "acme").and_then(|t| t.overrides.as_deref()), Some(other));
    // Removed.
    assert!(set_overrides(h.s(), &"acme".into(), None).await.unwrap());
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap().unwrap().overrides, None);
    // An unknown tenant: nothing created.
    assert!(!set_overrides(h.s(), &"nobody".into(), Some(other)).await.unwrap());
    assert_eq!(h.s().tenant(&"nobody".into()).await.unwrap(), None);
}

/// Plan changes: applied once per event id, never older than the last applied, and an
/// event for an unknown customer is not marked seen.
pub async fn plan_changes_apply_once_and_in_order<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_a");
    h.s().put_tenant(&acme, &[]).await.unwrap();
    let change = |id: &str, customer: &str, at, plan: &str| PlanChange::new(id, customer, at, plan.into());
    let as_of = |plan: &str, at| {
        let mut r = TenantRecord::new("acme".into(), plan.into()).with_customer("cus_a");
        r.last_event_at = Some(at);
        r
    };

    let applied = h.s().apply_plan_change(&change("evt_2", "cus_a", 200, "metered")).await.unwrap();
    assert_eq!(applied, PlanChangeOutcome::Applied(as_of("metered", 200)));
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("metered", 200)));
    assert_eq!(h.s().tenant_by_customer("cus_a").await.unwrap(), Some(as_of("metered", 200)));
    let dup = h.s().apply_plan_change(&change("evt_2", "cus_a", 200, "metered")).await.unwrap();
    assert_eq!(dup, PlanChangeOutcome::Duplicate);

    // An older event: stale, its id marked seen, nothing else changed.
    let old = change("evt_1", "cus_a", 100, "free");
    assert_eq!(h.s().apply_plan_change(&old).await.unwrap(), PlanChangeOutcome::Stale);
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("metered", 200)));
    h.restart().await;
    assert_eq!(h.s().apply_plan_change(&old).await.unwrap(), PlanChangeOutcome::Duplicate);
    let dup = h.s().apply_plan_change(&change("evt_2", "cus_a", 200, "metered")).await.unwrap();
    assert_eq!(dup, PlanChangeOutcome::Duplicate, "seen ids outlive a restart");

    // An event as old as the last applied is not older: applied.
    let same_time = h.s().apply_plan_change(&change("evt_2b", "cus_a", 200, "pro")).await.unwrap();
    assert_eq!(same_time, PlanChangeOutcome::Applied(as_of("pro", 200)));
    // A duplicate with other contents changes nothing.
    let dup = h.s().apply_plan_change(&change("evt_2", "cus_a", 900, "free")).await.unwrap();
    assert_eq!(dup, PlanChangeOutcome::Duplicate);
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("pro", 200)));

    // An unknown customer: nothing changed, the id not marked seen.
    let early = change("evt_9", "cus_new", 300, "pro");
    assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
    assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(as_of("pro", 200)));
    assert_eq!(h.s().tenant(&"beta".into()).await.unwrap(), None);
    h.s().put_tenant(&TenantRecord::new("beta".into(), "free".into()).with_customer("cus_new"), &[]).await.unwrap();
    h.restart().await;
    let mut beta = TenantRecord::new("beta".into(), "pro".into()).with_customer("cus_new");
    beta.last_event_at = Some(300);
    assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::Applied(beta.clone()));
    assert_eq!(h.s().apply_plan_change(&early).await.unwrap(), PlanChangeOutcome::Duplicate);
    assert_eq!(h.s().tenant_by_customer("cus_new").await.unwrap(), Some(beta));
    // Customers keep their own order: beta's newer event does not make acme's older ones stale.
    let acme_next = h.s().apply_plan_change(&change("evt_3", "cus_a", 250, "free")).await.unwrap();
    assert_eq!(acme_next, PlanChangeOutcome::Applied(as_of("free", 250)));
}

/// Keys carry an id, a display prefix and an expiry; an expired key no longer finds its
/// tenant but stays listed; a key of one tenant cannot be given to another.
pub async fn api_keys_carry_an_id_a_prefix_and_an_expiry<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (a, b) = (TenantRecord::new("a".into(), "free".into()), TenantRecord::new("b".into(), "free".into()));
    h.s().put_tenant(&a, &[KeyHash::of(b"old-a")]).await.unwrap();
    h.s().put_tenant(&b, &[]).await.unwrap();
    let live = ApiKeyRecord::new(KeyHash::of(b"tg_live_aaaa1111"), "a".into(), now).with_prefix("tg_live_aaaa");
    let rotating = ApiKeyRecord::new(KeyHash::of(b"old-a"), "a".into(), now).with_expiry(Some(now + 3600));
    let expired = ApiKeyRecord::new(KeyHash::of(b"gone-a"), "a".into(), now - 10).with_expiry(Some(now - 1));
    for k in [&live, &rotating, &expired] {
        h.s().put_key(k, crate::store::KeyWrite::Upsert).await.unwrap();
    }
    h.restart().await;
    let s = h.s();
    assert_eq!(s.find_key(&live.hash).await.unwrap().map(|t| t.id), Some("a".into()));
    assert_eq!(s.find_key(&rotating.hash).await.unwrap().map(|t| t.id), Some("a".into()), "within its grace");
    assert_eq!(s.find_key(&expired.hash).await.unwrap(), None, "expired");
    let mut want = vec![live.clone(), rotating.clone(), expired.clone()];
    want.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(s.list_keys(&"a".into()).await.unwrap(), want);
    assert!(s.list_keys(&"b".into()).await.unwrap().is_empty());
    assert_eq!(live.id, live.hash.id());
    assert!(live.id.starts_with("k_") && live.id.len() == 14);
    // Another tenant cannot take the key; its owner can change its expiry.
    let stolen = ApiKeyRecord::new(live.hash, "b".into(), now);
    assert!(matches!(
        s.put_key(&stolen, crate::store::KeyWrite::Upsert).await,
        Err(crate::store::StoreError::Conflict(_))
    ));
    assert_eq!(s.find_key(&live.hash).await.unwrap().map(|t| t.id), Some("a".into()));
    s.put_key(&live.clone().with_expiry(Some(now - 1)), crate::store::KeyWrite::Upsert).await.unwrap();
    assert_eq!(s.find_key(&live.hash).await.unwrap(), None);
    // put_tenant keeps what a key carries.
    s.put_tenant(&a, &[rotating.hash]).await.unwrap();
    let listed = s.list_keys(&"a".into()).await.unwrap();
    assert_eq!(listed.iter().find(|k| k.hash == rotating.hash).unwrap().expires_at, Some(now + 3600));
    s.remove_key(&rotating.hash).await.unwrap();
    assert_eq!(s.list_keys(&"a".into()).await.unwrap().len(), 2);
}

/// Keys carry their scopes: the default unless given others, kept through a restart, changed
/// by `put_key` alone (`put_tenant` keeps those of a key it holds, and gives a new key the
/// default), never another tenant's.
pub async fn api_keys_carry_their_scopes<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    use crate::base::{KeyScope, KeyScopes};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (a, b) = (TenantRecord::new("a".into(), "free".into()), TenantRecord::new("b".into(), "free".into()));
    h.s().put_tenant(&a, &[KeyHash::of(b"plain-a")]).await.unwrap();
    h.s().put_tenant(&b, &[]).await.unwrap();
    let payer = KeyScopes::NONE.with(KeyScope::UsageRead).with(KeyScope::RechargeWrite);
    let paying = ApiKeyRecord::new(KeyHash::of(b"payer-a"), "a".into(), now).with_scopes(payer);
    let blind = ApiKeyRecord::new(KeyHash::of(b"blind-a"), "a".into(), now).with_scopes(KeyScopes::NONE);
    h.s().put_key(&paying, crate::store::KeyWrite::Upsert).await.unwrap();
    h.s().put_key(&blind, crate::store::KeyWrite::Upsert).await.unwrap();
    h.restart().await;
    let s = h.s();
    let scopes_of = |keys: &[ApiKeyRecord], key: &[u8]| {
        keys.iter().find(|k| k.hash == KeyHash::of(key)).map(|k| k.scopes).expect("listed")
    };
    let listed = s.list_keys(&"a".into()).await.unwrap();
    assert_eq!(scopes_of(&listed, b"plain-a"), KeyScopes::DEFAULT, "a key put with its tenant has the default");
    assert_eq!(scopes_of(&listed, b"payer-a"), payer);
    assert_eq!(scopes_of(&listed, b"blind-a"), KeyScopes::NONE, "no scope is not the default");
    // Every scope is kept.
    s.put_key(&blind.clone().with_scopes(KeyScopes::ALL), crate::store::KeyWrite::Upsert).await.unwrap();
    assert_eq!(scopes_of(&s.list_keys(&"a".into()).await.unwrap(), b"blind-a"), KeyScopes::ALL);
    // put_tenant keeps a held key's scopes.
    s.put_tenant(&a, &[paying.hash, KeyHash::of(b"plain-a")]).await.unwrap();
    assert_eq!(scopes_of(&s.list_keys(&"a".into()).await.unwrap(), b"payer-a"), payer);
    // Another tenant cannot change them.
    let stolen = ApiKeyRecord::new(paying.hash, "b".into(), now).with_scopes(KeyScopes::ALL);
    assert!(matches!(
        s.put_key(&stolen, crate::store::KeyWrite::Upsert).await,
        Err(crate::store::StoreError::Conflict(_))
    ));
    assert_eq!(scopes_of(&s.list_keys(&"a".into()).await.unwrap(), b"payer-a"), payer);
    // The owner can take one away.
    s.put_key(&paying.clone().with_scopes(KeyScopes::NONE.with(KeyScope::UsageRead)), crate::store::KeyWrite::Upsert)
        .await
        .unwrap();
    let listed = s.list_keys(&"a".into()).await.unwrap();
    assert!(!scopes_of(&listed, b"payer-a").allows(KeyScope::RechargeWrite));
    assert_eq!(s.find_key(&paying.hash).await.unwrap().map(|t| t.id), Some("a".into()), "scopes never stop a key");
    // Read by its hash: as stored now, its tenant's, gone once removed.
    let read = s.key(&paying.hash).await.unwrap().expect("stored");
    assert_eq!((read.tenant.as_str(), read.scopes), ("a", KeyScopes::NONE.with(KeyScope::UsageRead)));
    assert_eq!(read.id, paying.id);
    assert_eq!(s.key(&blind.hash).await.unwrap().map(|k| k.scopes), Some(KeyScopes::ALL));
    s.remove_key(&blind.hash).await.unwrap();
    assert_eq!(s.key(&blind.hash).await.unwrap(), None, "removed: read so at once");
    // An update of a key removed meanwhile writes nothing back; of a held key, it writes.
    let revived = s.put_key(&blind.clone().with_scopes(KeyScopes::ALL), crate::store::KeyWrite::Existing).await;
    assert!(matches!(revived, Err(crate::store::StoreError::Conflict(_))), "{revived:?}");
    assert_eq!(s.key(&blind.hash).await.unwrap(), None, "not written back");
    let theirs = ApiKeyRecord::new(paying.hash, "b".into(), now).with_scopes(KeyScopes::ALL);
    assert!(s.put_key(&theirs, crate::store::KeyWrite::Existing).await.is_err(), "another tenant's: refused");
    let narrowed = read.clone().with_scopes(KeyScopes::NONE).with_expiry(Some(now + 60));
    s.put_key(&narrowed, crate::store::KeyWrite::Existing).await.unwrap();
    let stored = s.key(&paying.hash).await.unwrap().expect("stored");
    assert_eq!(
        (stored.scopes, stored.expires_at, stored.created_at),
        (KeyScopes::NONE, Some(now + 60), read.created_at)
    );
    // A key put_tenant moves to another tenant leaves its grants behind.
    s.put_key(&paying.clone().with_scopes(KeyScopes::ALL), crate::store::KeyWrite::Upsert).await.unwrap();
    s.put_tenant(&b, &[paying.hash]).await.unwrap();
    let moved = s.key(&paying.hash).await.unwrap().expect("stored");
    assert_eq!((moved.tenant.as_str(), moved.scopes), ("b", KeyScopes::DEFAULT));
}

/// A plan is set only over what was read: a plan change (or another operator) that came in
/// between makes the write fail, and nothing else of the tenant is written.
pub async fn a_plan_is_set_only_over_what_was_read<S: ?Sized + DirectoryStore>(h: &mut StoreUnderTest<S>) {
    let mut acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_a");
    acme.overrides = Some("{\"rate\":\"5/s\"}".into());
    h.s().put_tenant(&acme, &[]).await.unwrap();
    let read = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    // Unchanged since the read: written, the plan alone.
    assert!(set_plan_if_unchanged(h.s(), &read, &"pro".into()).await.unwrap());
    let mut expected = acme.clone();
    expected.plan = "pro".into();
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(expected.clone()));
    // The same read again: the plan changed since (the write above).
    assert!(!set_plan_if_unchanged(h.s(), &read, &"team".into()).await.unwrap());
    // A webhook applied between a read and the write: refused, the webhook's change kept.
    let read = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    let change = PlanChange::new("evt_1", "cus_a", 1_000, "pro".into());
    assert!(matches!(h.s().apply_plan_change(&change).await.unwrap(), PlanChangeOutcome::Applied(_)));
    assert!(!set_plan_if_unchanged(h.s(), &read, &"free".into()).await.unwrap(), "same plan, newer event");
    let read = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!(read.last_event_at, Some(1_000));
    assert!(set_plan_if_unchanged(h.s(), &read, &"free".into()).await.unwrap());
    let stored = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!((stored.plan.as_str(), stored.last_event_at), ("free", Some(1_000)), "the event time kept");
    assert_eq!(stored.overrides, acme.overrides);
    // A tenant that is gone.
    let ghost = TenantRecord::new("ghost".into(), "free".into());
    assert!(!set_plan_if_unchanged(h.s(), &ghost, &"pro".into()).await.unwrap());
    assert_eq!(h.s().tenant(&"ghost".into()).await.unwrap(), None);
}

/// A subscription's change applies over the subscriptions read, whatever the tenant's last
/// event (the caller orders it by its subscription): refused as `Changed` (its id not marked)
/// when they changed since; applied, it writes them with the plan, and `last_event_at` becomes
/// the later of the two.
pub async fn a_subscription_change_applies_over_the_subscriptions_read<S: ?Sized + DirectoryStore>(
    h: &mut StoreUnderTest<S>,
) {
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_a");
    h.s().put_tenant(&acme, &[]).await.unwrap();
    h.s().apply_plan_change(&PlanChange::new("evt_1", "cus_a", 500, "metered".into())).await.unwrap();
    // Older than the tenant's last event, but first for its subscription: applied.
    let read = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    let first = PlanChange::new("evt_2", "cus_a", 300, "pro".into()).with_subscriptions(&read, r#"{"sub_1":1}"#);
    let PlanChangeOutcome::Applied(record) = h.s().apply_plan_change(&first).await.unwrap() else {
        panic!("not applied")
    };
    assert_eq!((record.plan.as_str(), record.last_event_at), ("pro", Some(500)));
    assert_eq!(record.subscriptions.as_deref(), Some(r#"{"sub_1":1}"#));
    h.restart().await;
    let stored = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!((stored.plan.as_str(), stored.subscriptions.as_deref()), ("pro", Some(r#"{"sub_1":1}"#)));
    // Computed from what is no longer there: Changed, nothing written, the id not marked.
    let stale = PlanChange::new("evt_3", "cus_a", 900, "free".into()).with_subscriptions(&read, r#"{"sub_2":1}"#);
    assert_eq!(h.s().apply_plan_change(&stale).await.unwrap(), PlanChangeOutcome::Changed);
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap(), Some(stored.clone()));
    // A plan set by hand since the read: Changed too (not overwritten).
    assert!(set_plan_if_unchanged(h.s(), &stored, &"comp".into()).await.unwrap());
    let over_hand = PlanChange::new("evt_3", "cus_a", 900, "free".into()).with_subscriptions(&stored, "{}");
    assert_eq!(h.s().apply_plan_change(&over_hand).await.unwrap(), PlanChangeOutcome::Changed);
    let comped = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!(comped.plan.as_str(), "comp");
    let fresh =
        PlanChange::new("evt_3", "cus_a", 900, "free".into()).with_subscriptions(&comped, r#"{"sub_1":1,"sub_2":1}"#);
    let PlanChangeOutcome::Applied(record) = h.s().apply_plan_change(&fresh).await.unwrap() else {
        panic!("not applied")
    };
    assert_eq!((record.plan.as_str(), record.last_event_at), ("free", Some(900)));
    assert_eq!(h.s().apply_plan_change(&fresh).await.unwrap(), PlanChangeOutcome::Duplicate);
    // A later event of the tenant (not a subscription's) is still ordered by the last event.
    let older = PlanChange::new("evt_4", "cus_a", 800, "metered".into());
    assert_eq!(h.s().apply_plan_change(&older).await.unwrap(), PlanChangeOutcome::Stale);
    let unknown = PlanChange::new("evt_5", "cus_zz", 900, "pro".into()).with_subscriptions(&read, "{}");
    assert_eq!(h.s().apply_plan_change(&unknown).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
    // Another customer: the subscriptions of the old one are forgotten.
    let now = h.s().tenant(&"acme".into()).await.unwrap().unwrap();
    assert!(now.subscriptions.is_some());
    assert!(set_customer_if_unchanged(h.s(), &"acme".into(), Some("cus_a"), Some("cus_a")).await.unwrap());
    assert!(h.s().tenant(&"acme".into()).await.unwrap().unwrap().subscriptions.is_some(), "the same customer");
    assert!(set_customer_if_unchanged(h.s(), &"acme".into(), Some("cus_a"), Some("cus_b")).await.unwrap());
    assert_eq!(h.s().tenant(&"acme".into()).await.unwrap().unwrap().subscriptions, None);
}

/// `update_tenant` in each mode, for each setting: `Always` writes whenever the tenant exists,
/// `Unchanged` only over the tenant as read (whatever changed of it since); each writes its
/// setting alone.
pub async fn a_tenant_update_writes_one_setting_always_or_over_what_was_read<S: ?Sized + DirectoryStore>(
    h: &mut StoreUnderTest<S>,
) {
    let u = TenantRecord::new("u".into(), "free".into()).with_customer("cus_u").with_metronome_customer("acct-u");
    let v = TenantRecord::new("v".into(), "free".into()).with_customer("cus_v");
    h.s().put_tenant(&u, &[]).await.unwrap();
    h.s().put_tenant(&v, &[]).await.unwrap();
    let read = h.s().tenant(&"u".into()).await.unwrap().unwrap();
    // A plan, whatever it was; then any write over the old read is refused, whatever it sets.
    assert!(h.s().update_tenant(&TenantUpdate::Plan("u".into(), "pro".into()), UpdateWhen::Always).await.unwrap());
    let overrides = TenantUpdate::Overrides("u".into(), Some(r#"{"burst":3}"#.into()));
    for stale in [
        TenantUpdate::Plan("u".into(), "team".into()),
        overrides.clone(),
        TenantUpdate::MetronomeCustomer("u".into(), None),
        TenantUpdate::Customer("u".into(), Some("cus_w".into())),
        TenantUpdate::AlertEndpoint("u".into(), Some("{}".into())),
    ] {
        assert!(!h.s().update_tenant(&stale, UpdateWhen::Unchanged(&read)).await.unwrap(), "{stale:?}: changed since");
    }
    // Over a new read: written.
    let read = h.s().tenant(&"u".into()).await.unwrap().unwrap();
    assert!(h.s().update_tenant(&overrides, UpdateWhen::Unchanged(&read)).await.unwrap());
    let read = h.s().tenant(&"u".into()).await.unwrap().unwrap();
    let metronome = TenantUpdate::MetronomeCustomer("u".into(), None);
    assert!(h.s().update_tenant(&metronome, UpdateWhen::Unchanged(&read)).await.unwrap());
    // A tenant's alert endpoint (its secrets at rest): written over a read, then part of what
    // a later read must match.
    let read = h.s().tenant(&"u".into()).await.unwrap().unwrap();
    let endpoint = r#"{"url":"https://hooks.example.com/u","secrets":["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}"#;
    let alerts = TenantUpdate::AlertEndpoint("u".into(), Some(endpoint.into()));
    assert!(h.s().update_tenant(&alerts, UpdateWhen::Unchanged(&read)).await.unwrap());
    assert!(
        !h.s().update_tenant(&metronome, UpdateWhen::Unchanged(&read)).await.unwrap(),
        "the endpoint changed since"
    );
    // A read of another tenant never matches.
    let other = h.s().tenant(&"v".into()).await.unwrap().unwrap();
    let plan = TenantUpdate::Plan("u".into(), "team".into());
    assert!(!h.s().update_tenant(&plan, UpdateWhen::Unchanged(&other)).await.unwrap(), "another tenant's read");
    // A customer, whatever it was: taken from the tenant that held it.
    let customer = TenantUpdate::Customer("u".into(), Some("cus_v".into()));
    assert!(h.s().update_tenant(&customer, UpdateWhen::Always).await.unwrap());
    h.restart().await;
    let now = h.s().tenant(&"u".into()).await.unwrap().unwrap();
    assert_eq!(
        (now.plan.as_str(), now.customer.as_deref(), now.metronome_customer.as_deref(), now.overrides.as_deref()),
        ("pro", Some("cus_v"), None, Some(r#"{"burst":3}"#)),
        "each setting written alone"
    );
    assert_eq!(now.alert_endpoint.as_deref(), Some(endpoint));
    assert!(!format!("{now:?}").contains("whsec_"), "a record's Debug never shows the secrets");
    let none = TenantUpdate::AlertEndpoint("u".into(), None);
    assert!(h.s().update_tenant(&none, UpdateWhen::Always).await.unwrap());
    assert_eq!(h.s().tenant(&"u".into()).await.unwrap().unwrap().alert_endpoint, None);
    assert_eq!(h.s().tenant(&"v".into()).await.unwrap().unwrap().customer, None, "the customer left v");
    assert_eq!(h.s().tenant_by_customer("cus_v").await.unwrap().map(|t| t.id), Some("u".into()));
    assert_eq!(h.s().tenant_by_customer("cus_u").await.unwrap(), None, "u's old customer is no one's");
    // An unknown tenant, in either mode: nothing created.
    let ghost_read = TenantRecord::new("ghost".into(), "free".into());
    for when in [UpdateWhen::Always, UpdateWhen::Unchanged(&ghost_read)] {
        let ghost = TenantUpdate::Plan("ghost".into(), "pro".into());
        assert!(!h.s().update_tenant(&ghost, when).await.unwrap());
    }
    assert_eq!(h.s().tenant(&"ghost".into()).await.unwrap(), None);
}

/// The feed of tenants changed (`ChangeCall`): each tenant's last change kept (a tell replaces
/// it) with the feed's next stamp, across a restart; past `CHANGES_KEPT` tenants the oldest
/// change goes, its stamp kept as the floor, so a reader knows what it may have missed.
pub async fn the_feed_keeps_each_tenants_last_change_within_its_bound<S: ?Sized + DirectoryStore>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::{ChangeCall, CHANGES_KEPT};
    let read = |feed: crate::store::Changes| {
        let mut entries: Vec<(String, i64, i64)> =
            feed.tenants.into_iter().map(|c| (c.tenant.as_str().to_owned(), c.at, c.stamp)).collect();
        entries.sort();
        (entries, feed.floor)
    };
    assert_eq!(read(h.s().changes(ChangeCall::Read).await.unwrap()), (vec![], 0), "empty at first");
    let (a, b): (TenantId, TenantId) = ("a".into(), "b".into());
    for (tenant, at) in [(&a, 1_000), (&b, 1_001), (&a, 1_002)] {
        let told = h.s().changes(ChangeCall::Tell { tenant, at }).await.unwrap();
        assert!(told.tenants.is_empty(), "a tell answers nothing");
    }
    h.restart().await;
    let expected = vec![("a".to_owned(), 1_002, 3), ("b".to_owned(), 1_001, 2)];
    assert_eq!(read(h.s().changes(ChangeCall::Read).await.unwrap()), (expected, 0), "a's last change, stamped 3");
    // Past the bound: b (the oldest) goes first, then a; the floor is the highest stamp dropped.
    for i in 0..CHANGES_KEPT {
        let tenant: TenantId = format!("t{i:03}").into();
        h.s().changes(ChangeCall::Tell { tenant: &tenant, at: 2_000 + i as i64 }).await.unwrap();
    }
    let (entries, floor) = read(h.s().changes(ChangeCall::Read).await.unwrap());
    assert_eq!(entries.len(), CHANGES_KEPT, "bounded");
    assert!(!entries.iter().any(|e| e.0 == "a" || e.0 == "b"), "the oldest two went");
    assert_eq!(floor, 3, "the highest stamp dropped");
    assert_eq!(entries.iter().map(|e| e.2).max(), Some(3 + CHANGES_KEPT as i64));
    // A tenant told again keeps one entry, with the next stamp, and nothing else goes.
    let t0: TenantId = "t000".into();
    h.s().changes(ChangeCall::Tell { tenant: &t0, at: 9_000 }).await.unwrap();
    let (entries, floor) = read(h.s().changes(ChangeCall::Read).await.unwrap());
    assert_eq!((entries.len(), floor), (CHANGES_KEPT, 3));
    assert!(entries.contains(&("t000".to_owned(), 9_000, 4 + CHANGES_KEPT as i64)));
}

/// Eight writers tell the feed at once, eight tenants each: no tell is lost to another, each
/// tenant's change carries a stamp of its own, and the stamps are exactly 1 to 64 (every tell
/// took the feed's next sequence number once).
pub async fn concurrent_tells_each_keep_their_tenant_and_a_stamp_of_their_own<S: ?Sized + DirectoryStore>(
    h: &mut StoreUnderTest<S>,
) {
    use crate::store::ChangeCall;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let s = h.shared();
        tasks.spawn(async move {
            for i in 0..8 {
                let tenant: TenantId = format!("w{writer}-{i}").into();
                s.changes(ChangeCall::Tell { tenant: &tenant, at: 1_000 + i64::from(i) }).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let feed = h.s().changes(ChangeCall::Read).await.unwrap();
    let tenants: std::collections::BTreeSet<&str> = feed.tenants.iter().map(|c| c.tenant.as_str()).collect();
    assert_eq!(tenants.len(), 64, "every tenant told: {tenants:?}");
    let mut stamps: Vec<i64> = feed.tenants.iter().map(|c| c.stamp).collect();
    stamps.sort_unstable();
    assert_eq!(stamps, (1..=64).collect::<Vec<i64>>(), "a stamp each, none taken twice");
    assert_eq!((feed.floor, feed.head()), (0, 64));
}
