//! Reads Stripe's API while a webhook delivery waits: a full thin event, a payment's line
//! items, a price's lookup key.

use std::fmt;

use bytes::Bytes;
use serde_json::Value;

use super::Secret;

/// The API version the full events are read at: the one async-stripe is generated for.
const STRIPE_VERSION: &str = "2026-09-30.endive";

/// The most bytes of an answer of Stripe's API read (a longer one is an error).
const MAX_ANSWER: usize = 1 << 20;

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<Bytes>,
>;

/// Reads Stripe's API while a delivery waits (a full thin event, a payment's line items):
/// async-stripe has no v2 client and its v1 client would bring a second HTTP stack, so one
/// GET over the same hyper and rustls stack, with the secret key, within the timeout (at most
/// 10 s: Stripe waits that long for the delivery's answer), the body at most 1 MiB.
pub(crate) struct StripeReader {
    api_key: Secret,
    api_base: String,
    timeout: std::time::Duration,
    client: std::sync::OnceLock<HttpsClient>,
}

impl fmt::Debug for StripeReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeReader").field("api_base", &self.api_base).finish_non_exhaustive()
    }
}

impl StripeReader {
    pub(crate) fn new(api_key: Secret, api_base: Option<&str>, timeout: std::time::Duration) -> Self {
        let base = api_base.unwrap_or("https://api.stripe.com/");
        let api_base = if base.ends_with('/') { base.to_owned() } else { format!("{base}/") };
        Self { api_key, api_base, timeout, client: std::sync::OnceLock::new() }
    }

    /// `GET {api_base}{path}` (a path and query, without a leading `/`) at
    /// [`STRIPE_VERSION`]: the JSON body of a 2xx, or why not.
    pub(crate) async fn get(&self, path: &str) -> Result<serde_json::Value, ReadError> {
        use http_body_util::BodyExt;
        let client = self.client.get_or_init(|| {
            let connector =
                hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
        });
        let passing = |e: &dyn fmt::Display| ReadError { permanent: false, why: e.to_string() };
        let request = http::Request::get(format!("{}{path}", self.api_base))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.api_key.expose()))
            .header("stripe-version", STRIPE_VERSION)
            .body(http_body_util::Empty::new())
            .map_err(|e| ReadError { permanent: true, why: e.to_string() })?;
        let read = async {
            let response = client.request(request).await.map_err(|e| passing(&e))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| passing(&e))?
                .to_bytes();
            if !status.is_success() {
                // A refusal (a key that may not read it, an object of another account) stays
                // one; a rate limit or a server error may pass.
                let permanent = status.is_client_error() && status != http::StatusCode::TOO_MANY_REQUESTS;
                let why = format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
                return Err(ReadError { permanent, why });
            }
            serde_json::from_slice(&body).map_err(|e| ReadError { permanent: true, why: e.to_string() })
        };
        let limit = self.timeout.min(std::time::Duration::from_secs(10));
        tokio::time::timeout(limit, read).await.map_err(|_| passing(&"timed out"))?
    }
}

/// Why a read of Stripe's API failed, and whether trying again later may succeed.
#[derive(Debug)]
pub(crate) struct ReadError {
    /// A 4xx (but 429) or an answer that cannot be read: trying again will not help.
    pub(crate) permanent: bool,
    pub(crate) why: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

/// The id of an expandable field: a string, or an object's `id`.
pub(crate) fn id_of(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v["id"].as_str()).filter(|s| !s.is_empty())
}
