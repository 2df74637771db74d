//! A schema of its own per test on the local PostgreSQL server that `scripts/test.sh` starts
//! (`scripts/postgres-server.sh`) and names in `TOLLGATE_POSTGRES_URL`.

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::store::{PostgresOptions, PostgresStore};

/// The server's URL. Without one a test skips loudly; under CI it fails.
pub fn url() -> Option<String> {
    match std::env::var("TOLLGATE_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => panic!(
            "CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_POSTGRES_URL is not: the PostgreSQL tests must \
             run (scripts/test.sh starts a local server)"
        ),
        _ => {
            eprintln!(
                "SKIPPED: no local PostgreSQL server (TOLLGATE_POSTGRES_URL is not set); \
                 scripts/test.sh starts one (scripts/postgres-server.sh)"
            );
            None
        }
    }
}

/// Options for a new schema of the test's own, or `None` (skipped) without a server.
pub fn fresh() -> Option<PostgresOptions> {
    static N: AtomicU64 = AtomicU64::new(0);
    let url = url()?;
    let schema = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    Some(PostgresOptions::new(url).schema(schema).pool_size(4))
}

/// A store on a new schema of its own, or `None` (skipped) without a server.
pub async fn store() -> Option<(PostgresStore, PostgresOptions)> {
    let options = fresh()?;
    let store = PostgresStore::open(&options).await.expect("the schema is created");
    Some((store, options))
}

/// PgBouncer in transaction mode in front of the server (`TOLLGATE_PGBOUNCER_URL`, started by
/// `scripts/test.sh` with `scripts/pgbouncer.sh`). Without one a test skips loudly; under CI it
/// fails.
pub fn bouncer_url() -> Option<String> {
    match std::env::var("TOLLGATE_PGBOUNCER_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => panic!(
            "CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_PGBOUNCER_URL is not: the PgBouncer tests must run \
             (scripts/test.sh starts PgBouncer)"
        ),
        _ => {
            eprintln!("SKIPPED: no PgBouncer (TOLLGATE_PGBOUNCER_URL is not set); scripts/test.sh starts one");
            None
        }
    }
}

/// Options for a new schema of the test's own, reached through PgBouncer in transaction mode.
pub fn fresh_behind_bouncer() -> Option<PostgresOptions> {
    let url = bouncer_url()?;
    let mut options = fresh()?;
    options.url = url;
    Some(options)
}

/// A PostgreSQL cluster of a test's own (so that the test may restart or pause it without
/// holding up the others), started by `scripts/postgres-server.sh`; removed on drop.
pub struct OwnServer {
    pub dir: std::path::PathBuf,
    pub url: String,
    pub data: String,
    pub bin: String,
}

fn script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("scripts").join(name))
        .find(|p| p.exists())
        .expect("the script in the workspace")
}

/// Runs `command` as the cluster's owner (the unprivileged `postgres` user when the tests run
/// as root: the server refuses root).
fn as_owner(command: &str, args: &[&str]) -> std::process::Output {
    let root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let mut c = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", command]);
        c
    } else {
        std::process::Command::new(command)
    };
    c.args(args).output().expect("the command runs")
}

impl OwnServer {
    /// A new cluster, or `None` (skipped) without the shared server's variables (the tests
    /// run outside scripts/test.sh).
    pub fn start() -> Option<Self> {
        url()?;
        static N: AtomicU64 = AtomicU64::new(0);
        // Under the run's prefix (scripts/test.sh stops what a killed test leaves there).
        let prefix = std::env::var("TOLLGATE_POSTGRES_OWN_PREFIX")
            .unwrap_or_else(|_| std::env::temp_dir().join("tollgate-own-pg").display().to_string());
        let dir =
            std::path::PathBuf::from(format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let out = std::process::Command::new(script("postgres-server.sh"))
            .args(["start", dir.to_str().unwrap()])
            .output()
            .expect("the script runs");
        assert!(out.status.success(), "the cluster starts: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let var = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .to_owned()
        };
        Some(Self {
            url: var("TOLLGATE_POSTGRES_URL"),
            data: var("TOLLGATE_POSTGRES_DATA"),
            bin: var("TOLLGATE_POSTGRES_BIN"),
            dir,
        })
    }

    /// Options for a schema on this cluster.
    pub fn options(&self) -> PostgresOptions {
        PostgresOptions::new(self.url.clone()).schema("tollgate").pool_size(4)
    }

    /// `pg_ctl restart -m fast`: the server closes every connection and starts again. Its log
    /// goes to the cluster's file: the new server must not hold this process's pipes open.
    pub fn restart(&self) {
        let pg_ctl = format!("{}/pg_ctl", self.bin);
        let log = self.dir.join("server.log");
        let out = as_owner(
            &pg_ctl,
            &["-D", &self.data, "-l", log.to_str().unwrap(), "-m", "fast", "-w", "-t", "60", "restart"],
        );
        assert!(out.status.success(), "restart: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Sends `signal` (`STOP`, `CONT`) to the postmaster and every process it started (the
    /// backends of open connections included): the whole server pauses or resumes.
    pub fn signal_all(&self, signal: &str) {
        let pid = std::fs::read_to_string(format!("{}/postmaster.pid", self.data)).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_owned();
        let children = std::process::Command::new("ps").args(["-o", "pid=", "--ppid", &pid]).output().unwrap();
        let mut pids: Vec<String> =
            String::from_utf8_lossy(&children.stdout).split_whitespace().map(str::to_owned).collect();
        pids.push(pid);
        let status = std::process::Command::new("kill").arg(format!("-{signal}")).args(&pids).status().unwrap();
        assert!(status.success(), "kill -{signal} {pids:?}");
    }

    /// One value read with `psql` (the totals are read as an operator would).
    pub fn psql(&self, sql: &str) -> String {
        let out = std::process::Command::new("psql").args(["-qtA", &self.url, "-c", sql]).output().unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| self.signal_all("CONT"));
        let _ = std::process::Command::new(script("postgres-server.sh"))
            .args(["stop", self.dir.to_str().unwrap()])
            .output();
    }
}
