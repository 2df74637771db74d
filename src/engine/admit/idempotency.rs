//! `Idempotency-Key` (IETF httpapi draft): a key is bound to the tenant and to the request it
//! first came with (method and concrete path, query included, and the body's SHA-256). While
//! that request is in flight the key answers 409; reused on another request, 422; after it
//! completed, a replay is answered with the stored response, without running the handler, and
//! is never charged or billed again.
//!
//! Each node remembers the keys it saw; a key it has not seen is claimed in the store (one
//! conditional write), so the answer holds across the fleet; a replay reads the stored response
//! (one read). The claim is settled (completed with the response, or released) after the
//! response, off the request path.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::{
    config::TenantId,
    store::{CompletedRequest, IdempotencySettle, IdempotencySettled, IdempotencyStore, StoredResponse},
};

/// How long a claim the store holds for a request in flight stays in force without being
/// settled: a node that dies mid-request leaves the key usable again after this.
pub(crate) const IN_FLIGHT_SECS: i64 = 300;

/// The longest `Idempotency-Key` accepted, in bytes.
const MAX_LEN: usize = 255;

pub(crate) fn check_key(key: &[u8]) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > MAX_LEN {
        return Err("the Idempotency-Key must be 1 to 255 characters long");
    }
    if !key.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err("the Idempotency-Key has characters other than printable ASCII");
    }
    // A repeated header joined by a proxy (API Gateway's HTTP APIs and function URLs join
    // them with commas): refused as a repeated header is.
    if key.contains(&b',') {
        return Err(crate::response::REPEATED_IDEMPOTENCY_KEY);
    }
    Ok(())
}

const IN_FLIGHT: u8 = 0;
const DONE: u8 = 1;

/// One key: the request it is bound to, and whether that request is done.
struct Entry {
    request: u128,
    state: AtomicU8,
}

/// A bounded, expiring map of (tenant, key) to the request each key is bound to. Least
/// recently used keys go first when it is full.
#[derive(Clone)]
pub(crate) struct Idempotency {
    seen: moka::sync::Cache<u128, Arc<Entry>>,
    /// Claims this node is settling in the store (by fleet key): a request with the same key
    /// waits for its settlement before it asks the store, so a retry right after a failure
    /// on this node is never told the key is in flight. Entries leave when settled.
    settling: Settling,
    /// What became of the responses of completed requests, and the bytes held while they
    /// stream.
    responses: Arc<Responses>,
}

impl Idempotency {
    /// The claims this node is settling in the store.
    pub(crate) fn settling(&self) -> &Settling {
        &self.settling
    }

    /// What became of the responses of completed requests.
    pub(crate) fn responses(&self) -> &Arc<Responses> {
        &self.responses
    }

    /// Waits (at most `limit`) for this node's settlement of `key`, if one is under way.
    pub(crate) async fn settled(&self, key: &str, limit: Duration) {
        settled(&self.settling, key, limit).await;
    }

    /// Waits (at most `limit`) for the settlements under way that began at or after `since`:
    /// `true` when none is left.
    pub(crate) async fn all_settled(&self, since: std::time::Instant, limit: Duration) -> bool {
        all_settled(&self.settling, since, limit).await
    }
}

/// The responses of first requests: the bytes this node holds while they stream, and what
/// became of them.
#[derive(Debug, Default)]
pub(crate) struct Responses {
    /// Response bytes held now, while responses stream (`limits.idempotency_buffer_bytes`).
    pub(crate) buffered: AtomicU64,
    /// Stored with their key.
    pub(crate) stored: AtomicU64,
    /// Not stored, their key released: by reason ([`NotStored`]).
    pub(crate) not_stored: [AtomicU64; NotStored::ALL.len()],
}

