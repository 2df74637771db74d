//! What a front door needs for an `Idempotency-Key`: the request body's fingerprint, taken
//! while the body streams to the handler (never buffered whole), and the response, held while
//! it streams, stored with the key when it ends.

use std::{
    pin::Pin,
    sync::{atomic::Ordering, Arc, Mutex},
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::engine::admit::idempotency::{CaptureLimits, Claim, HeldBytes, NotStored, Responses};

/// The longest a request body left unread (or a replay's body) is waited for, to fingerprint
/// it: past it, the body has no fingerprint (a first request's key is bound without one; a
/// replay's body does not match one).
pub const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
use crate::store::StoredResponse;

/// The SHA-256 fingerprint of a request body, taken while the body is read, up to a number of
/// bytes (`limits.idempotency_max_request_body`): past it, or if the body fails, there is no
/// fingerprint.
///
/// Clones share one fingerprint: the door keeps one, the body being read feeds the other.
#[derive(Clone)]
pub struct BodyPrint {
    inner: Arc<Mutex<Print>>,
}

struct Print {
    hasher: Sha256,
    read: u64,
    max: u64,
    state: PrintState,
    /// What a reader left unread when it dropped the body, to drain.
    rest: Option<Pin<Box<dyn Rest>>>,
}

impl Print {
    fn update(&mut self, chunk: &[u8]) {
        if self.state != PrintState::Reading {
            return;
        }
        self.read += chunk.len() as u64;
        if self.read > self.max {
            self.state = PrintState::Unknown;
        } else {
            self.hasher.update(chunk);
        }
    }

    fn end(&mut self) {
        if self.state == PrintState::Reading {
            let digest = std::mem::take(&mut self.hasher).finalize().into();
            self.state = PrintState::Done(digest);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PrintState {
    Reading,
    Done([u8; 32]),
    /// Past the bound, or the body failed.
    Unknown,
}

/// A request body left unread, type-erased: its data frames as bytes.
trait Rest: Send {
    fn poll_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ()>>>;
}

impl<B> Rest for B
where
    B: http_body::Body + Send,
{
    fn poll_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ()>>> {
        let mut this = self;
        loop {
            return match this.as_mut().poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Err(_))) => Poll::Ready(Some(Err(()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => Poll::Ready(Some(Ok(data.copy_to_bytes(data.remaining())))),
                    // Trailers: not part of the body's bytes.
                    Err(_) => continue,
                },
            };
        }
    }
}

impl BodyPrint {
    /// A fingerprint of at most `max` bytes of body.
    #[must_use]
    pub fn new(max: u64) -> Self {
        let print = Print { hasher: Sha256::new(), read: 0, max, state: PrintState::Reading, rest: None };
        Self { inner: Arc::new(Mutex::new(print)) }
    }

    /// The fingerprint of a whole body held in memory (Lambda's), if it is at most `max` bytes.
    #[must_use]
    pub fn of(body: &[u8], max: u64) -> Option<[u8; 32]> {
        (body.len() as u64 <= max).then(|| Sha256::digest(body).into())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Print> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Feeds the next bytes of the body.
    pub fn update(&self, chunk: &[u8]) {
        self.lock().update(chunk);
    }

    /// The body ended.
    pub fn end(&self) {
        self.lock().end();
    }

    /// The body failed (or took too long): it has no fingerprint, and what was left of it is
    /// let go.
    pub fn fail(&self) {
        let mut p = self.lock();
        if p.state == PrintState::Reading {
            p.state = PrintState::Unknown;
        }
        p.rest = None;
    }

    /// The fingerprint, once the body ended within the bound.
    #[must_use]
    pub fn digest(&self) -> Option<[u8; 32]> {
        match self.lock().state {
            PrintState::Done(d) => Some(d),
            _ => None,
        }
    }

    /// Whether the body is still being read (neither ended, nor past the bound, nor failed).
    #[must_use]
    pub fn is_reading(&self) -> bool {
        self.lock().state == PrintState::Reading
    }

    /// Keeps what a reader left of the body when it dropped it, for [`drain`](Self::drain).
    pub fn leave<B>(&self, rest: Pin<Box<B>>)
    where
        B: http_body::Body + Send + 'static,
    {
        let mut p = self.lock();
        if p.state == PrintState::Reading {
            p.rest = Some(rest);
        }
    }

    /// Whether a reader left part of the body unread, to [`drain`](Self::drain).
    #[must_use]
    pub fn has_rest(&self) -> bool {
        self.lock().rest.is_some()
    }

    /// Reads what the reader left of the body (up to the bound) into the fingerprint: ready
    /// at once when nothing was left, or the fingerprint is settled.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut p = self.lock();
        loop {
            if p.state != PrintState::Reading {
                p.rest = None;
                return Poll::Ready(());
            }
            let Some(rest) = p.rest.as_mut() else { return Poll::Ready(()) };
            match rest.as_mut().poll_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => p.update(&chunk),
                Poll::Ready(Some(Err(()))) => p.state = PrintState::Unknown,
                Poll::Ready(None) => p.end(),
            }
        }
    }

    /// [`poll_drain`](Self::poll_drain) as a future.
    pub async fn drain(&self) {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await;
    }

    /// The fingerprint of `body`, read whole (up to `max` bytes: past it, `None`, and the rest
    /// is not read).
    pub async fn of_body<B>(body: B, max: u64) -> Option<[u8; 32]>
    where
        B: http_body::Body + Send + 'static,
    {
        let print = Self::new(max);
        print.lock().rest = Some(Box::pin(body));
        print.drain().await;
        print.digest()
    }
}

impl std::fmt::Debug for BodyPrint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.lock();
        f.debug_struct("BodyPrint")
            .field("read", &p.read)
            .field("done", &matches!(p.state, PrintState::Done(_)))
            .finish()
    }
}

