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

/// What a key may do at the routes its tenant calls about itself, beyond being served: one
/// scope of [`KeyScopes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyScope {
    /// `usage:read`: read the tenant's usage, balances and settings (the usage route, and
    /// `GET` of the settings routes).
    UsageRead,
    /// `caps:write`: set or remove the tenant's own spend cap.
    CapsWrite,
    /// `alerts:write`: register or remove the tenant's own alert endpoint.
    AlertsWrite,
    /// `recharge:write`: turn the tenant's auto-recharge on, change it or turn it off; it
    /// charges the customer's card, so no key has it unless given it by name.
    RechargeWrite,
}

impl KeyScope {
    /// Every scope, in the order they are written.
    pub const ALL: [Self; 4] = [Self::UsageRead, Self::CapsWrite, Self::AlertsWrite, Self::RechargeWrite];

    /// Its name: `usage:read`, `caps:write`, `alerts:write`, `recharge:write`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::UsageRead => "usage:read",
            Self::CapsWrite => "caps:write",
            Self::AlertsWrite => "alerts:write",
            Self::RechargeWrite => "recharge:write",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Self::UsageRead => 1,
            Self::CapsWrite => 2,
            Self::AlertsWrite => 4,
            Self::RechargeWrite => 8,
        }
    }
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The scopes of an API key: what it may do at its tenant's own routes (usage, spend cap,
/// alert endpoint, recharge). Every key is served by the layer whatever its scopes; the
/// scopes only open those routes.
///
/// A key given no scopes by name has [`KeyScopes::DEFAULT`] (`usage:read`, `caps:write`,
/// `alerts:write`): what every key could do before keys had scopes. `recharge:write`, which
/// charges a card, is never a default.
///
/// ```
/// use tollgate::store::{KeyScope, KeyScopes};
/// let scopes: KeyScopes = "usage:read, recharge:write".parse().unwrap();
/// assert!(scopes.allows(KeyScope::RechargeWrite));
/// assert!(!scopes.allows(KeyScope::CapsWrite));
/// assert_eq!(scopes.to_string(), "usage:read,recharge:write");
/// assert!(!KeyScopes::DEFAULT.allows(KeyScope::RechargeWrite));
/// assert!("billing:write".parse::<KeyScopes>().is_err());
/// assert!("".parse::<KeyScopes>().is_err() && "none,caps:write".parse::<KeyScopes>().is_err());
/// assert_eq!("none".parse::<KeyScopes>(), Ok(KeyScopes::NONE));
/// assert_eq!(KeyScopes::from_bits(-1), KeyScopes::NONE);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyScopes(u8);

impl KeyScopes {
    /// No scope: the key is served, and opens none of its tenant's own routes.
    pub const NONE: Self = Self(0);
    /// What a key has unless given scopes by name: `usage:read`, `caps:write`, `alerts:write`.
    pub const DEFAULT: Self = Self(1 | 2 | 4);
    /// Every scope, `recharge:write` included.
    pub const ALL: Self = Self(1 | 2 | 4 | 8);

    /// Whether it allows `scope`.
    #[must_use]
    pub const fn allows(self, scope: KeyScope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// The same, with `scope` too.
    #[must_use]
    pub const fn with(self, scope: KeyScope) -> Self {
        Self(self.0 | scope.bit())
    }

    /// The scopes as the stores keep them: one bit each (`usage:read` 1, `caps:write` 2,
    /// `alerts:write` 4, `recharge:write` 8).
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The scopes of stored bits; bits of no scope this version knows are dropped (a later
    /// version's scope is not granted by an earlier one), and a negative number, which no
    /// version writes, has none.
    #[must_use]
    pub const fn from_bits(bits: i64) -> Self {
        if bits < 0 {
            return Self::NONE;
        }
        Self((bits & Self::ALL.0 as i64) as u8)
    }

    /// The scopes both allow.
    #[must_use]
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// Each scope it allows, in the order they are written.
    pub fn iter(self) -> impl Iterator<Item = KeyScope> {
        KeyScope::ALL.into_iter().filter(move |s| self.allows(*s))
    }
}

impl Default for KeyScopes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for KeyScopes {
    /// The names joined by commas (`usage:read,caps:write`); `none` for no scope.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        for (i, scope) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(scope.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyScopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyScopes({self})")
    }
}

impl std::str::FromStr for KeyScopes {
    type Err = String;

