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