/// Header fields never stored with a response: those of one connection (hop-by-hop), and
/// those of each answer (`Date`, the length, and the rate-limit fields tollgate writes).
const NOT_STORED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "date",
    "content-length",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "idempotent-replayed",
];

/// Whether a response header field is stored with the response for replays.
#[must_use]
pub fn is_stored_header(name: &str) -> bool {
    !NOT_STORED.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// The response of a first request with an `Idempotency-Key`, held while it streams and
/// stored with the key when it ends ([`finish`](Self::finish)): replays are answered with it.
/// Held by the [`Ticket`](crate::engine::Ticket) of such a request: the door feeds its request body's
/// fingerprint as the handler reads it ([`Ticket::capture_mut`](crate::engine::Ticket::capture_mut)),
/// and takes it with the response ([`Ticket::capture`](crate::engine::Ticket::capture)).
///
/// A response is not stored, and its key is released (a retry runs again and is billed), if
/// it is a 5xx, longer than `limits.idempotency_max_body`, would take this node past
/// `limits.idempotency_buffer_bytes` while it streams, or does not fit the store
/// (`limits.idempotency_store_bytes`); or if the capture is dropped without
/// [`finish`](Self::finish) (the body failed, or was cut off).
pub struct ResponseCapture {
    claim: Option<Claim>,
    responses: Arc<Responses>,
    print: BodyPrint,
    max_body: u64,
    buffer_limit: u64,
    /// Bytes taken from the node's budget.
    held: u64,
    status: u16,
    headers: Vec<(String, Bytes)>,
    body: BytesMut,
    refused: Option<NotStored>,
}

impl ResponseCapture {
    pub(crate) fn new(claim: Claim) -> Self {
        // A claim made without the store's limits (none is) stores nothing.
        let limits = claim
            .fleet
            .as_ref()
            .map_or(CaptureLimits { max_body: 0, max_request_body: 0, buffer_bytes: 0 }, |f| f.limits);
        Self {
            responses: Arc::clone(claim.responses()),
            claim: Some(claim),
            print: BodyPrint::new(limits.max_request_body),
            max_body: limits.max_body,
            buffer_limit: limits.buffer_bytes,
            held: 0,
            status: 0,
            headers: Vec::new(),
            body: BytesMut::new(),
            refused: None,
        }
    }

    /// The request body's fingerprint: feed it the request body as the handler reads it
    /// (or hash a body held whole with [`BodyPrint::of`] and [`set_request_body`](Self::set_request_body)).
    #[must_use]
    pub fn request_body(&self) -> &BodyPrint {
        &self.print
    }

    /// Sets the request body's fingerprint (a body held whole: Lambda's).
    pub fn set_request_body(&mut self, digest: Option<[u8; 32]>) {
        let print = BodyPrint::new(0);
        {
            let mut p = print.lock();
            p.state = digest.map_or(PrintState::Unknown, PrintState::Done);
        }
        self.print = print;
    }

    /// The response's status and header fields (before tollgate's own are added). A 5xx is
    /// not stored. Call [`finish`](Self::finish) when its body ended, at once if it has none.
    pub fn head<'a>(&mut self, status: u16, headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        self.status = status;
        if status >= 500 {
            self.refuse(NotStored::NotStorable);
            return;
        }
        let mut size = 0u64;
        for (name, value) in headers {
            if is_stored_header(name) {
                size += (name.len() + value.len()) as u64;
                self.headers.push((name.to_ascii_lowercase(), Bytes::copy_from_slice(value)));
            }
        }
        self.hold(size);
    }

    /// The next bytes of the response body.
    pub fn data(&mut self, chunk: &[u8]) {
        if self.refused.is_some() || chunk.is_empty() {
            return;
        }
        if self.body.len() as u64 + chunk.len() as u64 > self.max_body {
            self.refuse(NotStored::TooLarge);
            return;
        }
        if self.hold(chunk.len() as u64) {
            self.body.extend_from_slice(chunk);
        }
    }

    /// Takes `n` bytes from the node's budget; past it the response is not stored.
    fn hold(&mut self, n: u64) -> bool {
        if self.refused.is_some() {
            return false;
        }
        let before = self.responses.buffered.fetch_add(n, Ordering::Relaxed);
        if before + n > self.buffer_limit {
            self.responses.buffered.fetch_sub(n, Ordering::Relaxed);
            self.refuse(NotStored::BufferFull);
            return false;
        }
        self.held += n;
        true
    }

    fn refuse(&mut self, why: NotStored) {
        if self.refused.is_none() {
            self.refused = Some(why);
            self.body = BytesMut::new();
            self.headers = Vec::new();
            self.give_back_bytes();
        }
    }

    fn give_back_bytes(&mut self) {
        if self.held > 0 {
            self.responses.buffered.fetch_sub(self.held, Ordering::Relaxed);
            self.held = 0;
        }
    }

    /// The response ended (its request billed): it is stored with the key, settled in the
    /// store in the background, unless it could not be held; then the key is released. What
    /// the handler left of the request body is drained into its fingerprint first, in the
    /// background too (at most [`DRAIN_LIMIT`]).
    pub fn finish(self) {
        if !self.has_rest() {
            return self.store();
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return self.store() };
        rt.spawn(async move {
            if tokio::time::timeout(DRAIN_LIMIT, self.print.drain()).await.is_err() {
                self.print.fail();
            }
            self.store();
        });
    }

    /// Whether what the handler left of the request body is still to be drained for a
    /// response that can still be stored: the door drains it ([`BodyPrint::drain`]) before
    /// [`finish`](Self::finish), or `finish` does.
    #[must_use]
    pub fn has_rest(&self) -> bool {
        self.is_storing() && self.print.has_rest()
    }

    /// Whether the response can still be stored (not a 5xx, nor past a bound so far).
    #[must_use]
    pub fn is_storing(&self) -> bool {
        self.claim.is_some() && self.refused.is_none()
    }

    fn store(mut self) {
        let Some(claim) = self.claim.take() else { return };
        if let Some(why) = self.refused {
            claim.responses().not_stored(why);
            return;
        }
        let body = std::mem::take(&mut self.body).freeze();
        let headers = std::mem::take(&mut self.headers);
        let response = StoredResponse::new(self.status, headers, body, self.print.digest());
        // The bytes stay counted until the store took them.
        let held = HeldBytes { responses: Arc::clone(&self.responses), n: std::mem::take(&mut self.held) };
        claim.complete(response, held);
    }
}

impl Drop for ResponseCapture {
    fn drop(&mut self) {
        self.give_back_bytes();
        if let Some(claim) = self.claim.take() {
            // Not finished: the body failed or was cut off, or the request was not billed.
            claim.responses().not_stored(self.refused.unwrap_or(NotStored::NotStorable));
        }
    }
}

impl std::fmt::Debug for ResponseCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCapture")
            .field("status", &self.status)
            .field("body_bytes", &self.body.len())
            .field("refused", &self.refused.map(NotStored::label))
            .finish_non_exhaustive()
    }
}
