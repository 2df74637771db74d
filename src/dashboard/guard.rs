//! What a dashboard keeps on its node to guard its door, each bounded: the failed tries of its
//! token per client address ([`Tries`]), and the sessions signed out before their end
//! ([`SignedOut`]). [`Client`] is what a front door tells of the connection.

use std::net::IpAddr;
use std::sync::Mutex;

/// What the door knows of the connection a request came on, put in the request's extensions
/// (`http::Request::extensions_mut`) before [`Dashboard::respond`](super::Dashboard::respond):
/// the client's address (failed tries of the token are limited per address) and whether the
/// connection is TLS (the session cookie is then `Secure`, under the `__Host-` prefix).
///
/// `tollgate_axum::dashboard` fills it from axum's `ConnectInfo<SocketAddr>` when the
/// application serves with `into_make_service_with_connect_info`, and `tollgate_actix::dashboard`
/// from the peer's address and the connection's scheme; an application behind a proxy it
/// trusts may insert one itself, with the address the proxy says, before the dashboard's
/// router (a `Client` already there is kept). Without one, every client is one address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Client {
    /// The client's address, if known.
    pub address: Option<IpAddr>,
    /// Whether the client reached the server over TLS (or a proxy said so).
    pub tls: bool,
}

impl Client {
    /// A client at `address`, over TLS or not.
    #[must_use]
    pub fn new(address: Option<IpAddr>, tls: bool) -> Self {
        Self { address, tls }
    }
}

/// The failed tries of the token a client address may make per [`TRY_WINDOW_SECS`]; past them
/// it is answered 429 until the window ends, its token not even compared.
pub const MAX_FAILED_TRIES: u32 = 10;

/// The window [`MAX_FAILED_TRIES`] counts in, in seconds.
pub const TRY_WINDOW_SECS: i64 = 60;

/// How many counters of failed tries a dashboard keeps (about 64 KiB): addresses are hashed
/// into them under a key drawn at start, so that two addresses rarely share one and nobody can
/// choose to share another's. IPv6 addresses count by their /64, which one client holds whole.
const TRY_SLOTS: usize = 4096;

/// Failed tries of the token per client address, in a fixed table.
#[derive(Debug)]
pub(crate) struct Tries {
    key: [u8; 32],
    /// Per slot: the window's start (Unix seconds) and the failures in it.
    slots: Mutex<Vec<(i64, u32)>>,
}

impl Tries {
    pub(crate) fn new() -> Self {
        let mut key = [0u8; 32];
        for chunk in key.chunks_mut(8) {
            chunk.copy_from_slice(&crate::base::draw_u64().to_le_bytes());
        }
        Self { key, slots: Mutex::new(vec![(0, 0); TRY_SLOTS]) }
    }

    fn slot(&self, address: Option<IpAddr>) -> usize {
        let bytes: Vec<u8> = match address {
            None => Vec::new(),
            Some(IpAddr::V4(v4)) => v4.octets().to_vec(),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.octets().to_vec(),
                None => v6.octets()[..8].to_vec(),
            },
        };
        let mac = crate::base::hmac_sha256(&self.key, &[b"tries ", &bytes]);
        let n = u64::from_le_bytes(mac[..8].try_into().unwrap_or_default());
        usize::try_from(n % TRY_SLOTS as u64).unwrap_or(0)
    }

    /// The seconds until `address` may try again, if it has used up its tries at `now`.
    pub(crate) fn barred(&self, address: Option<IpAddr>, now: i64) -> Option<i64> {
        let slot = self.slot(address);
        let slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, failed) = slots[slot];
        let ends = start.saturating_add(TRY_WINDOW_SECS);
        (failed >= MAX_FAILED_TRIES && now < ends).then(|| ends - now)
    }

    /// Counts a failed try of `address` at `now`.
    pub(crate) fn failed(&self, address: Option<IpAddr>, now: i64) {
        let slot = self.slot(address);
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, failed) = &mut slots[slot];
        if now >= start.saturating_add(TRY_WINDOW_SECS) || now < *start {
            (*start, *failed) = (now, 0);
        }
        *failed = failed.saturating_add(1);
    }
}

