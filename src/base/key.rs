//! API keys as the directory knows them: their SHA-256 digests, and their syntax.

use std::fmt;

use sha2::{Digest, Sha256};

/// The SHA-256 digest of an API key: the directory stores these, never the keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes an API key.
    #[must_use]
    pub fn of(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// A digest from its 32 bytes.
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// Reads a digest written as 64 hexadecimal digits.
    #[must_use]
    pub fn from_hex(hex: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex.trim(), &mut out).ok()?;
        Some(Self(out))
    }

    /// The key's short id: `k_` and the first 12 hexadecimal digits of the digest. It names a
    /// key in listings and revocations without revealing anything usable.
    #[must_use]
    pub fn id(&self) -> String {
        format!("k_{}", &self.to_hex()[..12])
    }

    /// The digest as 64 lowercase hexadecimal digits.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest's bytes.
    #[must_use]
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