/// Why a completed request's response was not stored (its key released, so a retry runs
/// again and is billed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    /// Longer than `limits.idempotency_max_body`.
    TooLarge,
    /// This node held `limits.idempotency_buffer_bytes` of streaming responses already.
    BufferFull,
    /// The store's bytes for responses (`limits.idempotency_store_bytes`) are spent, or the
    /// store takes no response that large.
    StoreFull,
    /// A 5xx, a gRPC answer, or a body that failed or was cut off.
    NotStorable,
    /// The request ran longer than `limits.idempotency_max_in_flight`: its key was released
    /// while it ran.
    TooLong,
    /// The store held `limits.idempotency_keys_max` live keys: the request was served without
    /// its key (a retry of it runs again).
    KeysFull,
}

impl NotStored {
    pub(crate) const ALL: [NotStored; 6] = [
        NotStored::TooLarge,
        NotStored::BufferFull,
        NotStored::StoreFull,
        NotStored::NotStorable,
        NotStored::TooLong,
        NotStored::KeysFull,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            NotStored::TooLarge => "too_large",
            NotStored::BufferFull => "buffer_full",
            NotStored::StoreFull => "store_full",
            NotStored::NotStorable => "not_storable",
            NotStored::TooLong => "too_long",
            NotStored::KeysFull => "keys_full",
        }
    }
}

/// Response bytes taken from a node's budget (`limits.idempotency_buffer_bytes`), given back
/// when dropped: held by a capture while the response streams, then by its settlement until
/// the store took the response (or refused it).
#[derive(Debug)]
pub(crate) struct HeldBytes {
    pub(crate) responses: Arc<Responses>,
    pub(crate) n: u64,
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        if self.n > 0 {
            self.responses.buffered.fetch_sub(self.n, Ordering::Relaxed);
        }
    }
}

/// This node's entry of a key completed here: forgotten if the store refuses its response (or
/// it is never settled), so the next request with the key asks the store afresh.
pub(crate) struct LocalEntry {
    set: Idempotency,
    key: u128,
    entry: Arc<Entry>,
}

impl LocalEntry {
    fn forget(self) {
        let entry = self.entry;
        self.set.seen.entry(self.key).and_compute_with(|e| match e {
            Some(e) if Arc::ptr_eq(e.value(), &entry) => moka::ops::compute::Op::Remove,
            _ => moka::ops::compute::Op::Nop,
        });
    }
}

impl Responses {
    pub(crate) fn not_stored(&self, why: NotStored) {
        let i = NotStored::ALL.iter().position(|w| *w == why).unwrap_or(0);
        self.not_stored[i].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tollgate_idempotent_responses_total", "outcome" => why.label()).increment(1);
    }

    fn stored(&self) {
        self.stored.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tollgate_idempotent_responses_total", "outcome" => "stored").increment(1);
    }

    /// Responses not stored, all reasons.
    pub(crate) fn not_stored_total(&self) -> u64 {
        self.not_stored.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

/// Fleet keys being settled, each with a receiver that closes when the settlement ends (its
/// value: when the settlement began).
pub(crate) type Settling =
    Arc<std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<std::time::Instant>>>>;

/// A claim held in the store too: settled there when the request ends.
pub(crate) struct FleetClaim {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) key: String,
    pub(crate) owner: u64,
    pub(crate) settling: Settling,
    /// When the key was claimed (the binding expires `window` after), and
    /// `limits.idempotency_window` and `limits.idempotency_store_bytes`, for the response.
    pub(crate) claimed_at: i64,
    pub(crate) window: i64,
    pub(crate) max_stored: u64,
    pub(crate) responses: Arc<Responses>,
    /// What the response capture keeps to.
    pub(crate) limits: CaptureLimits,
    /// The renewal of the claim while the request runs (stopped when it settles or drops).
    pub(crate) renewal: Option<Renewal>,
}

/// How often a claim in flight is renewed: well within [`IN_FLIGHT_SECS`], so that a renewal
/// that fails has two more chances before the claim would free itself.
const RENEW_EVERY_SECS: u64 = 100;

/// The task renewing a claim while its request runs: aborted when dropped.
#[derive(Debug)]
pub(crate) struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The most settlements under way at once (each retries for up to [`IN_FLIGHT_SECS`]).
const MAX_SETTLING: usize = 10_000;

/// Removes a settled key from the settling map once its settlement ended, however, if the
/// entry is still this settlement's (a later claim of the key may have its own).
struct Forget(Settling, String, tokio::sync::watch::Receiver<std::time::Instant>);

impl Drop for Forget {
    fn drop(&mut self) {
        let mut settling = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if settling.get(&self.1).is_some_and(|rx| rx.same_channel(&self.2)) {
            settling.remove(&self.1);
        }
    }
}

/// Waits (at most `limit`) for the settlements under way on this node that began at or after
/// `since`: `true` when none of them is left. (Older ones, retrying after a store hiccup, are
/// not waited for.)
pub(crate) async fn all_settled(settling: &Settling, since: std::time::Instant, limit: Duration) -> bool {
    let waiting: Vec<tokio::sync::watch::Receiver<std::time::Instant>> = settling
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|rx| *rx.borrow() >= since)
        .cloned()
        .collect();
    // Each ends when its task drops the sender (`changed` then answers an error).
    let all = async {
        for mut rx in waiting {
            let _ = rx.changed().await;
        }
    };
    tokio::time::timeout(limit, all).await.is_ok()
}

