//! The identifiers every layer uses: tenants, plans and meters.

use std::{fmt, sync::Arc};

macro_rules! id_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Creates the identifier from any string.
            pub fn new(id: impl AsRef<str>) -> Self {
                Self(Arc::from(id.as_ref()))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

id_newtype!(
    /// The name of a plan, such as `free` or `metered`.
    PlanId
);

id_newtype!(
    /// The name of a meter, such as `requests` or `tokens`.
    MeterId
);

impl PlanId {
    /// The plan's version this id names, as the directory keeps it: `pro@3` is version 3 of
    /// `pro`, and a bare `pro` version 1 (a plan's first version, and every tenant put on it
    /// before it had versions). Plan names never hold `@`.
    #[must_use]
    pub fn version(&self) -> u32 {
        self.as_str().rsplit_once('@').and_then(|(_, v)| v.parse().ok()).unwrap_or(1)
    }

    /// The plan's name, without its version (`pro` for `pro@3`).
    #[must_use]
    pub fn name(&self) -> &str {
        self.as_str().rsplit_once('@').map_or(self.as_str(), |(name, _)| name)
    }

    /// Version `version` of the plan `name`, as the directory keeps it: the bare name for
    /// version 1, `NAME@VERSION` after.
    #[must_use]
    pub fn at_version(name: &str, version: u32) -> Self {
        if version <= 1 {
            Self::from(name)
        } else {
            Self::from(format!("{name}@{version}"))
        }
    }

    /// Whether both name versions of one plan.
    #[must_use]
    pub fn same_plan(&self, other: &PlanId) -> bool {
        self.name() == other.name()
    }

    /// The plan a tenant on `self` is moved to by what names `to` (a webhook, a tier's move):
    /// `self` when `to` is another version of the same plan (a tenant keeps the version it was
    /// put on until an operator migrates it), else `to`.
    #[must_use]
    pub fn kept_for(&self, to: PlanId) -> PlanId {
        if self.same_plan(&to) {
            self.clone()
        } else {
            to
        }
    }
}

id_newtype!(
    /// The identifier of a tenant (a customer account).
    TenantId
);

id_newtype!(
    /// The name of an organization (`[orgs.NAME]`): a group of tenants that share its plan's
    /// limits.
    OrgId
);

impl OrgId {
    /// The longest organization name, in bytes: its counters' id, `org NAME`, is a tenant id's
    /// length at most.
    pub const MAX_LEN: usize = TenantId::MAX_LEN - 4;

    /// Parses an organization name: 1 to 124 visible ASCII characters (`!` to `~`), as a tenant
    /// id is written.
    ///
    /// ```
    /// use tollgate::config::OrgId;
    /// assert_eq!(OrgId::parse("acme-corp").unwrap().as_str(), "acme-corp");
    /// assert!(OrgId::parse("acme corp").is_err());
    /// ```
    ///
    /// # Errors
    /// What rule `s` breaks, as a sentence.
    pub fn parse(s: &str) -> Result<OrgId, String> {
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.bytes().all(|b| matches!(b, 0x21..=0x7e)) {
            return Err(format!(
                "an organization name is 1 to {} visible ASCII characters without spaces, not {s:?}",
                Self::MAX_LEN
            ));
        }
        Ok(OrgId::new(s))
    }

    /// The id its counters are kept under in the quota role's stores, beside its tenants':
    /// `org NAME`. The space is outside the tenant id grammar, so no tenant's counters can be
    /// an organization's.
    ///
    /// ```
    /// use tollgate::config::OrgId;
    /// assert_eq!(OrgId::new("acme").counters_id().as_str(), "org acme");
    /// ```
    #[must_use]
    pub fn counters_id(&self) -> TenantId {
        TenantId::new(format!("org {}", self.0))
    }
}

impl MeterId {
    /// The meter's name in a `RateLimit-Policy` item: its id, or for a series or a selector
    /// of a meter with dimensions (`tokens{model=m-large}`) the meter and its values joined by
    /// `-` (`tokens-m-large`), as a policy names it.
    ///
    /// ```
    /// use tollgate::config::MeterId;
    /// assert_eq!(MeterId::new("tokens{model=m-large,kind=output}").policy_name(), "tokens-m-large-output");
    /// assert_eq!(MeterId::new("tokens").policy_name(), "tokens");
    /// ```
    #[must_use]
    pub fn policy_name(&self) -> std::borrow::Cow<'_, str> {
        policy_name(&self.0)
    }
}

/// [`MeterId::policy_name`] of a meter's id.
pub(crate) fn policy_name(meter: &str) -> std::borrow::Cow<'_, str> {
    let Some((total, rest)) = meter.split_once('{') else { return meter.into() };
    let mut out = String::from(total);
    for pair in rest.trim_end_matches('}').split(',') {
        out.push('-');
        out.push_str(pair.split_once('=').map_or(pair, |(_, v)| v));
    }
    out.into()
}

impl TenantId {
    /// The longest tenant id, in characters (bytes: a tenant id is ASCII).
    pub const MAX_LEN: usize = 128;

    /// Parses a tenant id: 1 to 128 visible ASCII characters (`!` to `~`, 0x21 to 0x7E), so
    /// no whitespace, control or non-ASCII characters. `acme`, `sub|1234` and
    /// `org:42/team-7` are tenant ids; `a b` and `café` are not.
    ///
    /// ```
    /// use tollgate::config::{InvalidTenantId, TenantId};
    /// assert_eq!(TenantId::parse("sub|1234").unwrap().as_str(), "sub|1234");
    /// assert_eq!(TenantId::parse(""), Err(InvalidTenantId::Empty));
    /// assert!(!TenantId::is_valid("a b"));
    /// ```
    ///
    /// # Errors
    /// An [`InvalidTenantId`] saying which rule `s` breaks.
    pub fn parse(s: &str) -> Result<TenantId, InvalidTenantId> {
        if s.is_empty() {
            return Err(InvalidTenantId::Empty);
        }
        if let Some((at, found)) = s.char_indices().find(|&(_, c)| !matches!(c, '\x21'..='\x7e')) {
            return Err(InvalidTenantId::Character { at, found });
        }
        if s.len() > Self::MAX_LEN {
            return Err(InvalidTenantId::TooLong { len: s.len() });
        }
        Ok(TenantId::new(s))
    }

    /// Whether `s` is a valid tenant id (see [`parse`](Self::parse)).
    #[must_use]
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty() && s.len() <= Self::MAX_LEN && s.bytes().all(|b| matches!(b, 0x21..=0x7e))
    }
}

/// Why a string is not a tenant id: a tenant id is 1 to 128 visible ASCII characters
/// (0x21 to 0x7E), with no whitespace. See [`TenantId::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTenantId {
    /// The string is empty.
    #[error("a tenant id is 1 to 128 visible ASCII characters, not an empty string")]
    Empty,
    /// The string is longer than 128 characters.
    #[error("a tenant id is 1 to 128 visible ASCII characters, not {len}")]
    TooLong {
        /// The length of the string, in bytes.
        len: usize,
    },
    /// A character that is not visible ASCII: whitespace, a control or a non-ASCII character.
    #[error("a tenant id is 1 to 128 visible ASCII characters without spaces: {found:?} (at byte {at}) is not one")]
    Character {
        /// The byte offset of the character.
        at: usize,
        /// The character.
        found: char,
    },
}
