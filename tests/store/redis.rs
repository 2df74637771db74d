//! The Redis store (feature `redis`) on the local server `scripts/test.sh` starts
//! (`scripts/redis-server.sh`, `TOLLGATE_REDIS_URL`): the fleet roles it serves behind four
//! engines, opened from a configuration, and what it refuses. Without a server the tests skip
//! loudly, and fail under CI.
#![cfg(feature = "redis")]

use std::{sync::Arc, time::Duration};

use crate::common::{self, NodeStore};
use tollgate::{
    store::{CellCall, RateStore, RedisStore, ReserveToken, Store},
    Config,
};

/// `redis-cli` against the test server: its output.
fn cli(url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli").args(["-u", url]).args(args).output().expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Four nodes, each its own connection to the server under one prefix, beside one memory
/// store of the other roles.
async fn four_nodes_on_redis() -> Option<[NodeStore; 4]> {
    let (first, prefix) = common::redis::store().await?;
    let url = common::redis::url()?;
    let rest: Arc<dyn Store> = Arc::new(tollgate::store::MemoryStore::new());
    let mut fleets = vec![Arc::new(first)];
    for _ in 1..4 {
        fleets.push(Arc::new(RedisStore::open(&url, &prefix, Duration::from_secs(5)).await.unwrap()));
    }
    let nodes: Vec<NodeStore> =
        fleets.into_iter().map(|fleet| NodeStore::Beside { rest: rest.clone(), fleet }).collect();
    Some(nodes.try_into().unwrap_or_else(|_| unreachable!()))
}

/// Four engines, each with its own connection to one Redis, share a fleet rate within its
/// documented bound, counted on the engine clock (tests/common/fleet.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_share_one_fleet_rate() {
    let Some(nodes) = four_nodes_on_redis().await else { return };
    common::fleet::four_nodes_share_one_rate_on(nodes, Duration::from_millis(1)).await;
}

/// Four engines on one Redis run at most a fleet concurrency's requests at once
/// (tests/common/places.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_run_at_most_the_fleets_concurrency() {
    let Some(nodes) = four_nodes_on_redis().await else { return };
    common::places::four_nodes_run_at_most_on(nodes, common::places::TOML).await;
}

/// A configuration puts the fleet roles on Redis beside a durable store, and `Builder::open`
/// opens them: two engines opened from it share the tenant's fleet rate (the second finds
/// the burst the first took).
#[tokio::test]
async fn the_configuration_puts_the_fleet_roles_on_redis() {
    let Some(url) = common::redis::url() else { return };
    let Some(pg) = common::postgres::url() else { return };
    let prefix = common::redis::fresh_prefix();
    let schema = prefix.replace('-', "_");
    let toml = format!(
        r#"
        [store]
        kind = "postgres"
        url = "{pg}"
        schema = "{schema}"
        [store.rate]
        kind = "redis"
        url = "{url}"
        prefix = "{prefix}"
        [store.places]
        kind = "redis"
        url = "{url}"
        prefix = "{prefix}"
        [store.idempotency]
        kind = "redis"
        url = "{url}"
        prefix = "{prefix}"
        [limits]
        fleet_size_hint = 2
        [plans.p]
        rate = "1/min"
        burst = 4
        rate_scope = "fleet"
        [tenants.t]
        plan = "p"
        keys = ["key-t"]
        "#
    );
    let config = Config::from_toml_str(&toml).unwrap();
    assert_eq!(config.store_of(tollgate::config::StoreRole::Rate).kind(), "redis");
    // The engines' clock stands still: a lease's spare cells stay spendable.
    let (clock, _handle) = tollgate::clock::Clock::fake_at_unix(common::NOON);
    let open = |config: Config| tollgate::Tollgate::builder(config).clock(clock.clone()).open();
    let (a, _) = open(config.clone()).await.expect("opens postgres and redis");
    let (b, _) = open(config).await.unwrap();
    let mut served = 0;
    for engine in [&a, &b, &a, &b, &a, &b] {
        if common::fleet::send_key(engine, "key-t").await.is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 4, "the burst, once for both engines");
    // The tenant's bucket is a hash under the prefix, tagged by the tenant, with a TTL.
    let key = format!("{prefix}:1:{{t}}:rate");
    assert_eq!(cli(&url, &["exists", &key]), "1");
    assert!(cli(&url, &["pttl", &key]).parse::<i64>().unwrap() > 0, "it expires");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The roles Redis does not serve are refused at load, naming the key and why.
#[test]
fn roles_redis_does_not_serve_are_refused_at_load() {
    let refused = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
    let alone = refused("[store]\nkind = \"redis\"\n[plans.p]\nrate = \"1/s\"\n");
    assert!(alone.contains("store.kind") && alone.contains("durable"), "{alone}");
    let quota = refused("[store]\nkind = \"postgres\"\n[store.quota]\nkind = \"redis\"\n[plans.p]\nrate = \"1/s\"\n");
    assert!(quota.contains("store.quota.kind") && quota.contains("quota role"), "{quota}");
    let prefix = refused("[store.rate]\nkind = \"redis\"\nprefix = \"a{b}\"\n[plans.p]\nrate = \"1/s\"\n");
    assert!(prefix.contains("store.rate.prefix"), "{prefix}");
    let key = refused("[store.rate]\nkind = \"redis\"\ntable = \"x\"\n[plans.p]\nrate = \"1/s\"\n");
    assert!(key.contains("store.rate.table"), "{key}");
}

/// An unreachable server is a clear error within the connect timeout, never a hang, and never
/// shows the URL's password; a wrong password too.
#[tokio::test]
async fn an_unreachable_server_or_a_wrong_password_is_a_clear_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://user:hunter2secret@127.0.0.1:{closed}");
    let started = std::time::Instant::now();
    let e = RedisStore::open(&url, "p", Duration::from_secs(2)).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(!e.contains("hunter2secret"), "{e}");
    // A user whose password is not the one given.
    let Some(good) = common::redis::url() else { return };
    assert_eq!(cli(&good, &["acl", "setuser", "tollgate-test", "on", ">rightpassword", "~*", "+@all"]), "OK");
    let wrong = good.replacen("redis://", "redis://tollgate-test:hunter2secret@", 1);
    let e = RedisStore::open(&wrong, "p", Duration::from_secs(2)).await.unwrap_err().to_string();
    assert!(!e.contains("hunter2secret") && e.contains("redis"), "{e}");
    let right = good.replacen("redis://", "redis://tollgate-test:rightpassword@", 1);
    RedisStore::open(&right, "p", Duration::from_secs(2)).await.expect("the right password opens it");
}

