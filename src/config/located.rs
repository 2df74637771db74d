//! The document with spans: every error placed at its file, line, column and key path.

use toml::de::{DeTable, DeValue};

use super::{ConfigError, ConfigErrorKind as Kind};

/// The document with spans, to place errors found after deserialization.
pub(super) struct Located<'a> {
    pub(super) text: &'a str,
    pub(super) root: Option<DeValue<'a>>,
}

impl Located<'_> {
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// The position of the value at `path` (dotted, with `[i]` for array items), or of its
    /// closest ancestor present in the document.
    pub(super) fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut node = self.root.as_ref()?;
        let mut span = None;
        for segment in split_path(path) {
            let next = match segment {
                Segment::Key(k) => node.get(k),
                Segment::Index(i) => node.get(i),
            };
            match next {
                Some(spanned) => {
                    span = Some(spanned.span());
                    node = spanned.get_ref();
                }
                None => break,
            }
        }
        span.map(|s| self.position(s.start))
    }

    /// The position of the value at `path` only if it is in the document.
    pub(super) fn find_exact(&self, path: &str) -> Option<(usize, usize)> {
        let mut node = self.root.as_ref()?;
        let mut span = None;
        for segment in split_path(path) {
            let Segment::Key(k) = segment else { return None };
            let spanned = node.get(k)?;
            span = Some(spanned.span());
            node = spanned.get_ref();
        }
        span.map(|s| self.position(s.start))
    }

    pub(super) fn error(&self, kind: Kind, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(kind, path, message).at(self.find(path))
    }
}

pub(super) enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

pub(super) fn split_path(path: &str) -> impl Iterator<Item = Segment<'_>> {
    // Parts split at dots outside quotes: `stripe.events."customer.subscription.deleted"`.
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in path.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => {
                parts.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&path[start..]);
    parts.into_iter().filter(|s| !s.is_empty()).flat_map(|part| {
        if let Some(key) = part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            return std::iter::once(Segment::Key(key)).chain(None);
        }
        let (key, rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        let index = rest.trim_end_matches(']').parse().ok();
        std::iter::once(Segment::Key(key)).chain(index.map(Segment::Index))
    })
}

/// A TOML syntax error; a duplicate key is named by its full key path.
pub(super) fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let loc = Located { text, root: None };
    let span = e.span();
    let pos = span.as_ref().map(|s| loc.position(s.start));
    let message = e.message().trim();
    let key = match (&span, message.starts_with("duplicate key")) {
        (Some(span), true) => duplicate_key_path(text, span.clone()).unwrap_or_default(),
        _ => String::new(),
    };
    let message = if key.is_empty() {
        message.to_owned()
    } else {
        format!("{message}: this key is already defined earlier in the file")
    };
    ConfigError::new(Kind::Syntax, key, message).at(pos)
}

/// The key path of the duplicate key at `span`. The parser reports only the key's span, and
/// keeps only the first definition; so the duplicate is renamed to a placeholder, the text is
/// parsed again, and the placeholder's path in that document is the duplicate's path.
pub(super) fn duplicate_key_path(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let raw = text.get(span.clone())?;
    let name = raw.trim_matches(|c| c == '"' || c == '\'');
    let placeholder = format!("tollgate-duplicate-key-{}-{}", span.start, span.end);
    let renamed = format!("{}{placeholder}{}", &text[..span.start], &text[span.end..]);
    let (root, _) = DeTable::parse_recoverable(&renamed);
    let mut path = String::new();
    find_key(root.get_ref(), &placeholder, &mut path)
        .then(|| format!("{}{name}", &path[..path.len() - placeholder.len()]))
}

/// Whether `table` holds the key `needle` somewhere below it; if so `path` ends with its path.
pub(super) fn find_key(table: &DeTable<'_>, needle: &str, path: &mut String) -> bool {
    let len = path.len();
    for (key, value) in table {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if key.get_ref() == needle || find_in_value(value.get_ref(), needle, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

pub(super) fn find_in_value(value: &DeValue<'_>, needle: &str, path: &mut String) -> bool {
    match value {
        DeValue::Table(t) => find_key(t, needle, path),
        DeValue::Array(items) => {
            let len = path.len();
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                if find_in_value(item.get_ref(), needle, path) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        _ => false,
    }
}

pub(super) fn serde_error(loc: &Located<'_>, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let mut path = e.path().to_string();
    if path == "." {
        path.clear();
    }
    let inner = e.into_inner();
    let message = inner.message().trim().to_owned();
    let (kind, path) = match message.strip_prefix("unknown field `") {
        Some(rest) => {
            let field = rest.split('`').next().unwrap_or_default();
            let full = if path.is_empty() {
                field.to_owned()
            } else if path == field || path.ends_with(&format!(".{field}")) {
                path
            } else {
                format!("{path}.{field}")
            };
            (Kind::UnknownKey, full)
        }
        None => (Kind::InvalidValue, path),
    };
    let pos = inner.span().map(|s| loc.position(s.start)).or_else(|| loc.find(&path));
    ConfigError::new(kind, path, message).at(pos)
}
