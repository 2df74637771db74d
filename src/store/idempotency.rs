//! The idempotency role: `Idempotency-Key` bindings claimed and settled for the whole fleet.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

use super::StoreError;

/// A claim on an `Idempotency-Key` for the whole fleet: the first node to put it runs the
/// request; every node answers the others from it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyClaim {
    /// The key with its tenant: a SHA-256 digest in hexadecimal (never the key itself).
    pub key: String,
    /// The request the key is bound to (method, path and query): a digest in hexadecimal.
    pub request: String,
    /// Who claims it: drawn per request, so only this claim can settle it.
    pub owner: u64,
    /// Now, in Unix seconds, by the claimer's clock. A store that keeps time by its own clock
    /// (the RedisStore: the server's `TIME`) judges the claim at its time instead, and moves
    /// the claim's times by how far it is ahead of this.
    pub now: i64,
    /// Until when an unsettled claim holds (a node that dies with the request in flight
    /// leaves the key usable again after this).
    pub in_flight_until: i64,
    /// When the binding expires (`limits.idempotency_window` after the claim).
    pub expires_at: i64,
    /// The most bindings the store holds for the fleet (`limits.idempotency_keys_max`): past
    /// it, a new key is not bound ([`IdempotencyState::Full`]). A store never forgets a live
    /// binding to make room; a store bounded by its own size (SQLite, memory) holds at most
    /// [`IDEMPOTENCY_KEYS_MAX`](super::contract::IDEMPOTENCY_KEYS_MAX) whatever this says; a
    /// store that expires bindings by itself (DynamoDB's TTL) may have no count.
    pub max_keys: u64,
}

impl IdempotencyClaim {
    /// A claim of `key` for `request` by `owner` at `now`, in flight until `in_flight_until`,
    /// forgotten at `expires_at`.
    pub fn new(
        key: impl Into<String>,
        request: impl Into<String>,
        owner: u64,
        now: i64,
        in_flight_until: i64,
        expires_at: i64,
    ) -> Self {
        Self {
            key: key.into(),
            request: request.into(),
            owner,
            now,
            in_flight_until,
            expires_at,
            max_keys: super::contract::IDEMPOTENCY_KEYS_MAX as u64,
        }
    }

    /// Bound only while the store holds fewer than `max_keys` bindings.
    #[must_use]
    pub fn at_most(mut self, max_keys: u64) -> Self {
        self.max_keys = max_keys;
        self
    }
}

/// What the store said to an [`IdempotencyClaim`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyState {
    /// The key was free (never used, expired, or its holder's in-flight time ran out): it is
    /// now bound to this request, in flight, for this owner.
    Claimed,
    /// The key is bound to this request, which another claim is still running: 409.
    InFlight,
    /// The key is bound to this request, which completed: a replay, answered with the stored
    /// response (not charged). `None`: a binding stored without its response (by a version
    /// before responses were stored).
    Completed(Option<Box<StoredResponse>>),
    /// The key is bound to another request: 422.
    Mismatch,
    /// The key is free, but the store holds [`max_keys`](IdempotencyClaim::max_keys) bindings
    /// that are not past their window: it was not bound (the request is served without its
    /// key, and counted).
    Full,
}

impl IdempotencyState {
    /// The state a live binding gives a claim or a read of `request`: the binding's request
    /// (`bound`), whether it completed, and its stored response's bytes (the SQL stores).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn of_binding(
        bound: &str,
        request: &str,
        completed: bool,
        response: Option<&[u8]>,
    ) -> Result<Self, StoreError> {
        if bound != request {
            return Ok(IdempotencyState::Mismatch);
        }
        if !completed {
            return Ok(IdempotencyState::InFlight);
        }
        let response = response.map(StoredResponse::decode).transpose()?;
        Ok(IdempotencyState::Completed(response.map(Box::new)))
    }
}

