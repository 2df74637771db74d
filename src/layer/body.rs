use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::engine::{InFlight, Pass, ResponseCapture, RouteHeld};

pin_project! {
    /// The response body of a [`TollgateService`](super::TollgateService): the inner service's
    /// body, or the body of a rejection.
    pub struct TollgateBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // Boxed: a rejection's body, or a gRPC answer whose status comes in its trailers, is
        // rare, and the inner body's niche then holds the variant, so wrapping a one-box body
        // (axum's) adds no byte to every response. `None`: an empty rejection body.
        Other { other: Option<Pin<Box<Other<B>>>> },
    }
}

pin_project! {
    #[project = OtherProj]
    enum Other<B> {
        Full { data: Option<Bytes> },
        // A gRPC answer billed when its trailers come, or the answer of a route that holds
        // (`grpc`: false) billed when it ends: the ticket lives until the body ends (or its
        // last byte of `exact`, the length an HTTP/1 server writes and then stops polling at;
        // `seen`: its bytes so far). The route's hold (`held`) lives until the body has gone:
        // trailers that come after the last byte (HTTP/2) still say its actual.
        Tracked {
            #[pin] body: B,
            ticket: Option<Pass>,
            status: u16,
            grpc: bool,
            seen: u64,
            exact: Option<u64>,
            held: Option<Arc<RouteHeld>>,
        },
        // The answer to the first request with an `Idempotency-Key` (billed at its head): held
        // while it streams, stored with the key when its last frame has gone (a server does
        // not poll a body for its end once the length it announced is written). `seen`: its
        // bytes so far; `exact`: its length, if it said. Without a capture, the answer of a
        // tenant whose plan limits its requests in flight: `in_flight`, its place, is held until
        // the body ends (or fails, or is dropped).
        Stored {
            #[pin] body: B,
            capture: Option<ResponseCapture>,
            seen: u64,
            exact: Option<u64>,
            in_flight: Option<InFlight>,
        },
    }
}

impl<B> TollgateBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self { kind: Kind::Inner { body } }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        let other = (!data.is_empty()).then(|| Box::pin(Other::Full { data: Some(data) }));
        Self { kind: Kind::Other { other } }
    }

    /// The body of a gRPC answer whose `grpc-status` comes in its trailers: `ticket` is
    /// completed by that status when they come (by the HTTP `status` if the body ends
    /// without), given back if the body fails, and dropped (billed as a request cut off) if
    /// the body is.
    pub(crate) fn tracked(body: B, ticket: Pass, status: u16) -> Self {
        let held = ticket.route_hold();
        let tracked = Other::Tracked { body, ticket: Some(ticket), status, grpc: true, seen: 0, exact: None, held };
        Self { kind: Kind::Other { other: Some(Box::pin(tracked)) } }
    }

    /// The body of the answer of a route that holds units (`[[routes]] hold`): `ticket` is
    /// completed with `status` when the body ends (its route's `actual_header` read in the
    /// trailers, if they come), or when its `exact` length has been read (a server stops
    /// there), given back if the body fails, and dropped (billed as a request cut off) if the
    /// body is before.
    pub(crate) fn held(body: B, ticket: Pass, status: u16, exact: Option<u64>) -> Self {
        let held = ticket.route_hold();
        let tracked = Other::Tracked { body, ticket: Some(ticket), status, grpc: false, seen: 0, exact, held };
        Self { kind: Kind::Other { other: Some(Box::pin(tracked)) } }
    }

    /// The inner service's body, holding the request's place among its tenant's requests in
    /// flight (if its plan limits them) until it ends.
    #[inline]
    pub(crate) fn counted(body: B, in_flight: Option<InFlight>) -> Self {
        match in_flight {
            None => Self::inner(body),
            // A stored body without a capture: it only holds the place until it ends (or
            // fails, or is dropped).
            in_flight => {
                let counted = Other::Stored { body, capture: None, seen: 0, exact: None, in_flight };
                Self { kind: Kind::Other { other: Some(Box::pin(counted)) } }
            }
        }
    }
}

impl<B> TollgateBody<B> {
    /// The body of the first request with an `Idempotency-Key`, already billed: `capture`
    /// holds it as it streams and stores it when its last frame has gone. A body that fails,
    /// or is dropped before its end, stores nothing: the key is released.
    /// `exact`: the length the server stops at (the body's own, or the announced
    /// `Content-Length`), if known.
    pub(crate) fn stored(body: B, capture: ResponseCapture, in_flight: Option<InFlight>, exact: Option<u64>) -> Self
    where
        B: Body,
    {
        let stored = Other::Stored { body, capture: Some(capture), seen: 0, exact, in_flight };
        Self { kind: Kind::Other { other: Some(Box::pin(stored)) } }
    }
}

impl<B> std::fmt::Debug for TollgateBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("TollgateBody::Inner"),
            Kind::Other { other: None } => f.write_str("TollgateBody::Full(empty)"),
            Kind::Other { other: Some(other) } => match other.as_ref().get_ref() {
                Other::Full { data } => f.debug_tuple("TollgateBody::Full").field(data).finish(),
                Other::Tracked { .. } => f.write_str("TollgateBody::Tracked"),
                Other::Stored { .. } => f.write_str("TollgateBody::Stored"),
            },
        }
    }
}

