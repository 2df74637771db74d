use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

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
        // Boxed: a rejection's body is rare, and the inner body's niche then holds the
        // variant, so wrapping a one-box body (axum's) adds no byte to every response.
        Full { data: Option<Box<Bytes>> },
    }
}

impl<B> TollgateBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self { kind: Kind::Inner { body } }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self { kind: Kind::Full { data: (!data.is_empty()).then(|| Box::new(data)) } }
    }
}

impl<B> std::fmt::Debug for TollgateBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("TollgateBody::Inner"),
            Kind::Full { data } => f.debug_tuple("TollgateBody::Full").field(data).finish(),
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
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(*d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
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