/// The response of a completed request, stored with its `Idempotency-Key` binding: a replay
/// is answered with it without running the handler again.
///
/// It is customer data at rest in the store: the status, the headers the response had
/// (without hop-by-hop headers, `Date` and the rate-limit fields, which belong to each
/// answer) and the body, which fits `limits.idempotency_max_body`. `Debug` shows sizes only.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The HTTP status.
    pub status: u16,
    /// The header fields kept, in order (lowercase names; a repeated field once per value).
    pub headers: Vec<(String, Bytes)>,
    /// The body.
    pub body: Bytes,
    /// SHA-256 of the first request's body, to which the key is bound: a replay with another
    /// body is refused (422). `None`: the body was longer than
    /// `limits.idempotency_max_request_body` (or never read whole), and is not compared.
    pub request_body: Option<[u8; 32]>,
}

/// The version byte of [`StoredResponse::encode`].
const ENCODING: u8 = 1;

impl StoredResponse {
    /// A stored response.
    #[must_use]
    pub fn new(status: u16, headers: Vec<(String, Bytes)>, body: Bytes, request_body: Option<[u8; 32]>) -> Self {
        Self { status, headers, body, request_body }
    }

    /// The bytes a store keeps: a version byte, the status, the request body's fingerprint,
    /// the headers and the body, each length-prefixed.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(ENCODING);
        out.extend_from_slice(&self.status.to_be_bytes());
        match &self.request_body {
            Some(print) => {
                out.push(1);
                out.extend_from_slice(print);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// The length of [`encode`](Self::encode)'s bytes: what the response costs the store.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
        1 + 2 + 1 + self.request_body.map_or(0, |_| 32) + 4 + headers + 4 + self.body.len()
    }

    /// Reads bytes made by [`encode`](Self::encode).
    ///
    /// # Errors
    /// [`StoreError::Backend`] for bytes it did not make.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        fn bad() -> StoreError {
            StoreError::Backend("a stored Idempotency-Key response is unreadable".into())
        }
        struct Reader<'a>(&'a [u8]);
        impl<'a> Reader<'a> {
            fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
                if self.0.len() < n {
                    return Err(bad());
                }
                let (head, rest) = self.0.split_at(n);
                self.0 = rest;
                Ok(head)
            }
            fn len(&mut self) -> Result<usize, StoreError> {
                Ok(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| bad())?) as usize)
            }
        }
        let mut r = Reader(bytes);
        if r.take(1)? != [ENCODING] {
            return Err(bad());
        }
        let status = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| bad())?);
        let request_body = match r.take(1)? {
            [0] => None,
            [1] => Some(<[u8; 32]>::try_from(r.take(32)?).map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        let count = r.len()?;
        let mut headers = Vec::with_capacity(count.min(256));
        for _ in 0..count {
            let n = r.len()?;
            let name = std::str::from_utf8(r.take(n)?).map_err(|_| bad())?.to_owned();
            let n = r.len()?;
            headers.push((name, Bytes::copy_from_slice(r.take(n)?)));
        }
        let n = r.len()?;
        let body = Bytes::copy_from_slice(r.take(n)?);
        if !r.0.is_empty() {
            return Err(bad());
        }
        Ok(Self { status, headers, body, request_body })
    }
}

impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Customer data: sizes only.
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &self.headers.len())
            .field("body_bytes", &self.body.len())
            .field("request_body_fingerprint", &self.request_body.is_some())
            .finish()
    }
}

/// How a claimed key ends: [`IdempotencyStore::settle_idempotency`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencySettle {
    /// The request completed and was billed: later requests with the key are replays,
    /// answered with its response until the binding expires.
    Completed(CompletedRequest),
    /// The request was not billed (refused, failed, dropped), or its response cannot be
    /// stored: the key is free again.
    Released,
    /// The request still runs: its claim holds until `until` (Unix seconds; never past the
    /// binding's expiry), so a retry elsewhere keeps getting 409 rather than running it again.
    /// Changes only a claim this owner holds and has not completed ([`IdempotencySettled::NotHeld`]
    /// otherwise). A store written before this mode must not take it as a release.
    Renewed {
        /// The claim's new in-flight end.
        until: i64,
    },
}

