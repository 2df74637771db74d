//! A table of its own per test on the local DynamoDB-compatible server (moto) that
//! `scripts/test.sh` starts and names in `TOLLGATE_DYNAMODB_ENDPOINT`.

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::aws_sdk_dynamodb::{
    config::{BehaviorVersion, Credentials, Region},
    Client, Config,
};
use tollgate::store::DynamoStore;

/// The server's endpoint. Without one a test skips loudly; under CI it fails.
pub fn endpoint() -> Option<String> {
    match std::env::var("TOLLGATE_DYNAMODB_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => panic!(
            "CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_DYNAMODB_ENDPOINT is not: the DynamoDB tests \
             must run (scripts/test.sh starts a local server)"
        ),
        _ => {
            eprintln!(
                "SKIPPED: no local DynamoDB server (TOLLGATE_DYNAMODB_ENDPOINT is not set); \
                 scripts/test.sh starts one"
            );
            None
        }
    }
}

/// A client of the local server, with test credentials.
pub fn client(endpoint: &str) -> Client {
    let config = Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tollgate-tests"))
        .build();
    Client::from_conf(config)
}

/// Another client with the same configuration (another node, or a restarted one).
pub fn client_like(client: &Client) -> Client {
    Client::from_conf(client.config().clone())
}

/// A store on a new table of its own, or `None` (skipped) without a server.
pub async fn table() -> Option<DynamoStore> {
    static N: AtomicU64 = AtomicU64::new(0);
    let endpoint = endpoint()?;
    let name = format!("tollgate-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let store = DynamoStore::new(client(&endpoint), name);
    store.create_table().await.expect("the table is created");
    Some(store)
}

/// A store on a new table of `endpoint` whose client counts the requests it sends (each
/// attempt of each call).
pub async fn counting_table(endpoint: &str) -> (DynamoStore, std::sync::Arc<AtomicU64>) {
    static N: AtomicU64 = AtomicU64::new(0);
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let config = client(endpoint).config().to_builder().interceptor(Counting(sent.clone())).build();
    let name = format!("tollgate-counted-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let store = DynamoStore::new(Client::from_conf(config), name);
    store.create_table().await.expect("the table is created");
    (store, sent)
}

/// Counts the requests a client sends.
#[derive(Debug)]
struct Counting(std::sync::Arc<AtomicU64>);

impl tollgate::aws_sdk_dynamodb::config::Intercept for Counting {
    fn name(&self) -> &'static str {
        "Counting"
    }

    fn read_before_transmit(
        &self,
        _: &tollgate::aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &tollgate::aws_sdk_dynamodb::config::RuntimeComponents,
        _: &mut tollgate::aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), tollgate::aws_sdk_dynamodb::error::BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A DynamoDB-compatible server of a test's own (so that the test may stop and resume it
/// without holding up the others), or `None` (skipped) without the venv's Python.
pub struct OwnServer {
    pub child: std::process::Child,
    pub endpoint: String,
}

impl OwnServer {
    pub async fn start() -> Option<Self> {
        let python = match std::env::var("TOLLGATE_MOTO_PYTHON") {
            Ok(p) if !p.is_empty() => p,
            _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => {
                panic!(
                    "CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_MOTO_PYTHON is not (scripts/test.sh sets it)"
                )
            }
            _ => {
                eprintln!("SKIPPED: TOLLGATE_MOTO_PYTHON is not set; scripts/test.sh sets it");
                return None;
            }
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // The workspace's scripts, from this package's folder or one of its parents (the
        // integration crates share these helpers).
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|dir| dir.join("scripts/moto-server.py"))
            .find(|p| p.exists())
            .expect("scripts/moto-server.py in the workspace");
        let child = std::process::Command::new(python)
            .arg(&script)
            .args(["127.0.0.1", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the server starts");
        // Owned at once, so that it is stopped (and reaped) on every path, a panic included.
        let server = Self { child, endpoint: format!("http://127.0.0.1:{port}") };
        for _ in 0..150 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the server did not start on port {port}");
    }

    /// Sends the server a signal (`STOP`, `CONT`); whether it was delivered.
    pub fn signal(&self, signal: &str) -> bool {
        let status =
            std::process::Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
        status.is_ok_and(|s| s.success())
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
