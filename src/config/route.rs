//! Route patterns: method + path to meter and cost.

use std::fmt;

/// A path pattern: literal segments, `{name}` for one segment, `{*name}` for the rest.
///
/// ```
/// use tollgate::config::RoutePattern;
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
    /// `{name}`: one segment.
    Param(Box<str>),
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
                Seg::Param(name.into())
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
                Seg::Param(_) => None,
                Seg::Rest => Some("{*}".into()),
            })
            .collect()
    }

    /// The position of the one-segment parameter `{name}` among the pattern's segments (0:
    /// the first after the leading `/`); `None` when it has none of that name (a `{*rest}`
    /// is not one segment).
    pub(crate) fn param_segment(&self, name: &str) -> Option<usize> {
        self.segments.iter().position(|s| matches!(s, Seg::Param(n) if **n == *name))
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
                Seg::Param(_) => !part.is_empty(),
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

/// Why a path with a dot segment is refused.
pub(crate) const DOT_SEGMENT: &str =
    "the path has a dot segment (`.` or `..`, perhaps percent-encoded): send the path resolved";

/// The path as the routers of the front doors match it: escapes decoded as actix-web decodes
/// them (every `%XX` but `%25`, `%2F` and `%2B`: `%` `/` `+` stay escaped), as long as the
/// result is UTF-8 (else only the escapes of ASCII characters are decoded). A path with a dot
/// segment (`.` or `..`, after decoding) is refused: routers differ on them (axum matches `..`
/// as a segment, a proxy may resolve it), so no rule could match what every one of them
/// serves. Empty segments are merged (`//v1//generate` is `/v1/generate`), as actix-web's
/// `NormalizePath` and most proxies merge them before the router sees the path.
///
/// Borrowed, without a copy, when there is nothing to decode or merge.
#[inline]
pub(crate) fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    // Most paths have no escape, no dot and no empty segment: answered here, inline.
    let mut slash = false;
    for b in path.bytes() {
        if b == b'%' || b == b'.' || (slash && b == b'/') {
            return normalize_escaped(path);
        }
        slash = b == b'/';
    }
    Ok(std::borrow::Cow::Borrowed(path))
}

/// [`normalize_path`] for a path with a `%`, a `.` or an empty segment.
#[inline(never)]
fn normalize_escaped(path: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    let bytes = path.as_bytes();
    let mut escaped = false;
    let mut empty = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' => escaped = true,
            b'/' if i > 0 && bytes[i - 1] == b'/' => empty = true,
            b'.' if i == 0 || bytes[i - 1] == b'/' => {
                let end = bytes[i..].iter().position(|&c| c == b'/').map_or(bytes.len(), |n| i + n);
                if end - i <= 2 && bytes[i..end].iter().all(|&c| c == b'.') {
                    return Err(DOT_SEGMENT);
                }
            }
            _ => {}
        }
    }
    if !escaped && !empty {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let mut out = if escaped {
        let decoded = decode(bytes, false);
        match String::from_utf8(decoded) {
            Ok(out) => out,
            // Escapes that do not make UTF-8: only those of ASCII characters are decoded.
            Err(_) => String::from_utf8(decode(bytes, true)).unwrap_or_else(|_| path.to_owned()),
        }
    } else {
        path.to_owned()
    };
    // Empty segments merged (an escaped `/`, `%2F`, stays escaped: never merged).
    if out.contains("//") {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    // Dot segments written as escapes (`%2E%2E`) are dot segments too.
    if out.split('/').any(|segment| segment == "." || segment == "..") {
        return Err(DOT_SEGMENT);
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// `bytes` with their `%XX` escapes decoded but those of `%`, `/` and `+` (with `ascii_only`,
/// only those of ASCII characters); a `%` not followed by two hex digits is kept.
fn decode(bytes: &[u8], ascii_only: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| hex(bytes[i + 1]).zip(hex(bytes[i + 2])).map(|(h, l)| h << 4 | l))
            .flatten()
            .filter(|c| !matches!(c, b'%' | b'/' | b'+') && (!ascii_only || c.is_ascii()));
        match escape {
            Some(c) => {
                out.push(c);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
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
    fn paths_are_normalized_as_routers_decode_them() {
        let n = |p| normalize_path(p).map(std::borrow::Cow::into_owned);
        assert!(matches!(normalize_path("/v1/generate"), Ok(std::borrow::Cow::Borrowed(_))));
        assert_eq!(n("/v1/gener%61te").unwrap(), "/v1/generate");
        assert_eq!(n("/v1/%7e%2D%2e%5F%41").unwrap(), "/v1/~-._A");
        assert_eq!(n("/v1%2Freports").unwrap(), "/v1%2Freports", "an encoded / stays encoded");
        assert_eq!(n("/a%2Bb/100%25").unwrap(), "/a%2Bb/100%25", "so do + and %");
        assert_eq!(n("/v1/models%3Agenerate/%40me").unwrap(), "/v1/models:generate/@me", "as actix-web decodes");
        assert_eq!(n("/a%20b/%zz/%4").unwrap(), "/a b/%zz/%4", "broken escapes kept");
        assert_eq!(n("/caf%C3%A9/é%").unwrap(), "/café/é%");
        assert_eq!(n("/x%FF%3A").unwrap(), "/x%FF:", "escapes that do not make UTF-8: ASCII ones only");
        for dots in ["/v1/../x", "/v1/./x", "/..", "/.", "/v1/x/..", "/v1/%2E%2E/x", "/v1/.%2e", "/%2e/x", "."] {
            assert_eq!(n(dots), Err(DOT_SEGMENT), "{dots}");
        }
        for fine in ["/v1/items.json", "/v1/.well-known", "/v1/...", "/v1/..x", "/v1/%2E%2E%2E"] {
            assert!(n(fine).is_ok(), "{fine}");
        }
        // Empty segments merged, escaped slashes kept.
        assert_eq!(n("/v1//generate").unwrap(), "/v1/generate");
        assert_eq!(n("//v1///generate//").unwrap(), "/v1/generate/");
        assert_eq!(n("/v1//gener%61te").unwrap(), "/v1/generate");
        assert_eq!(n("/v1/%2F/x").unwrap(), "/v1/%2F/x");
        assert_eq!(n("/v1//../x"), Err(DOT_SEGMENT));
        assert!(matches!(normalize_path("/v1/generate/"), Ok(std::borrow::Cow::Borrowed(_))));
    }

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