/// Keys of a newer layout under the prefix are refused with the version found; scripts
/// flushed from the server (`SCRIPT FLUSH`) are loaded again and nothing doubles.
#[tokio::test]
async fn a_newer_layout_is_refused_and_flushed_scripts_reload() {
    let Some((store, prefix)) = common::redis::store().await else { return };
    let url = common::redis::url().unwrap();
    let take = |seq: u64| {
        CellCall::new("t".into(), 3, 1, 100_000_000, 10, 1_773_446_400_000_000_000, ReserveToken::new(1, seq))
    };
    assert_eq!(store.take_cells(&take(1)).await.unwrap().granted, 3);
    assert_eq!(cli(&url, &["script", "flush"]), "OK");
    assert_eq!(store.take_cells(&take(1)).await.unwrap().granted, 3, "answered again, not applied");
    assert_eq!(store.take_cells(&take(2)).await.unwrap().granted, 3);
    assert_eq!(store.take_cells(&take(3)).await.unwrap().granted, 3);
    assert_eq!(store.take_cells(&take(4)).await.unwrap().granted, 1, "10 in all, each once");
    cli(&url, &["set", &format!("{prefix}:layout"), "2"]);
    let e = RedisStore::open(&url, &prefix, Duration::from_secs(2)).await.unwrap_err().to_string();
    assert!(e.contains("layout 2"), "{e}");
}

/// A Redis server of the test's own, on `dir`'s files, `appendfsync` as given: killed with
/// SIGKILL when dropped.
struct OwnServer {
    child: std::process::Child,
    url: String,
}

