//! Anonymous callers limited per client address: the address of the client (the peer, or
//! through trusted proxies the rightmost untrusted hop of `Forwarded` / `X-Forwarded-For`),
//! grouped (IPv6 by a prefix), and a bounded map of GCRA cells keyed by it.

use std::{
    hash::{BuildHasher, Hasher},
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use governor::{nanos::Nanos, state::StateStore};

use super::GcraCell;
use crate::config::{
    net::{canonical, mask},
    ForwardedHeader, IpRange,
};

/// The most lines of the forwarding header read: the last ones (a proxy appends its entry to
/// the end, as a last line or at the end of the last line).
const MAX_LINES: usize = 8;

/// A client's address, and whether it identifies the client: it came through a trusted proxy,
/// or it is a public address. A private, shared or local peer that is not a trusted proxy (a
/// load balancer, a NAT) presents one address for many clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Client {
    pub(crate) ip: IpAddr,
    pub(crate) identifies: bool,
}

impl Client {
    /// An address a front door gave (`RequestInfo::with_client`): it identifies the client
    /// when it is public.
    pub(crate) fn given(ip: IpAddr) -> Self {
        Self { ip, identifies: is_public(ip) }
    }
}

/// Whether `ip` is a public address: not private (RFC 1918, IPv6 unique local), shared
/// (carrier-grade NAT, RFC 6598; DS-Lite's 192.0.0.0/24), loopback, link-local, "this
/// network" (0.0.0.0/8) or reserved (240.0.0.0/4). (Documentation ranges count as public.)
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            let c = v4.octets()[2];
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_broadcast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback() || v6.is_unspecified() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// [`client_ip`], and whether the address identifies the client ([`Client`]).
pub(crate) fn client<'a>(
    peer: Option<IpAddr>,
    trusted: &[IpRange],
    header: ForwardedHeader,
    lines: impl Iterator<Item = &'a [u8]>,
) -> Option<Client> {
    let through_proxy = peer.is_some_and(|p| trusted.iter().any(|r| r.contains(canonical(p))));
    let ip = client_ip(peer, trusted, header, lines)?;
    let hop_is_proxy = through_proxy && trusted.iter().any(|r| r.contains(ip));
    Some(Client { ip, identifies: (through_proxy && !hop_is_proxy) || is_public(ip) })
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the rightmost
/// address of the forwarding chain (the header the proxies write, every line in order) that
/// is not a trusted proxy. The leftmost entries are whatever the client wrote: they are never
/// believed past the first untrusted hop. An entry that cannot be read stops the walk at the
/// last trusted hop. `None` without a peer. Reads from the right without allocating.
pub(crate) fn client_ip<'a>(
    peer: Option<IpAddr>,
    trusted: &[IpRange],
    header: ForwardedHeader,
    lines: impl Iterator<Item = &'a [u8]>,
) -> Option<IpAddr> {
    let peer = canonical(peer?);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|r| r.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    // The last MAX_LINES lines, in a ring.
    let mut held: [&[u8]; MAX_LINES] = [&[]; MAX_LINES];
    let mut n = 0usize;
    for line in lines {
        held[n % MAX_LINES] = line;
        n += 1;
    }
    let kept = n.min(MAX_LINES);
    let mut client = peer;
    for k in 1..=kept {
        let line = held[(n - k) % MAX_LINES];
        // Element by element from the right: a byte that is not UTF-8 spoils its own element
        // only, never the proxies' entries on its right.
        for element in line.rsplit(|b| *b == b',') {
            let hop = std::str::from_utf8(element).ok().and_then(|element| match header {
                // Some proxies write the client's port too: `ip:port`, `[v6]:port`.
                ForwardedHeader::XForwardedFor => forwarded_node(element.trim()),
                ForwardedHeader::Forwarded => element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, v)| forwarded_node(v.trim())),
            });
            match hop {
                Some(ip) if is_trusted(ip) => client = ip,
                Some(ip) => return Some(ip),
                // Unreadable: what the last trusted hop saw is all that can be believed.
                None => return Some(client),
            }
        }
    }
    Some(client)
}

