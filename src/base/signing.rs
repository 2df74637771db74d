//! Signatures of webhooks, both ways: HMAC-SHA256 (RFC 2104), the Standard Webhooks scheme
//! tollgate signs its alerts with, and which addresses a tenant's endpoint may reach.

use std::net::IpAddr;

use base64::Engine as _;

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts` under `key`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new().chain_update(block.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    Sha256::new().chain_update(block.map(|b| b ^ 0x5c)).chain_update(inner.finalize()).finalize().into()
}

/// A Standard Webhooks signing secret: `whsec_` then the base64 of 24 to 64 random bytes. Never
/// shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSecret(&'static str);

impl WebhookSecret {
    /// The shortest secret, in bytes.
    pub const MIN_BYTES: usize = 24;
    /// The longest secret, in bytes.
    pub const MAX_BYTES: usize = 64;

    /// A secret of `whsec_<base64>`.
    ///
    /// # Errors
    /// Not `whsec_` followed by standard base64 of 24 to 64 bytes.
    pub fn parse(text: &str) -> Result<Self, BadSecret> {
        let Some(encoded) = text.strip_prefix("whsec_") else {
            return Err(BadSecret("a secret starts with `whsec_` (Standard Webhooks)"));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| BadSecret("a secret is `whsec_` followed by standard base64"))?;
        if !(Self::MIN_BYTES..=Self::MAX_BYTES).contains(&bytes.len()) {
            return Err(BadSecret("a secret holds 24 to 64 bytes (32 is usual)"));
        }
        Ok(Self(bytes))
    }

    /// Whitespace-separated secrets (several while one is rotated), at least one.
    ///
    /// # Errors
    /// None, or one that does not [`parse`](Self::parse).
    pub fn parse_list(text: &str) -> Result<Vec<Self>, BadSecret> {
        let secrets = text.split_whitespace().map(Self::parse).collect::<Result<Vec<_>, _>>()?;
        if secrets.is_empty() {
            return Err(BadSecret("no secret: `whsec_…`, several separated by spaces while one is rotated"));
        }
        Ok(secrets)
    }

    /// A new secret of 32 random bytes from the operating system.
    #[must_use]
    pub fn generate() -> Self {
        Self((0..4).flat_map(|_| super::draw_u64().to_ne_bytes()).collect())
    }

    /// The secret as its owner writes it: `whsec_<base64>`.
    #[must_use]
    pub fn expose(&self) -> String {
        format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&self.0))
    }

    /// The `v1` signature of a message: base64 of HMAC-SHA256 over `id.timestamp.body`.
    #[must_use]
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mac = hmac_sha256(&self.0, &[id.as_bytes(), b".", timestamp.to_string().as_bytes(), b".", body]);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac))
    }
}

/// The `webhook-signature` header of a message signed by each of `secrets`: their `v1`
/// signatures separated by spaces (a receiver accepts any one it can verify).
#[must_use]
pub fn signature_header(secrets: &[WebhookSecret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| s.sign(id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

/// Whether an address is one a tenant's endpoint may reach: a public unicast address, never
/// loopback, private (RFC 1918, unique local), link-local (cloud metadata at 169.254.169.254
/// among them), carrier-grade NAT, unspecified, multicast, broadcast, documentation or reserved
/// ranges, nor an IPv6 address carrying such an IPv4 one (mapped, NAT64, 6to4).
#[must_use]
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address; the local-use
            // NAT64 prefix (64:ff9b:1::/48, RFC 8215) leads into a private network.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
                return false;
            }
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let v4 = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return is_public(IpAddr::V4(v4));
            }
            if s[0] == 0x2002 {
                let v4 = std::net::Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
                return is_public(IpAddr::V4(v4));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])
                || s[..6] == [0, 0, 0, 0, 0, 0])
        }
    }
}

/// Whether an address is the host's own (loopback): where an operator's endpoint may use plain
/// `http`.
#[must_use]
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn signs_as_the_reference_libraries_do() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(format!("{secret:?}").contains("redacted"));
        let two = [secret.clone(), WebhookSecret::generate()];
        let header = signature_header(&two, "msg_1", 1, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert_eq!(WebhookSecret::parse(&two[1].expose()).unwrap(), two[1]);
    }

    /// The official Rust library verifies what tollgate signs: with several secrets (a
    /// rotation), with the one it knows; a changed body or id does not verify.
    #[test]
    fn the_official_library_verifies_our_signatures() {
        let (old, new) = (WebhookSecret::generate(), WebhookSecret::generate());
        let now = crate::store::unix_now();
        let body = br#"{"type":"quota.exhausted"}"#;
        let headers = |id: &str, body: &[u8]| {
            let mut h = http::HeaderMap::new();
            h.insert("webhook-id", id.parse().unwrap());
            h.insert("webhook-timestamp", now.to_string().parse().unwrap());
            h.insert(
                "webhook-signature",
                signature_header(&[new.clone(), old.clone()], id, now, body).parse().unwrap(),
            );
            h
        };
        for secret in [&old, &new] {
            let hook = standardwebhooks::Webhook::new(&secret.expose()).unwrap();
            hook.verify(body, &headers("alert_1", body)).unwrap();
            assert!(hook.verify(b"{}", &headers("alert_1", body)).is_err(), "another body");
            let mut other = headers("alert_1", body);
            other.insert("webhook-id", "alert_2".parse().unwrap());
            assert!(hook.verify(body, &other).is_err(), "another id");
        }
    }

    #[test]
    fn bad_secrets_are_refused() {
        for bad in ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_***", "whsec_c2hvcnQ=", "whsec_"] {
            assert!(WebhookSecret::parse(bad).is_err(), "{bad}");
        }
        assert!(WebhookSecret::parse_list("  ").is_err());
        assert_eq!(
            WebhookSecret::parse_list(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw  whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n"
            )
            .unwrap()
            .len(),
            2
        );
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::8.8.8.8",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()) && !is_loopback("10.0.0.1".parse().unwrap()));
    }
}
