//! The rate role: one tenant's rate shared by every node (`rate_scope = "fleet"`), as the
//! theoretical arrival time (TAT) of one GCRA bucket, leased out to the nodes in cells.

use std::{collections::BTreeMap, fmt};

use async_trait::async_trait;

use super::{
    contract::{SENDERS_KEPT, SENDER_QUIET_SECS},
    quota::forgotten,
    ReserveToken, StoreError,
};
use crate::base::TenantId;

/// A lease of cells of a tenant's shared rate ([`RateStore::take_cells`]): at most `want`
/// cells, none unless `need` fit.
///
/// The bucket is GCRA's: one cell comes back every `interval` nanoseconds, and at most
/// `burst` cells are free at once (τ = `burst` × `interval`). A store grants `g = min(want,
/// ⌊(now + τ − max(tat, now)) / interval⌋)` cells when `g ≥ need` and moves the TAT to
/// `max(tat, now) + g × interval`; else it grants none and leaves the TAT. So over any interval
/// Δ the cells granted, by every node together, are at most `burst + Δ / interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CellCall {
    /// Whose rate.
    pub tenant: TenantId,
    /// The most cells the node would hold (its lease).
    pub want: u32,
    /// The fewest cells that serve the request waiting (at most `want`): fewer fit, none is
    /// granted.
    pub need: u32,
    /// One cell's time, in nanoseconds (at least 1).
    pub interval: u64,
    /// The most cells free at once.
    pub burst: u32,
    /// The caller's clock, in Unix nanoseconds. A store that keeps time by its own clock
    /// (the RedisStore: the server's `TIME`) applies the call that much later or earlier, and
    /// answers the TAT on the caller's clock; the others apply it at this time (keep the nodes
    /// NTP-synced).
    pub now: i64,
    /// Who sent it: a re-sent call (the same token) is applied once.
    pub token: ReserveToken,
}

impl CellCall {
    /// A call for `want` cells of `tenant`'s rate, `need` of them at least.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tenant: TenantId,
        want: u32,
        need: u32,
        interval: u64,
        burst: u32,
        now: i64,
        token: ReserveToken,
    ) -> Self {
        Self { tenant, want, need: need.min(want), interval: interval.max(1), burst, now, token }
    }
}

/// What a [`CellCall`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CellGrant {
    /// The cells granted: 0 when fewer than `need` fit (or the call was an older one of its
    /// sender, answered again without being applied).
    pub granted: u32,
    /// The bucket's TAT after the call (Unix nanoseconds); granted, it is the virtual end of
    /// this lease (what a [`CellReturn`] of its cells names).
    pub tat: i64,
}

impl CellGrant {
    /// A grant of `granted` cells, the TAT then `tat`.
    #[must_use]
    pub fn new(granted: u32, tat: i64) -> Self {
        Self { granted, tat }
    }
}

/// Cells of a lease given back unspent ([`RateStore::return_cells`]): the TAT moves to
/// `max(now, tat − min(cells × interval, lease_end − now))`, and nothing comes back once
/// `lease_end ≤ now`: cells whose time has passed are never given to others.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CellReturn {
    /// Whose rate.
    pub tenant: TenantId,
    /// The cells unspent.
    pub cells: u32,
    /// One cell's time, in nanoseconds.
    pub interval: u64,
    /// The virtual end of the lease they come from ([`CellGrant::tat`]).
    pub lease_end: i64,
    /// The caller's clock, in Unix nanoseconds.
    pub now: i64,
    /// Who sent it: a re-sent return is applied once.
    pub token: ReserveToken,
}

impl CellReturn {
    /// `cells` of the lease ending at `lease_end`, given back at `now`.
    #[must_use]
    pub fn new(tenant: TenantId, cells: u32, interval: u64, lease_end: i64, now: i64, token: ReserveToken) -> Self {
        Self { tenant, cells, interval: interval.max(1), lease_end, now, token }
    }
}