/// A completed request's response, and the bounds its storing keeps to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompletedRequest {
    /// The response to store with the binding.
    pub response: std::sync::Arc<StoredResponse>,
    /// Now, in Unix seconds.
    pub now: i64,
    /// How long a binding lives (`limits.idempotency_window`), in seconds.
    pub window: i64,
    /// The most bytes of stored responses the store holds at once
    /// (`limits.idempotency_store_bytes`). Responses are counted in buckets of `window`
    /// (what was stored in this bucket and the one before is all that can still be live), each
    /// allowed half of it; a response that does not fit is refused and its key released.
    pub max_stored_bytes: u64,
}

impl CompletedRequest {
    /// `response`, stored at `now` for bindings of `window` seconds, within `max_stored_bytes`.
    #[must_use]
    pub fn new(response: std::sync::Arc<StoredResponse>, now: i64, window: i64, max_stored_bytes: u64) -> Self {
        Self { response, now, window: window.max(1), max_stored_bytes }
    }

    /// The bucket the response is counted in: `now` in whole windows.
    #[must_use]
    pub fn bucket(&self) -> i64 {
        self.now.div_euclid(self.window.max(1))
    }

    /// What one bucket may hold: half of `max_stored_bytes`.
    #[must_use]
    pub fn bucket_bytes(&self) -> u64 {
        self.max_stored_bytes / 2
    }
}

/// What [`IdempotencyStore::settle_idempotency`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencySettled {
    /// Settled as asked.
    Settled,
    /// The response could not be stored (the store's bytes for responses are spent, or it is
    /// larger than the store takes): the key was released instead.
    Refused,
    /// The key is no longer held by this owner (expired and claimed again, or settled):
    /// nothing changed.
    NotHeld,
}

/// Where `Idempotency-Key` bindings live: one conditional write claims a key for the fleet.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug + 'static {
    /// Claims an `Idempotency-Key` for the fleet: one conditional write. A binding that
    /// expired, or whose in-flight time ran out unsettled, is replaced; otherwise the binding
    /// stays and the answer says what it is (with the stored response of a completed one).
    /// Bindings are bounded and expire at `expires_at`.
    async fn claim_idempotency(&self, claim: &IdempotencyClaim) -> Result<IdempotencyState, StoreError>;

    /// The binding of a key, as a claim of it for `request` (a digest, as in
    /// [`IdempotencyClaim::request`]) would find it at `now`, without claiming it: one read.
    /// `None`: free (never used, expired, released, or left in flight past its time);
    /// [`IdempotencyState::Mismatch`]: bound to another request.
    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<IdempotencyState>, StoreError>;

    /// Settles a claim made by `owner`: marks the key completed with its response, or frees
    /// it. Changes nothing when the key is no longer held by `owner`.
    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &IdempotencySettle,
    ) -> Result<IdempotencySettled, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_response_reads_back_as_it_was_written() {
        let r = StoredResponse::new(
            201,
            vec![("content-type".into(), Bytes::from_static(b"text/plain")), ("x-a".into(), Bytes::new())],
            Bytes::from_static(b"created"),
            Some([7; 32]),
        );
        let bytes = r.encode();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(StoredResponse::decode(&bytes).unwrap(), r);
        let none = StoredResponse::new(500, vec![], Bytes::new(), None);
        assert_eq!(StoredResponse::decode(&none.encode()).unwrap(), none);
        assert_eq!(none.encode().len(), none.encoded_len());
        // Truncated, extended or foreign bytes are an error, never a panic.
        for cut in 0..bytes.len() {
            assert!(StoredResponse::decode(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(StoredResponse::decode(&longer).is_err());
        assert!(StoredResponse::decode(b"\x02").is_err());
        assert!(!format!("{r:?}").contains("created"));
    }
}