impl<B> Body for TollgateBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Other { other: None } => Poll::Ready(None),
            KindProj::Other { other: Some(other) } => match other.as_mut().project() {
                OtherProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
                OtherProj::Tracked { mut body, ticket, status, grpc, seen, exact, held } => {
                    // Marked while the body runs: a panic in it is a failure, not a cut-off.
                    if let Some(t) = ticket.as_mut() {
                        t.in_poll = true;
                    }
                    let polled = body.as_mut().poll_frame(cx);
                    if let Some(t) = ticket.as_mut() {
                        t.in_poll = false;
                    }
                    match &polled {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Some(trailers) = frame.trailers_ref() {
                                // Read into the route's hold, also after the ticket completed.
                                if let Some(h) = held.as_ref() {
                                    if let Some(value) = h.actual_header().and_then(|name| trailers.get(name)) {
                                        h.set_actual(value.as_bytes());
                                    }
                                }
                                if let Some(t) = ticket.take() {
                                    if *grpc {
                                        // No status in a gRPC answer's trailers is an error
                                        // (the client sees UNKNOWN).
                                        t.complete_grpc(grpc_code(trailers.get("grpc-status")).unwrap_or(2));
                                    } else {
                                        t.complete(*status);
                                    }
                                }
                            } else {
                                *seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                                // The body says it ended with this frame, or its announced
                                // length is written: a server stops polling it here, with no
                                // trailers to come.
                                if body.is_end_stream() || exact.is_some_and(|n| *seen >= n) {
                                    if let Some(t) = ticket.take() {
                                        t.complete(*status);
                                    }
                                }
                            }
                        }
                        Poll::Ready(None) => {
                            if let Some(t) = ticket.take() {
                                t.complete(*status);
                            }
                        }
                        // The body failed: not served whole, not billed.
                        Poll::Ready(Some(Err(_))) => {
                            if let Some(t) = ticket.take() {
                                t.give_back();
                            }
                        }
                        Poll::Pending => {}
                    }
                    polled
                }
                OtherProj::Stored { mut body, capture, seen, exact, in_flight } => {
                    let polled = body.as_mut().poll_frame(cx);
                    match &polled {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Some(data) = frame.data_ref() {
                                let before = *seen;
                                *seen += data.len() as u64;
                                if let Some(c) = capture.as_mut() {
                                    // Never past the length the server writes (it cuts there).
                                    let keep = exact.map_or(data.len(), |n| {
                                        usize::try_from(n.saturating_sub(before)).unwrap_or(usize::MAX).min(data.len())
                                    });
                                    c.data(&data[..keep]);
                                }
                            }
                            // The last frame: the server may not poll again.
                            if exact.is_some_and(|n| *seen >= n) {
                                if let Some(c) = capture.take() {
                                    c.finish();
                                }
                                *in_flight = None;
                            } else if body.is_end_stream() {
                                // Shorter than it announced: not served whole, not stored.
                                if exact.is_some() {
                                    *capture = None;
                                } else if let Some(c) = capture.take() {
                                    c.finish();
                                }
                                *in_flight = None;
                            }
                        }
                        // The body failed: not served whole, not stored (the key is released).
                        Poll::Ready(Some(Err(_))) => {
                            *capture = None;
                            *in_flight = None;
                        }
                        Poll::Ready(None) => {
                            // Shorter than it announced: not served whole, not stored.
                            if exact.is_some_and(|n| *seen < n) {
                                *capture = None;
                            } else if let Some(c) = capture.take() {
                                c.finish();
                            }
                            *in_flight = None;
                        }
                        Poll::Pending => {}
                    }
                    polled
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Other { other: None } => true,
            Kind::Other { other: Some(other) } => match other.as_ref().get_ref() {
                Other::Full { data } => data.is_none(),
                Other::Tracked { body, .. } => body.is_end_stream(),
                Other::Stored { body, .. } => body.is_end_stream(),
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Other { other: None } => SizeHint::with_exact(0),
            Kind::Other { other: Some(other) } => match other.as_ref().get_ref() {
                Other::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
                Other::Tracked { body, .. } | Other::Stored { body, .. } => body.size_hint(),
            },
        }
    }
}

/// A `grpc-status` value's code (an unreadable one is `UNKNOWN`'s, 2).
pub(crate) fn grpc_code(value: Option<&http::HeaderValue>) -> Option<u8> {
    let value = value?;
    Some(std::str::from_utf8(value.as_bytes()).ok().and_then(|v| v.trim().parse::<u8>().ok()).unwrap_or(2))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body::Body as _;
    use http_body_util::{combinators::BoxBody, BodyExt};

    use super::TollgateBody;

    /// A response is moved several times between a service and the connection: with a
    /// one-box body (axum's) wrapping must not make it bigger (an `http::Response<axum::Body>`
    /// is 128 bytes, the most the compiler copies inline; any more is a `memcpy` call per
    /// move).
    #[test]
    fn wrapping_a_boxed_body_adds_no_byte() {
        type Boxed = BoxBody<Bytes, Infallible>;
        assert_eq!(size_of::<TollgateBody<Boxed>>(), size_of::<Boxed>());
        assert_eq!(size_of::<http::Response<TollgateBody<Boxed>>>(), size_of::<http::Response<Boxed>>());
    }

    #[tokio::test]
    async fn a_rejection_body_yields_its_bytes_once() {
        let body = TollgateBody::<BoxBody<Bytes, Infallible>>::full(Bytes::from_static(b"{\"status\":429}"));
        assert_eq!(body.size_hint().exact(), Some(14));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), Bytes::from_static(b"{\"status\":429}"));
        let empty = TollgateBody::<BoxBody<Bytes, Infallible>>::full(Bytes::new());
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }
}
