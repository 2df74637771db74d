use tower_layer::Layer;

use super::{Buffered, FromConfig, SameBody, Streamed, TollgateService};
use crate::{engine::Tollgate, response::ProblemJson};

/// The tower layer: wraps a service so that every request is identified, rate-limited,
/// checked against its quotas and metered by one shared [`Tollgate`] engine.
///
/// Cheap to clone; all clones (and all the services they make) share the engine and every
/// tenant's state. Rejections are responses (`429`, `401`, `400`, `503` with an
/// `application/problem+json` body), never service errors.
///
/// ```
/// use axum::{routing::get, Router};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let config = tollgate::Config::from_toml_str(r#"
///     [plans.free]
///     rate = "5/s"
///     [tenants.acme]
///     plan = "free"
///     keys = ["tg_test_acme"]
/// "#).unwrap();
/// let (tollgate, worker) = tollgate::Tollgate::builder(config).build();
/// tokio::spawn(worker.run());
/// let layer = tollgate::TollgateLayer::new(tollgate);
/// let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(layer);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TollgateLayer<R = FromConfig, P = ProblemJson, M = SameBody> {
    tollgate: Tollgate,
    resolver: R,
    responder: P,
    context: bool,
    mode: M,
}

impl TollgateLayer {
    /// A layer over `tollgate`, identifying tenants as configured and answering rejections
    /// with problem+json.
    #[must_use]
    pub fn new(tollgate: Tollgate) -> Self {
        Self { tollgate, resolver: FromConfig, responder: ProblemJson, context: true, mode: SameBody }
    }
}

impl<R, P, M> TollgateLayer<R, P, M> {
    /// The engine.
    pub fn handle(&self) -> &Tollgate {
        &self.tollgate
    }

    /// Identifies tenants with `resolver` instead.
    pub fn resolver<R2>(self, resolver: R2) -> TollgateLayer<R2, P, M> {
        TollgateLayer {
            tollgate: self.tollgate,
            resolver,
            responder: self.responder,
            context: self.context,
            mode: self.mode,
        }
    }

    /// Hands the inner service a [`RequestBody`](super::RequestBody) around each request's
    /// body, for body types that cannot hold another body (hyper's `Incoming`,
    /// `http_body_util::Full`): it fingerprints the body of a first request with an
    /// `Idempotency-Key` as it is read. By default ([`SameBody`]) the inner service receives
    /// the body type it came with, which must implement [`RebuildBody`](super::RebuildBody)
    /// (axum's does; tonic's with the `tonic` feature).
    pub fn streamed_bodies(self) -> TollgateLayer<R, P, Streamed> {
        TollgateLayer {
            tollgate: self.tollgate,
            resolver: self.resolver,
            responder: self.responder,
            context: self.context,
            mode: Streamed,
        }
    }

    /// Hands the inner service request bodies as they are, for bodies held whole in memory
    /// (`lambda_http::Body`): those of requests with an `Idempotency-Key` are fingerprinted at
    /// once.
    pub fn buffered_bodies(self) -> TollgateLayer<R, P, Buffered> {
        TollgateLayer {
            tollgate: self.tollgate,
            resolver: self.resolver,
            responder: self.responder,
            context: self.context,
            mode: Buffered,
        }
    }

    /// Whether admitted requests carry a [`TenantContext`](crate::TenantContext) in their
    /// extensions (the default). Services that never read it (no extra usage to record, no
    /// need for the tenant in handlers) can turn it off and save its allocations.
    #[must_use]
    pub fn tenant_context(mut self, enabled: bool) -> Self {
        self.context = enabled;
        self
    }

    /// Builds rejection responses with `responder` instead.
    pub fn responder<P2>(self, responder: P2) -> TollgateLayer<R, P2, M> {
        TollgateLayer {
            tollgate: self.tollgate,
            resolver: self.resolver,
            responder,
            context: self.context,
            mode: self.mode,
        }
    }
}

impl<S, R: Clone, P: Clone, M: Clone> Layer<S> for TollgateLayer<R, P, M> {
    type Service = TollgateService<S, R, P, M>;

    fn layer(&self, inner: S) -> Self::Service {
        let (resolver, responder) = (self.resolver.clone(), self.responder.clone());
        TollgateService::new(inner, self.tollgate.clone(), resolver, responder, self.context, self.mode.clone())
    }
}
