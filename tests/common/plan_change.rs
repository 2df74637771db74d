//! A tenant of the directory moved between plans while four nodes serve it: the scenario every
//! store runs (issue 90, "a plan change keeps what was used").

use std::sync::Arc;

use tollgate::{admin::Admin, config::Period, store::QuotaKey, RejectionKind};

use super::holds::admit;
use super::{node_on, Harness, NodeStore, NOON};

/// Plans of 1,000 and of 500 tokens a day; the tenant is in the directory, not the file.
pub const TOML: &str = r#"
[meters.tokens]
[plans.big]
quotas.tokens = { limit = 1000, period = "day", mode = "hard", lease = 8 }
[plans.small]
quotas.tokens = { limit = 500, period = "day", mode = "hard", lease = 8 }
[[routes]]
path = "/generate"
reports = ["tokens"]
[usage]
flush_interval = "1s"
store_timeout = "30s"
[limits]
hold_timeout = "24h"
"#;

/// The day's counter of `tenant`'s tokens at noon.
pub fn day_key(tenant: &str) -> QuotaKey {
    let (start, end) = Period::Day.bounds(NOON);
    QuotaKey::new(tenant.into(), "tokens".into(), Period::Day, start, end)
}

/// One request on `h` holding and recording `tokens`: `Ok` once settled and completed, or the
/// refusal's kind (its admission's or its hold's).
async fn spend(h: &Harness, key: &'static str, tokens: u64) -> Result<(), RejectionKind> {
    let (ticket, ctx) = admit(h, key).await.map_err(|r| r.kind())?;
    match ctx.hold("tokens", tokens).await {
        Ok(mut hold) => {
            hold.record(tokens).unwrap();
            hold.settle();
            assert!(ticket.complete(200));
            Ok(())
        }
        Err(r) => {
            ticket.give_back();
            Err(r.kind())
        }
    }
}

/// Four nodes serve tenant `t` of the directory on a plan of 1,000 tokens a day; 600 are used
/// across them and a hold of 100 is open on node 1 when an operator (the CLI: an `Admin` with
/// no engine) moves `t` to a plan of 500. Once each node has followed the directory's feed
/// (what its worker does every second), every node refuses `t` (700 counted of 500), though
/// each held a lease of the old plan; the hold open across the move settles at 40 and gives
/// the rest back. Moved back to 1,000, every node serves `t` again after its follow. The
/// store's counter then holds exactly what was recorded: nothing lost, counted twice or freed
/// by the moves.
pub async fn a_plan_change_applies_on_every_node_within_a_second(
    stores: [NodeStore; 4],
    admin_store: Arc<dyn tollgate::store::Store>,
    quota: Arc<dyn tollgate::store::QuotaInspect>,
) {
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Harness> = stores.iter().map(|s| node_on(TOML, s, clock.clone(), handle.clone())).collect();
    let cli = Admin::new(admin_store);
    cli.add_tenant("t", "big", None).await.unwrap();
    let key: &'static str = Box::leak(cli.issue_key("t", Default::default()).await.unwrap().key.into_boxed_str());
    for i in 0..60 {
        spend(&nodes[i % 4], key, 10).await.unwrap();
    }
    let (held_ticket, held_ctx) = admit(&nodes[1], key).await.unwrap();
    let mut held = held_ctx.hold("tokens", 100).await.unwrap();
    // Each node holds a lease of the old plan now.
    for h in &nodes {
        spend(h, key, 0).await.unwrap();
    }

    cli.set_plan("t", "small").await.unwrap();
    // Before a node follows the feed it may still serve from its lease of the old plan; after,
    // none does.
    for (i, h) in nodes.iter().enumerate() {
        h.tollgate.follow_directory().await.unwrap();
        assert_eq!(spend(h, key, 1).await, Err(RejectionKind::QuotaExceeded), "node {i} after the move down");
    }
    // The hold open across the move settles lower: 60 of its 100 go back.
    held.record(40).unwrap();
    held.settle();
    assert!(held_ticket.complete(200));
    for (i, h) in nodes.iter().enumerate() {
        assert_eq!(spend(h, key, 1).await, Err(RejectionKind::QuotaExceeded), "node {i}: 640 of 500");
    }

    cli.set_plan("t", "big").await.unwrap();
    for (i, h) in nodes.iter().enumerate() {
        h.tollgate.follow_directory().await.unwrap();
        assert_eq!(spend(h, key, 10).await, Ok(()), "node {i} after the move up");
    }
    for h in &nodes {
        assert!(h.tollgate.shutdown().await.unwrap().leases_returned);
    }
    assert_eq!(quota.reserved(&day_key("t")).await.unwrap(), 600 + 40 + 40, "the day's counter: what was recorded");
}