impl OwnServer {
    async fn start(dir: &std::path::Path, fsync: &str, port: u16) -> Self {
        let mut child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir"])
            .arg(dir)
            .args(["--appendonly", "yes", "--appendfsync", fsync, "--save", "", "--maxmemory-policy", "noeviction"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/redis-server.sh installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        // Up (its files loaded) once it answers: at most 10 s.
        for _ in 0..200 {
            let up = std::process::Command::new("redis-cli").args(["-u", &url, "ping"]).output();
            if up.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG") {
                return Self { child, url };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the test's own redis-server did not answer");
    }

    /// Killed with SIGKILL: no shutdown, nothing written on the way out.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server killed with SIGKILL and started again on its files, `appendfsync always`: every
/// write it acknowledged is there (the cells leased stay leased, a call answered before is
/// answered alike, an `Idempotency-Key` claimed stays claimed).
#[tokio::test]
async fn a_server_killed_with_appendfsync_always_keeps_what_it_acknowledged() {
    use tollgate::store::{IdempotencyClaim, IdempotencyState, IdempotencyStore};
    if common::redis::url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = OwnServer::start(dir.path(), "always", port).await;
    let store = RedisStore::open(&server.url, "crash", Duration::from_secs(5)).await.unwrap();
    let now = 1_773_446_400_000_000_000;
    let take =
        |seq: u64, want: u32| CellCall::new("t".into(), want, 1, 100_000_000, 10, now, ReserveToken::new(1, seq));
    let mut leased = 0;
    for seq in 1..=4 {
        leased += store.take_cells(&take(seq, 2)).await.unwrap().granted;
    }
    assert_eq!(leased, 8);
    let claim = IdempotencyClaim::new(
        "key",
        "r",
        7,
        now / 1_000_000_000,
        now / 1_000_000_000 + 300,
        now / 1_000_000_000 + 86_400,
    );
    assert_eq!(store.claim_idempotency(&claim).await.unwrap(), IdempotencyState::Claimed);
    drop(store);
    server.kill();
    let server = OwnServer::start(dir.path(), "always", port).await;
    let store = RedisStore::open(&server.url, "crash", Duration::from_secs(5)).await.unwrap();
    assert_eq!(store.take_cells(&take(4, 2)).await.unwrap().granted, 2, "its answer kept: not applied again");
    assert_eq!(store.take_cells(&take(5, 10)).await.unwrap().granted, 2, "the 8 leased are still leased");
    let retry = IdempotencyClaim::new(
        "key",
        "r",
        8,
        now / 1_000_000_000 + 1,
        now / 1_000_000_000 + 301,
        now / 1_000_000_000 + 86_400,
    );
    assert_eq!(store.claim_idempotency(&retry).await.unwrap(), IdempotencyState::InFlight, "still claimed");
}

/// The server paused (SIGSTOP) before a node leases cells of a fleet rate: no request is
/// served while it cannot answer (fail-closed: each is refused, 503 or, while the engine takes
/// the timeouts for a contended bucket, 429); once it runs again (SIGCONT) whatever it queued
/// meanwhile applies once, and the tenant gets exactly its burst, no cell twice nor stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_follows_the_policy_and_the_limit_is_exact_after() {
    use tollgate::RejectionKind;
    if common::redis::url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = OwnServer::start(dir.path(), "everysec", port).await;
    let redis = Arc::new(RedisStore::open(&server.url, "paused", Duration::from_secs(5)).await.unwrap());
    let toml = r#"
        [usage]
        store_timeout = "500ms"
        on_store_error = "fail-closed"
        [plans.p]
        rate = "1/min"
        burst = 10
        rate_scope = "fleet"
        [tenants.t]
        plan = "p"
        keys = ["key-t"]
    "#;
    // The engine clock stands still: nothing comes back to the bucket during the test.
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(common::NOON);
    let (engine, _worker) = tollgate::Tollgate::builder(Config::from_toml_str(toml).unwrap())
        .store_arc(Arc::new(tollgate::store::MemoryStore::new()))
        .rate_store(redis)
        .clock(clock)
        .build();
    // Paused before the tenant's first lease: every request must wait on it.
    let pid = server.child.id().to_string();
    let signal = |sig: &str| assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    let mut served = 0;
    for _ in 0..4 {
        match common::fleet::send_key(&engine, "key-t").await {
            Ok(()) => panic!("served while the store cannot answer"),
            Err(r) => assert!(matches!(r.kind(), RejectionKind::StoreUnavailable | RejectionKind::RateLimited), "{r}"),
        }
    }
    signal("-CONT");
    // Running again: what it queued applies. The engine asks the store again once its
    // fail-fast interval is over (at most 5 s: a tenth of a cell at 1/min comes back).
    handle.advance(Duration::from_secs(6));
    let send_all = async |tries: usize| {
        let mut served = 0;
        for _ in 0..tries {
            match common::fleet::send_key(&engine, "key-t").await {
                Ok(()) => served += 1,
                Err(r) => {
                    assert!(matches!(r.kind(), RejectionKind::StoreUnavailable | RejectionKind::RateLimited), "{r}");
                }
            }
        }
        served
    };
    served += send_all(100).await;
    assert_eq!(served, 10, "the burst, each cell once, none stranded by a lost answer");
    // The bucket refilled (ten minutes at 1/min): exactly the burst again.
    handle.advance(Duration::from_secs(600));
    assert_eq!(send_all(100).await, 10, "the burst again");
    engine.shutdown().await.unwrap();
    drop(server);
}
