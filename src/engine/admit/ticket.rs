//! An admitted request, until its response is known.

use std::{
    fmt,
    sync::{atomic::Ordering, Arc},
};

use crate::engine::{
    admit::capture::ResponseCapture,
    usage::{
        context::TenantContext,
        hold::RouteHeld,
        spend::SpendTab,
        taken::{OrgTaken, Source, Taken},
        units::Units,
    },
};
use crate::{
    config::{HeaderStyle, PlanId, TenantId},
    response::{emit, Field, HeaderState, Rejection, RejectionKind, Value},
    store::StoredResponse,
    tenant::Tenant,
};

/// What a ticket holds of its `Idempotency-Key` (always in a box: keyed requests are rare).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Held {
    /// The first request with it: the capture of its response, which settles the claim.
    First(ResponseCapture),
    /// A replay: the stored response it is answered with, and the most request body bytes
    /// read to compare its body.
    Replay { response: Box<StoredResponse>, max_request_body: u64 },
}

/// An admitted request as the engine holds it until its response is known: a
/// [`Ticket`] without the engine's units, which the tower layer keeps (it makes its requests'
/// contexts from the engine it holds) and the engine's entry points hand out as a [`Ticket`].
/// Dropped without being completed, it bills or refunds as [`Ticket`] says.
#[must_use = "complete the ticket with the response status, or its usage is refunded"]
pub(crate) struct Pass {
    pub(crate) state: Tenant,
    /// The meter, and what the rate-limit headers report.
    pub(crate) headers: HeaderState,
    /// Where the quota units of its route's cost came from (`None`: none were taken): billed,
    /// they are spent; else they go back, as a [`Taken`] of its tenant's.
    pub(crate) source: Option<Source>,
    pub(crate) at: i64,
    pub(crate) claim: Option<Box<Held>>,
    pub(crate) cost: u32,
    /// `false` for an idempotent replay: nothing is charged or recorded.
    pub(crate) charged: bool,
    pub(crate) done: bool,
    /// Whether the service serving the request was called.
    pub(crate) called: bool,
    /// Set while the service's future is polled: a ticket dropped with it set was dropped by a
    /// panic in the service (caught by a catch-panic layer or the runtime), not by a client
    /// gone between two polls.
    pub(crate) in_poll: bool,
    /// The request's place among its tenant's requests in flight (a plan with `concurrency`).
    pub(crate) slot: Option<Box<crate::tenant::Slot>>,
    /// The hold of its route (`[[routes]] hold`), shared with its contexts.
    pub(crate) hold: Option<Arc<RouteHeld>>,
    /// Its spend, on a plan with a spend cap (shared with its contexts).
    pub(crate) spend: Option<Arc<SpendTab>>,
    /// What it holds of its tenant's organization (a tenant in one): the organization's state,
    /// and its route's cost taken there, spent when billed and given back otherwise.
    pub(crate) org: Option<Box<OrgTaken>>,
}