/// Where tenants' shared rates live (`rate_scope = "fleet"`): one GCRA bucket per tenant,
/// leased out in cells so that a node spends them without a store call per request.
///
/// Both calls are one atomic read-modify-write of the tenant's bucket, applied at most once
/// per [`ReserveToken`] (a call re-sent after a timeout is answered, not applied again), with
/// the rules of [`CellCall`] and [`CellReturn`]. [`RateRow`] implements them for a store that
/// can read and write a row atomically.
#[async_trait]
pub trait RateStore: Send + Sync + fmt::Debug + 'static {
    /// Takes a lease of cells of a tenant's shared rate.
    async fn take_cells(&self, call: &CellCall) -> Result<CellGrant, StoreError>;

    /// Gives unspent cells of a lease back.
    async fn return_cells(&self, call: &CellReturn) -> Result<(), StoreError>;
}

/// One tenant's bucket as a store keeps it: its TAT and the last call of each sender (so that
/// a re-sent call is applied once), with the rules of the role applied to it. Stores keep the
/// senders as the JSON of [`senders_json`](Self::senders_json).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateRow {
    /// The theoretical arrival time, Unix nanoseconds (0: never taken).
    pub tat: i64,
    senders: BTreeMap<u64, SenderCall>,
    /// The latest last-call time of a sender forgotten (Unix seconds; 0: none).
    forgotten_at: i64,
}

/// A sender's last call on a bucket: its sequence number, what it was granted, the TAT after
/// it, and when it was made (Unix seconds, by the sender's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SenderCall(u64, u32, i64, i64);

/// The JSON a store keeps a row's senders in.
#[derive(serde::Serialize, serde::Deserialize)]
struct SendersJson {
    #[serde(rename = "s")]
    senders: BTreeMap<String, SenderCall>,
    #[serde(rename = "f")]
    forgotten_at: i64,
}

impl RateRow {
    /// A row as stored: its TAT and its senders' JSON (empty: none).
    ///
    /// # Errors
    /// The senders' text is not what [`senders_json`](Self::senders_json) writes.
    pub fn from_stored(tat: i64, senders: &str) -> Result<Self, StoreError> {
        if senders.is_empty() {
            return Ok(Self { tat, ..Self::default() });
        }
        let json: SendersJson = serde_json::from_str(senders)
            .map_err(|e| StoreError::Backend(format!("a rate row's senders do not read: {e}").into()))?;
        let senders = json.senders.into_iter().filter_map(|(k, v)| Some((k.parse().ok()?, v))).collect();
        Ok(Self { tat, senders, forgotten_at: json.forgotten_at })
    }

    /// The senders, as stored.
    #[must_use]
    pub fn senders_json(&self) -> String {
        let json = SendersJson {
            senders: self.senders.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            forgotten_at: self.forgotten_at,
        };
        serde_json::to_string(&json).unwrap_or_default()
    }

    /// The answer to `token` if its call was applied already (or is older than one that
    /// was): `(granted, tat)`, or `None` for a new call.
    fn seen(&self, token: &ReserveToken) -> Option<(u32, i64)> {
        match self.senders.get(&token.node) {
            Some(&SenderCall(seq, granted, tat, _)) if token.seq == seq => Some((granted, tat)),
            Some(&SenderCall(seq, ..)) if token.seq < seq => Some((0, self.tat)),
            Some(_) => None,
            None if forgotten(token.at, self.forgotten_at) => Some((0, self.tat)),
            None => None,
        }
    }

    /// Records `token`'s call as applied, forgetting the senders quiet longest beyond
    /// [`SENDERS_KEPT`] (never one that called within [`SENDER_QUIET_SECS`] of this call).
    fn applied(&mut self, token: &ReserveToken, granted: u32) {
        self.senders.insert(token.node, SenderCall(token.seq, granted, self.tat, token.at));
        while self.senders.len() > SENDERS_KEPT {
            let Some((&oldest, &SenderCall(.., at))) = self.senders.iter().min_by_key(|(_, c)| c.3) else { break };
            if at > token.at - SENDER_QUIET_SECS {
                break;
            }
            self.senders.remove(&oldest);
            self.forgotten_at = self.forgotten_at.max(at);
        }
    }