/// Waits (at most `limit`) for this node's settlement of `key` in the store, if one is under
/// way.
pub(crate) async fn settled(settling: &Settling, key: &str, limit: Duration) {
    let waiting = settling.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned();
    if let Some(mut rx) = waiting {
        let _ = tokio::time::timeout(limit, rx.changed()).await;
    }
}

impl FleetClaim {
    /// Renews the claim every [`RENEW_EVERY_SECS`] while the request runs, so that a retry on
    /// another node keeps getting 409 however long it takes; for at most `max_in_flight` in
    /// all, after which the key is released (and counted): a retry may then run.
    pub(crate) fn renew_while_running(&mut self, clock: crate::clock::Clock, max_in_flight: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (store, key, owner) = (self.store.clone(), self.key.clone(), self.owner);
        let (claimed_at, window, responses) = (self.claimed_at, self.window, self.responses.clone());
        let max = i64::try_from(max_in_flight.as_secs()).unwrap_or(i64::MAX);
        let task = rt.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(RENEW_EVERY_SECS)).await;
                let now = clock.unix_secs();
                if now.saturating_sub(claimed_at) >= max {
                    let released = store.settle_idempotency(&key, owner, &IdempotencySettle::Released).await;
                    if matches!(released, Ok(IdempotencySettled::Settled)) {
                        responses.not_stored(NotStored::TooLong);
                        tracing::warn!(
                            "a request held its Idempotency-Key past limits.idempotency_max_in_flight: the key is \
                             released, and a retry may run"
                        );
                    }
                    return;
                }
                let until = now.saturating_add(IN_FLIGHT_SECS).min(claimed_at.saturating_add(window));
                let renewed = store.settle_idempotency(&key, owner, &IdempotencySettle::Renewed { until }).await;
                match renewed {
                    Ok(IdempotencySettled::Settled) => {}
                    // Settled or taken by now: nothing more to hold.
                    Ok(_) => return,
                    // Tried again at the next turn, well before the claim frees itself.
                    Err(e) => tracing::debug!(error = %e, "renewing an Idempotency-Key claim failed"),
                }
            }
        });
        self.renewal = Some(Renewal(task));
    }

    /// Settles the claim in the store in the background (after the response), retried a few
    /// times. A claim left unsettled frees itself after [`IN_FLIGHT_SECS`].
    ///
    /// A completion carries the bytes its response holds (given back once the store answered)
    /// and this node's entry of the key (forgotten if the response is not stored).
    fn settle(mut self, how: IdempotencySettle, held: Option<HeldBytes>, local: Option<LocalEntry>) {
        // The request has ended: no more renewals.
        self.renewal = None;
        let completing = matches!(how, IdempotencySettle::Completed(_));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            if let Some(local) = local {
                local.forget();
            }
            return;
        };
        let (done, waiting) = tokio::sync::watch::channel(std::time::Instant::now());
        {
            let mut settling = self.settling.lock().unwrap_or_else(|e| e.into_inner());
            if settling.len() >= MAX_SETTLING {
                // A long outage: settlements are not queued without bound; this claim frees
                // itself after its in-flight time.
                tracing::debug!("too many Idempotency-Key settlements under way; this one is skipped");
                if let Some(local) = local {
                    local.forget();
                }
                return;
            }
            settling.insert(self.key.clone(), waiting.clone());
        }
        rt.spawn(async move {
            let _done = done;
            let _held = held;
            let mut local = local;
            let _forget = Forget(self.settling.clone(), self.key.clone(), waiting);
            // Until the claim's in-flight time ends: after that an unsettled claim frees
            // itself, and a completed request would be charged again on another node.
            let give_up = tokio::time::Instant::now() + Duration::from_secs(IN_FLIGHT_SECS as u64);
            let mut attempt = 0u32;
            loop {
                match self.store.settle_idempotency(&self.key, self.owner, &how).await {
                    Ok(IdempotencySettled::Refused) => {
                        self.responses.not_stored(NotStored::StoreFull);
                        if let Some(local) = local.take() {
                            local.forget();
                        }
                        return;
                    }
                    Ok(IdempotencySettled::Settled) if completing => {
                        self.responses.stored();
                        return;
                    }
                    // Not held any more (released past `idempotency_max_in_flight`, or
                    // expired): the store does not hold this response, so this node must not
                    // replay it either.
                    Ok(IdempotencySettled::NotHeld) if completing => {
                        if let Some(local) = local.take() {
                            local.forget();
                        }
                        return;
                    }
                    Ok(_) => return,
                    Err(e) => tracing::debug!(error = %e, attempt, "settling an Idempotency-Key failed"),
                }
                let pause = Duration::from_millis(100u64 << attempt.min(7));
                if tokio::time::Instant::now() + pause >= give_up {
                    break;
                }
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            if let Some(local) = local.take() {
                local.forget();
            }
            tracing::warn!(
                completing,
                "an Idempotency-Key could not be settled in the store for {IN_FLIGHT_SECS} s; it frees itself"
            );
        });
    }
}

