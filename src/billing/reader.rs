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
    /// When each refusal of the key (by what it lacks) was last logged: once a minute each, a
    /// burst of retried deliveries logs it once (a few kinds: bounded).
    refusals_logged: std::sync::Mutex<std::collections::HashMap<String, i64>>,
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
        Self { api_key, api_base, timeout, client: std::sync::OnceLock::new(), refusals_logged: Default::default() }
    }

    /// Whether a refusal of the key for `lacking` is to be logged at `now`: the first in a
    /// minute.
    pub(crate) fn log_refusal(&self, lacking: &str, now: i64) -> bool {
        let mut logged = self.refusals_logged.lock().unwrap_or_else(|e| e.into_inner());
        match logged.get(lacking) {
            Some(at) if now - at < 60 => false,
            _ => {
                if logged.len() >= 64 {
                    logged.clear();
                }
                logged.insert(lacking.to_owned(), now);
                true
            }
        }
    }

    /// `GET {api_base}{path}` (a path and query, without a leading `/`) at
    /// [`STRIPE_VERSION`]: the JSON body of a 2xx, or why not.
    /// Its key, API base and timeout.
    pub(crate) fn parts(&self) -> (&Secret, &str, std::time::Duration) {
        (&self.api_key, &self.api_base, self.timeout)
    }

    pub(crate) async fn get(&self, path: &str) -> Result<serde_json::Value, ReadError> {
        use http_body_util::BodyExt;
        let client = self.client.get_or_init(|| {
            let connector =
                hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
        });
        let passing = |e: &dyn fmt::Display| ReadError { why: e.to_string(), refused: None, status: None };
        let request = http::Request::get(format!("{}{path}", self.api_base))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.api_key.expose()))
            .header("stripe-version", STRIPE_VERSION)
            .body(http_body_util::Empty::new())
            .map_err(|e| ReadError::permanent(e.to_string()))?;
        let read = async {
            let response = client.request(request).await.map_err(|e| passing(&e))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| passing(&e))?
                .to_bytes();
            if !status.is_success() {
                let why = format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
                // The key may not read it (401: rolled or revoked; 403: a restricted key without
                // the permission; 404: a key of another account or mode, the object being one
                // of a signed event): it will pass once the key is right, so never final.
                if let Some(refused) = refusal(status, path) {
                    return Err(ReadError { why, refused: Some(refused), status: Some(status.as_u16()) });
                }
                // Another client error, a rate limit or a server error: answered 500 by the
                // caller, so Stripe delivers the event again.
                return Err(ReadError { why, refused: None, status: Some(status.as_u16()) });
            }
            serde_json::from_slice(&body).map_err(|e| ReadError::permanent(e.to_string()))
        };
        let limit = self.timeout.min(std::time::Duration::from_secs(10));
        tokio::time::timeout(limit, read).await.map_err(|_| passing(&"timed out"))?
    }
}

/// Why a read of Stripe's API failed: every failure of a read a payment needs answers 500
/// (Stripe delivers the event again), never "no credits".
#[derive(Debug)]
pub(crate) struct ReadError {
    pub(crate) why: String,
    /// Refused for the key (401, 403, 404): what it lacks, as a person fixes it.
    pub(crate) refused: Option<String>,
    /// The answer's status, if Stripe answered.
    pub(crate) status: Option<u16>,
}

impl ReadError {
    /// A failure that is not the key's (an answer that cannot be read, no key at all).
    pub(crate) fn permanent(why: impl Into<String>) -> Self {
        Self { why: why.into(), refused: None, status: None }
    }
}

/// The permission a restricted key needs for a read of `path` (a path and query without the
/// leading `/`), named as the Dashboard's restricted key form names it.
pub(crate) fn permission_of(path: &str) -> &'static str {
    const BY_PATH: [(&str, &str); 9] = [
        ("v1/checkout/sessions", "Checkout Sessions: read"),
        ("v1/payment_intents", "PaymentIntents: read (sessions with manual capture, recharges)"),
        ("v1/invoice_payments", "Invoices: read (invoice payments)"),
        ("v1/invoices", "Invoices: read"),
        ("v1/prices", "Prices: read"),
        ("v1/refunds", "Refunds: read"),
        ("v1/credit_notes", "Credit notes: read"),
        ("v1/billing/meters", "Billing meters: read"),
        ("v2/core/events", "Event destinations and events: read"),
    ];
    BY_PATH.iter().find(|(prefix, _)| path.starts_with(prefix)).map_or("the API", |(_, p)| p)
}

/// What a refusal of a read of `path` with `status` says the key lacks (`None`: not a refusal
/// of the key).
fn refusal(status: http::StatusCode, path: &str) -> Option<String> {
    let permission = permission_of(path);
    match status.as_u16() {
        401 => Some(format!("a valid secret key (401: rolled or revoked), for {permission}")),
        403 => Some(format!("{permission} (403: the restricted key lacks it)")),
        404 => Some(format!("{permission} on this account and mode (404: a key of another account, or test for live)")),
        _ => None,
    }
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

/// What a Stripe secret key may read of what `[stripe.credits]` needs, as
/// [`check_stripe_access`](crate::billing::check_stripe_access) found by asking (Stripe cannot
/// list a key's permissions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StripeAccess {
    /// What the key lacks, one entry per read refused (401, 403 or 404), as the Dashboard's
    /// restricted key form names the permission (`"Refunds: read (403: …)"`).
    pub refused: Vec<String>,
    /// Why Stripe could not be asked (unreachable, timed out, a server error): nothing is
    /// known of the key then.
    pub unreachable: Option<String>,
}

impl StripeAccess {
    /// Whether every read asked was answered.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.refused.is_empty() && self.unreachable.is_none()
    }
}

impl StripeReader {
    /// Asks for one item of each list in `paths` (without the leading `/`): what is refused,
    /// and whether Stripe could be asked at all.
    pub(crate) async fn probe(&self, paths: &[&str]) -> StripeAccess {
        let mut access = StripeAccess::default();
        for path in paths {
            match self.get(&format!("{path}?limit=1")).await {
                Ok(_) => {}
                Err(ReadError { refused: Some(lacking), .. }) => access.refused.push(lacking),
                // Not an answer of Stripe's (a wrong `api_base`), or a server error: the key
                // could not be checked.
                Err(ReadError { why, .. }) => {
                    access.unreachable = Some(why);
                    break;
                }
            }
        }
        access
    }
}

/// The lists a key must read for `[stripe.credits]`: checkout sessions, invoices (and their
/// payments) and credit notes (pre-payment ones lower what an invoice grants); refunds when
/// they are taken back (`refunds`); prices when the map names lookup keys (`lookup_keys`).
pub(crate) fn credit_reads(refunds: bool, lookup_keys: bool) -> Vec<&'static str> {
    let mut reads = vec!["v1/checkout/sessions", "v1/invoices", "v1/invoice_payments", "v1/credit_notes"];
    if refunds {
        reads.push("v1/refunds");
    }
    if lookup_keys {
        reads.push("v1/prices");
    }
    reads
}