/// A request counted against its tenant's `concurrency` (a plan's limit of requests in flight
/// at once on a node), from [`Ticket::take_in_flight`]: a front door holds it in the response
/// body until the body has gone (ended, failed or dropped); dropped, it frees the place.
#[must_use = "the request counts as in flight until this is dropped"]
#[derive(Debug)]
pub struct InFlight(#[allow(dead_code)] pub(crate) Box<crate::tenant::Slot>);

impl Pass {
    /// [`Ticket::take_in_flight`].
    pub(crate) fn take_in_flight(&mut self) -> Option<InFlight> {
        self.slot.take().map(InFlight)
    }

    /// [`Ticket::tenant`].
    #[must_use]
    pub(crate) fn tenant(&self) -> &TenantId {
        &self.state.id
    }

    /// [`Ticket::plan`].
    #[must_use]
    pub(crate) fn plan(&self) -> &PlanId {
        &self.state.plan.id
    }

    /// [`Ticket::is_replay`].
    #[must_use]
    pub(crate) fn is_replay(&self) -> bool {
        !self.charged
    }

    /// [`Ticket::replayed_response`].
    #[must_use]
    pub(crate) fn replayed_response(&self) -> Option<&StoredResponse> {
        match self.claim.as_deref() {
            Some(Held::Replay { response, .. }) => Some(response),
            _ => None,
        }
    }

    /// [`Ticket::replay_body_limit`].
    #[must_use]
    pub(crate) fn replay_body_limit(&self) -> u64 {
        match self.claim.as_deref() {
            Some(Held::Replay { max_request_body, .. }) => *max_request_body,
            _ => 0,
        }
    }

    /// [`Ticket::check_replay_body`].
    pub(crate) fn check_replay_body(&self, body: Option<[u8; 32]>) -> Result<(), Rejection> {
        let Some(first) = self.replayed_response().and_then(|r| r.request_body) else { return Ok(()) };
        if body == Some(first) {
            return Ok(());
        }
        let r = Rejection::new(
            RejectionKind::IdempotencyKeyMismatch,
            "this Idempotency-Key was used for a request with another body",
        );
        Err(r.for_tenant(&self.state))
    }

    /// [`Ticket::has_key`].
    #[inline]
    #[must_use]
    pub(crate) fn has_key(&self) -> bool {
        self.claim.is_some()
    }

    /// [`Ticket::capture`].
    pub(crate) fn capture(&mut self) -> Option<ResponseCapture> {
        if !matches!(self.claim.as_deref(), Some(Held::First(_))) {
            return None;
        }
        match self.claim.take().map(|b| *b) {
            Some(Held::First(capture)) => Some(capture),
            _ => None,
        }
    }

    /// [`Ticket::capture_mut`].
    pub(crate) fn capture_mut(&mut self) -> Option<&mut ResponseCapture> {
        match self.claim.as_deref_mut() {
            Some(Held::First(capture)) => Some(capture),
            _ => None,
        }
    }

    /// The handle to put in the request extensions, with the engine's units.
    pub(crate) fn context_with(&self, units: Arc<Units>) -> TenantContext {
        let org = self.org.as_ref().map(|o| o.state.clone());
        TenantContext::new(self.state.clone(), self.charged, self.hold.clone(), self.spend.clone(), org, units)
    }

    /// [`Ticket::holds`].
    #[must_use]
    pub(crate) fn holds(&self) -> bool {
        self.hold.is_some()
    }

    /// [`Ticket::actual_header`].
    #[must_use]
    pub(crate) fn actual_header(&self) -> Option<&http::HeaderName> {
        self.hold.as_ref()?.spec.actual_header.as_ref()
    }

    /// [`Ticket::set_actual_from_head`].
    pub(crate) fn set_actual_from_head<'h>(&mut self, header: impl Fn(&http::HeaderName) -> Option<&'h [u8]>) {
        let Some(held) = &self.hold else { return };
        held.responded.store(true, Ordering::Release);
        let Some(name) = self.actual_header().cloned() else { return };
        if let Some(value) = header(&name) {
            let value = value.to_vec();
            self.set_actual(&value);
        }
    }

    /// [`Ticket::set_actual`].
    pub(crate) fn set_actual(&mut self, value: &[u8]) {
        if let Some(held) = &self.hold {
            held.set_actual(value);
        }
    }

    /// The route's hold, for a body that reads its trailers after the ticket completed.
    pub(crate) fn route_hold(&self) -> Option<Arc<RouteHeld>> {
        self.hold.clone()
    }

    /// Ends an admission's span (feature `otel`) with this pass: its tenant, plan, the units
    /// its route took and the policy in force.
    #[cfg(feature = "otel")]
    pub(crate) fn trace(&self, span: crate::base::trace::RequestSpan) {
        let mut policy = None;
        self.emit(&mut |field, value| {
            if field == Field::RateLimitPolicy {
                policy = Some(value.as_str().to_owned());
            }
        });
        span.admitted(self.tenant().as_str(), self.plan().as_str(), u64::from(self.cost), policy.as_deref());
    }

    /// [`Ticket::for_each_header`].
    pub(crate) fn for_each_header(&self, mut put: impl FnMut(Field, &str)) {
        self.emit(&mut |field, value| put(field, value.as_str()));
    }

    #[inline]
    pub(crate) fn emit(&self, put: &mut dyn FnMut(Field, Value<'_>)) {
        if self.state.plan.header_style != HeaderStyle::None {
            emit(&self.state.plan, &self.headers, None, Some(&self.state), put);
        }
    }

    /// [`Ticket::service_called`].
    pub(crate) fn service_called(&mut self) {
        self.called = true;
    }

    /// [`Ticket::give_back`].
    pub(crate) fn give_back(mut self) {
        self.done = true;
        self.refund();
    }

    /// [`Ticket::complete`].
    #[allow(clippy::must_use_candidate)] // most callers need not know
    pub(crate) fn complete(mut self, status: u16) -> bool {
        self.done = true;
        if self.state.plan.billable.contains(status) {
            self.bill()
        } else {
            self.refund();
            false
        }
    }

    /// [`Ticket::complete_grpc`].
    #[allow(clippy::must_use_candidate)] // most callers need not know
    pub(crate) fn complete_grpc(mut self, code: u8) -> bool {
        self.done = true;
        // A code outside the 17 is UNKNOWN's.
        let code = if code > 16 { 2 } else { code };
        if self.state.plan.billable_grpc & (1 << code) != 0 {
            self.bill()
        } else {
            self.refund();
            false
        }
    }

    /// Records the request's usage and settles its `Idempotency-Key`.
    fn bill(&mut self) -> bool {
        if !self.charged {
            return false;
        }
        if let Some(held) = self.hold.take() {
            held.end(true);
        }
        self.source = None;
        if let Some(org) = &mut self.org {
            // Spent at the organization too.
            std::mem::take(&mut org.taken).keep();
        }
        self.state.record(self.headers.meter(), self.at, u64::from(self.cost));
        self.state.plan.metrics.usage_units.increment(u64::from(self.cost));
        if let Some(tab) = &self.spend {
            tab.bill(&self.state);
        }
        if self.claim.is_some() {
            self.release_key();
        }
        true
    }

    /// Drops what the ticket holds of its key: a first request's claim no capture took is
    /// released (no response is stored; a retry is charged).
    #[cold]
    #[inline(never)]
    fn release_key(&mut self) {
        self.claim = None;
    }

    fn refund(&mut self) {
        if !self.charged {
            return;
        }
        if let Some(held) = self.hold.take() {
            // Not billed: what the work recorded stays, the rest of the hold goes back.
            held.end(false);
        }
        if let Some(source) = self.source.take() {
            // Back to their lease, lock-free (a retired state's lease goes back once its last
            // request is done).
            drop(Taken::new(&self.state, self.headers.meter(), u64::from(self.cost), source, self.at));
        }
        if let Some(org) = &mut self.org {
            // Back to the organization's lease too.
            drop(std::mem::take(&mut org.taken));
        }
        if let Some(tab) = &self.spend {
            tab.refund(&self.state);
        }
        // Not billed: the key is released (the claim's drop), so a retry is charged.
        if self.claim.is_some() {
            self.release_key();
        }
        self.state.plan.metrics.refunded_units.increment(u64::from(self.cost));
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.called && self.state.plan.bill_cancelled && !self.in_poll && !std::thread::panicking() {
            // Cut off once the service had it: it may have done the work. (Not a service that
            // panicked: that is a failure, answered 500 by a catch-panic layer.)
            self.bill();
        } else {
            self.refund();
        }
    }
}

impl fmt::Debug for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("tenant", &self.state.id)
            .field("plan", &self.state.plan.id)
            .field("cost", &self.cost)
            .field("charged", &self.charged)
            .finish_non_exhaustive()
    }
}

