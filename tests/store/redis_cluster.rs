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

/// Held by the tests that move slots, add a master or change a master's settings: one at a
/// time, each seeing the cluster as the script made it (the conformance modules on the same
/// cluster go on meanwhile: their tenants' slots are not the ones moved).
static TOPOLOGY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Master {
    /// `redis-cli` against this master: its output.
    fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("redis-cli {args:?}: {e}"))
    }

    /// [`cli`](Self::cli), its failure returned (for what runs while a test unwinds).
    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let port = self.port.to_string();
        let out = std::process::Command::new("redis-cli")
            .args(["-h", &self.host, "-p", &port])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
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
    assert!(masters.len() >= 3, "three masters: {text}");
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

/// A slot being moved: finished on drop if the test stops halfway (a panic), so that the
/// cluster stays whole for the other tests (every key moved, every master told; nothing
/// asserted while unwinding).
struct Moving {
    all: Vec<Master>,
    from: Master,
    to: Master,
    slot: u16,
    done: bool,
}

impl Moving {
    /// Begins moving `slot` from `from` to `to` ([`begin_move`]).
    fn begin(all: &[Master], from: &Master, to: &Master, slot: u16) -> Self {
        begin_move(from, to, slot);
        Self { all: all.to_vec(), from: from.clone(), to: to.clone(), slot, done: false }
    }