/// The limits a response capture keeps to, from the configuration when its key was claimed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CaptureLimits {
    pub(crate) max_body: u64,
    pub(crate) max_request_body: u64,
    pub(crate) buffer_bytes: u64,
}

/// What a key says about a request.
pub(crate) enum Verdict {
    /// The first request with this key: charge it; the claim settles the key.
    First(Claim),
    /// The request the key is bound to completed: a replay, answered with the stored
    /// response (not charged).
    Replay,
    /// The request the key is bound to is still in flight: 409.
    InFlight,
    /// The key is bound to another request (method or path): 422.
    Mismatch,
}

/// The first request's hold on a key. Dropped without [`done`](Self::done) (the request was
/// not billed, refused, or dropped while it waited), it releases the key, so a retry is
/// charged.
pub(crate) struct Claim {
    set: Idempotency,
    key: u128,
    entry: Arc<Entry>,
    done: bool,
    /// The claim in the store, once made (boxed: a claim moves through admission).
    pub(crate) fleet: Option<Box<FleetClaim>>,
}

impl Claim {
    /// The request completed and was billed with `response`: later requests with the key are
    /// replays, answered with it.
    /// `held`: the bytes the response holds of this node's budget, given back once the store
    /// answered.
    pub(crate) fn complete(mut self, response: StoredResponse, held: HeldBytes) {
        self.entry.state.store(DONE, Ordering::Release);
        self.done = true;
        if let Some(fleet) = self.fleet.take() {
            let done = CompletedRequest::new(Arc::new(response), fleet.claimed_at, fleet.window, fleet.max_stored);
            let local = LocalEntry { set: self.set.clone(), key: self.key, entry: self.entry.clone() };
            fleet.settle(IdempotencySettle::Completed(done), Some(held), Some(local));
        }
    }

