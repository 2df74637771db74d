//! Prepaid credits through the engine and `Admin`: grants once per id, listing, revocation,
//! and expiry closed once across two nodes by the engine's clock.

use std::sync::Arc;

use tollgate::{
    admin::Admin,
    clock::Clock,
    store::{GrantOutcome, QuotaKey, Reservation, ReserveToken, SqliteStore, Store},
    Config, Tollgate,
};

const TOML: &str = "[meters.tokens]\nevent_name = \"tokens\"\n[plans.p]\n[tenants.acme]\nplan = \"p\"\n";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn prepaid() -> QuotaKey {
    let (start, end) = tollgate::config::Period::Prepaid.bounds(0);
    QuotaKey::new("acme".into(), "tokens".into(), tollgate::config::Period::Prepaid, start, end)
}

#[tokio::test]
async fn grants_apply_once_are_listed_revoked_and_expired_once_across_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("t.db")).await.unwrap());
    let config = Config::from_toml_str(TOML).unwrap();
    let admin = Admin::new(store.clone()).with_config(config.clone());
    let t = now();
    let soon = t + 3600;
    assert!(matches!(
        admin.grant_credits("acme", "tokens", 100, Some(soon), "inv_1").await.unwrap(),
        GrantOutcome::Granted(_)
    ));
    assert!(matches!(admin.grant_credits("acme", "tokens", 50, None, "pi_2").await.unwrap(), GrantOutcome::Granted(_)));
    // A webhook or a command run again: nothing added.
    assert!(matches!(
        admin.grant_credits("acme", "tokens", 100, Some(soon), "inv_1").await.unwrap(),
        GrantOutcome::Duplicate(_)
    ));
    // Bad input changes nothing.
    for (meter, units, at, id) in [
        ("ghost", 5, None, "x"),
        ("tokens", 0, None, "x"),
        ("tokens", 5, Some(t - 10), "x"),
        ("tokens", 5, None, ""),
        ("tokens", 5, None, "two words"),
    ] {
        assert!(admin.grant_credits("acme", meter, units, at, id).await.is_err(), "{meter} {units} {at:?} {id:?}");
    }
    let (grants, balances) = admin.credits("acme").await.unwrap();
    assert_eq!(grants.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["inv_1", "pi_2"]);
    assert_eq!((balances[0].1.granted, balances[0].1.reserved), (150, 0));

    // 30 units used (a node's lease): spent from inv_1, the soonest to expire.
    let used = Reservation::new(prepaid(), 30, 0, None, ReserveToken::new(1, 1));
    assert_eq!(store.reserve(&used).await.unwrap().granted, 30);

    // Two nodes past inv_1's expiry: one closes it, losing the 70 it still held.
    let nodes: Vec<Tollgate> = (0..2)
        .map(|_| {
            let (clock, _fake) = Clock::fake_at_unix(soon + 60);
            Tollgate::builder(config.clone()).store_arc(store.clone()).clock(clock).build().0
        })
        .collect();
    let (a, b) = tokio::join!(nodes[0].expire_credits(), nodes[1].expire_credits());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.grants + b.grants, a.lost + b.lost), (1, 70), "{a:?} {b:?}");
    assert_eq!(nodes[0].expire_credits().await.unwrap().grants, 0, "closed once");
    let (grants, balances) = admin.credits("acme").await.unwrap();
    assert!(grants.iter().find(|g| g.id == "inv_1").unwrap().closed.is_some_and(|c| !c.revoked && c.lost == 70));
    assert_eq!((balances[0].1.granted, balances[0].1.reserved), (50, 0));

    // Revoked: what pi_2 still holds leaves the balance.
    assert!(admin.revoke_credits("acme", None, "nope").await.is_err());
    let closed = admin.revoke_credits("acme", None, "pi_2").await.unwrap();
    assert_eq!((closed.revoked, closed.lost), (true, 50));
    assert!(admin.revoke_credits("acme", Some("tokens"), "pi_2").await.is_err(), "once");
    let left = store.reserve(&Reservation::new(prepaid(), 1, 0, None, ReserveToken::new(1, 2))).await.unwrap();
    assert_eq!((left.granted, left.limit), (0, Some(0)));
}

/// Grants whose close keeps failing (a hot balance, a slow store) never hold back expiry: four
/// of them at the head of the list wait on this node, a minute and then longer, while the pass
/// closes the grant behind them; once their store answers again they close too.
#[tokio::test]
async fn grants_whose_close_keeps_failing_never_stall_expiry() {
    let faulty = Arc::new(crate::common::Faulty::default());
    let store: Arc<dyn Store> = faulty.clone();
    let toml = format!("{TOML}[tenants.stuck]\nplan = \"p\"\n");
    let config = Config::from_toml_str(&toml).unwrap();
    let admin = Admin::new(store.clone()).with_config(config.clone());
    let t = now();
    for i in 0..4 {
        admin.grant_credits("stuck", "tokens", 10, Some(t + 60 + i), &format!("pi_s{i}")).await.unwrap();
    }
    admin.grant_credits("acme", "tokens", 10, Some(t + 120), "pi_a").await.unwrap();
    *faulty.refuse_tenant.lock().unwrap() = Some("stuck".into());
    let (clock, fake) = Clock::fake_at_unix(t + 200);
    let node = Tollgate::builder(config).store_arc(store.clone()).clock(clock).build().0;
    // The four fail in a row: the pass stops, and they wait.
    assert!(node.expire_credits().await.is_err());
    let report = node.expire_credits().await.unwrap();
    assert_eq!((report.grants, report.waiting), (1, 4), "the grant behind them closed: {report:?}");
    let (grants, _) = admin.credits("acme").await.unwrap();
    assert!(grants[0].closed.is_some());
    // The worker's next passes, a minute apart: they wait; failing again, they stop no pass.
    admin.grant_credits("acme", "tokens", 10, Some(t + 230), "pi_b").await.unwrap();
    fake.advance(std::time::Duration::from_secs(60));
    assert_eq!(node.expire_credits().await.unwrap().grants, 1, "the new one behind them");
    admin.grant_credits("acme", "tokens", 10, Some(t + 300), "pi_c").await.unwrap();
    fake.advance(std::time::Duration::from_secs(61));
    let report = node.expire_credits().await.unwrap();
    assert_eq!((report.grants, report.waiting), (1, 4), "tried again, failed again, not stopped: {report:?}");
    // Their store answers again; after their wait they close.
    *faulty.refuse_tenant.lock().unwrap() = None;
    assert_eq!(node.expire_credits().await.unwrap().grants, 0, "still waiting");
    fake.advance(std::time::Duration::from_secs(241));
    let report = node.expire_credits().await.unwrap();
    assert_eq!((report.grants, report.waiting), (4, 0), "{report:?}");
}
