//! The request body the inner service receives, and how the layer fingerprints the bodies of
//! requests with an `Idempotency-Key` ([`BodyMode`]).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::engine::{BodyPrint, ResponseCapture};

/// How a [`TollgateService`](super::TollgateService) hands request bodies to the inner
/// service, and fingerprints those of first requests with an `Idempotency-Key` (and of their
/// replays, which never reach the inner service).
pub trait BodyMode<B>: Clone + Send + Sync + 'static {
    /// The request body the inner service receives.
    type Body;

    /// A request without an `Idempotency-Key` to bind.
    fn plain(body: B) -> Self::Body;

    /// [`plain`](Self::plain) for a whole request (a mode that hands bodies on as they came
    /// returns the request itself: no move of its head).
    #[inline]
    fn plain_request(request: http::Request<B>) -> http::Request<Self::Body> {
        request.map(Self::plain)
    }

    /// The first request with an `Idempotency-Key`: its body feeds `capture`'s fingerprint as
    /// the inner service reads it.
    fn printed(body: B, capture: &mut ResponseCapture) -> Self::Body;

    /// The fingerprint of a replay's body, of at most `max` bytes: done, or to drain with
    /// [`BodyPrint::drain`].
    fn replay(body: B, max: u64) -> BodyPrint;
}

/// The default: the inner service receives the request's own body type, which can hold any
/// body of its kind ([`RebuildBody`]: axum's, tonic's, `http_body_util`'s boxed bodies). A
/// request without a key is handed on untouched; the first request with an `Idempotency-Key`
/// gets its body wrapped in a [`RequestBody`] that fingerprints what is read, boxed into that
/// type.
#[derive(Debug, Clone, Copy, Default)]
pub struct SameBody;

/// Request bodies of any type, read as they stream (hyper's `Incoming`, `Full`…): the inner
/// service receives a [`RequestBody`], which fingerprints what it reads
/// ([`TollgateLayer::streamed_bodies`](super::TollgateLayer::streamed_bodies)). Every request
/// is re-wrapped: prefer [`SameBody`] where the body type allows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streamed;

/// A request body type that can hold any body of its kind, so the inner service of the tower
/// layer receives it as it came ([`SameBody`], the default).
#[diagnostic::on_unimplemented(
    message = "the tower layer cannot hand `{Self}` on as it came",
    note = "use `TollgateLayer::streamed_bodies()`: the inner service then receives `tollgate::layer::RequestBody<{Self}>`"
)]
pub trait RebuildBody: Body<Data = Bytes> + Sized + Send + 'static {
    /// `body` as this type.
    fn rebuild(body: RequestBody<Self>) -> Self;
}

#[cfg(feature = "axum")]
impl RebuildBody for axum_core::body::Body {
    fn rebuild(body: RequestBody<Self>) -> Self {
        Self::new(body)
    }
}

#[cfg(feature = "tonic")]
impl RebuildBody for tonic::body::Body {
    fn rebuild(body: RequestBody<Self>) -> Self {
        Self::new(body)
    }
}

impl<E: 'static> RebuildBody for http_body_util::combinators::BoxBody<Bytes, E> {
    fn rebuild(body: RequestBody<Self>) -> Self {
        Self::new(body)
    }
}

impl<E: 'static> RebuildBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn rebuild(body: RequestBody<Self>) -> Self {
        Self::new(body)
    }
}

impl<B: RebuildBody> BodyMode<B> for SameBody {
    type Body = B;

    #[inline(always)]
    fn plain(body: B) -> B {
        body
    }

    #[inline(always)]
    fn plain_request(request: http::Request<B>) -> http::Request<B> {
        request
    }

    fn printed(body: B, capture: &mut ResponseCapture) -> B {
        B::rebuild(<Streamed as BodyMode<B>>::printed(body, capture))
    }

    fn replay(body: B, max: u64) -> BodyPrint {
        <Streamed as BodyMode<B>>::replay(body, max)
    }
}

/// Request bodies held whole in memory (Lambda's `lambda_http::Body`): fingerprinted at once,
/// handed to the inner service as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buffered;

impl<B> BodyMode<B> for Streamed
where
    B: Body<Data = Bytes> + Send + 'static,
{
    type Body = RequestBody<B>;

    #[inline]
    fn plain(body: B) -> RequestBody<B> {
        RequestBody { kind: Kind::Plain { body } }
    }

    fn printed(body: B, capture: &mut ResponseCapture) -> RequestBody<B> {
        let print = capture.request_body().clone();
        if body.is_end_stream() {
            print.end();
        }
        let printed = Printed { body: Some(Box::pin(body)), print, leave: leave::<B> };
        RequestBody { kind: Kind::Printed { printed: Box::new(printed) } }
    }

    fn replay(body: B, max: u64) -> BodyPrint {
        let print = BodyPrint::new(max);
        if body.is_end_stream() {
            print.end();
        } else {
            print.leave(Box::pin(body));
        }
        print
    }
}

impl<B> BodyMode<B> for Buffered
where
    B: AsRef<[u8]>,
{
    type Body = B;

    #[inline]
    fn plain(body: B) -> B {
        body
    }

    #[inline(always)]
    fn plain_request(request: http::Request<B>) -> http::Request<B> {
        request
    }

    fn printed(body: B, capture: &mut ResponseCapture) -> B {
        let print = capture.request_body();
        print.update(body.as_ref());
        print.end();
        body
    }

    fn replay(body: B, max: u64) -> BodyPrint {
        let print = BodyPrint::new(max);
        print.update(body.as_ref());
        print.end();
        print
    }
}

/// Hands what a reader left of a body to its fingerprint, to drain.
fn leave<B: Body + Send + 'static>(body: Pin<Box<B>>, print: &BodyPrint) {
    print.leave(body);
}

pin_project! {
    /// The request body a [`TollgateService`](super::TollgateService) hands the inner service
    /// ([`Streamed`]): the request's own body, fingerprinted as it is read when the request is
    /// the first with an `Idempotency-Key`.
    pub struct RequestBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Plain { #[pin] body: B },
        // Boxed: only first requests with an `Idempotency-Key`.
        Printed { printed: Box<Printed<B>> },
    }
}

struct Printed<B> {
    /// `None` once handed to the fingerprint.
    body: Option<Pin<Box<B>>>,
    print: BodyPrint,
    /// [`leave`] for this body type (the drop below cannot name its bounds).
    leave: fn(Pin<Box<B>>, &BodyPrint),
}

impl<B> Drop for Printed<B> {
    fn drop(&mut self) {
        // Dropped before its end: the rest is drained into the fingerprint.
        if let Some(body) = self.body.take() {
            if self.print.is_reading() {
                (self.leave)(body, &self.print);
            }
        }
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Plain { .. } => f.write_str("RequestBody::Plain"),
            Kind::Printed { printed } => f.debug_tuple("RequestBody::Printed").field(&printed.print).finish(),
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Plain { body } => body.poll_frame(cx),
            KindProj::Printed { printed } => {
                let Some(body) = printed.body.as_mut() else { return Poll::Ready(None) };
                let polled = body.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            printed.print.update(data);
                        }
                        if body.is_end_stream() {
                            printed.print.end();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => printed.print.fail(),
                    Poll::Ready(None) => printed.print.end(),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            Kind::Printed { printed } => printed.body.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { body } => body.size_hint(),
            Kind::Printed { printed } => printed.body.as_ref().map_or(SizeHint::with_exact(0), |b| b.size_hint()),
        }
    }
}
