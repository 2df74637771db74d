//! API keys: issued, rotated, listed and revoked.

use crate::store::{unix_now, ApiKeyRecord, KeyWrite, StoreError};
use crate::store::{KeyHash, KeyScopes, Setting};

use super::{Admin, AdminError};

/// How many characters of a key are kept to recognise it by (`tg_live_ab12`).
pub(super) const PREFIX_CHARS: usize = 12;

/// How a key is issued.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct KeyOptions {
    /// From when it no longer works (Unix seconds), if ever.
    pub expires_at: Option<i64>,
    /// `tg_test_` keys instead of `tg_live_` ones (the same otherwise: a name for people).
    pub test: bool,
    /// What it may do at its tenant's own routes: [`KeyScopes::DEFAULT`] unless given others
    /// (`recharge:write`, which charges a card, only by name).
    pub scopes: Option<KeyScopes>,
}

impl KeyOptions {
    /// A `tg_test_` key if `test`.
    #[must_use]
    pub fn test(mut self, test: bool) -> Self {
        self.test = test;
        self
    }

    /// Expiring at `at` (Unix seconds).
    #[must_use]
    pub fn expiring(mut self, at: i64) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// With these scopes.
    #[must_use]
    pub fn scopes(mut self, scopes: KeyScopes) -> Self {
        self.scopes = Some(scopes);
        self
    }
}

/// A key just issued: the only time the key itself is seen.
#[derive(Clone)]
#[non_exhaustive]
pub struct IssuedKey {
    /// The key, to hand to the customer. Not stored anywhere.
    pub key: String,
    /// What the directory keeps of it.
    pub record: ApiKeyRecord,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey").field("key", &"…").field("record", &self.record).finish()
    }
}

/// A new key: `tg_live_` (or `tg_test_`), 26 random base-62 characters (154 bits) and 6 of
/// their check (`base::key::key_check`: a key shaped so is told from random bytes before the
/// directory is asked, and goes first when lookups queue).
fn new_key(test: bool) -> Result<String, AdminError> {
    const ALPHABET: &[u8] = crate::base::KEY_ALPHABET;
    const RANDOM: usize = crate::base::ISSUED_KEY_LEN - 8 - 6;
    let mut key = String::from(if test { "tg_test_" } else { "tg_live_" });
    let mut n = 0;
    while n < RANDOM {
        let mut bytes = [0u8; 64];
        getrandom::fill(&mut bytes)
            .map_err(|e| AdminError::Invalid(format!("the system's random source failed: {e}")))?;
        // Rejection sampling: 248 = 4 × 62, so every character is equally likely.
        for b in bytes.into_iter().filter(|b| *b < 248) {
            if n == RANDOM {
                break;
            }
            key.push(char::from(ALPHABET[usize::from(b % 62)]));
            n += 1;
        }
    }
    let check = crate::base::key_check(key.as_bytes());
    key.extend(check.iter().map(|b| char::from(*b)));
    Ok(key)
}

impl Admin {
    /// Issues a new key for a tenant: returned once, stored as its hash with its id, its first
    /// characters, its expiry and its scopes.
    ///
    /// # Errors
    /// No such tenant, or the store failed.
    pub async fn issue_key(&self, tenant: &str, options: KeyOptions) -> Result<IssuedKey, AdminError> {
        let record = self.existing(tenant).await?;
        let key = new_key(options.test)?;
        let stored = ApiKeyRecord::new(KeyHash::of(key.as_bytes()), record.id, unix_now())
            .with_prefix(&key[..PREFIX_CHARS])
            .with_expiry(options.expires_at)
            .with_scopes(options.scopes.unwrap_or_default());
        self.directory.put_key(&stored, KeyWrite::Upsert).await?;
        self.record(&stored.tenant, Setting::Key, None, Some(key_text(&stored))).await;
        Ok(IssuedKey { key, record: stored })
    }

    /// Sets what a key may do at its tenant's own routes: its scopes, replaced whole. The
    /// cap, recharge and alert routes read them at each call; the usage route within a second
    /// (on DynamoDB, its key index's lag too). A key the file declares too keeps no more than
    /// the file's `key_scopes` allow. A key revoked meanwhile stays revoked.
    ///
    /// # Errors
    /// No such tenant or key (or revoked meanwhile), the store failed, or it did not keep the
    /// scopes (a directory store of your own that does not store them).
    pub async fn set_key_scopes(&self, tenant: &str, id: &str, scopes: KeyScopes) -> Result<ApiKeyRecord, AdminError> {
        let before = self.key(tenant, id).await?;
        let key = before.clone().with_scopes(scopes);
        self.update_key(tenant, id, &key).await?;
        match self.directory.key(&key.hash).await? {
            Some(stored) if stored.scopes == scopes => {
                self.record(&stored.tenant, Setting::Key, Some(key_text(&before)), Some(key_text(&stored))).await;
                Ok(stored)
            }
            Some(_) => Err(AdminError::Invalid(format!(
                "the directory store did not keep the scopes of key {id} (or they were changed meanwhile): \
                 a store must keep `ApiKeyRecord::scopes`"
            ))),
            None => Err(AdminError::UnknownKey { tenant: tenant.to_owned(), id: id.to_owned() }),
        }
    }