    /// The key completed elsewhere (the store says so): a replay here too from now on, with
    /// nothing of this node's to settle.
    pub(crate) fn completed_elsewhere(mut self) {
        self.fleet = None;
        self.entry.state.store(DONE, Ordering::Release);
        self.done = true;
    }

    /// The counters of what became of responses.
    pub(crate) fn responses(&self) -> &Arc<Responses> {
        &self.set.responses
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            fleet.settle(IdempotencySettle::Released, None, None);
        }
        if !self.done {
            let entry = self.entry.clone();
            // Only this claim's entry: a later request may have bound the key anew.
            self.set.seen.entry(self.key).and_compute_with(|e| match e {
                Some(e) if Arc::ptr_eq(e.value(), &entry) => moka::ops::compute::Op::Remove,
                _ => moka::ops::compute::Op::Nop,
            });
        }
    }
}

impl Idempotency {
    pub(crate) fn new(window: Duration, capacity: u64) -> Self {
        let seen = crate::tenant::lru(capacity).time_to_live(window).build();
        Self { seen, settling: Settling::default(), responses: Arc::default() }
    }

    /// Forgets `key` of `tenant` on this node: the store no longer holds the response its
    /// entry says completed (expired there, or not stored).
    pub(crate) fn forget(&self, tenant: &TenantId, key: &[u8]) {
        self.seen.invalidate(&Self::short(Self::digest(&[tenant.as_str().as_bytes(), key])));
    }

    /// The same on every node (the store compares them): SHA-256 of the length-prefixed parts.
    fn digest(parts: &[&[u8]]) -> [u8; 32] {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        h.finalize().into()
    }

    fn short(d: [u8; 32]) -> u128 {
        u128::from_le_bytes(d[..16].try_into().expect("16 of 32 bytes"))
    }

    /// The digest of a request a key can be bound to: method and concrete path, query
    /// included.
    pub(crate) fn request(method: &str, path: &str, query: Option<&str>) -> u128 {
        let has_query = [u8::from(query.is_some())];
        // The parameters in a canonical order: a proxy may rebuild the query in another order
        // (lambda_http rebuilds REST and ALB queries from a hash map), and a retry must bind
        // to the same request.
        let sorted;
        let query = match query {
            Some(q) if q.contains('&') => {
                // By name only, and stable: a parameter's values keep their order
                // (`a=1&a=2` is not `a=2&a=1`).
                let mut pairs: Vec<&str> = q.split('&').collect();
                pairs.sort_by_key(|pair| pair.split('=').next().unwrap_or(pair));
                sorted = pairs.join("&");
                sorted.as_str()
            }
            q => q.unwrap_or(""),
        };
        Self::short(Self::digest(&[b"request", method.as_bytes(), path.as_bytes(), query.as_bytes(), &has_query]))
    }

    /// The store's name for `key` of `tenant`: a digest, never the key.
    pub(crate) fn fleet_key(tenant: &TenantId, key: &[u8]) -> String {
        hex::encode(Self::digest(&[b"idempotency-key", tenant.as_str().as_bytes(), key]))
    }

    /// What `key` of `tenant` says about the request with digest `request`, as far as this
    /// node knows.
    pub(crate) fn check(&self, tenant: &TenantId, key: &[u8], request: u128) -> Verdict {
        let id = Self::short(Self::digest(&[tenant.as_str().as_bytes(), key]));
        let fresh = Arc::new(Entry { request, state: AtomicU8::new(IN_FLIGHT) });
        let entry = self.seen.entry(id).or_insert_with(|| fresh.clone());
        if entry.is_fresh() && Arc::ptr_eq(entry.value(), &fresh) {
            return Verdict::First(Claim { set: self.clone(), key: id, entry: fresh, done: false, fleet: None });
        }
        let existing = entry.into_value();
        if existing.request != request {
            Verdict::Mismatch
        } else if existing.state.load(Ordering::Acquire) == DONE {
            Verdict::Replay
        } else {
            Verdict::InFlight
        }
    }
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("entries", &self.seen.entry_count()).finish()
    }
}
