//! Secrets read from the environment or a file.

use std::fmt;

/// A secret read from the environment or a file: never in the configuration, never printed
/// (its `Debug` shows only that it is set).
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// A secret given in code.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}