/// The most sessions a node remembers as signed out. Past it, every session the node's
/// dashboard issued until then ends on the node, as a new token would end them: a sign-out is
/// never forgotten while its session could still be shown.
pub const MAX_SIGNED_OUT: usize = 1024;

/// Sessions signed out before their end, on this node.
#[derive(Debug, Default)]
pub(crate) struct SignedOut {
    inner: Mutex<Ended>,
}

#[derive(Debug, Default)]
struct Ended {
    /// The cookie's value and when its session would have ended.
    cookies: std::collections::HashMap<String, i64>,
    /// Sessions issued before this time (Unix seconds) are over, however they were shown.
    before: i64,
    /// The digest of the token in force when last seen.
    token: Option<[u8; 32]>,
}

impl SignedOut {
    /// Whether the session of `cookie` was signed out (or ended with every session before it).
    pub(crate) fn ended(&self, cookie: &str) -> bool {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let issued = cookie.split_once('.').and_then(|(t, _)| t.parse::<i64>().ok()).unwrap_or(i64::MIN);
        issued < inner.before || inner.cookies.contains_key(cookie)
    }

    /// The token in force at `now` has the digest `print`: when it differs from the one seen
    /// last, every session issued before `now` ends (a token rotated away and back does not
    /// bring back its sessions, signed out or not).
    pub(crate) fn token_in_force(&self, print: [u8; 32], now: i64) {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match inner.token {
            Some(seen) if seen == print => {}
            Some(_) => {
                inner.token = Some(print);
                inner.before = inner.before.max(now);
                inner.cookies.clear();
            }
            None => inner.token = Some(print),
        }
    }

    /// Ends the session of `cookie` (a session in force, checked by the caller) at `now`.
    pub(crate) fn end(&self, cookie: &str, now: i64) {
        let Some(ends) = super::access::session_ends(cookie) else { return };
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.cookies.retain(|_, ends| *ends > now);
        if inner.cookies.len() >= MAX_SIGNED_OUT {
            // Full of sessions still in force: end every session issued so far instead. The
            // cookie's own second is included, and a later login gets a later second.
            inner.cookies.clear();
            inner.before = now.saturating_add(1);
            return;
        }
        inner.cookies.insert(cookie.to_owned(), ends);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_are_counted_per_address_and_their_window_ends() {
        let tries = Tries::new();
        let (a, b): (IpAddr, IpAddr) = ("203.0.113.7".parse().unwrap(), "198.51.100.1".parse().unwrap());
        let at = 1_800_000_000;
        for _ in 0..MAX_FAILED_TRIES {
            assert_eq!(tries.barred(Some(a), at), None);
            tries.failed(Some(a), at);
        }
        assert_eq!(tries.barred(Some(a), at + 1), Some(TRY_WINDOW_SECS - 1));
        assert_eq!(tries.barred(Some(a), at + TRY_WINDOW_SECS), None, "the window ends");
        if tries.slot(Some(a)) != tries.slot(Some(b)) {
            assert_eq!(tries.barred(Some(b), at + 1), None, "another address");
        }
        let (v6, same64): (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::ffff:1".parse().unwrap());
        assert_eq!(tries.slot(Some(v6)), tries.slot(Some(same64)), "one /64 is one client");
    }

    #[test]
    fn sign_outs_are_bounded_and_never_forgotten_early() {
        let out = SignedOut::default();
        let at = 1_800_000_000;
        let cookie = |t: i64| format!("{t}.00");
        out.end(&cookie(at), at);
        assert!(out.ended(&cookie(at)) && !out.ended(&cookie(at + 1)));
        for i in 1..i64::try_from(MAX_SIGNED_OUT).unwrap() {
            out.end(&cookie(at + i), at + i);
        }
        let now = at + i64::try_from(MAX_SIGNED_OUT).unwrap();
        out.end(&cookie(now), now);
        assert!(out.inner.lock().unwrap().cookies.len() <= MAX_SIGNED_OUT);
        assert!((0..=i64::try_from(MAX_SIGNED_OUT).unwrap()).all(|i| out.ended(&cookie(at + i))), "none forgotten");
        assert!(!out.ended(&cookie(now + 1)), "a later login holds");
    }
}