/// A `Forwarded` node (RFC 7239 §6): `192.0.2.60`, `"[2001:db8::1]:4711"`, `"192.0.2.60:80"`;
/// `unknown` and obfuscated identifiers are not addresses. An `X-Forwarded-For` entry is read
/// alike (some proxies write `ip:port` there too).
fn forwarded_node(value: &str) -> Option<IpAddr> {
    let v = value.trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split_once(']').and_then(|(a, _)| a.parse::<Ipv6Addr>().ok()).map(|a| canonical(IpAddr::V6(a)));
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // `a.b.c.d:port`
    v.rsplit_once(':').and_then(|(a, _)| a.parse::<std::net::Ipv4Addr>().ok()).map(IpAddr::V4)
}

/// Client addresses grouped and keyed: an IPv4 address alone, an IPv6 address by its first
/// `ipv6_prefix` bits, hashed with keys drawn at random (so no one can choose addresses that
/// share a key). 0 is "no address".
#[derive(Debug)]
pub(crate) struct ClientKeys {
    ipv6_prefix: u8,
    hasher: std::collections::hash_map::RandomState,
}

impl ClientKeys {
    pub(crate) fn new(ipv6_prefix: u8) -> Self {
        Self { ipv6_prefix, hasher: std::collections::hash_map::RandomState::new() }
    }

    /// The group of a client address as bytes the same on every node (a version tag, then the
    /// address, an IPv6 one cut to `ipv6_prefix` bits; `[0]`: none), to scope an anonymous
    /// caller's `Idempotency-Key` to its address.
    pub(crate) fn group(&self, ip: Option<IpAddr>) -> Vec<u8> {
        match ip.map(canonical) {
            None => vec![0],
            Some(IpAddr::V4(v4)) => [&[4u8][..], &v4.octets()].concat(),
            Some(IpAddr::V6(v6)) => [&[6u8][..], &mask(u128::from(v6), 128, self.ipv6_prefix).to_be_bytes()].concat(),
        }
    }

    /// The key of a client address (0: none).
    pub(crate) fn key(&self, ip: Option<IpAddr>) -> u64 {
        let Some(ip) = ip else { return 0 };
        let group = match canonical(ip) {
            IpAddr::V4(v4) => (4u8, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (6u8, mask(u128::from(v6), 128, self.ipv6_prefix)),
        };
        let mut h = self.hasher.build_hasher();
        h.write_u8(group.0);
        h.write_u128(group.1);
        // Never 0 (no address), never with the top bit (a fleet lease's cells:
        // `plan::FLEET_TAKEN`).
        (h.finish() >> 1).max(1)
    }
}

/// A bounded map that drops the least recently used first, as the docs say of every map keyed
/// by what clients send: moka's default admission could refuse a new key in favour of
/// often-seen ones (a new address would then find a full bucket on every request).
pub(crate) fn lru<K, V>(capacity: u64) -> moka::sync::CacheBuilder<K, V, moka::sync::Cache<K, V>>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder().max_capacity(capacity).eviction_policy(moka::policy::EvictionPolicy::lru())
}

/// governor's keyed state store over a bounded map of GCRA cells, one per client key. A
/// client whose cell is evicted (the map at its capacity, least recently used first) starts
/// again with a full bucket.
#[derive(Clone)]
pub(crate) struct ClientCells {
    cells: moka::sync::Cache<u64, Arc<GcraCell>>,
}

impl ClientCells {
    pub(crate) fn new(capacity: u64) -> Self {
        Self { cells: lru(capacity).build() }
    }

    /// Gives back `nanos` of a client's bucket (a request refused for another reason after its
    /// rate check).
    pub(crate) fn give_back(&self, key: u64, nanos: u64) {
        if let Some(cell) = self.cells.get(&key) {
            cell.give_back(nanos);
        }
    }

    /// How many clients are held (approximate: the map settles its bounds in the background).
    pub(crate) fn len(&self) -> u64 {
        self.cells.entry_count()
    }

    pub(crate) fn settle(&self) {
        self.cells.run_pending_tasks();
    }
}

impl StateStore for ClientCells {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let cell = self.cells.get_with(*key, || Arc::new(GcraCell::default()));
        cell.measure_and_replace(f)
    }
}

