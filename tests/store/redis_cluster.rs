//! The Redis store on a Redis Cluster of three masters (`scripts/redis-server.sh
//! start-cluster`, `TOLLGATE_REDIS_CLUSTER_URL`): tenants spread over the masters, each
//! tenant's keys in one slot; four engines hold a hard quota exactly while the tenant's slot
//! moves from one master to another; every master's durability is told. The conformance
//! modules run on the cluster too (tests/store/store_conformance.rs, `redis_cluster`). Without
//! a cluster the tests skip loudly, and fail under CI.
#![cfg(feature = "redis")]

use std::{sync::Arc, time::Duration};

use super::redis::{burst, four_nodes_with_stores, hard_quota_nodes, On};
use crate::common;
use tollgate::store::{CellCall, RateStore, RedisStore, ReserveToken};

/// A master of the cluster, as `CLUSTER NODES` tells it.
#[derive(Debug, Clone)]
struct Master {
    id: String,
    host: String,
    port: u16,
    /// The slot ranges it serves.
    slots: Vec<(u16, u16)>,
}

impl Master {
    /// `redis-cli` against this master: its output.
    fn cli(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let out = std::process::Command::new("redis-cli")
            .args(["-h", &self.host, "-p", &port])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The cluster's masters, read from the node at `url`.
fn masters(url: &str) -> Vec<Master> {
    let out =
        std::process::Command::new("redis-cli").args(["-u", url, "cluster", "nodes"]).output().expect("redis-cli runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut masters: Vec<Master> = text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || !f[2].split(',').any(|flag| flag == "master") {
                return None;
            }
            let addr = f[1].split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(Master { id: f[0].to_owned(), host: host.to_owned(), port: port.parse().ok()?, slots })
        })
        .collect();
    masters.sort_by_key(|m| m.port);
    assert_eq!(masters.len(), 3, "three masters: {text}");
    masters
}

/// The slot of the hash tag `tag`.
fn slot_of(master: &Master, tag: &str) -> u16 {
    master.cli(&["cluster", "keyslot", tag]).parse().expect("a slot")
}

/// Every key under `prefix` on `master`.
fn keys_on(master: &Master, prefix: &str) -> Vec<String> {
    let pattern = format!("{prefix}:*");
    master.cli(&["--scan", "--pattern", &pattern]).lines().map(str::to_owned).filter(|k| !k.is_empty()).collect()
}

/// The master serving `slot`, and another to move it to. The slot must be stable: a slot left
/// moving by a run stopped halfway would hold the keys of this run on the second master from
/// the start, and the move would test nothing.
fn move_from_to(all: &[Master], slot: u16) -> (Master, Master) {
    for m in all {
        let nodes = m.cli(&["cluster", "nodes"]);
        let moving = nodes.lines().any(|line| line.contains(&format!("[{slot}-")));
        assert!(!moving, "slot {slot} is left moving on {} by an earlier run: start the cluster again", m.addr());
    }
    let from = all.iter().find(|m| m.serves(slot)).expect("a master serves every slot").clone();
    let to = all.iter().find(|m| m.id != from.id).expect("three masters").clone();
    (from, to)
}

/// The first step of moving `slot` (as `redis-cli --cluster reshard` does): importing on
/// `to`, migrating on `from`. Keys stay on `from`; a key it does not hold is asked of `to`.
fn begin_move(from: &Master, to: &Master, slot: u16) {
    assert_eq!(to.cli(&["cluster", "setslot", &slot.to_string(), "importing", &from.id]), "OK");
    assert_eq!(from.cli(&["cluster", "setslot", &slot.to_string(), "migrating", &to.id]), "OK");
}

