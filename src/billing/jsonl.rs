use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{BillingSink, MeterEvent, SinkError};

/// Writes meter events as JSON lines, one object per line, appended to a file: what would be
/// billed, for development and audits.
///
/// ```no_run
/// # async fn f() {
/// let sink = tollgate::billing::JsonlSink::new("usage.jsonl");
/// # }
/// ```
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl JsonlSink {
    /// A sink appending to `path` (created if missing).
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self { path: path.as_ref().to_owned(), lock: tokio::sync::Mutex::new(()) }
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl BillingSink for JsonlSink {
    async fn send(&self, event: &MeterEvent) -> Result<(), SinkError> {
        let mut line = serde_json::to_vec(event).map_err(|e| SinkError::Permanent(e.to_string()))?;
        line.push(b'\n');
        let _guard = self.lock.lock().await;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(SinkError::retryable)?;
        file.write_all(&line).await.map_err(SinkError::retryable)?;
        file.flush().await.map_err(SinkError::retryable)?;
        Ok(())
    }
}