/// An admitted request. Complete it with the response status: a billable status records the
/// usage, any other gives the reserved units back.
///
/// Call [`service_called`](Self::service_called) when the request is handed to the service
/// that serves it. A ticket dropped without [`complete`](Self::complete) (the client went away)
/// gives its units back if the service was not called yet; once it was, it is billed as a
/// completed request (`usage.bill_cancelled`, true by default: the handler may have done its
/// work), or given back with `bill_cancelled = false`. [`give_back`](Self::give_back) gives the
/// units back whatever happened (the service failed, or refused the request itself).
///
/// A ticket carries the engine's usage part for its [`context`](Self::context) (the handle a
/// handler records usage and takes holds through): every ticket the engine hands out has it.
#[must_use = "complete the ticket with the response status, or its usage is refunded"]
pub struct Ticket {
    pass: Pass,
    units: Arc<Units>,
}

impl Ticket {
    /// `pass`, handed out by the engine with its `units`.
    #[inline]
    pub(crate) fn new(pass: Pass, units: Arc<Units>) -> Self {
        Self { pass, units }
    }

    /// The admitted request.
    #[inline]
    pub(crate) fn pass(&self) -> &Pass {
        &self.pass
    }

    /// The admitted request, and the engine's units (for a front door that keeps the first).
    #[inline]
    pub(crate) fn into_parts(self) -> (Pass, Arc<Units>) {
        (self.pass, self.units)
    }