/// Every key of `slot` moved from `from` to `to` (`MIGRATE`): `from` answers each call on the
/// slot with ASK.
fn move_keys(from: &Master, to: &Master, slot: u16) {
    loop {
        let keys = from.cli(&["cluster", "getkeysinslot", &slot.to_string(), "100"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            return;
        }
        let port = to.port.to_string();
        let mut args = vec!["migrate", to.host.as_str(), port.as_str(), "", "0", "5000", "KEYS"];
        args.extend(keys);
        assert_eq!(from.cli(&args), "OK");
    }
}

/// `slot` given to `to`, every master told, `to` first and `from` next (the order of
/// https://redis.io/docs/latest/commands/cluster-setslot/, "Redis Cluster live resharding
/// explained", as `redis-cli --cluster reshard` does: the other way round, for a moment each
/// of the two sends the slot's calls to the other): `from` answers MOVED.
fn end_move(all: &[Master], from: &Master, to: &Master, slot: u16) {
    let rest = all.iter().filter(|m| m.id != from.id && m.id != to.id);
    for m in [to, from].into_iter().chain(rest) {
        assert_eq!(m.cli(&["cluster", "setslot", &slot.to_string(), "node", &to.id]), "OK");
    }
}

/// Tenants' shared rates written through one connection land on every master, and each
/// tenant's keys on the master that serves its slot: the store routes each call by its key.
#[tokio::test]
async fn tenants_spread_over_the_masters_each_in_its_own_slot() {
    let Some((store, prefix)) = common::redis::cluster_store().await else { return };
    let url = common::redis::cluster_url().unwrap();
    let tenants: Vec<String> = (0..24).map(|i| format!("tenant-{i}")).collect();
    let now = common::NOON * 1_000_000_000;
    for (i, tenant) in tenants.iter().enumerate() {
        let token = ReserveToken::new(1, i as u64 + 1).at(common::NOON);
        let call = CellCall::new(tenant.as_str().into(), 1, 1, 100_000_000, 10, now, token);
        assert_eq!(store.take_cells(&call).await.unwrap().granted, 1);
    }
    let masters = masters(&url);
    for master in &masters {
        let keys = keys_on(master, &prefix);
        assert!(
            keys.iter().any(|k| k.ends_with(":rate")),
            "master {} holds some tenants' rates: {keys:?}",
            master.addr()
        );
    }
    for tenant in &tenants {
        let slot = slot_of(&masters[0], tenant);
        let key = format!("{prefix}:1:{{{tenant}}}:rate");
        let holder = masters.iter().find(|m| m.serves(slot)).expect("a master serves every slot");
        assert_eq!(holder.cli(&["exists", &key]), "1", "{key} is on {}, which serves slot {slot}", holder.addr());
    }
}

/// Four engines, each with its own connection to the cluster, hammer one tenant whose hard
/// daily quota is L while its slot moves to another master, a step between each burst: marked
/// importing and migrating (its keys still on the first master), its keys moved (every call
/// redirected with `ASK`), then given to the second master (`MOVED`). The fleet admits exactly
/// L, and the usage stored is what was admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hard_quota_holds_exactly_while_its_slot_moves_between_masters() {
    const L: u64 = 384;
    const TASKS: u64 = 8;
    let Some((stores, memory, _)) = four_nodes_with_stores(On::Cluster).await else { return };
    let url = common::redis::cluster_url().unwrap();
    // A tenant of its own, whose slot no other test's tenant shares: the move redirects
    // nobody else's calls.
    let tenant = "slot-mover";
    let nodes = hard_quota_nodes(&stores, tenant, L);
    let burst = |each: u64| burst(&nodes, TASKS as usize, each);
    let all = masters(&url);
    let slot = slot_of(&all[0], tenant);
    assert!(["t", "u", "asked-0"].iter().all(|other| slot_of(&all[0], other) != slot), "a slot of its own");
    let (from, to) = move_from_to(&all, slot);

    let mut total = burst(L / 4 / TASKS).await;
    // Importing on the second master, migrating on the first: the keys are still on the first.
    begin_move(&from, &to, slot);
    let b = burst(L / 4 / TASKS).await;
    total = (total.0 + b.0, total.1 + b.1);
    // Every key of the slot moved: the first master answers each call with ASK.
    move_keys(&from, &to, slot);
    let c = burst(L / 4 / TASKS).await;
    total = (total.0 + c.0, total.1 + c.1);
    // The slot is the second master's: every node is told (MOVED from the first).
    end_move(&all, &from, &to, slot);
    let d = burst(L / 4 / TASKS + L / TASKS).await;
    total = (total.0 + d.0, total.1 + d.1);

    let sent = TASKS * (4 * (L / 4 / TASKS) + L / TASKS);
    assert_eq!(total, (L, sent - L), "exactly L admitted across the move");
    assert!(masters(&url).iter().any(|m| m.id == to.id && m.serves(slot)), "the slot moved");
    assert!(from.cli(&["cluster", "countkeysinslot", &slot.to_string()]) == "0", "no key left behind");
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
    let stored = common::committed(&*memory, tenant, "requests", common::NOON - 3600, common::NOON + 3600, 3600).await;
    assert_eq!(stored, L, "the usage stored is the requests admitted");
}

/// Four engines on the cluster share a fleet rate within its documented bound
/// (tests/common/fleet.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_share_one_fleet_rate_on_a_cluster() {
    let Some((nodes, _, _)) = four_nodes_with_stores(On::Cluster).await else { return };
    common::fleet::four_nodes_share_one_rate_on(nodes, Duration::from_millis(1)).await;
}

