//! What a caller may do at its tenant's own routes: its key's scopes
//! ([`KeyScopes`](crate::store::KeyScopes)), read from the file (a declared tenant's
//! `key_scopes`) or the directory (each key's own), or the scopes of the identity an
//! authentication layer verified. Reading a setting needs `usage:read` or the scope that
//! writes it; writing it needs that scope.

use crate::{
    base::{KeyHash, KeyScope, KeyScopes, TenantId},
    config::Config,
    store::{DirectoryStore, StoreError},
    tenant::{Caller, Who},
};

/// Why a caller may not do what it asked: nothing was read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScopeError {
    /// The key (or identity) lacks the scope.
    #[error("this {who} lacks the scope `{scope}`, which {what} needs (its scopes: {has}){hint}")]
    Missing {
        /// The scope it lacks.
        scope: KeyScope,
        /// What it was asked (`"reading the recharge"`, `"changing the spend cap"`).
        what: String,
        /// `"API key k_…"`, `"identity"`, or a caller with neither.
        who: String,
        /// The scopes it has.
        has: KeyScopes,
        /// Who gives scopes, for the reader.
        hint: &'static str,
    },
    /// The key is not one of the tenant's live keys (revoked or expired since it was served,
    /// another tenant's), or the identity is another tenant's.
    #[error("this {0} is not one of the tenant's live keys or identities (revoked, expired, or another tenant's)")]
    NotLive(&'static str),
    /// The store did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a route asks of a caller: to read (`usage:read`, or the scope that writes it) or to
/// write (the scope itself) `thing` (`"the recharge"`), named in the refusal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need {
    pub(crate) scope: KeyScope,
    pub(crate) write: bool,
    pub(crate) thing: &'static str,
}

impl Need {
    fn what(self) -> String {
        format!("{} {}", if self.write { "changing" } else { "reading" }, self.thing)
    }

    fn met_by(self, scopes: KeyScopes) -> bool {
        scopes.allows(self.scope) || (!self.write && scopes.allows(KeyScope::UsageRead))
    }
}

/// The tenant's live keys with their scopes at `now` (Unix seconds): those the file declares
/// for it (with its `key_scopes`), then those of the directory (as its listing reads them).
///
/// # Errors
/// The directory failed.
pub(crate) async fn keys_of(
    directory: &dyn DirectoryStore,
    config: &Config,
    tenant: &TenantId,
    now: i64,
) -> Result<Box<[(KeyHash, KeyScopes)]>, StoreError> {
    let mut keys: Vec<(KeyHash, KeyScopes)> = file_keys(config, tenant).collect();
    keys.extend(directory.list_keys(tenant).await?.into_iter().filter(|k| k.is_live(now)).map(|k| (k.hash, k.scopes)));
    Ok(keys.into_boxed_slice())
}

/// The keys the file declares for `tenant`, with its `key_scopes`.
fn file_keys<'a>(config: &'a Config, tenant: &TenantId) -> impl Iterator<Item = (KeyHash, KeyScopes)> + 'a {
    let spec = config.tenants().iter().find(|t| t.id() == tenant);
    spec.into_iter().flat_map(|spec| spec.key_hashes().iter().map(|h| (*h, spec.key_scopes())))
}

/// Whether `caller`, calling `tenant`'s own route, meets `need` among the tenant's `keys`
/// ([`keys_of`], or the caller's own key as read): who it is as a setting records it
/// (`"key:k_…"`, `"tenant"`), or why not. A key listed twice (in the file and the directory)
/// has what both allow.
///
/// # Errors
/// [`ScopeError::Missing`], [`ScopeError::NotLive`].
pub(crate) fn check_among(
    keys: &[(KeyHash, KeyScopes)],
    tenant: &TenantId,
    caller: &Caller,
    need: Need,
) -> Result<String, ScopeError> {
    let (scopes, who, by, hint) = match &caller.0 {
        Who::Key(hash) => {
            let scopes = keys
                .iter()
                .filter(|(h, _)| h == hash)
                .map(|(_, s)| *s)
                .reduce(KeyScopes::intersection)
                .ok_or(ScopeError::NotLive("API key"))?;
            let by = format!("key:{}", hash.id());
            (scopes, format!("API key {}", hash.id()), by, "; the operator gives it (tollgate keys scopes)")
        }
        Who::Identity(of, scopes) if of == tenant => (
            *scopes,
            "identity".to_owned(),
            "tenant".to_owned(),
            "; the authentication layer gives it (Identity::with_scopes)",
        ),
        Who::Identity(..) => return Err(ScopeError::NotLive("identity")),
        Who::Nobody => (KeyScopes::NONE, "caller without an API key or identity".to_owned(), String::new(), ""),
    };
    if need.met_by(scopes) {
        Ok(by)
    } else {
        Err(ScopeError::Missing { scope: need.scope, what: need.what(), who, has: scopes, hint })
    }
}

