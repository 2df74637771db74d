//! Configuration errors that say what is wrong and where.

use std::{fmt, path::PathBuf};

/// A configuration that could not be loaded: names the file, line, column and key path.
///
/// ```
/// let err = tollgate::Config::from_toml_str("[plans.free]\nrate = \"0/s\"\n").unwrap_err();
/// assert_eq!(err.line(), Some(2));
/// assert_eq!(err.key(), "plans.free.rate");
/// assert!(err.to_string().contains("plans.free.rate"));
/// ```
#[derive(Debug)]
pub struct ConfigError {
    file: Option<PathBuf>,
    position: Option<(usize, usize)>,
    key: String,
    message: String,
    kind: ConfigErrorKind,
}

/// The broad class of a [`ConfigError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Io,
    /// The text is not valid TOML.
    Syntax,
    /// A key that the configuration does not know.
    UnknownKey,
    /// A key with a value of the wrong type or an impossible value.
    InvalidValue,
    /// A reference to something that is not declared (a plan, a meter).
    UnknownReference,
    /// Two declarations that cannot both hold (two routes with the same match).
    Conflict,
}

impl ConfigError {
    pub(crate) fn new(kind: ConfigErrorKind, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: None, position: None, key: key.into(), message: message.into(), kind }
    }

    pub(crate) fn at(mut self, position: Option<(usize, usize)>) -> Self {
        self.position = position;
        self
    }

    pub(crate) fn in_file(mut self, file: Option<PathBuf>) -> Self {
        self.file = file;
        self
    }

    /// The file the configuration came from, if it came from a file.
    #[must_use]
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// The 1-based line of the offending key or value, when known.
    #[must_use]
    pub fn line(&self) -> Option<usize> {
        self.position.map(|p| p.0)
    }

    /// The 1-based column of the offending key or value, when known.
    #[must_use]
    pub fn column(&self) -> Option<usize> {
        self.position.map(|p| p.1)
    }

    /// The dotted key path, such as `plans.free.quotas.requests.limit` (empty for the root).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong, without the location.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The class of the error.
    #[must_use]
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => f.write_str("<config>")?,
        }
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
