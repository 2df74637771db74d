//! The places role: a tenant's requests in flight across the fleet (`concurrency_scope =
//! "fleet"`), as places each node leases for a while and renews while its requests run.

use std::{collections::BTreeMap, fmt};

use async_trait::async_trait;

use super::{ReserveToken, StoreError};
use crate::base::TenantId;

/// A node's places of one tenant, set by a call of [`PlaceStore`]: the node (its token's
/// sender) asks to hold `count` places in all, of the tenant's `limit`, until `now + ttl`.
///
/// Counts are absolute (the node's total, not a change), so a call re-sent after a timeout
/// does no harm; a call older than one of its sender already applied (a lower sequence number)
/// changes nothing. A node's places expire `ttl` after its last call: a node that dies (or
/// stops renewing) frees them then.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlaceCall {
    /// Whose requests.
    pub tenant: TenantId,
    /// The places the node asks to hold in all.
    pub count: u32,
    /// The most places the tenant's nodes may hold together (its plan's `concurrency`).
    pub limit: u32,
    /// How long the places hold after this call, in nanoseconds.
    pub ttl: i64,
    /// The caller's clock, Unix nanoseconds.
    pub now: i64,
    /// Who sent it (the node: its sender id) and its place in that sender's calls.
    pub token: ReserveToken,
    /// How many of the `count` places the node keeps spare (no request on them): marked so in
    /// the row, another node's acquire takes them before it is refused, and the node itself
    /// uses them again only through an acquire.
    pub spare: u32,
}

impl PlaceCall {
    /// `count` places of `tenant`'s `limit`, held until `now + ttl`.
    #[must_use]
    pub fn new(tenant: TenantId, count: u32, limit: u32, ttl: i64, now: i64, token: ReserveToken) -> Self {
        Self { tenant, count, limit, ttl, now, token, spare: 0 }
    }

    /// The same call, `spare` of its places marked as spares (at most `count`).
    #[must_use]
    pub fn with_spare(mut self, spare: u32) -> Self {
        self.spare = spare.min(self.count);
        self
    }

    /// The same call at `now` (a store that keeps places on its own clock sets it).
    #[must_use]
    pub fn at(mut self, now: i64) -> Self {
        self.now = now;
        self
    }
}

/// What a [`PlaceCall`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Places {
    /// The places the calling node holds now (until its call's `now + ttl`).
    pub held: u32,
    /// The places every node of the tenant holds now, this one's included.
    pub taken: u32,
    /// How many of `taken` are spares (held with no request on them): an acquire takes them
    /// before it is refused.
    pub spare: u32,
}

impl Places {
    /// `held` of `taken`, none of them spare.
    #[must_use]
    pub fn new(held: u32, taken: u32) -> Self {
        Self { held, taken, spare: 0 }
    }

    /// The same, `spare` of `taken` spares.
    #[must_use]
    pub fn with_spare(mut self, spare: u32) -> Self {
        self.spare = spare;
        self
    }

    /// The places taken by requests, or held for them: those an acquire cannot take.
    #[must_use]
    pub fn busy(&self) -> u32 {
        self.taken.saturating_sub(self.spare)
    }
}

/// Where tenants' requests in flight are counted for the fleet (`concurrency_scope = "fleet"`):
/// per tenant, the places each node holds, each node's until it expires.
///
/// Each call is one atomic read-modify-write of the tenant's row, with the rules of
/// [`PlaceRow`]: nodes together never hold more than `limit` live places. One verb, whose
/// [`PlaceMode`] says what it does; [`PlaceStoreExt`] names each mode for callers.
#[async_trait]
pub trait PlaceStore: Send + Sync + fmt::Debug + 'static {
    /// Applies `call` in `mode` to the tenant's row ([`PlaceRow::apply`]): what the node holds
    /// after it, and the places taken in all.
    async fn places(&self, call: &PlaceCall, mode: PlaceMode) -> Result<Places, StoreError>;
}