    /// The handle to put in the request extensions.
    #[must_use]
    pub fn context(&self) -> TenantContext {
        self.pass.context_with(self.units.clone())
    }

    /// The request's place among its tenant's requests in flight, when its plan limits them
    /// (`concurrency`): hold it until the response body has gone. A ticket completed or
    /// dropped without giving it out frees the place then.
    #[inline]
    pub fn take_in_flight(&mut self) -> Option<InFlight> {
        self.pass.take_in_flight()
    }

    /// The tenant.
    #[must_use]
    #[inline]
    pub fn tenant(&self) -> &TenantId {
        self.pass.tenant()
    }

    /// The tenant's plan.
    #[must_use]
    #[inline]
    pub fn plan(&self) -> &PlanId {
        self.pass.plan()
    }

    /// Whether this request repeats an `Idempotency-Key` already charged (it is not charged):
    /// answer it with [`replayed_response`](Self::replayed_response), without calling the
    /// handler.
    #[must_use]
    #[inline]
    pub fn is_replay(&self) -> bool {
        self.pass.is_replay()
    }

    /// The stored response a replay is answered with (marked `Idempotent-Replayed: true`),
    /// once its body matched ([`check_replay_body`](Self::check_replay_body)).
    #[must_use]
    #[inline]
    pub fn replayed_response(&self) -> Option<&StoredResponse> {
        self.pass.replayed_response()
    }

    /// The most bytes of a replay's body read to fingerprint it ([`BodyPrint`](crate::door::BodyPrint)).
    #[must_use]
    #[inline]
    pub fn replay_body_limit(&self) -> u64 {
        self.pass.replay_body_limit()
    }

    /// Compares a replay's body (its fingerprint, `None` past the limit) with the first
    /// request's: another body is a misuse of the key (422). A first request whose body was
    /// past the limit has no fingerprint, and any body replays it.
    ///
    /// # Errors
    /// The 422 to answer with.
    #[inline]
    pub fn check_replay_body(&self, body: Option<[u8; 32]>) -> Result<(), Rejection> {
        self.pass.check_replay_body(body)
    }

    /// Whether the ticket holds anything of an `Idempotency-Key` (a first request's capture, or
    /// a replay's stored response): one test, for the paths of requests without one.
    #[inline]
    #[must_use]
    pub fn has_key(&self) -> bool {
        self.pass.has_key()
    }