    /// Names separated by commas or spaces (`usage:read,recharge:write`), or `none` alone; an
    /// unknown name, nothing at all (an unset variable, say) and `none` beside a scope are
    /// refused, naming the scopes there are.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut scopes = Self::NONE;
        let names: Vec<&str> = text.split(|c: char| c == ',' || c.is_whitespace()).filter(|n| !n.is_empty()).collect();
        match names.as_slice() {
            [] => return Err(
                "no key scope given: name them (usage:read, caps:write, alerts:write, recharge:write) or write none"
                    .to_owned(),
            ),
            ["none"] => return Ok(Self::NONE),
            names if names.contains(&"none") => return Err("`none` cannot stand beside a scope".to_owned()),
            _ => {}
        }
        for name in names {
            let scope = KeyScope::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
                format!("`{name}` is not a key scope: expected usage:read, caps:write, alerts:write, recharge:write or none")
            })?;
            scopes = scopes.with(scope);
        }
        Ok(scopes)
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

/// The base-62 alphabet of the keys tollgate issues.
pub(crate) const KEY_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The length of a key tollgate issues: `tg_live_` (or `tg_test_`), 26 random base-62
/// characters and 6 of their check.
pub(crate) const ISSUED_KEY_LEN: usize = 40;

/// The check of an issued key's first 34 characters (its prefix and random part): their
/// CRC-32 (IEEE), in 6 base-62 characters. It is no secret and proves nothing of a key: it
/// tells a key shaped as tollgate issues them from random bytes before the directory is asked
/// (such keys go first when lookups queue, `engine::admit::clients`), as the checksums of
/// GitHub's and Stripe's tokens let scanners do.
pub(crate) fn key_check(body: &[u8]) -> [u8; 6] {
    let mut crc = !0u32;
    for &b in body {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    let mut n = !crc;
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = KEY_ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Whether `key` is shaped as tollgate issues keys, its check included ([`key_check`]): keys
/// issued before the check (32 random characters, none) are not, nor are keys an operator
/// chose.
pub(crate) fn issued_shape(key: &[u8]) -> bool {
    key.len() == ISSUED_KEY_LEN
        && (key.starts_with(b"tg_live_") || key.starts_with(b"tg_test_"))
        && key[8..].iter().all(u8::is_ascii_alphanumeric)
        && key_check(&key[..ISSUED_KEY_LEN - 6]) == key[ISSUED_KEY_LEN - 6..]
}

#[cfg(test)]
mod check_tests {
    use super::*;

    /// The check is CRC-32 (IEEE): its standard test vector, in base 62.
    #[test]
    fn the_check_is_crc32_in_base_62() {
        // CRC-32 of "123456789" is 0xCBF43926 = 3,421,780,262.
        let mut n = 3_421_780_262u32;
        let mut want = [0u8; 6];
        for slot in want.iter_mut().rev() {
            *slot = KEY_ALPHABET[(n % 62) as usize];
            n /= 62;
        }
        assert_eq!(key_check(b"123456789"), want);
    }

    /// A key with its check is issued-shaped; one character changed, or an older key of 32
    /// random characters, is not.
    #[test]
    fn a_key_is_issued_shaped_only_with_its_check() {
        let body = b"tg_live_ABCDEFGHIJKLMNOPQRSTUVWXYz";
        assert_eq!(body.len(), 34);
        let mut key = body.to_vec();
        key.extend_from_slice(&key_check(body));
        assert!(issued_shape(&key));
        key[12] = b'Q';
        assert!(!issued_shape(&key), "a character changed");
        assert!(!issued_shape(b"tg_live_0123456789abcdefghijABCDEFGHIJKL"), "no check");
        assert!(!issued_shape(b"key-acme"));
    }
}