    /// Writes a change of a key its tenant still holds: a key revoked meanwhile is not written
    /// back (no such key).
    async fn update_key(&self, tenant: &str, id: &str, key: &ApiKeyRecord) -> Result<(), AdminError> {
        match self.directory.put_key(key, KeyWrite::Existing).await {
            Err(StoreError::Conflict(_)) => {
                Err(AdminError::UnknownKey { tenant: tenant.to_owned(), id: id.to_owned() })
            }
            other => Ok(other?),
        }
    }

    /// Rotates a key: issues a new one with the same scopes, and keeps the old one working
    /// until `grace_until` (Unix seconds) so clients can move over.
    ///
    /// # Errors
    /// No such tenant or key, or the store failed.
    pub async fn rotate_key(&self, tenant: &str, id: &str, grace_until: i64) -> Result<IssuedKey, AdminError> {
        let old = self.key(tenant, id).await?;
        let issued = self.issue_key(tenant, KeyOptions::default().scopes(old.scopes)).await?;
        let until = old.expires_at.map_or(grace_until, |at| at.min(grace_until));
        let tenant = old.tenant.clone();
        let before = key_text(&old);
        let ending = old.with_expiry(Some(until));
        self.update_key(tenant.as_str(), id, &ending).await?;
        self.changed(&tenant).await;
        self.record(&tenant, Setting::Key, Some(before), Some(key_text(&ending))).await;
        Ok(issued)
    }

    /// The keys of a tenant (expired ones included), in id order.
    ///
    /// # Errors
    /// No such tenant, or the store failed.
    pub async fn keys(&self, tenant: &str) -> Result<Vec<ApiKeyRecord>, AdminError> {
        let record = self.existing(tenant).await?;
        Ok(self.directory.list_keys(&record.id).await?)
    }

    /// The key `id` of `tenant` as stored now: found by its id in the listing, then read by
    /// its hash (consistently: a listing may read an index that lags, and a key revoked just
    /// before must not be written back by a change of its expiry or scopes).
    async fn key(&self, tenant: &str, id: &str) -> Result<ApiKeyRecord, AdminError> {
        let unknown = || AdminError::UnknownKey { tenant: tenant.to_owned(), id: id.to_owned() };
        let listed = self.keys(tenant).await?.into_iter().find(|k| k.id == id).ok_or_else(unknown)?;
        match self.directory.key(&listed.hash).await? {
            Some(k) if k.tenant == listed.tenant => Ok(k),
            _ => Err(unknown()),
        }
    }

    /// Revokes a key at once. Running nodes stop taking it within a second (they read its
    /// tenant again when they follow the directory's feed of tenants changed; within
    /// `limits.directory_ttl` if the feed could not be told), at once on a node that is told
    /// through [`Tollgate::invalidate_key`](crate::Tollgate::invalidate_key).
    ///
    /// # Errors
    /// No such tenant or key, or the store failed.
    pub async fn revoke_key(&self, tenant: &str, id: &str) -> Result<ApiKeyRecord, AdminError> {
        let key = self.key(tenant, id).await?;
        self.directory.remove_key(&key.hash).await?;
        self.changed(&key.tenant).await;
        self.record(&key.tenant, Setting::Key, Some(key_text(&key)), None).await;
        Ok(key)
    }
}

/// A key as its audit records it: `ID prefix=tg_live_ab12 scopes=… expires=…` (never the key).
pub(super) fn key_text(key: &ApiKeyRecord) -> String {
    let expires = key.expires_at.map_or_else(|| "never".to_owned(), |at| at.to_string());
    format!("{} prefix={} scopes={} expires={expires}", key.id, key.prefix, key.scopes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_shaped() {
        let a = new_key(false).unwrap();
        let b = new_key(true).unwrap();
        assert!(a.starts_with("tg_live_") && a.len() == 40, "{a}");
        assert!(b.starts_with("tg_test_") && b.len() == 40, "{b}");
        assert_ne!(a[8..], b[8..]);
        assert!(a[8..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert!(crate::base::issued_shape(a.as_bytes()) && crate::base::issued_shape(b.as_bytes()));
    }
}
