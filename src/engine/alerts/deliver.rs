//! One delivery of an outbox row: a signed POST (Standard Webhooks), within a time limit, its
//! answer read up to a bound, redirects not followed; a tenant's endpoint only to addresses it
//! may reach, checked on the addresses each connection resolves to (the SSRF guard).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioIo};
use tokio::net::TcpStream;

use crate::{base::WebhookSecret, config::IpRange};

/// The most bytes of an answer read (the rest is not waited for).
pub(crate) const MAX_ANSWER: usize = 64 * 1024;

/// Where a connection may go: anywhere (an operator's endpoint), or a tenant's: public
/// addresses and the ranges `alerts.allow_private` names.
#[derive(Clone, Debug)]
struct Guarded {
    /// `None`: any address.
    allow: Option<Arc<RwLock<Vec<IpRange>>>>,
    connect_timeout: Duration,
}

/// A connection refused by the SSRF guard.
#[derive(Debug, thiserror::Error)]
#[error("refused: {0} resolves to no address a tenant's endpoint may reach ({1})")]
pub(crate) struct Refused(String, String);

impl Guarded {
    fn allowed(&self, addr: &SocketAddr) -> bool {
        match &self.allow {
            None => true,
            Some(allow) => {
                let ip = addr.ip();
                crate::base::is_public(ip)
                    || allow.read().unwrap_or_else(|e| e.into_inner()).iter().any(|r| r.contains(ip))
            }
        }
    }
}

impl tower_service::Service<http::Uri> for Guarded {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let guard = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
                resolved.into_iter().partition(|a| guard.allowed(a));
            if allowed.is_empty() {
                let seen = refused.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
                return Err(std::io::Error::other(Refused(host, seen)));
            }
            let mut last = None;
            for addr in allowed {
                match tokio::time::timeout(guard.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(TokioIo::new(stream));
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
        })
    }
}

type Https = hyper_rustls::HttpsConnector<Guarded>;

/// The clients deliveries go through: one for the operator's endpoints, one for tenants'
/// (guarded, no connection kept between deliveries).
#[derive(Debug)]
pub(crate) struct Deliverer {
    operator: Client<Https, Full<Bytes>>,
    tenant: Client<Https, Full<Bytes>>,
    allow: Arc<RwLock<Vec<IpRange>>>,
}

/// What one delivery came to.
#[derive(Debug)]
pub(crate) enum Sent {
    /// The endpoint answered 2xx.
    Delivered,
    /// It did not: why.
    Failed(String),
}

fn https(guard: Guarded) -> Result<Https, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(guard))
}

impl Deliverer {
    pub(crate) fn new(timeout: Duration) -> Result<Self, String> {
        let allow = Arc::new(RwLock::new(Vec::new()));
        let connect_timeout = timeout.min(Duration::from_secs(10));
        let builder = || Client::builder(hyper_util::rt::TokioExecutor::new());
        let operator = builder().build(https(Guarded { allow: None, connect_timeout })?);
        let tenant =
            builder().pool_max_idle_per_host(0).build(https(Guarded { allow: Some(allow.clone()), connect_timeout })?);
        Ok(Self { operator, tenant, allow })
    }

    /// Takes the ranges a tenant's endpoint may reach although private (a reload may change
    /// them).
    pub(crate) fn allow_private(&self, ranges: &[IpRange]) {
        let mut allow = self.allow.write().unwrap_or_else(|e| e.into_inner());
        if allow.as_slice() != ranges {
            *allow = ranges.to_vec();
        }
    }

    /// Posts `body` to `url` as message `id`, signed by `secrets` at `timestamp` (Unix
    /// seconds, the wall clock), within `timeout` for the whole exchange.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        tenant: bool,
        url: &str,
        id: &str,
        timestamp: i64,
        body: &str,
        secrets: &[WebhookSecret],
        timeout: Duration,
    ) -> Sent {
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", crate::base::signature_header(secrets, id, timestamp, body.as_bytes()))
            .body(Full::new(Bytes::from(body.to_owned())));
        let request = match request {
            Ok(r) => r,
            Err(e) => return Sent::Failed(format!("the request cannot be made: {e}")),
        };
        let client = if tenant { &self.tenant } else { &self.operator };
        let started = tokio::time::Instant::now();
        let response = match tokio::time::timeout(timeout, client.request(request)).await {
            Err(_) => return Sent::Failed(format!("no answer within {:.1}s", timeout.as_secs_f64())),
            Ok(Err(e)) => return Sent::Failed(chain(&e)),
            Ok(Ok(response)) => response,
        };
        // The status decides; the answer's body is read after it, up to its bound and within
        // what is left of the time limit (at most a second), then dropped: a slow or huge body
        // neither fails a delivery the endpoint accepted nor stalls the worker.
        let status = response.status();
        let drain = timeout.saturating_sub(started.elapsed()).min(Duration::from_secs(1));
        let _ =
            tokio::time::timeout(drain, http_body_util::Limited::new(response.into_body(), MAX_ANSWER).collect()).await;
        if status.is_success() {
            Sent::Delivered
        } else if status.is_redirection() {
            Sent::Failed(format!("{status}: redirects are not followed (answer 2xx at the endpoint itself)"))
        } else {
            Sent::Failed(status.to_string())
        }
    }
}

/// An error with its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
