//! What the command groups share: the configuration and the administration it opens, and times.

use std::time::Duration;

use tollgate::{admin::Admin, Config};

pub(crate) type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub(crate) fn load(path: &std::path::Path) -> Result<Config> {
    Config::from_path(path).map_err(Into::into)
}

pub(crate) async fn admin(config: &std::path::Path) -> Result<Admin> {
    open_admin(&load(config)?).await
}

/// Who this run's changes are recorded as made by (`--operator`, set once at the start).
pub(crate) static OPERATOR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The operator a run is recorded as: `--operator` (or `$TOLLGATE_OPERATOR`), else
/// `cli:$USER` (`cli` without a user).
pub(crate) fn operator_of(given: Option<String>) -> String {
    given.filter(|o| !o.trim().is_empty()).unwrap_or_else(|| match std::env::var("USER") {
        Ok(user) if !user.is_empty() => format!("cli:{user}"),
        _ => "cli".to_owned(),
    })
}

/// The administration `config` names, its changes recorded as made by the run's operator.
pub(crate) async fn open_admin(config: &Config) -> Result<Admin> {
    let admin = Admin::open(config).await?;
    Ok(match OPERATOR.get() {
        Some(o) => admin.operator(o.clone()),
        None => admin,
    })
}

pub(crate) fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

pub(crate) fn now() -> i64 {
    secs(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default())
}

pub(crate) fn time_text(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map_or_else(|| unix.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// A time given as Unix seconds, an RFC 3339 time, or a date (midnight UTC).
pub(crate) fn parse_time(text: &str) -> Result<i64> {
    if let Ok(n) = text.parse::<i64>() {
        return Ok(n);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp()));
    }
    Err(format!("`{text}` is not a time: give a date (2026-11-01), an RFC 3339 time or Unix seconds").into())
}

/// Whether standard output was found closed: nothing more is written to it.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes one line of the command's output ([`out!`](crate::out)): dropped once standard output
/// is closed (a broken pipe); another failure to write is said once on standard error.
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    if STDOUT_CLOSED.load(Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.write_all(b"\n")) {
        STDOUT_CLOSED.store(true, Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("warning: the output could not be written ({e}); the command goes on without it");
        }
    }
}
