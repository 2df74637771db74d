//! Stripe's signature scheme over bytes, for bodies async-stripe cannot verify.

/// Whether the `Stripe-Signature` value `header` carries a `v1` signature of `body` by `secret`
/// made within 300 s of `now`: Stripe's scheme (HMAC-SHA256 of `t.body`), over bytes, for
/// bodies async-stripe cannot take (it verifies a `&str`).
pub(super) fn signed_bytes(header: &str, body: &[u8], secret: &str, now: i64) -> bool {
    let mut t = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => candidates.push(v),
            _ => {}
        }
    }
    let Some(t) = t.filter(|t| (now - t).abs() <= 300) else { return false };
    let mac = crate::base::hmac_sha256(secret.as_bytes(), &[t.to_string().as_bytes(), b".", body]);
    candidates.iter().any(|c| {
        hex::decode(c)
            .is_ok_and(|sig| sig.len() == mac.len() && sig.iter().zip(mac).fold(0, |d, (a, b)| d | (a ^ b)) == 0)
    })
}
