//! The ledger role: what each export sent, kept for reconciliation to compare with the billing
//! system's totals.

use std::fmt;

use async_trait::async_trait;

use super::{ExportKey, ExportSend, StoreError};

/// How long the [ledger](LedgerStore::ledger) keeps an entry after its export: Stripe takes
/// meter events up to 35 days old, so nothing older can be compared or sent again.
pub const LEDGER_KEPT_SECS: i64 = 35 * 86_400;

/// One meter event the billing system accepted (an exported revision), or one under
/// observation by reconciliation (a dead letter found lacking): what reconciliation compares
/// with the billing system's hourly totals.
///
/// Kept [`LEDGER_KEPT_SECS`] after its export, listed by the hour of its timestamp (the hour
/// the billing system counts it in, which may not be its window's: a late revision is stamped
/// at export time).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LedgerEntry {
    /// Which aggregate.
    pub key: ExportKey,
    /// Which of its revisions.
    pub revision: u32,
    /// What it sent: value, timestamp, customer, meter name and identifier.
    pub send: ExportSend,
    /// When it was marked exported (Unix seconds); `None` for a dead letter that
    /// reconciliation is observing.
    pub exported_at: Option<i64>,
    /// When reconciliation first found the billing system lacking it, if it did and has not
    /// found it since: two passes apart are proof.
    pub lacking_since: Option<i64>,
    /// Whether it was proven lost and its value sent again as a new revision: no longer
    /// expected in the billing system's totals.
    pub superseded: bool,
}

impl LedgerEntry {
    /// The entry of revision `revision` of `key`, sent as `send`, exported at `exported_at`.
    #[must_use]
    pub fn new(key: ExportKey, revision: u32, send: ExportSend, exported_at: Option<i64>) -> Self {
        Self { key, revision, send, exported_at, lacking_since: None, superseded: false }
    }

    /// The start of the hour the billing system counts it in.
    #[must_use]
    pub fn hour(&self) -> i64 {
        self.send.timestamp - self.send.timestamp.rem_euclid(3600)
    }
}

/// Where the reconciliation ledger lives: an entry per exported revision, written by
/// [`ExportStore::finish_export`](super::ExportStore::finish_export) in the export's own write.
/// Since the ledger is written in the same write as the export state it records, a store
/// holds it beside the aggregates: the usage store's role, as the export role is.
#[async_trait]
pub trait LedgerStore: Send + Sync + fmt::Debug + 'static {
    /// The ledger entries whose timestamp falls in the hour starting at `hour`, in (key,
    /// revision) order after `after`, at most `limit` of them: superseded entries and
    /// observed dead letters included.
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError>;

    /// Records that reconciliation found the billing system lacking `entry` at `now`, unless
    /// it was found so before (an observed dead letter gets an entry of its own, with no
    /// `exported_at`). Returns when it was first found lacking.
    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError>;

    /// Forgets that the billing system was found lacking `entry` (it holds it now, or the dead
    /// letter was settled): an observed dead letter's entry goes.
    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError>;

    /// Sends an exported entry's value again as a new revision of its aggregate, once the
    /// billing system was proven to lack it: in one write, the entry is superseded, its value
    /// is no longer counted as exported and the aggregate's revision moves on (so an export
    /// that read it before cannot begin from the old `exported`), so the next export pass sends
    /// it under a new identifier. Returns `false` (and changes nothing) when the entry is already superseded
    /// or not exported, or its aggregate is gone, dead-lettered, has an export in flight, or
    /// has not moved past the entry's revision.
    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError>;
}
