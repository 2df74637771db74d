//! Route patterns: method + path to meter and cost.

use std::fmt;

/// A path pattern: literal segments, `{name}` for one segment, `{*name}` for the rest.
///
/// ```
/// use tollgate::plan::RoutePattern;
/// let p = RoutePattern::parse("/v1/models/{id}/generate").unwrap();
/// assert!(p.matches("/v1/models/gpt/generate"));
/// assert!(!p.matches("/v1/models/gpt"));
/// let rest = RoutePattern::parse("/files/{*path}").unwrap();
/// assert!(rest.matches("/files/a/b/c"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RoutePattern {
    text: Box<str>,
    segments: Box<[Seg]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Seg {
    Literal(Box<str>),
    Param,
    Rest,
}

impl RoutePattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// A message saying what is wrong with the pattern.
    pub fn parse<'t>(text: &'t str) -> Result<Self, String> {
        let Some(body) = text.strip_prefix('/') else {
            return Err(format!("a path pattern starts with '/', not \"{text}\""));
        };
        let mut segments = Vec::new();
        let parts: Vec<&str> = if body.is_empty() { Vec::new() } else { body.split('/').collect() };
        let mut params: Vec<&str> = Vec::new();
        let mut param = |name: &'t str| -> Result<(), String> {
            check_param(name)?;
            if params.contains(&name) {
                return Err(format!("the parameter `{name}` appears twice in \"{text}\""));
            }
            params.push(name);
            Ok(())
        };
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(format!(
                    "\"{text}\" has an empty segment: no '//' and no trailing '/' (but for the root \"/\")"
                ));
            }
            let seg = if let Some(name) = part.strip_prefix("{*").and_then(|p| p.strip_suffix('}')) {
                if i + 1 != parts.len() {
                    return Err("a {*rest} segment must be the last one".into());
                }
                param(name)?;
                Seg::Rest
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                param(name)?;
                Seg::Param
            } else if part.contains(['{', '}', '*', '?', '#']) {
                return Err(format!("`{part}` is not a literal segment, a {{param}} or a {{*rest}}"));
            } else {
                Seg::Literal((*part).into())
            };
            segments.push(seg);
        }
        Ok(Self { text: text.into(), segments: segments.into() })
    }

    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The pattern with parameter names erased: two patterns with one shape match the same paths.
    pub(crate) fn shape(&self) -> Vec<Option<Box<str>>> {
        self.segments
            .iter()
            .map(|s| match s {
                Seg::Literal(l) => Some(l.clone()),
                Seg::Param => None,
                Seg::Rest => Some("{*}".into()),
            })
            .collect()
    }

    /// Whether `path` (without the query string) matches.
    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        let mut rest = path.strip_prefix('/').unwrap_or(path);
        for (i, seg) in self.segments.iter().enumerate() {
            if let Seg::Rest = seg {
                return true;
            }
            let (part, tail) = match rest.find('/') {
                Some(at) => (&rest[..at], Some(&rest[at + 1..])),
                None => (rest, None),
            };
            let ok = match seg {
                Seg::Literal(l) => **l == *part,
                Seg::Param => !part.is_empty(),
                Seg::Rest => unreachable!("handled above"),
            };
            if !ok {
                return false;
            }
            match tail {
                Some(t) => rest = t,
                None => return i + 1 == self.segments.len() || matches!(self.segments[i + 1], Seg::Rest),
            }
        }
        // All segments consumed: the path must be consumed too (a trailing '/' is tolerated).
        rest.is_empty()
    }
}

fn check_param(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("`{name}` is not a parameter name (letters, digits, '_')"));
    }
    Ok(())
}

impl fmt::Debug for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let p = RoutePattern::parse("/v1/chat").unwrap();
        assert!(p.matches("/v1/chat"));
        assert!(p.matches("/v1/chat/"));
        assert!(!p.matches("/v1/chat/x"));
        assert!(!p.matches("/v1"));
        let root = RoutePattern::parse("/").unwrap();
        assert!(root.matches("/"));
        assert!(!root.matches("/a"));
        let p = RoutePattern::parse("/a/{id}").unwrap();
        assert!(p.matches("/a/7") && !p.matches("/a/") && !p.matches("/a"));
        let p = RoutePattern::parse("/a/{*rest}").unwrap();
        assert!(p.matches("/a/") && p.matches("/a/b/c") && p.matches("/a"));
        assert!(RoutePattern::parse("a").is_err());
        assert!(RoutePattern::parse("/{*a}/b").is_err());
        assert!(RoutePattern::parse("/x*").is_err());
    }

    #[test]
    fn empty_segments_and_repeated_parameters_are_rejected() {
        assert!(RoutePattern::parse("/").is_ok());
        assert!(RoutePattern::parse("/a/{id}/b/{*rest}").is_ok());
        for bad in ["//", "/a//b", "/a/", "/a/{id}/", "/a/{id}/b/{id}", "/{x}/{*x}"] {
            assert!(RoutePattern::parse(bad).is_err(), "{bad}");
        }
        assert!(RoutePattern::parse("/a/{id}/b/{id}").unwrap_err().contains("`id`"));
    }
}
