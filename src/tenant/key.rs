use std::{
    fmt,
    hash::Hasher,
    sync::atomic::{AtomicU64, Ordering},
};

use sha2::{Digest, Sha256};
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::config::TenantId;

/// The SHA-256 digest of an API key: the directory stores these, never the keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes an API key.
    pub fn of(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// A digest from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// Reads a digest written as 64 hexadecimal digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex.trim(), &mut out).ok()?;
        Some(Self(out))
    }

    /// The key's short id: `k_` and the first 12 hexadecimal digits of the digest. It names a
    /// key in listings and revocations without revealing anything usable.
    pub fn id(&self) -> String {
        format!("k_{}", &self.to_hex()[..12])
    }

    /// The digest as 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..12])
    }
}

/// The longest API key accepted, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 256;

/// Why an API key with a comma is refused (in a configuration, an import, or a request, where
/// it is answered as a repeated header).
pub(crate) const COMMA_IN_KEY: &str =
    "the API key has a comma (proxies join a repeated header's values with commas, so it could not be told apart)";

/// Checks the syntax of an API key: 1 to 256 visible ASCII characters other than the comma.
pub(crate) fn check_api_key(key: &[u8]) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("the API key is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("the API key is longer than 256 characters");
    }
    // A fold rather than `all`: no early exit, so the loop vectorizes. No comma: API
    // Gateway's HTTP APIs, function URLs and other proxies join a repeated header's values
    // with commas, so a key with one is read as a repeated header.
    if !key.iter().fold(true, |ok, &b| ok & (b.wrapping_sub(0x21) < 0x5e) & (b != b',')) {
        return Err(if key.contains(&b',') {
            COMMA_IN_KEY
        } else {
            "the API key has characters other than visible ASCII"
        });
    }
    Ok(())
}

/// What a request says about its tenant, as a [`TenantResolver`](crate::TenantResolver) finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credential<'a> {
    /// An API key, to be looked up in the tenant directory.
    ApiKey(&'a [u8]),
    /// A tenant identity already verified by an earlier layer (for example a JWT claim).
    Tenant(&'a str),
    /// Nothing identifies the tenant.
    Missing,
    /// Something was there but cannot be read; the reason is sent back in the 400 response.
    Malformed(&'static str),
}

/// A verified tenant identity put in the request extensions by an authentication layer, for
/// `identify.source = "extension"`.
///
/// ```
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(tollgate::Identity::new("acme"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    tenant: TenantId,
}

impl Identity {
    /// The identity of `tenant`.
    pub fn new(tenant: impl Into<TenantId>) -> Self {
        Self { tenant: tenant.into() }
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
}

/// A 128-bit keyed digest of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Fingerprint {
    pub(crate) lo: u64,
    pub(crate) hi: u64,
}

/// Computes fingerprints with SipHash-1-3 keyed by secrets drawn at start-up, so nobody outside
/// the process can craft colliding inputs. Drawn anew after a SnapStart restore
/// ([`reseed`](Self::reseed)), so that copies of one snapshot do not share them.
pub(crate) struct Fingerprinter {
    k0: AtomicU64,
    k1: AtomicU64,
}

/// A random `u64` from the operating system. Not `RandomState`: its keys live in a
/// thread-local drawn once and then counted up, so copies of one SnapStart snapshot (or of a
/// forked process) would draw the same values after the copy.
pub(crate) fn draw_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_ok() {
        return u64::from_ne_bytes(bytes);
    }
    // No OS randomness (never seen on the platforms Lambda runs): mix the time in.
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    std::collections::hash_map::RandomState::new().hash_one((now.as_nanos(), std::process::id()))
}

pub(crate) const TAG_API_KEY: u8 = 1;
pub(crate) const TAG_TENANT: u8 = 2;

impl Fingerprinter {
    pub(crate) fn random() -> Self {
        Self { k0: AtomicU64::new(draw_u64()), k1: AtomicU64::new(draw_u64()) }
    }

    /// Draws new secrets: every fingerprint computed before no longer matches.
    pub(crate) fn reseed(&self) {
        self.k0.store(draw_u64(), Ordering::Relaxed);
        self.k1.store(draw_u64(), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn of(&self, tag: u8, bytes: &[u8]) -> Fingerprint {
        let mut h = SipHasher13::new_with_keys(self.k0.load(Ordering::Relaxed), self.k1.load(Ordering::Relaxed));
        h.write_u8(tag);
        h.write(bytes);
        let h = h.finish128();
        Fingerprint { lo: h.h1, hi: h.h2 }
    }
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(..)")
    }
}

#[cfg(test)]
mod tests {
    /// Ids are drawn from the operating system, not from state a copy of the process shares:
    /// after a fork (which copies memory as a SnapStart restore does), parent and child draw
    /// different values. `RandomState`, seeded once per thread and then counted up, draws the
    /// same in both (checked too, so that the test tells the two sources apart).
    #[test]
    #[allow(unsafe_code)]
    fn copies_of_a_process_draw_different_ids() {
        use std::hash::BuildHasher;
        let _ = super::draw_u64();
        let _ = std::collections::hash_map::RandomState::new();
        let mut fds = [0i32; 2];
        // SAFETY: a pipe, and a fork whose child only draws, writes and exits at once.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let values = [super::draw_u64(), std::collections::hash_map::RandomState::new().hash_one(7u64)];
                let bytes: [u8; 16] = std::mem::transmute(values);
                libc::write(fds[1], bytes.as_ptr().cast(), 16);
                libc::_exit(0);
            }
            let mut bytes = [0u8; 16];
            assert_eq!(libc::read(fds[0], bytes.as_mut_ptr().cast(), 16), 16);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            let child: [u64; 2] = std::mem::transmute(bytes);
            let parent = [super::draw_u64(), std::collections::hash_map::RandomState::new().hash_one(7u64)];
            assert_ne!(child[0], parent[0], "drawn from the OS: each copy its own");
            assert_eq!(child[1], parent[1], "RandomState: the copies agree");
        }
    }
}