/// Four nodes serve tenant `t` from 16 tasks while the clock moves a second every 5 ms and the
/// CLI moves `t` between the plans of 1,000 and of 500 a day 8 times (one task moves it every
/// fifth of its requests, and has every node follow the feed at once), each node's worker
/// following it too: no move loses, frees or counts twice a unit. Moved down once the tasks
/// end, every node refuses. Once the nodes shut down (their leases given back), the day's
/// counter holds exactly the tokens recorded, and never more than the higher plan's 1,000 were
/// recorded.
pub async fn moves_under_traffic_keep_the_count_exact(
    stores: [NodeStore; 4],
    admin_store: Arc<dyn tollgate::store::Store>,
    quota: Arc<dyn tollgate::store::QuotaInspect>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        stores.iter().map(|s| Arc::new(node_on(TOML, s, clock.clone(), handle.clone()))).collect();
    let cli = Arc::new(Admin::new(admin_store));
    cli.add_tenant("t", "big", None).await.unwrap();
    let key: &'static str = Box::leak(cli.issue_key("t", Default::default()).await.unwrap().key.into_boxed_str());
    let recorded = Arc::new(AtomicU64::new(0));
    let moves = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let (h, recorded, cli, moves) = (nodes[i % 4].clone(), recorded.clone(), cli.clone(), moves.clone());
        let all = nodes.clone();
        tasks.spawn(async move {
            for n in 0..40u64 {
                // One task moves the plan every fifth of its requests, down then up, and has
                // every node follow the feed at once (as their workers do each second), while
                // the others' requests go on.
                if i == 0 && n % 5 == 0 {
                    let m = moves.fetch_add(1, Ordering::SeqCst);
                    cli.set_plan("t", if m % 2 == 0 { "small" } else { "big" }).await.unwrap();
                    for node in &all {
                        node.tollgate.follow_directory().await.unwrap();
                    }
                }
                let tokens = 1 + (n * 7 + i as u64) % 5;
                if spend(&h, key, tokens).await.is_ok() {
                    recorded.fetch_add(tokens, Ordering::SeqCst);
                }
            }
        });
    }
    while !tasks.is_empty() {
        tokio::select! {
            joined = tasks.join_next() => { joined.unwrap().unwrap(); }
            () = tokio::time::sleep(std::time::Duration::from_millis(5)) => {
                handle.advance(std::time::Duration::from_secs(1));
            }
        }
    }
    let moves = moves.load(Ordering::SeqCst);
    // Moved down once more, past what was recorded: every node refuses once it followed.
    cli.set_plan("t", "small").await.unwrap();
    for (i, h) in nodes.iter().enumerate() {
        h.tollgate.follow_directory().await.unwrap();
        assert_eq!(spend(h, key, 1).await, Err(RejectionKind::QuotaExceeded), "node {i} after the last move");
    }
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
    let recorded = recorded.load(Ordering::SeqCst);
    eprintln!("{recorded} tokens recorded over {moves} moves");
    assert_eq!(moves, 8, "the plan moved 8 times");
    assert!(recorded <= 1000, "recorded {recorded} of at most 1,000");
    assert!(recorded > 500, "recorded {recorded}: the last move down must find the tenant past 500");
    // The day's counter is the day's window of the clock as the tasks left it.
    let (start, end) = Period::Day.bounds(handle.unix_secs());
    let key = QuotaKey::new("t".into(), "tokens".into(), Period::Day, start, end);
    let mut counted = quota.reserved(&key).await.unwrap();
    if start > NOON {
        counted += quota.reserved(&day_key("t")).await.unwrap();
    }
    assert_eq!(counted, recorded, "the counters hold exactly what was recorded");
}
