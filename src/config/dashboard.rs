//! `[dashboard]`: the operator dashboard's access token.

use serde::Deserialize;

use super::validator::Validator;
use super::ConfigError;

/// The shortest access token taken, in bytes: a token is a bearer credential to every tenant's
/// figures, and guessing it must be out of reach. 32 random characters (`openssl rand -hex 32`
/// prints 64) hold at least 100 bits.
pub const MIN_TOKEN_LEN: usize = 32;

/// The fewest distinct characters a token may hold: fewer is not random.
const MIN_DISTINCT: usize = 6;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDashboard {
    pub(crate) token_file: Option<String>,
}

/// The operator dashboard's access token: never in the configuration itself, never printed (its
/// `Debug` shows only that it is set).
#[derive(Clone)]
pub struct DashboardToken(String);

impl DashboardToken {
    /// A token given in code: surrounding whitespace (a file's last newline) is dropped.
    ///
    /// # Errors
    /// A token shorter than [`MIN_TOKEN_LEN`] bytes, holding anything but visible ASCII, or
    /// plainly not random: fewer than 6 distinct characters, or a shorter text repeated
    /// (`abcdabcd…`). The message says how to make one.
    pub fn new(text: &str) -> Result<Self, String> {
        const MAKE: &str = "(`openssl rand -hex 32` prints one)";
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "a token of at least {MIN_TOKEN_LEN} random characters {MAKE}; this one has {}",
                token.len()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("a token of visible ASCII characters only {MAKE}"));
        }
        let bytes = token.as_bytes();
        let mut seen = [false; 128];
        bytes.iter().for_each(|&b| seen[usize::from(b & 0x7f)] = true);
        let distinct = seen.iter().filter(|s| **s).count();
        let period = (1..=bytes.len() / 2).find(|&p| bytes.iter().zip(&bytes[p..]).all(|(a, b)| a == b));
        if distinct < MIN_DISTINCT || period.is_some() {
            return Err(format!(
                "a token of {MIN_TOKEN_LEN} random characters {MAKE}; this one {}",
                match period {
                    Some(p) => format!("repeats its first {p}"),
                    None => format!("has {distinct} distinct characters"),
                }
            ));
        }
        Ok(Self(token.to_owned()))
    }

    /// The token itself.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DashboardToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DashboardToken(…)")
    }
}

/// `[dashboard]`: the operator dashboard (feature `dashboard`, and `tollgate dashboard`).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DashboardSettings {
    /// The access token, read from `token_file` when the configuration is read; `None`
    /// without one.
    pub token: Option<DashboardToken>,
}

impl Validator<'_, '_> {
    /// `[dashboard]`.
    pub(super) fn dashboard(&self, raw: &RawDashboard) -> Result<DashboardSettings, ConfigError> {
        let Some(path) = &raw.token_file else { return Ok(DashboardSettings::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| self.invalid("dashboard.token_file", format!("cannot read {path}: {e}")))?;
        let token = DashboardToken::new(&text)
            .map_err(|why| self.invalid("dashboard.token_file", format!("{path} must hold {why}")))?;
        Ok(DashboardSettings { token: Some(token) })
    }
}