/// Four engines on the cluster hold, record and give back against a prepaid balance, the
/// clock moving (tests/common/holds.rs): it never goes below zero, and ends at what was
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_holding_never_spend_past_a_prepaid_balance_on_a_cluster() {
    let Some((nodes, memory, reader)) = four_nodes_with_stores(On::Cluster).await else { return };
    common::holds::four_nodes_holding(nodes, reader, memory, true).await;
}

/// `cluster_durability_warnings` reads every master: one that may evict is named, and the
/// others say nothing.
#[tokio::test]
async fn every_masters_durability_is_told() {
    let Some(url) = common::redis::cluster_url() else { return };
    let all = masters(&url);
    let odd = &all[1];
    // Put back whatever the test ends with.
    struct Restore(Master);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.cli(&["config", "set", "maxmemory-policy", "noeviction"]);
        }
    }
    odd.cli(&["config", "set", "maxmemory-policy", "volatile-lru"]);
    let _restore = Restore(odd.clone());
    let warnings = RedisStore::cluster_durability_warnings(&url, Duration::from_secs(5)).await.unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("volatile-lru") && warnings[0].contains(&format!("node {}", odd.addr())),
        "{warnings:?}"
    );
    drop(_restore);
    let warnings = RedisStore::cluster_durability_warnings(&url, Duration::from_secs(5)).await.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// The slot of a hash tag, as the cluster computes it: CRC16 (XMODEM) mod 16384
/// (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/, "Key
/// distribution model").
fn slot_by_crc(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &byte in tag.as_bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Many calls at once on one connection, each of its own tenant, the tenants sharing one slot
/// whose keys moved already: each is redirected with ASK, and each goes to the second master
/// with `ASKING` right before it (another call's command between the two would take the
/// one-time flag, and the call would be refused until it timed out). Every call is answered,
/// each cell once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_sharing_a_connection_follow_ask_while_a_slot_moves() {
    const CALLS: usize = 64;
    let Some((store, _prefix)) = common::redis::cluster_store().await else { return };
    let store = Arc::new(store);
    let url = common::redis::cluster_url().unwrap();
    let all = masters(&url);
    assert_eq!(slot_by_crc("asked-0"), slot_of(&all[0], "asked-0"), "the cluster's own slot function");
    let slot = slot_by_crc("asked-0");
    let tenants: Vec<String> =
        (0..).map(|i| format!("asked-{i}")).filter(|t| slot_by_crc(t) == slot).take(CALLS).collect();
    let now = common::NOON * 1_000_000_000;
    let call = |tenant: &str, node: u64, want: u32| {
        let token = ReserveToken::new(node, 1).at(common::NOON);
        CellCall::new(tenant.into(), want, 1, 1_000_000, 1_000, now, token)
    };
    // Each tenant's row exists, then the slot's keys move.
    for tenant in &tenants {
        assert_eq!(store.take_cells(&call(tenant, 1, 1)).await.unwrap().granted, 1);
    }
    let (from, to) = move_from_to(&all, slot);
    begin_move(&from, &to, slot);
    move_keys(&from, &to, slot);
    let mut calls = tokio::task::JoinSet::new();
    for tenant in &tenants {
        let (store, call) = (store.clone(), call(tenant, 2, 1));
        calls.spawn(async move { store.take_cells(&call).await.map(|g| g.granted) });
    }
    let mut granted = 0u64;
    while let Some(done) = calls.join_next().await {
        granted += u64::from(done.unwrap().expect("every call is answered while the slot moves"));
    }
    end_move(&all, &from, &to, slot);
    assert_eq!(granted, CALLS as u64, "each call its cell");
    // Asked again now the slot is moved: answered from its token, nothing granted twice.
    assert_eq!(store.take_cells(&call(&tenants[0], 2, 1)).await.unwrap().granted, 1, "a re-sent call, its cell");
    assert_eq!(store.take_cells(&call(&tenants[0], 3, 1_000)).await.unwrap().granted, 998, "the rest of the burst");
}

/// A node of a cluster opened as one server is refused at open, saying what to set (it would
/// answer MOVED for most tenants' keys, later); a server that is not a cluster opened as one
/// is refused too.
#[tokio::test]
async fn a_cluster_opened_as_one_server_is_refused_naming_the_setting() {
    let Some(cluster) = common::redis::cluster_url() else { return };
    let e = RedisStore::open(&cluster, "p", Duration::from_secs(5)).await.unwrap_err().to_string();
    assert!(e.contains("cluster = true"), "{e}");
    let Some(one) = common::redis::url() else { return };
    let e = RedisStore::open_cluster(&one, "p", Duration::from_secs(5)).await.unwrap_err().to_string();
    assert!(e.contains("cluster"), "{e}");
}