    /// Applies a [`CellCall`] (once per token): what it got. The row changes only when cells
    /// are granted: a refused call is not remembered (sent again, it is weighed again, and
    /// refusing costs a store no write).
    pub fn take(&mut self, call: &CellCall) -> CellGrant {
        if let Some((granted, tat)) = self.seen(&call.token) {
            return CellGrant::new(granted, tat);
        }
        let t = i128::from(call.interval.max(1));
        let base = i128::from(self.tat.max(call.now));
        let horizon = i128::from(call.now) + i128::from(call.burst) * t;
        let fit = if horizon >= base { (horizon - base) / t } else { 0 };
        let granted = i128::from(call.want).min(fit);
        let granted = if granted >= i128::from(call.need.max(1)) { granted as u32 } else { 0 };
        if granted > 0 {
            self.tat = (base + i128::from(granted) * t).min(i128::from(i64::MAX)) as i64;
            self.applied(&call.token, granted);
        }
        CellGrant::new(granted, self.tat)
    }

    /// Applies a [`CellReturn`] (once per token). A store writes the row only when a call
    /// changed it (compare it with its copy read): answered again, or refused, nothing is
    /// written.
    pub fn give_back(&mut self, call: &CellReturn) {
        if self.seen(&call.token).is_some() {
            return;
        }
        let back = i128::from(call.cells) * i128::from(call.interval.max(1));
        let left = i128::from(call.lease_end) - i128::from(call.now);
        if left > 0 && back > 0 {
            let tat = (i128::from(self.tat) - back.min(left)).max(i128::from(call.now));
            self.tat = tat.min(i128::from(self.tat)) as i64;
        }
        self.applied(&call.token, 0);
    }

    /// Whether the row can go: its bucket is full again (its TAT past by more than `idle`
    /// nanoseconds at `now`) and none of its senders called within [`SENDER_QUIET_SECS`].
    #[must_use]
    pub fn idle(&self, now: i64, idle: i64) -> bool {
        self.tat < now.saturating_sub(idle)
            && self.senders.values().all(|c| c.3 < now / 1_000_000_000 - SENDER_QUIET_SECS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 100_000_000; // 10/s

    fn token(node: u64, seq: u64) -> ReserveToken {
        ReserveToken::new(node, seq).at(1_000)
    }

    #[test]
    fn cells_follow_the_bucket() {
        let mut row = RateRow::default();
        let now = 1_000_000_000_000;
        let g = row.take(&CellCall::new("t".into(), 8, 1, T, 10, now, token(1, 1)));
        assert_eq!(g.granted, 8);
        assert_eq!(g.tat, now + 8 * T as i64);
        let g = row.take(&CellCall::new("t".into(), 8, 3, T, 10, now, token(1, 2)));
        assert_eq!(g.granted, 0, "2 fit, 3 needed");
        let g = row.take(&CellCall::new("t".into(), 8, 2, T, 10, now, token(1, 3)));
        assert_eq!(g.granted, 2);
        // The same call again: answered, not applied.
        let again = row.take(&CellCall::new("t".into(), 8, 2, T, 10, now, token(1, 3)));
        assert_eq!(again, g);
        // Half a second later: 5 cells back.
        let g = row.take(&CellCall::new("t".into(), 8, 1, T, 10, now + 5 * T as i64, token(2, 1)));
        assert_eq!(g.granted, 5);
    }

    #[test]
    fn a_return_never_gives_back_time_that_has_passed() {
        let mut row = RateRow::default();
        let now = 1_000_000_000_000;
        let g = row.take(&CellCall::new("t".into(), 10, 1, T, 10, now, token(1, 1)));
        // 5 unspent, given back 0.9 s later: only 0.1 s of the lease is left to give.
        row.give_back(&CellReturn::new("t".into(), 5, T, g.tat, now + 9 * T as i64, token(1, 2)));
        assert_eq!(row.tat, g.tat - T as i64);
        // Again (re-sent): nothing more.
        row.give_back(&CellReturn::new("t".into(), 5, T, g.tat, now + 9 * T as i64, token(1, 2)));
        assert_eq!(row.tat, g.tat - T as i64);
        // Past the lease's end: nothing.
        let before = row.tat;
        row.give_back(&CellReturn::new("t".into(), 5, T, g.tat, g.tat + 1, token(1, 3)));
        assert_eq!(row.tat, before);
    }

    #[test]
    fn senders_survive_the_stored_form() {
        let mut row = RateRow::default();
        row.take(&CellCall::new("t".into(), 3, 1, T, 10, 5, token(7, 9)));
        let stored = RateRow::from_stored(row.tat, &row.senders_json()).unwrap();
        assert_eq!(stored, row);
    }
}
