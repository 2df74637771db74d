use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use siphasher::sip128::SipHasher13;

use crate::base::{draw_u64, KeyHash, KeyScopes, TenantId};

/// What a request says about its tenant, as a [`TenantResolver`](crate::TenantResolver) finds it.
///
/// Its `Debug` never prints an API key, only its length.
#[derive(Clone, Copy, PartialEq, Eq)]
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

impl fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::ApiKey(key) => write!(f, "ApiKey(<{} bytes, not shown>)", key.len()),
            Credential::Tenant(id) => f.debug_tuple("Tenant").field(id).finish(),
            Credential::Missing => f.write_str("Missing"),
            Credential::Malformed(reason) => f.debug_tuple("Malformed").field(reason).finish(),
        }
    }
}

/// A verified tenant identity put in the request extensions by an authentication layer, for
/// `identify.source = "extension"`.
///
/// ```
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(tollgate::Identity::new("acme"));
/// ```
///
/// The layer that verified it says what the caller may do at the tenant's own routes, as a
/// key's scopes do: [`KeyScopes::DEFAULT`] unless given others.
///
/// ```
/// use tollgate::store::{KeyScope, KeyScopes};
/// let admin = tollgate::Identity::new("acme").with_scopes(KeyScopes::ALL);
/// assert!(admin.scopes().allows(KeyScope::RechargeWrite));
/// assert!(!tollgate::Identity::new("acme").scopes().allows(KeyScope::RechargeWrite));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    tenant: TenantId,
    scopes: KeyScopes,
}

impl Identity {
    /// The identity of `tenant`, with the default scopes.
    pub fn new(tenant: impl Into<TenantId>) -> Self {
        Self { tenant: tenant.into(), scopes: KeyScopes::DEFAULT }
    }

    /// The same, allowed `scopes` at the tenant's own routes.
    #[must_use]
    pub fn with_scopes(mut self, scopes: KeyScopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// The tenant.
    #[must_use]
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// What it may do at the tenant's own routes.
    #[must_use]
    pub fn scopes(&self) -> KeyScopes {
        self.scopes
    }
}

/// Who calls one of a tenant's own routes (its spend cap, recharge, alert endpoint, usage):
/// the API key the request carries, known by its hash, or the [`Identity`] an authentication
/// layer put in it, with its scopes. What it may do there is its key's scopes
/// ([`KeyScopes`]). Made from the request by
/// [`Tollgate::caller`](crate::Tollgate::caller), as the layer identifies it; its `Debug`
/// shows a key's id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller(pub(crate) Who);

/// [`Caller`]'s parts.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Who {
    /// An API key, by its hash.
    Key(KeyHash),
    /// An identity of this tenant, with its scopes.
    Identity(TenantId, KeyScopes),
    /// Nothing identifies it (a request served as the anonymous tenant): no scope.
    Nobody,
}

impl Caller {
    /// A caller with this API key.
    #[must_use]
    pub fn api_key(key: &[u8]) -> Self {
        Self(Who::Key(KeyHash::of(key)))
    }

    /// A caller with this verified identity: its scopes are what it may do at its own
    /// tenant's routes (another tenant's open nothing to it).
    #[must_use]
    pub fn identity(identity: &Identity) -> Self {
        Self(Who::Identity(identity.tenant.clone(), identity.scopes))
    }

    /// A caller nothing identifies: it may do nothing at a tenant's own routes.
    #[must_use]
    pub fn nobody() -> Self {
        Self(Who::Nobody)
    }

    /// Whether it calls with an API key.
    pub(crate) fn is_key(&self) -> bool {
        matches!(self.0, Who::Key(_))
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Who::Key(hash) => write!(f, "Caller::Key({})", hash.id()),
            Who::Identity(tenant, scopes) => write!(f, "Caller::Identity({tenant}, {scopes})"),
            Who::Nobody => f.write_str("Caller::Nobody"),
        }
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
///
/// Each kind of credential (`TAG_*`) has secrets of its own, drawn apart: an API key and a
/// tenant id of the same bytes never share a fingerprint, and the bytes are hashed in one pass
/// from their first byte (a tag byte written first would misalign every word of them).
pub(crate) struct Fingerprinter {
    /// The two secrets of each kind, by tag (index 0 unused).
    keys: [[AtomicU64; 2]; 3],
}

pub(crate) const TAG_API_KEY: u8 = 1;
pub(crate) const TAG_TENANT: u8 = 2;

impl Fingerprinter {
    pub(crate) fn random() -> Self {
        let this = Self { keys: Default::default() };
        this.reseed();
        this
    }

    /// Draws new secrets: every fingerprint computed before no longer matches.
    pub(crate) fn reseed(&self) {
        for pair in &self.keys {
            for k in pair {
                k.store(draw_u64(), Ordering::Relaxed);
            }
        }
    }

    #[inline]
    pub(crate) fn of(&self, tag: u8, bytes: &[u8]) -> Fingerprint {
        let [k0, k1] = &self.keys[usize::from(tag)];
        let h = SipHasher13::new_with_keys(k0.load(Ordering::Relaxed), k1.load(Ordering::Relaxed)).hash(bytes);
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
        let _ = crate::base::draw_u64();
        let _ = std::collections::hash_map::RandomState::new();
        let mut fds = [0i32; 2];
        // SAFETY: a pipe, and a fork whose child only draws, writes and exits at once.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let values = [crate::base::draw_u64(), std::collections::hash_map::RandomState::new().hash_one(7u64)];
                let bytes: [u8; 16] = std::mem::transmute(values);
                libc::write(fds[1], bytes.as_ptr().cast(), 16);
                libc::_exit(0);
            }
            let mut bytes = [0u8; 16];
            assert_eq!(libc::read(fds[0], bytes.as_mut_ptr().cast(), 16), 16);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            let child: [u64; 2] = std::mem::transmute(bytes);
            let parent = [crate::base::draw_u64(), std::collections::hash_map::RandomState::new().hash_one(7u64)];
            assert_ne!(child[0], parent[0], "drawn from the OS: each copy its own");
            assert_eq!(child[1], parent[1], "RandomState: the copies agree");
        }
    }
}