    /// For the first request with an `Idempotency-Key`: the capture of its response, which
    /// the door feeds (the request body's fingerprint, the response's head and body) and
    /// finishes when the response ended and was billed, so replays are answered with it. A
    /// door that does not take it stores nothing: the key is released when the request ends,
    /// and a retry runs again and is billed.
    #[inline]
    pub fn capture(&mut self) -> Option<ResponseCapture> {
        self.pass.capture()
    }

    /// The capture of a first request's response, left in the ticket: to feed its request
    /// body's fingerprint ([`ResponseCapture::request_body`]) when the request is handed on.
    #[inline]
    pub fn capture_mut(&mut self) -> Option<&mut ResponseCapture> {
        self.pass.capture_mut()
    }

    /// Whether the request's route holds units (`[[routes]] hold`) until its response ends: a
    /// front door then completes the ticket when the response body has ended (the tower
    /// layer does), and reads the route's [`actual_header`](Self::actual_header) in the
    /// response's headers or trailers.
    #[must_use]
    #[inline]
    pub fn holds(&self) -> bool {
        self.pass.holds()
    }

    /// The response header (or trailer) that says how many units of the held meter the work
    /// used (`[[routes]] actual_header`), if the route names one.
    #[must_use]
    #[inline]
    pub fn actual_header(&self) -> Option<&http::HeaderName> {
        self.pass.actual_header()
    }

    /// The handler answered, on a route that holds ([`holds`](Self::holds)): call it with the
    /// response's head, before its body streams. Sets what the route's
    /// [`actual_header`](Self::actual_header) says in the response's headers, read through
    /// `header` (a trailer may say it later, through [`set_actual`](Self::set_actual)). From
    /// then on, a route that names an `actual_header` its response never says (a client gone
    /// before the trailer) bills its estimate in full; a request cut off before this call bills
    /// what its work recorded.
    #[inline]
    pub fn set_actual_from_head<'h>(&mut self, header: impl Fn(&http::HeaderName) -> Option<&'h [u8]>) {
        self.pass.set_actual_from_head(header)
    }

    /// Sets what the response's [`actual_header`](Self::actual_header) says (a header, or a
    /// trailer: the last one read wins): a whole number of units, billed through the hold when
    /// it settles (what `TenantContext::record` recorded on the held meter counts toward it).
    /// A value that does not parse bills the hold's estimate in full, logged.
    #[inline]
    pub fn set_actual(&mut self, value: &[u8]) {
        self.pass.set_actual(value)
    }

    /// Writes the rate-limit header fields of the response through `put`.
    #[inline]
    pub fn for_each_header(&self, put: impl FnMut(Field, &str)) {
        self.pass.for_each_header(put)
    }

    /// Records that the request was handed to the service that serves it: from now on a
    /// dropped ticket is billed (`usage.bill_cancelled`).
    #[inline]
    pub fn service_called(&mut self) {
        self.pass.service_called()
    }

    /// Gives the request's units back: it was not served (the service failed, or refused the
    /// request itself).
    #[inline]
    pub fn give_back(self) {
        self.pass.give_back()
    }

    /// Completes the request with its response status. Returns whether usage was recorded.
    #[allow(clippy::must_use_candidate)] // most callers need not know
    #[inline]
    pub fn complete(self, status: u16) -> bool {
        self.pass.complete(status)
    }

    /// Completes a gRPC call with its status code (the `grpc-status` of its response): billed
    /// when `usage.billable_grpc` lists the code (by default `OK` and the client errors, not
    /// `INTERNAL`, `UNAVAILABLE` and the other server-side failures), else its units go back.
    /// Every gRPC answer is HTTP 200: its status says how it went. Returns whether usage was
    /// recorded.
    #[allow(clippy::must_use_candidate)] // most callers need not know
    #[inline]
    pub fn complete_grpc(self, code: u8) -> bool {
        self.pass.complete_grpc(code)
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pass.fmt(f)
    }
}