/// [`check_among`] the caller's own key as stored now (read by its hash, consistently: a key
/// revoked or narrowed before the call is seen so) and as the file declares it; an identity's
/// scopes need no read.
///
/// # Errors
/// As [`check_among`], or the directory failed.
pub(crate) async fn check(
    directory: &dyn DirectoryStore,
    config: &Config,
    tenant: &TenantId,
    caller: &Caller,
    need: Need,
    now: i64,
) -> Result<String, ScopeError> {
    let mut keys: Vec<(KeyHash, KeyScopes)> = Vec::new();
    if let Who::Key(hash) = &caller.0 {
        keys.extend(file_keys(config, tenant).filter(|(h, _)| h == hash));
        if let Some(k) = directory.key(hash).await?.filter(|k| &k.tenant == tenant && k.is_live(now)) {
            keys.push((k.hash, k.scopes));
        }
    }
    check_among(&keys, tenant, caller, need)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TenantId {
        "acme".into()
    }

    const RECHARGE: Need = Need { scope: KeyScope::RechargeWrite, write: true, thing: "the recharge" };
    const READ_RECHARGE: Need = Need { scope: KeyScope::RechargeWrite, write: false, thing: "the recharge" };

    #[test]
    fn a_key_meets_what_its_scopes_allow_and_nothing_else() {
        let plain = KeyHash::of(b"tg_plain");
        let payer = KeyHash::of(b"tg_payer");
        let keys = [(plain, KeyScopes::DEFAULT), (payer, KeyScopes::NONE.with(KeyScope::RechargeWrite))];
        // The default reads the recharge (usage:read) but does not change it.
        assert_eq!(
            check_among(&keys, &t(), &Caller::api_key(b"tg_plain"), READ_RECHARGE).unwrap(),
            format!("key:{}", plain.id())
        );
        let e = check_among(&keys, &t(), &Caller::api_key(b"tg_plain"), RECHARGE).unwrap_err();
        assert!(e.to_string().contains("lacks the scope `recharge:write`"), "{e}");
        assert!(e.to_string().contains("usage:read,caps:write,alerts:write"), "{e}");
        // The scope that writes reads too.
        assert!(check_among(&keys, &t(), &Caller::api_key(b"tg_payer"), READ_RECHARGE).is_ok());
        assert!(check_among(&keys, &t(), &Caller::api_key(b"tg_payer"), RECHARGE).is_ok());
        // A key not among the live ones, whatever it is.
        assert!(matches!(
            check_among(&keys, &t(), &Caller::api_key(b"tg_other"), READ_RECHARGE),
            Err(ScopeError::NotLive(_))
        ));
        // A key listed twice has what both allow.
        let twice = [(plain, KeyScopes::ALL), (plain, KeyScopes::NONE.with(KeyScope::UsageRead))];
        assert!(check_among(&twice, &t(), &Caller::api_key(b"tg_plain"), READ_RECHARGE).is_ok());
        assert!(check_among(&twice, &t(), &Caller::api_key(b"tg_plain"), RECHARGE).is_err());
        // Another tenant's identity opens nothing, whatever its scopes.
        let theirs = crate::Identity::new("globex").with_scopes(KeyScopes::ALL);
        assert!(matches!(
            check_among(&[], &t(), &Caller::identity(&theirs), READ_RECHARGE),
            Err(ScopeError::NotLive(_))
        ));
        // An identity brings its own; nobody has none.
        let id = crate::Identity::new("acme");
        assert!(check_among(&[], &t(), &Caller::identity(&id), RECHARGE).is_err());
        let id = id.with_scopes(KeyScopes::ALL);
        assert_eq!(check_among(&[], &t(), &Caller::identity(&id), RECHARGE).unwrap(), "tenant");
        assert!(check_among(&[], &t(), &Caller::nobody(), READ_RECHARGE).is_err());
    }
}
