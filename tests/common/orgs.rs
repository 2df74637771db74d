//! Organizations (`[orgs.NAME]`) shared by a fleet: the scenario every store runs.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tollgate::config::Period;
use tollgate::store::QuotaKey;

use super::{Harness, NOON};

/// Three tenants of organization `acme` with their own months of 300, 400 and 400 requests,
/// sharing the organization's month of 1,000; and a tenant of no organization.
pub const TOML_ORG: &str = r#"
[plans.project]
rate = "1000000/s"
quotas.requests = { limit = 400, period = "month", mode = "hard", lease = 8 }
[plans.small]
rate = "1000000/s"
quotas.requests = { limit = 300, period = "month", mode = "hard", lease = 8 }
[plans.company]
quotas.requests = { limit = 1000, period = "month", mode = "hard", lease = 8 }
[orgs.acme]
plan = "company"
[tenants.a]
plan = "small"
org = "acme"
keys = ["key-a"]
[tenants.b]
plan = "project"
org = "acme"
keys = ["key-b"]
[tenants.c]
plan = "project"
org = "acme"
keys = ["key-c"]
[tenants.solo]
plan = "project"
keys = ["key-solo"]
[usage]
flush_interval = "1s"
store_timeout = "30s"
"#;

const KEYS: [&str; 3] = ["key-a", "key-b", "key-c"];

/// The month's counter of `tenant`'s requests at noon.
pub fn month_key(tenant: &str) -> QuotaKey {
    let period = Period::Month { anchor_day: 1 };
    let (start, end) = period.bounds(NOON);
    QuotaKey::new(tenant.into(), "requests".into(), period, start, end)
}

/// Four engines with their workers on `stores` serve the three tenants of one organization:
/// `tasks` tasks, each on one node and one tenant, send requests until every node refuses every
/// tenant, while the clock moves a second every 5 ms. The organization's month admits at most
/// its 1,000 requests, each tenant at most its own month (tenant a's 300 binds first), and what
/// leases left unspent is small (at most a lease of 8 per node);
/// every refusal of a tenant past its organization's month names the organization's policy.
/// Once the nodes shut down (their leases given back), the store's counters hold exactly what
/// was admitted, at each scope: nothing leased at one scope and lost, nothing counted twice.
pub async fn four_nodes_share_an_organizations_month(
    stores: [super::NodeStore; 4],
    quota: Arc<dyn tollgate::store::QuotaInspect>,
    tasks: usize,
) {
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        stores.iter().map(|s| Arc::new(super::node_on(TOML_ORG, s, clock.clone(), handle.clone()))).collect();
    let admitted: Arc<[AtomicU64; 3]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
    let org_refusals = Arc::new(AtomicU64::new(0));
    let own_refusals: Arc<[AtomicU64; 3]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
    // Rounds until one admits nothing anywhere: a node's lease is spent or given back before
    // the last round (the worker returns leases near the limit, and each refusal asks the store).
    loop {
        let before: u64 = admitted.iter().map(|a| a.load(Ordering::SeqCst)).sum();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..tasks {
            let (h, admitted, org_refusals) = (nodes[i % 4].clone(), admitted.clone(), org_refusals.clone());
            let own_refusals = own_refusals.clone();
            let tenant = (i / 4) % 3;
            set.spawn(async move {
                for _ in 0..40 {
                    let reply = h.get("/", KEYS[tenant]).await;
                    match reply.status.as_u16() {
                        200 => {
                            admitted[tenant].fetch_add(1, Ordering::SeqCst);
                        }
                        429 => {
                            let body = reply.json();
                            if body["scope"] == "organization" {
                                assert_eq!(body["policy"], "org-requests-month", "{body}");
                                org_refusals.fetch_add(1, Ordering::SeqCst);
                            } else {
                                assert_eq!(body["policy"], "requests-month", "{body}");
                                own_refusals[tenant].fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        other => panic!("status {other}: {:?}", reply.body),
                    }
                }
            });
        }
        while !set.is_empty() {
            tokio::select! {
                done = set.join_next() => { done.unwrap().unwrap(); }
                () = tokio::time::sleep(std::time::Duration::from_millis(5)) => {
                    handle.advance(std::time::Duration::from_secs(1));
                }
            }
        }
        let after: u64 = admitted.iter().map(|a| a.load(Ordering::SeqCst)).sum();
        if after == before {
            break;
        }
    }
    let each: Vec<u64> = admitted.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let total: u64 = each.iter().sum();
    eprintln!(
        "admitted per tenant {each:?}, {total} in all; {} refused by the organization",
        org_refusals.load(Ordering::SeqCst)
    );
    assert!(total <= 1000, "the organization's month admitted {total} of 1000");
    assert!(each[0] <= 300 && each[1] <= 400 && each[2] <= 400, "a tenant passed its own month: {each:?}");
    assert!(each[0] >= 300 - 4 * 8, "tenant a, which its own month limits, served only {}", each[0]);
    assert!(own_refusals[0].load(Ordering::SeqCst) > 0, "tenant a's own month refused nothing");
    assert!(total >= 1000 - 4 * 8, "only {total} of 1000 served: units leased were not spent");
    assert!(org_refusals.load(Ordering::SeqCst) > 0, "the organization refused no request");
    // The tenant of no organization is served as before.
    assert_eq!(nodes[0].status("/", "key-solo").await, 200);
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
    assert_eq!(quota.reserved(&month_key("org acme")).await.unwrap(), total, "the organization's counter");
    for (tenant, n) in ["a", "b", "c"].into_iter().zip(each) {
        assert_eq!(quota.reserved(&month_key(tenant)).await.unwrap(), n, "tenant {tenant}'s counter");
    }
}