impl std::fmt::Debug for ClientCells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCells").field("clients", &self.cells.entry_count()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[&str]) -> Vec<IpRange> {
        list.iter().map(|r| IpRange::parse(r).unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(peer: &str, trusted: &[&str], header: &[&str]) -> IpAddr {
        let trusted = ranges(trusted);
        let lines = header.iter().map(|h| h.as_bytes());
        client_ip(Some(ip(peer)), &trusted, ForwardedHeader::XForwardedFor, lines).unwrap()
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let proxies = ["10.0.0.0/8"];
        // An untrusted peer: its headers are not read.
        assert_eq!(xff("203.0.113.5", &proxies, &["198.51.100.1"]), ip("203.0.113.5"));
        // A trusted peer: the rightmost untrusted entry, whatever the client wrote before it.
        assert_eq!(xff("10.0.0.1", &proxies, &["6.6.6.6, 198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(xff("10.0.0.1", &proxies, &["6.6.6.6, 198.51.100.1, 10.0.0.2"]), ip("198.51.100.1"));
        // Over several header lines, in order.
        assert_eq!(xff("10.0.0.1", &proxies, &["6.6.6.6", "198.51.100.1, 10.9.9.9"]), ip("198.51.100.1"));
        // Every hop trusted: the leftmost.
        assert_eq!(xff("10.0.0.1", &proxies, &["10.0.0.3, 10.0.0.2"]), ip("10.0.0.3"));
        // No header: the peer.
        assert_eq!(xff("10.0.0.1", &proxies, &[]), ip("10.0.0.1"));
        // Garbage: the last trusted hop's view.
        assert_eq!(xff("10.0.0.1", &proxies, &["1.2.3.4, bogus, 10.0.0.2"]), ip("10.0.0.2"));
        // IPv4-mapped addresses are IPv4.
        assert_eq!(xff("::ffff:10.0.0.1", &proxies, &["198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(client_ip(None, &ranges(&proxies), ForwardedHeader::XForwardedFor, std::iter::empty()), None);
        // More lines than are read: the last ones are read (the client's own lines first).
        let mut many: Vec<&str> = std::iter::repeat_n("6.6.6.6", 9).collect();
        many.push("198.51.100.1");
        assert_eq!(xff("10.0.0.1", &proxies, &many), ip("198.51.100.1"));
    }

    #[test]
    fn the_forwarded_header_is_read_when_configured() {
        let trusted = ranges(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let fwd = ForwardedHeader::Forwarded;
        let forwarded = [&b"for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\";by=10.0.0.9"[..]];
        assert_eq!(client_ip(Some(ip("10.0.0.1")), &trusted, fwd, forwarded.into_iter()), Some(ip("2001:db8::1")));
        let forwarded = [&b"for=\"192.0.2.61:8080\", For=10.1.1.1"[..]];
        assert_eq!(client_ip(Some(ip("10.0.0.1")), &trusted, fwd, forwarded.into_iter()), Some(ip("192.0.2.61")));
        let forwarded = [&b"for=unknown"[..]];
        assert_eq!(client_ip(Some(ip("10.0.0.1")), &trusted, fwd, forwarded.into_iter()), Some(ip("10.0.0.1")));
    }

    #[test]
    fn ipv6_addresses_are_grouped_by_their_prefix() {
        let keys = ClientKeys::new(64);
        let k = |s: &str| keys.key(Some(ip(s)));
        assert_eq!(k("2001:db8::1"), k("2001:db8::ffff:1234"));
        assert_ne!(k("2001:db8::1"), k("2001:db8:0:1::1"));
        assert_ne!(k("192.0.2.1"), k("192.0.2.2"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
        assert_eq!(keys.key(None), 0);
        let each = ClientKeys::new(128);
        assert_ne!(each.key(Some(ip("2001:db8::1"))), each.key(Some(ip("2001:db8::2"))));
    }

    #[test]
    fn ranges_parse_and_match() {
        assert!(IpRange::parse("2001:db8::/32").unwrap().contains(ip("2001:db8:1::1")));
        assert!(!IpRange::parse("2001:db8::/32").unwrap().contains(ip("2001:db9::1")));
        assert!(IpRange::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!IpRange::parse("0.0.0.0/0").unwrap().contains(ip("::1")));
        assert!(IpRange::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!IpRange::parse("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
        for bad in ["", "10.0.0.0/", "10.0.0.0/33", "::/129", "a.b.c.d/8", "10.0.0/8"] {
            assert!(IpRange::parse(bad).is_err(), "{bad}");
        }
    }
}
