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
    #[error("this {who} lacks the scope `{scope}`, which {what} needs (its scopes: {has}); the operator gives it")]
    Missing {
        /// The scope it lacks.
        scope: KeyScope,
        /// What it was asked (`"reading the recharge"`, `"changing the spend cap"`).
        what: &'static str,
        /// `"API key k_…"` or `"identity"`.
        who: String,
        /// The scopes it has.
        has: KeyScopes,
    },
    /// The key is not one of the tenant's live keys (revoked or expired since it was served,
    /// or issued less than a second ago and not yet read).
    #[error(
        "this API key is not one of the tenant's live keys (revoked or expired, or issued within the last second)"
    )]
    NotLive,
    /// The store did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a route asks of a caller: to read (`usage:read`, or the scope that writes it) or to
/// write (the scope itself), described for the refusal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need {
    pub(crate) scope: KeyScope,
    pub(crate) write: bool,
    pub(crate) what: &'static str,
}

impl Need {
    fn met_by(self, scopes: KeyScopes) -> bool {
        scopes.allows(self.scope) || (!self.write && scopes.allows(KeyScope::UsageRead))
    }
}

/// The tenant's live keys with their scopes at `now` (Unix seconds): those the file declares
/// for it (with its `key_scopes`), then those of the directory.
///
/// # Errors
/// The directory failed.
pub(crate) async fn keys_of(
    directory: &dyn DirectoryStore,
    config: &Config,
    tenant: &TenantId,
    now: i64,
) -> Result<Box<[(KeyHash, KeyScopes)]>, StoreError> {
    let mut keys: Vec<(KeyHash, KeyScopes)> = Vec::new();
    if let Some(spec) = config.tenants().iter().find(|t| t.id() == tenant) {
        keys.extend(spec.key_hashes().iter().map(|h| (*h, spec.key_scopes())));
    }
    keys.extend(directory.list_keys(tenant).await?.into_iter().filter(|k| k.is_live(now)).map(|k| (k.hash, k.scopes)));
    Ok(keys.into_boxed_slice())
}

/// Whether `caller`, calling `tenant`'s own route, meets `need` among the tenant's `keys`
/// ([`keys_of`]): who it is as a setting records it (`"key:k_…"`, `"tenant"`), or why not.
///
/// # Errors
/// [`ScopeError::Missing`], [`ScopeError::NotLive`].
pub(crate) fn check_among(keys: &[(KeyHash, KeyScopes)], caller: &Caller, need: Need) -> Result<String, ScopeError> {
    let (scopes, who, by) = match &caller.0 {
        Who::Key(hash) => {
            let scopes = keys.iter().find(|(h, _)| h == hash).map(|(_, s)| *s).ok_or(ScopeError::NotLive)?;
            (scopes, format!("API key {}", hash.id()), format!("key:{}", hash.id()))
        }
        Who::Identity(scopes) => (*scopes, "identity".to_owned(), "tenant".to_owned()),
        Who::Nobody => (KeyScopes::NONE, "caller".to_owned(), String::new()),
    };
    if need.met_by(scopes) {
        Ok(by)
    } else {
        Err(ScopeError::Missing { scope: need.scope, what: need.what, who, has: scopes })
    }
}

/// [`check_among`] the tenant's keys as read now (an identity's scopes need no read).
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
    let keys = match caller.0 {
        Who::Key(_) => keys_of(directory, config, tenant, now).await?,
        Who::Identity(_) | Who::Nobody => Box::default(),
    };
    check_among(&keys, caller, need)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECHARGE: Need = Need { scope: KeyScope::RechargeWrite, write: true, what: "changing the recharge" };
    const READ_RECHARGE: Need = Need { scope: KeyScope::RechargeWrite, write: false, what: "reading the recharge" };

    #[test]
    fn a_key_meets_what_its_scopes_allow_and_nothing_else() {
        let plain = KeyHash::of(b"tg_plain");
        let payer = KeyHash::of(b"tg_payer");
        let keys = [(plain, KeyScopes::DEFAULT), (payer, KeyScopes::NONE.with(KeyScope::RechargeWrite))];
        // The default reads the recharge (usage:read) but does not change it.
        assert_eq!(
            check_among(&keys, &Caller::api_key(b"tg_plain"), READ_RECHARGE).unwrap(),
            format!("key:{}", plain.id())
        );
        let e = check_among(&keys, &Caller::api_key(b"tg_plain"), RECHARGE).unwrap_err();
        assert!(e.to_string().contains("lacks the scope `recharge:write`"), "{e}");
        assert!(e.to_string().contains("usage:read,caps:write,alerts:write"), "{e}");
        // The scope that writes reads too.
        assert!(check_among(&keys, &Caller::api_key(b"tg_payer"), READ_RECHARGE).is_ok());
        assert!(check_among(&keys, &Caller::api_key(b"tg_payer"), RECHARGE).is_ok());
        // A key not among the live ones, whatever it is.
        assert!(matches!(check_among(&keys, &Caller::api_key(b"tg_other"), READ_RECHARGE), Err(ScopeError::NotLive)));
        // An identity brings its own; nobody has none.
        let id = crate::Identity::new("acme");
        assert!(check_among(&[], &Caller::identity(&id), RECHARGE).is_err());
        let id = id.with_scopes(KeyScopes::ALL);
        assert_eq!(check_among(&[], &Caller::identity(&id), RECHARGE).unwrap(), "tenant");
        assert!(check_among(&[], &Caller::nobody(), READ_RECHARGE).is_err());
    }
}
