//! `[dashboard]`: the operator dashboard's access token.

use serde::Deserialize;

use super::validator::Validator;
use super::ConfigError;

/// The shortest access token taken, in bytes: a token is a bearer credential to every tenant's
/// figures, and guessing it must be out of reach.
pub const MIN_TOKEN_LEN: usize = 16;

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
    /// A token shorter than [`MIN_TOKEN_LEN`] bytes, or holding anything but visible ASCII.
    pub fn new(text: &str) -> Result<Self, String> {
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!("a token of at least {MIN_TOKEN_LEN} characters (this one has {})", token.len()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token of visible ASCII characters only".to_owned());
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