/// What a call of [`PlaceStore::places`] does. Not `#[non_exhaustive]`: a store matches on
/// every mode, and a new one is a change it must make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceMode {
    /// Takes places: the node holds `count` in all if they fit beside the other nodes' live
    /// places (else as many as fit), until `now + ttl`.
    Acquire,
    /// Renews the node's places, `count` of them at most, until `now + ttl` (as an acquire:
    /// places that expired meanwhile and were taken by others are not held again).
    Renew,
    /// Gives places back: the node holds `count` at most from now on (its expiry unchanged;
    /// none: its entry holds none, and goes a TTL later).
    Release,
}

impl PlaceMode {
    /// The call's name, for logs and errors.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            PlaceMode::Acquire => "acquire places",
            PlaceMode::Renew => "renew places",
            PlaceMode::Release => "release places",
        }
    }
}

/// Each [`PlaceMode`] of [`PlaceStore::places`] as a verb of its own: implemented for every
/// places store by a blanket impl.
///
/// You MUST NOT implement this trait: a store implements [`PlaceStore`], and gets these.
#[async_trait]
pub trait PlaceStoreExt: PlaceStore {
    /// [`PlaceMode::Acquire`].
    async fn acquire_places(&self, call: &PlaceCall) -> Result<Places, StoreError> {
        self.places(call, PlaceMode::Acquire).await
    }

    /// [`PlaceMode::Renew`].
    async fn renew_places(&self, call: &PlaceCall) -> Result<Places, StoreError> {
        self.places(call, PlaceMode::Renew).await
    }

    /// [`PlaceMode::Release`].
    async fn release_places(&self, call: &PlaceCall) -> Result<Places, StoreError> {
        self.places(call, PlaceMode::Release).await
    }
}

impl<T: PlaceStore + ?Sized> PlaceStoreExt for T {}

/// One node's places, as a row keeps them: how many, until when (Unix nanoseconds), the
/// sequence number of its last call, and how many of them are spares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    count: u32,
    until: i64,
    seq: u64,
    spare: u32,
}

/// One tenant's places as a store keeps them (JSON of [`to_json`](Self::to_json)), with the
/// rules of the role applied to it.
///
/// The JSON is an object: per node (its sender id as the key) `[count, until, seq]`, and for a
/// node holding spares `"s<node>": [spare, until, seq]` beside it. A reader of a version
/// before spares were marked skips the keys it cannot read as a number: it counts a spare as a
/// place taken (never more admitted), and a row it writes back has none marked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaceRow {
    holders: BTreeMap<u64, Holder>,
}

impl PlaceRow {
    /// A row as stored (empty text: none).
    ///
    /// # Errors
    /// The text is not what [`to_json`](Self::to_json) writes.
    pub fn from_json(text: &str) -> Result<Self, StoreError> {
        if text.is_empty() {
            return Ok(Self::default());
        }
        let entries: BTreeMap<String, (u32, i64, u64)> = serde_json::from_str(text)
            .map_err(|e| StoreError::Backend(format!("a places row does not read: {e}").into()))?;
        let mut holders: BTreeMap<u64, Holder> = entries
            .iter()
            .filter_map(|(k, &(count, until, seq))| Some((k.parse().ok()?, Holder { count, until, seq, spare: 0 })))
            .collect();
        for (k, &(spare, _, seq)) in &entries {
            let Some(node) = k.strip_prefix('s').and_then(|n| n.parse::<u64>().ok()) else { continue };
            // Spares marked by the holder's last call (not by an older one a reader wrote over).
            if let Some(h) = holders.get_mut(&node).filter(|h| h.seq == seq) {
                h.spare = spare.min(h.count);
            }
        }
        Ok(Self { holders })
    }