    /// Ends the move ([`end_move`]).
    fn end(mut self) {
        end_move(&self.all, &self.from, &self.to, self.slot);
        self.done = true;
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let slot = self.slot.to_string();
        let port = self.to.port.to_string();
        for _ in 0..100 {
            let Ok(keys) = self.from.try_cli(&["cluster", "getkeysinslot", &slot, "100"]) else { break };
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["migrate", self.to.host.as_str(), port.as_str(), "", "0", "5000", "REPLACE", "KEYS"];
            args.extend(keys);
            let _ = self.from.try_cli(&args);
        }
        for m in [&self.to, &self.from].into_iter().chain(&self.all) {
            let _ = m.try_cli(&["cluster", "setslot", &slot, "node", &self.to.id]);
        }
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
    let _topology = TOPOLOGY.lock().await;
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
    // Every master's scripts flushed (a restart, a failover): each write loads the script on
    // the node that answers NOSCRIPT, and goes on.
    for master in &masters {
        assert_eq!(master.cli(&["script", "flush"]), "OK");
    }
    for (i, tenant) in tenants.iter().enumerate() {
        let token = ReserveToken::new(2, i as u64 + 1).at(common::NOON);
        let call = CellCall::new(tenant.as_str().into(), 1, 1, 100_000_000, 10, now, token);
        assert_eq!(store.take_cells(&call).await.unwrap().granted, 1, "after SCRIPT FLUSH");
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
    let _topology = TOPOLOGY.lock().await;
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
    let moving = Moving::begin(&all, &from, &to, slot);
    let b = burst(L / 4 / TASKS).await;
    total = (total.0 + b.0, total.1 + b.1);
    // Every key of the slot moved: the first master answers each call with ASK.
    move_keys(&from, &to, slot);
    let c = burst(L / 4 / TASKS).await;
    total = (total.0 + c.0, total.1 + c.1);
    // The slot is the second master's: every node is told (MOVED from the first).
    moving.end();
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
    let Some((nodes, _, _)) = four_nodes_with_stores(On::ClusterDriven).await else { return };
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

/// `cluster_durability_warnings` reads every master (with `INFO`): one that keeps no
/// append-only file is named, and the others say nothing. (An evicting policy on a master of
/// the shared cluster would refuse the other tests' stores: `memory`'s unit tests and the
/// single server's eviction tests cover the policy.)
#[tokio::test]
async fn every_masters_durability_is_told() {
    let Some(url) = common::redis::cluster_url() else { return };
    let _topology = TOPOLOGY.lock().await;
    let all = masters(&url);
    let odd = &all[1];
    // Put back whatever the test ends with.
    struct Restore(Master);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = self.0.try_cli(&["config", "set", "appendonly", "yes"]);
        }
    }
    odd.cli(&["config", "set", "appendonly", "no"]);
    let _restore = Restore(odd.clone());
    let warnings = RedisStore::cluster_durability_warnings(&url, Duration::from_secs(5)).await.unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("appendonly is no") && warnings[0].contains(&format!("node {}", odd.addr())),
        "{warnings:?}"
    );
    drop(_restore);
    let warnings = RedisStore::cluster_durability_warnings(&url, Duration::from_secs(5)).await.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// Upgrading a prefix of layout 2 on a cluster takes the time to live off every tenant's quota
/// row on every master (the pass scans each master), and leaves the other roles' rows as they
/// were.
#[tokio::test]
async fn upgrading_from_layout_2_on_a_cluster_reaches_every_master() {
    use tollgate::store::{QuotaKey, QuotaStore, Reservation};
    let Some((store, prefix)) = common::redis::cluster_store().await else { return };
    let url = common::redis::cluster_url().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let day = tollgate::config::Period::Day;
    let (start, end) = day.bounds(now);
    let tenants: Vec<String> = (0..24).map(|i| format!("tenant-{i}")).collect();
    for (i, tenant) in tenants.iter().enumerate() {
        let key = QuotaKey::new(tenant.as_str().into(), "requests".into(), day, start, end);
        let token = ReserveToken::new(1, i as u64 + 1).at(now);
        store.reserve(&Reservation::new(key, 1, 0, Some(10), token)).await.unwrap();
    }
    let masters = masters(&url);
    let holder = |key: &str| {
        let tag = key.split_once('{').and_then(|(_, rest)| rest.split_once('}')).map(|(t, _)| t).unwrap();
        let slot = slot_of(&masters[0], tag);
        masters.iter().find(|m| m.serves(slot)).expect("a master serves every slot")
    };
    let mut rows = Vec::new();
    for tenant in &tenants {
        for row in [
            format!("{prefix}:1:{{{tenant}}}:quota"),
            format!("{prefix}:1:{{{tenant}}}:counter:requests:day:{start}:{end}"),
        ] {
            assert_eq!(holder(&row).cli(&["pexpire", &row, "3000000000"]), "1", "{row}");
            rows.push(row);
        }
    }
    let mut on = std::collections::HashSet::new();
    for row in &rows {
        on.insert(holder(row).addr());
    }
    assert_eq!(on.len(), masters.len(), "the rows are on every master");
    let layout = format!("{prefix}:layout");
    holder(&format!("{{{layout}}}")).cli(&["-c", "set", &layout, "2"]);
    RedisStore::open_cluster(&url, &prefix, Duration::from_secs(5)).await.unwrap();
    for row in &rows {
        assert_eq!(holder(row).cli(&["pttl", row]), "-1", "{row}");
    }
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
    let Some((store, _prefix)) = common::redis::cluster_store_driven().await else { return };
    // Each cell counted at one time of the calls' clock (1 ms a cell).
    let _topology = TOPOLOGY.lock().await;
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
    let moving = Moving::begin(&all, &from, &to, slot);
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
    moving.end();
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

/// A server of its own, in cluster mode: on drop, forgotten by the masters (once met), killed,
/// and its directory removed.
struct Spare {
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// Its id, once the masters met it.
    met: Option<(String, Vec<Master>)>,
    /// A slot it may hold, and the master to give it back to (a test stopped halfway: the
    /// keys moved to it are lost, the cluster whole again).
    slot: Option<(u16, Master)>,
}

impl Drop for Spare {
    fn drop(&mut self) {
        // Its slot given back first, every master told (no master left without an owner for
        // it, which would take the whole cluster down), then forgotten and stopped.
        if let (Some((slot, owner)), Some((_, masters))) = (&self.slot, &self.met) {
            for m in masters {
                let _ = m.try_cli(&["cluster", "setslot", &slot.to_string(), "node", &owner.id]);
            }
        }
        if let Some((id, masters)) = &self.met {
            for m in masters {
                let _ = m.try_cli(&["cluster", "forget", id]);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port whose cluster bus (the port plus 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port <= 55_000
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// Polls `done` every 100 ms, up to 20 s: whether it came true.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A master added empty (a scale-out) is given its first slot while a connection opened before
/// it joined keeps calling: the keys moved to it already are answered `ASK` towards a node the
/// cluster client has no connection to, and the store asks it on a connection of its own; once
/// the slot is its, `MOVED` brings the client to it. Every call is answered, each cell once.
/// Then the slot goes back and the node leaves the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_added_empty_takes_a_slot_while_calls_go_on() {
    const CALLS: u64 = 16;
    let Some((store, _prefix)) = common::redis::cluster_store_driven().await else { return };
    // Each cell counted at one time of the calls' clock (1 ms a cell).
    let _topology = TOPOLOGY.lock().await;
    let url = common::redis::cluster_url().unwrap();
    let all = masters(&url);
    let tenant = "scale-out";
    let slot = slot_by_crc(tenant);
    assert!(["t", "u", "asked-0", "slot-mover"].iter().all(|other| slot_by_crc(other) != slot), "a slot of its own");
    let now = common::NOON * 1_000_000_000;
    let call = |node: u64, want: u32| {
        CellCall::new(tenant.into(), want, 1, 1_000_000, 1_000, now, ReserveToken::new(node, 1).at(common::NOON))
    };
    assert_eq!(store.take_cells(&call(1, 1)).await.unwrap().granted, 1, "the tenant's row, on its master");

    // The fourth master: a server of its own, met by the cluster, serving nothing yet.
    let port = free_cluster_port();
    let dir = std::env::temp_dir().join(format!("tollgate-spare-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir", dir.to_str().unwrap()])
        .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"])
        // Given its slot back, it stays an empty master (not a replica of the taker), to leave.
        .args(["--cluster-allow-replica-migration", "no"])
        .args(["--appendonly", "yes", "--maxmemory-policy", "noeviction", "--save", ""])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let mut spare = Spare { child, dir, met: None, slot: None };
    let mut new = Master { id: String::new(), host: "127.0.0.1".to_owned(), port, slots: Vec::new() };
    assert!(eventually(|| new.try_cli(&["ping"]).is_ok_and(|p| p == "PONG")).await, "the spare server starts");
    new.id = new.cli(&["cluster", "myid"]);
    spare.met = Some((new.id.clone(), all.clone()));
    assert_eq!(all[0].cli(&["cluster", "meet", "127.0.0.1", &port.to_string()]), "OK");
    // Met: every node sees the four as masters, past their handshake.
    let settled = |m: &Master| {
        m.try_cli(&["cluster", "nodes"]).is_ok_and(|nodes| {
            let masters = nodes.lines().filter(|l| l.split_whitespace().nth(2).is_some_and(|f| f.contains("master")));
            masters.clone().count() == 4 && masters.clone().all(|l| !l.contains("handshake") && !l.contains("noaddr"))
        })
    };
    assert!(eventually(|| all.iter().chain([&new]).all(settled)).await, "every master knows the new one, and it them");
    let up = || new.try_cli(&["cluster", "info"]).is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_state:ok"));
    assert!(eventually(up).await, "the new master sees the cluster whole");
    let with_new: Vec<Master> = all.iter().cloned().chain([new.clone()]).collect();

    // Its first slot: the tenant's keys moved to it, then the slot given.
    let from = all.iter().find(|m| m.serves(slot)).unwrap().clone();
    spare.slot = Some((slot, from.clone()));
    let moving = Moving::begin(&with_new, &from, &new, slot);
    move_keys(&from, &new, slot);
    let store = Arc::new(store);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let (store, call) = (store.clone(), call(100 + i, 1));
        calls.spawn(async move { store.take_cells(&call).await.map(|g| g.granted) });
    }
    let mut granted = 0u64;
    while let Some(done) = calls.join_next().await {
        granted += u64::from(done.unwrap().expect("a call to a key on the new master, asked"));
    }
    assert_eq!(granted, CALLS, "each call its cell");
    // The store's connection to the new master lost (the server's `timeout`, a restart): the
    // call on it fails, never sent again (it may have run), and the next connects again.
    assert_ne!(new.cli(&["client", "kill", "type", "normal"]), "0", "the store's connection killed");
    assert!(store.take_cells(&call(150, 1)).await.is_err(), "its connection lost");
    assert_eq!(store.take_cells(&call(151, 1)).await.unwrap().granted, 1, "connected again");
    moving.end();
    assert_eq!(store.take_cells(&call(200, 1)).await.unwrap().granted, 1, "the slot is the new master's: MOVED");

    // Back to where it was, and the node gone from the cluster.
    let back = Moving::begin(&with_new, &new, &from, slot);
    move_keys(&new, &from, slot);
    back.end();
    assert_eq!(store.take_cells(&call(201, 1)).await.unwrap().granted, 1, "back on its first master: MOVED");
    for m in &all {
        assert_eq!(m.cli(&["cluster", "forget", &new.id]), "OK");
    }
    drop(spare);
    assert_eq!(masters(&url).len(), 3, "the cluster is three masters again");
    let rest = u64::from(store.take_cells(&call(202, 1_000)).await.unwrap().granted);
    // Call 150 may have run on the new master before its connection went: its cell, once.
    assert!([1_000 - CALLS - 4, 1_000 - CALLS - 5].contains(&rest), "each cell granted once, the node gone: {rest}");
}
