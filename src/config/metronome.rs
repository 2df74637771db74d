//! `[metronome]`: the Metronome sink.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::{export::host_only, validator::Validator};

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetronome {
    pub(crate) api_base: Option<String>,
    pub(crate) api_token_file: Option<String>,
    pub(crate) timeout: Option<String>,
}

/// `[metronome]`: where the Metronome sink sends events. The API token is never here: it comes
/// from `METRONOME_API_TOKEN` or the file `api_token_file` names.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MetronomeSettings {
    /// The API's base URL (`https://api.metronome.com/` by default; a local stand-in in tests):
    /// events go to `{api_base}v1/ingest`.
    pub api_base: Option<String>,
    /// A file holding the API token; `METRONOME_API_TOKEN` otherwise.
    pub api_token_file: Option<std::path::PathBuf>,
    /// How long one call may take (30 s by default).
    pub timeout: Duration,
}

impl Validator<'_, '_> {
    /// `[metronome]`: no token here (it comes from the environment or a file).
    pub(super) fn metronome(&self, raw: &RawMetronome) -> Result<MetronomeSettings, ConfigError> {
        let api_base = match &raw.api_base {
            None => None,
            Some(url) if host_only(url) => Some(if url.ends_with('/') { url.clone() } else { format!("{url}/") }),
            Some(_) => {
                return Err(self.invalid(
                    "metronome.api_base",
                    "expected an http:// or https:// URL (no path after the host: `v1/ingest` is appended)",
                ))
            }
        };
        let api_token_file = match &raw.api_token_file {
            Some(p) if p.trim().is_empty() => return Err(self.invalid("metronome.api_token_file", "must not be empty")),
            p => p.as_ref().map(std::path::PathBuf::from),
        };
        let timeout = self.duration("metronome.timeout", raw.timeout.as_deref(), Duration::from_secs(30))?;
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(300) {
            return Err(self.invalid("metronome.timeout", "must be between 1 second and 5 minutes"));
        }
        Ok(MetronomeSettings { api_base, api_token_file, timeout })
    }
}
