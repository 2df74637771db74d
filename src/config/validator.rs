//! The checks every table shares: durations, methods, policies, names and references to meters and plans.

use std::{num::NonZeroU64, time::Duration};

use super::located::Located;
use super::{ConfigError, ConfigErrorKind as Kind};

pub(super) struct Validator<'l, 'a> {
    pub(super) loc: &'l Located<'a>,
}

pub(super) fn check_name(v: &Validator<'_, '_>, path: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(v.invalid(path, "names are 1 to 64 characters among letters, digits, '-', '_' and '.'"))
    }
}

/// What a request gets when the store cannot be reached within its time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorPolicy {
    /// Admit the request (its usage is still recorded) and count the error.
    FailOpen,
    /// Reject the request with 503 and count the error.
    FailClosed,
}

impl Validator<'_, '_> {
    pub(super) fn invalid(&self, path: &str, message: impl Into<String>) -> ConfigError {
        self.loc.error(Kind::InvalidValue, path, message)
    }

    pub(super) fn duration(&self, path: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
        let d = self.duration_or_zero(path, value, default)?;
        if d.is_zero() {
            return Err(self.invalid(path, "must be longer than zero"));
        }
        Ok(d)
    }

    /// A duration where zero means "off".
    pub(super) fn duration_or_zero(
        &self,
        path: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        humantime::parse_duration(value)
            .map_err(|e| self.invalid(path, format!("{e}: write a duration such as \"10s\", \"15m\", \"1h\"")))
    }

    /// One of the nine standard HTTP methods, in any case (`http::Method` alone would take any
    /// token, such as a misspelt `GETT`, as an extension method).
    pub(super) fn method(&self, path: &str, value: &str) -> Result<http::Method, ConfigError> {
        const METHODS: [http::Method; 9] = [
            http::Method::GET,
            http::Method::HEAD,
            http::Method::POST,
            http::Method::PUT,
            http::Method::DELETE,
            http::Method::CONNECT,
            http::Method::OPTIONS,
            http::Method::TRACE,
            http::Method::PATCH,
        ];
        METHODS.into_iter().find(|m| m.as_str().eq_ignore_ascii_case(value)).ok_or_else(|| {
            self.invalid(
                path,
                format!("`{value}` is not an HTTP method: expected GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE or PATCH"),
            )
        })
    }

    pub(super) fn policy(&self, path: &str, value: &str) -> Result<StoreErrorPolicy, ConfigError> {
        match value {
            "fail-open" => Ok(StoreErrorPolicy::FailOpen),
            "fail-closed" => Ok(StoreErrorPolicy::FailClosed),
            _ => Err(self.invalid(path, "expected \"fail-open\" or \"fail-closed\"")),
        }
    }

    pub(super) fn positive(&self, path: &str, value: i64) -> Result<NonZeroU64, ConfigError> {
        u64::try_from(value)
            .ok()
            .and_then(NonZeroU64::new)
            .ok_or_else(|| self.invalid(path, format!("must be a whole number of at least 1, not {value}")))
    }
}
