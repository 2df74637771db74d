//! The lookup keys of `[stripe.credits.prices]`, resolved to the price ids Stripe's invoice
//! lines name.

use super::reader::{ReadError, StripeReader};
use crate::config::CreditSettings;

/// How long the price ids of lookup keys, and the lookup key of a price id, are trusted, in
/// seconds.
const LOOKUP_TTL_SECS: i64 = 3600;

/// The most lookup keys Stripe takes in one `GET /v1/prices` ("up to 10 lookup_keys").
const LOOKUP_KEYS_PER_CALL: usize = 10;

/// The most prices of one payment read one by one (`GET /v1/prices/{id}`).
const PRICES_READ_PER_PAYMENT: usize = 20;

/// The most price ids whose lookup key is kept.
const PRICES_KEPT: usize = 1000;

/// Whether a key of `[stripe.credits.prices]` is a lookup key: a price id starts with
/// `price_` (or, for prices made by the old Plans API, `plan_`), anything else is a lookup
/// key.
pub(crate) fn is_lookup_key(key: &str) -> bool {
    !key.starts_with("price_") && !key.starts_with("plan_")
}

/// The lookup keys of prices, as Stripe last said: an invoice line names its price by id
/// alone (`pricing.price_details.price`), so a lookup key of `[stripe.credits.prices]` is
/// matched through this.
///
/// - The configuration's lookup keys are resolved to price ids together
///   (`GET /v1/prices?lookup_keys[]=…`, active prices, then archived ones), one read at a time
///   for the node, kept at most [`LOOKUP_TTL_SECS`].
/// - A price id of a payment that this reading lacks (a lookup key moved to a new price since,
///   or a price of something else) is read alone (`GET /v1/prices/{id}`), and its lookup key
///   kept as long (none: a minute), at most [`PRICES_KEPT`] of them.
#[derive(Debug, Default)]
pub(crate) struct LookupKeys {
    read: tokio::sync::Mutex<Option<Resolved>>,
    prices: std::sync::Mutex<std::collections::HashMap<String, (i64, Option<String>)>>,
}

/// One reading of the lookup keys.
#[derive(Debug, Clone)]
struct Resolved {
    /// The lookup keys asked for (the configuration's, at the time).
    keys: Vec<String>,
    /// When they were read (Unix seconds).
    at: i64,
    /// Price id → lookup key.
    ids: std::collections::HashMap<String, String>,
}

/// Price id → lookup key for `keys`, read with `GET /v1/prices?lookup_keys[]=…`: active
/// prices (the list's default), then archived ones, which subscriptions made before still
/// renew on.
async fn read_lookup_keys(
    reader: &StripeReader,
    keys: &[String],
) -> Result<std::collections::HashMap<String, String>, ReadError> {
    let mut ids = std::collections::HashMap::new();
    for active in ["true", "false"] {
        let missing: Vec<&String> = keys.iter().filter(|k| !ids.values().any(|v| v == *k)).collect();
        for chunk in missing.chunks(LOOKUP_KEYS_PER_CALL) {
            let query: Vec<String> = chunk.iter().map(|k| format!("lookup_keys%5B%5D={}", query_encode(k))).collect();
            let page = reader.get(&format!("v1/prices?active={active}&limit=100&{}", query.join("&"))).await?;
            let data = page["data"].as_array().ok_or_else(|| ReadError::permanent("a list of prices without data"))?;
            for price in data {
                if let (Some(id), Some(key)) = (price["id"].as_str(), price["lookup_key"].as_str()) {
                    if chunk.iter().any(|k| *k == key) {
                        ids.insert(id.to_owned(), key.to_owned());
                    }
                }
            }
        }
    }
    for key in keys {
        if !ids.values().any(|k| k == key) {
            tracing::warn!(lookup_key = %key, "[stripe.credits.prices] names a lookup key no Stripe price has");
        }
    }
    Ok(ids)
}

/// `s` percent-encoded for a query string (every byte but the unreserved characters).
fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl LookupKeys {
    /// Price id → lookup key, for the price ids of `unmatched` lines (lines on no key of the
    /// map), when the map has lookup keys. Empty without lookup keys; an
    /// error when a price could not be read (no secret key is a permanent one), so that no
    /// paid line is taken for one on no credit price unread.
    pub(crate) async fn ids(
        &self,
        reader: Option<&StripeReader>,
        credits: &CreditSettings,
        unmatched: &[&str],
        now: i64,
    ) -> Result<std::collections::HashMap<String, String>, ReadError> {
        let keys: Vec<String> = credits.prices.keys().filter(|k| is_lookup_key(k)).cloned().collect();
        if keys.is_empty() || unmatched.is_empty() {
            return Ok(Default::default());
        }
        let Some(reader) = reader else {
            return Err(ReadError::permanent(
                "[stripe.credits.prices] names lookup keys, and there is no Stripe secret key to resolve them",
            ));
        };
        let mut ids = {
            // One reading at a time: a burst of renewals makes one.
            let mut read = self.read.lock().await;
            match read.as_ref().filter(|r| r.keys == keys && now - r.at < LOOKUP_TTL_SECS) {
                Some(r) => r.ids.clone(),
                None => {
                    let ids = read_lookup_keys(reader, &keys).await?;
                    *read = Some(Resolved { keys: keys.clone(), at: now, ids: ids.clone() });
                    ids
                }
            }
        };
        // The price ids the reading lacks, one by one: a lookup key moved to a new price since.
        let mut missing: Vec<&str> = unmatched.iter().copied().filter(|id| !ids.contains_key(*id)).collect();
        missing.sort_unstable();
        missing.dedup();
        for id in missing.into_iter().take(PRICES_READ_PER_PAYMENT) {
            let kept = self.prices.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
            // A price without a lookup key is asked again after a minute: the key may be moved
            // to it (a new price of a pack); one with a lookup key is kept an hour.
            let fresh = |(at, key): &(i64, Option<String>)| now - at < if key.is_some() { LOOKUP_TTL_SECS } else { 60 };
            let key = match kept.filter(fresh) {
                Some((_, key)) => key,
                None => {
                    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        continue;
                    }
                    let key = match reader.get(&format!("v1/prices/{id}")).await {
                        Ok(price) => price["lookup_key"].as_str().map(str::to_owned),
                        // A price can be archived, never deleted: a 404 on the id of a signed
                        // event's line is a key of another account or mode (a refusal,
                        // answered 500), never "no lookup key".
                        Err(e) => return Err(e),
                    };
                    let mut prices = self.prices.lock().unwrap_or_else(|e| e.into_inner());
                    if prices.len() >= PRICES_KEPT {
                        prices.retain(|_, (at, _)| now - *at < LOOKUP_TTL_SECS);
                        if prices.len() >= PRICES_KEPT {
                            prices.clear();
                        }
                    }
                    prices.insert(id.to_owned(), (now, key.clone()));
                    key
                }
            };
            if let Some(key) = key.filter(|k| keys.contains(k)) {
                ids.insert(id.to_owned(), key);
            }
        }
        Ok(ids)
    }
}