    /// The row, as stored.
    #[must_use]
    pub fn to_json(&self) -> String {
        let mut entries: BTreeMap<String, (u32, i64, u64)> = BTreeMap::new();
        for (node, h) in &self.holders {
            entries.insert(node.to_string(), (h.count, h.until, h.seq));
            if h.spare > 0 {
                entries.insert(format!("s{node}"), (h.spare, h.until, h.seq));
            }
        }
        serde_json::to_string(&entries).unwrap_or_default()
    }

    /// Whether the row remembers no node (it can go): none holds a place, and none gave its
    /// last one back within a TTL.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }

    /// The latest expiry of a node's places (0: none).
    #[must_use]
    pub fn expires(&self) -> i64 {
        self.holders.values().map(|h| h.until).max().unwrap_or(0)
    }

    /// The places taken in all and the spares among them, the caller's included.
    fn answer(&self, node: u64) -> Places {
        let held = self.holders.get(&node).map_or(0, |h| h.count);
        let taken = self.holders.values().map(|h| h.count).fold(0u32, u32::saturating_add);
        let spare = self.holders.values().map(|h| h.spare).fold(0u32, u32::saturating_add);
        Places::new(held, taken).with_spare(spare)
    }

    /// Applies a call (`mode`): what the calling node holds, and the places taken in all.
    /// Expired entries go; a call older than its sender's last (a lower sequence number) only
    /// reads.
    ///
    /// A hold takes what fits beside the other nodes' places; when the places it wants for
    /// requests (`count − spare`) do not fit, it first takes other nodes' spares (a spare
    /// never refuses the tenant elsewhere). The node a spare was taken from holds one place
    /// fewer; it learns so at its next call, and never uses a spare it marked without one.
    pub fn apply(&mut self, call: &PlaceCall, mode: PlaceMode) -> Places {
        let now = call.now;
        self.holders.retain(|_, h| h.until > now);
        let node = call.token.node;
        let mine = self.holders.get(&node).copied();
        if mine.is_some_and(|h| call.token.seq < h.seq) {
            return self.answer(node);
        }
        let others = |row: &Self| -> u32 {
            row.holders.iter().filter(|(k, _)| **k != node).map(|(_, h)| h.count).fold(0u32, u32::saturating_add)
        };
        let spare = call.spare.min(call.count);
        let held = match mode {
            PlaceMode::Acquire | PlaceMode::Renew => {
                let for_requests = call.count - spare;
                let mut short = for_requests.saturating_sub(call.limit.saturating_sub(others(self)));
                for (_, h) in self.holders.iter_mut().filter(|(k, _)| **k != node) {
                    if short == 0 {
                        break;
                    }
                    let taken = h.spare.min(short);
                    h.count -= taken;
                    h.spare -= taken;
                    short -= taken;
                }
                call.count.min(call.limit.saturating_sub(others(self)))
            }
            PlaceMode::Release => call.count.min(mine.map_or(0, |h| h.count)),
        };
        // The places on requests first: the spares are what is left of them.
        let spare = held.saturating_sub(call.count - spare);
        // A release keeps the places' expiry; a node holding none is remembered for a TTL all
        // the same (its sequence number: a late call of it changes nothing), then forgotten.
        let until = match (mode, mine) {
            (PlaceMode::Release, Some(h)) if held > 0 => h.until,
            _ => now.saturating_add(call.ttl.max(0)),
        };
        if held == 0 && mine.is_none() {
            // Never held one: nothing to remember.
            return self.answer(node);
        }
        self.holders.insert(node, Holder { count: held, until, seq: call.token.seq, spare });
        self.answer(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: i64 = 30_000_000_000;

    fn call(node: u64, seq: u64, count: u32, now: i64) -> PlaceCall {
        PlaceCall::new("t".into(), count, 5, TTL, now, ReserveToken::new(node, seq).at(now / 1_000_000_000))
    }

    #[test]
    fn places_are_shared_expire_and_come_back() {
        let mut row = PlaceRow::default();
        assert_eq!(row.apply(&call(1, 1, 3, 0), PlaceMode::Acquire), Places::new(3, 3));
        assert_eq!(row.apply(&call(2, 1, 4, 0), PlaceMode::Acquire), Places::new(2, 5), "2 fit");
        assert_eq!(row.apply(&call(1, 2, 1, 1), PlaceMode::Release), Places::new(1, 3));
        // Re-sent: the same; older: only read.
        assert_eq!(row.apply(&call(1, 2, 1, 1), PlaceMode::Release), Places::new(1, 3));
        assert_eq!(row.apply(&call(1, 1, 3, 1), PlaceMode::Acquire), Places::new(1, 3));
        // Node 1 stops renewing: its place frees after the TTL.
        assert_eq!(row.apply(&call(2, 2, 4, TTL + 2), PlaceMode::Acquire), Places::new(4, 4));
        let stored = PlaceRow::from_json(&row.to_json()).unwrap();
        assert_eq!(stored, row);
    }

    /// A renew holds as an acquire does: the same row, the same calls, the same answers.
    #[test]
    fn a_renew_holds_as_an_acquire() {
        let (mut acquired, mut renewed) = (PlaceRow::default(), PlaceRow::default());
        for (node, seq, count, now) in
            [(1, 1, 3, 0), (2, 1, 4, 0), (1, 2, 2, 1), (2, 2, 5, TTL + 2), (3, 1, 9, TTL + 3)]
        {
            let c = call(node, seq, count, now);
            assert_eq!(acquired.apply(&c, PlaceMode::Acquire), renewed.apply(&c, PlaceMode::Renew), "{c:?}");
        }
        assert_eq!(acquired, renewed);
    }

    #[test]
    fn spares_are_marked_taken_first_and_read_from_older_rows() {
        let mut row = PlaceRow::default();
        assert_eq!(row.apply(&call(1, 1, 5, 0), PlaceMode::Acquire), Places::new(5, 5));
        assert_eq!(row.apply(&call(1, 2, 2, 0).with_spare(2), PlaceMode::Release), Places::new(2, 2).with_spare(2));
        assert_eq!(
            row.apply(&call(2, 1, 4, 0), PlaceMode::Acquire),
            Places::new(4, 5).with_spare(1),
            "3 free, 1 spare"
        );
        assert_eq!(row.apply(&call(3, 1, 1, 0), PlaceMode::Acquire), Places::new(1, 5), "the last spare");
        assert_eq!(row.apply(&call(4, 1, 1, 0), PlaceMode::Acquire), Places::new(0, 5), "none left");
        assert_eq!(row.apply(&call(1, 3, 2, 0).with_spare(2), PlaceMode::Acquire), Places::new(0, 5));
        // A node's entry is three numbers, as before spares were marked; its spares beside it
        // under a key an older reader skips.
        assert!(!row.to_json().contains("\"s"), "{}", row.to_json());
        let older = PlaceRow::from_json(r#"{"7":[2,100,3]}"#).unwrap();
        assert_eq!(older.to_json(), r#"{"7":[2,100,3]}"#);
        let mut spared = row.clone();
        spared.apply(&call(2, 2, 4, 0).with_spare(1), PlaceMode::Release);
        let text = spared.to_json();
        assert!(text.contains("\"s2\":[1,"), "{text}");
        assert_eq!(PlaceRow::from_json(&text).unwrap(), spared);
        // What an older reader sees: the entries of numbered keys, spares counted as taken.
        let old: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        let counted: u64 =
            old.iter().filter(|(k, _)| k.parse::<u64>().is_ok()).map(|(_, v)| v[0].as_u64().unwrap()).sum();
        assert_eq!(counted, 5);
        // A spare mark of another call than its node's entry's is not read.
        let stale = r#"{"2":[4,100,9],"s2":[1,100,8]}"#;
        assert_eq!(PlaceRow::from_json(stale).unwrap().answer(2), Places::new(4, 4));
    }
}
