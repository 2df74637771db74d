//! A receiver of alerts for the tests (scripts/alert-receiver.py): each delivery verified with
//! the official Standard Webhooks library and its body checked against
//! docs/alerts.schema.json, recorded, and answered as the test says (ok, down, slow, redirect,
//! huge).
#![allow(dead_code, unreachable_pub)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A signing secret the tests use.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: Option<String>,
    pub kind: Option<String>,
    /// The body's `data`.
    pub data: serde_json::Value,
    pub path: String,
    pub verified: bool,
    pub valid: bool,
    pub error: Option<String>,
    pub mode: String,
}

/// The receiver process, killed when dropped.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    pub port: u16,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// Starts a receiver verifying with `SECRET` (`None`: no Python with the library, skipped
    /// loudly; in CI it must be there).
    pub fn start() -> Option<Self> {
        let python = test_python("standardwebhooks")?;
        // The workspace's scripts, from the root crate or a door crate (integrations/NAME).
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = [manifest.to_path_buf(), manifest.join("../..")]
            .into_iter()
            .map(|root| root.join("scripts/alert-receiver.py"))
            .find(|p| p.exists())
            .expect("scripts/alert-receiver.py");
        // Port 0: the receiver binds a port the system chooses and says which, so no other
        // test's server can take it between a choice here and its bind.
        let mut child = Command::new(python)
            .args([script.as_os_str(), "0".as_ref(), SECRET.as_ref()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the alert receiver starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the alert receiver did not start: {line:?}"));
        Some(Self { child, port })
    }

    /// The URL of a path on it.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.0\r\nhost: x\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }

    /// What it received, in arrival order.
    pub async fn received(&self) -> Vec<Delivery> {
        let all: Vec<serde_json::Value> = serde_json::from_str(&self.call("GET", "/received", "").await).unwrap();
        let text = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_owned);
        all.iter()
            .map(|v| Delivery {
                id: text(v, "id"),
                kind: text(v, "type"),
                data: v["data"].clone(),
                path: text(v, "path").unwrap_or_default(),
                verified: v["verified"].as_bool().unwrap_or(false),
                valid: v["valid"].as_bool().unwrap_or(false),
                error: text(v, "error"),
                mode: text(v, "mode").unwrap_or_default(),
            })
            .collect()
    }

    /// How it answers from now on (`ok`, `down`, `slow` for `seconds`, `redirect`, `huge`).
    pub async fn mode(&self, mode: &str, seconds: u64) {
        self.call("POST", "/mode", &format!("{{\"mode\":\"{mode}\",\"seconds\":{seconds}}}")).await;
    }

    /// Verifies with `secret` too (a tenant's, drawn at its registration).
    pub async fn add_secret(&self, secret: &str) {
        self.call("POST", "/secret", &format!("{{\"secret\":\"{secret}\"}}")).await;
    }

    /// Waits (real time, at most `within`) until `until` holds of what it received.
    pub async fn wait_for(&self, within: Duration, until: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        let started = tokio::time::Instant::now();
        loop {
            let got = self.received().await;
            if until(&got) || started.elapsed() > within {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A file holding `SECRET`, for `secret_file` (kept while the returned directory lives).
pub fn secret_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    (dir, path.to_string_lossy().into_owned())
}

/// The `[alerts]` section sending to `url` (an endpoint named `ops`), signed with `SECRET` read
/// from `secret`.
pub fn section(url: &str, secret: &str, extra: &str) -> String {
    format!(
        "[alerts]\ntimeout = \"3s\"\n{extra}\n[alerts.endpoints.ops]\nurl = \"{url}\"\nsecret_file = \"{secret}\"\n"
    )
}

/// The test environment's Python (`TOLLGATE_MOTO_PYTHON`, set by scripts/test.sh), which has
/// `library` for a receiver of the tests (this
/// file is included alone by the Lambda door's tests: the helper stands here). `None` outside it, skipped loudly; under CI (or
/// `TOLLGATE_REQUIRE_SERVERS`) its absence fails the test.
pub fn test_python(library: &str) -> Option<String> {
    match std::env::var("TOLLGATE_MOTO_PYTHON") {
        Ok(p) => Some(p),
        _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => {
            panic!("CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_MOTO_PYTHON is not (scripts/test.sh sets it)")
        }
        _ => {
            eprintln!("SKIPPED: TOLLGATE_MOTO_PYTHON (a Python with {library}) is not set; scripts/test.sh sets it");
            None
        }
    }
}
