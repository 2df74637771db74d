//! The house: the imports between the crate's source files, read from the code, checked for
//! circles and for layers that import upward (`base/` imports nothing above it; `config/`
//! imports only `base/`; every room on its floor, with an allow-list of arrows back up that
//! only shrinks), and for rooms outside the engine reaching into its parts.
//!
//! An import is a `use` item or a `crate::` / `super::` / `self::` path in code (or a path
//! through a module a `use` named), traced through re-exports to the file that defines the
//! item. Comments, doc comments (intra-doc links among them), string literals and `#[cfg(test)]`
//! modules do not count. The reader is small and knows the crate's habits: no `#[path]`
//! module, no `extern crate` alias.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Replaces comments and the insides of string and char literals by spaces (lines kept), so
/// that what is left is code.
fn code_of(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if (c == b'r' || (c == b'b' && b.get(i + 1) == Some(&b'r')))
            && !b[..i].last().is_some_and(|p| p.is_ascii_alphanumeric() || *p == b'_')
            && {
                let j = if c == b'b' { i + 2 } else { i + 1 };
                let mut k = j;
                while b.get(k) == Some(&b'#') {
                    k += 1;
                }
                b.get(k) == Some(&b'"')
            }
        {
            // A raw string: r"…", r#"…"#, br"…".
            let mut j = if c == b'b' { i + 2 } else { i + 1 };
            let mut hashes = 0;
            while b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            out.extend(std::iter::repeat_n(b' ', j - i));
            out.push(b'"');
            j += 1;
            loop {
                if b[j] == b'"' && b[j + 1..].iter().take(hashes).filter(|h| **h == b'#').count() == hashes {
                    out.push(b'"');
                    out.extend(std::iter::repeat_n(b' ', hashes));
                    i = j + 1 + hashes;
                    break;
                }
                out.push(blank(b[j]));
                j += 1;
            }
        } else if c == b'"' {
            out.push(b'"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                out.push(blank(b[i]));
                i += 1;
            }
            out.push(b'"');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime ('a): only the first is blanked.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|x| *x == b'\'').map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                // Multi-byte chars: up to 4 bytes.
                (i + 2..(i + 6).min(b.len())).find(|k| b[*k] == b'\'' && b[i + 1] >= 0x80)
            };
            match end {
                Some(e) => {
                    out.push(b'\'');
                    out.extend(std::iter::repeat_n(b' ', e - i - 1));
                    out.push(b'\'');
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// A module: where it is, what it defines, what it imports.
#[derive(Debug, Default)]
struct Module {
    file: String,
    /// Items defined here (types, functions, constants, …).
    items: BTreeSet<String>,
    /// Child modules, by name, to their module path.
    children: BTreeMap<String, String>,
    /// `use` items: (the name they bind, the path), a glob binding `*`.
    uses: Vec<(String, Vec<String>)>,
    /// Which of `uses` are re-exports (`pub use`, `pub(crate) use`, …): names passed on, which
    /// the module itself need not use.
    reexports: BTreeSet<usize>,
    /// Paths written in code (`crate::…`, `super::…`, `self::…`, `name::…`).
    paths: Vec<Vec<String>>,
    /// The names written in code (not in `use` items): what a glob import may bring.
    idents: BTreeSet<String>,
}

/// The crate's modules, by module path (`crate`, `crate::engine`, …).
#[derive(Debug, Default)]
struct Crate {
    modules: BTreeMap<String, Module>,
    /// `#[macro_export]` macros live at the crate's root.
    macros: BTreeSet<String>,
    /// The files of modules declared only for tests (`#[cfg(test)] mod tests;`): not read.
    test_files: BTreeSet<String>,
}

/// The use tree after `use` (up to its `;`), flattened to (binding, path).
fn flatten_use(tree: &str) -> Vec<(String, Vec<String>)> {
    fn go(prefix: &[String], s: &str, out: &mut Vec<(String, Vec<String>)>) {
        let s = s.trim().trim_start_matches("::");
        if s.is_empty() {
            return;
        }
        if let Some(open) = s.find('{') {
            let head: Vec<String> =
                s[..open].split("::").map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect();
            let inner = &s[open + 1..s.rfind('}').unwrap_or(s.len())];
            let mut path = prefix.to_vec();
            path.extend(head);
            let (mut depth, mut start) = (0, 0);
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        go(&path, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            go(&path, &inner[start..], out);
            return;
        }
        let (p, alias) = match s.split_once(" as ") {
            Some((p, a)) => (p.trim(), Some(a.trim().to_owned())),
            None => (s, None),
        };
        let mut path = prefix.to_vec();
        path.extend(p.split("::").map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned));
        if path.last().is_some_and(|l| l == "self") {
            path.pop();
        }
        let Some(last) = path.last().cloned() else { return };
        out.push((alias.unwrap_or(last), path));
    }
    let mut out = Vec::new();
    go(&[], tree, &mut out);
    out
}

/// Whether an attribute's text (inside `#[…]`) makes its item exist only in tests.
fn test_only(attr: &str) -> bool {
    let a: String = attr.chars().filter(|c| !c.is_whitespace()).collect();
    a == "cfg(test)" || a.starts_with("cfg(all(test,") || a == "test" || a.starts_with("cfg(all(test)")
}

/// Reads the module whose code is `code` (a file's, or an inline module's body) into `krate`.
fn read_module(krate: &mut Crate, files: &BTreeMap<String, String>, file: &str, path: &str, code: &str) {
    let b = code.as_bytes();
    let mut module = Module { file: file.to_owned(), ..Module::default() };
    let (mut i, mut depth) = (0usize, 0i32);
    let mut attrs: Vec<String> = Vec::new();
    let dir_of_children = {
        let stem = file.trim_end_matches(".rs");
        if file.ends_with("/mod.rs") || file.ends_with("lib.rs") {
            file.rsplit_once('/').map(|(d, _)| d.to_owned()).unwrap_or_default()
        } else {
            stem.to_owned()
        }
    };
    let word_at = |i: usize| -> Option<(&str, usize)> {
        if !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b'$')) {
            return None;
        }
        let mut j = i;
        while j < b.len() && is_ident(b[j]) {
            j += 1;
        }
        Some((&code[i..j], j))
    };
    let skip_ws = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    let matching = |open: usize| -> usize {
        let (mut d, mut k) = (0, open);
        while k < b.len() {
            match b[k] {
                b'{' | b'[' | b'(' => d += 1,
                b'}' | b']' | b')' => {
                    d -= 1;
                    if d == 0 {
                        return k;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        b.len() - 1
    };
    while i < b.len() {
        let c = b[i];
        if c == b'#' && (b.get(i + 1) == Some(&b'[') || (b.get(i + 1) == Some(&b'!') && b.get(i + 2) == Some(&b'['))) {
            let open = if b[i + 1] == b'[' { i + 1 } else { i + 2 };
            let close = matching(open);
            if b[i + 1] == b'[' {
                attrs.push(code[open + 1..close].to_owned());
            }
            i = close + 1;
            continue;
        }
        if c == b'{' {
            depth += 1;
            i += 1;
            continue;
        }
        if c == b'}' {
            depth -= 1;
            i += 1;
            continue;
        }
        if c == b';' && depth == 0 {
            attrs.clear();
        }
        let Some((word, end)) = word_at(i) else {
            i += 1;
            continue;
        };
        match word {
            "mod" if depth == 0 => {
                let j = skip_ws(end);
                let Some((name, after)) = word_at(j) else {
                    i = end;
                    continue;
                };
                let name = name.to_owned();
                let k = skip_ws(after);
                let child = format!("{path}::{name}");
                let tests = attrs.iter().any(|a| test_only(a));
                attrs.clear();
                if b.get(k) == Some(&b';') {
                    let flat = format!("{dir_of_children}/{name}.rs");
                    let nested = format!("{dir_of_children}/{name}/mod.rs");
                    let f = if files.contains_key(&flat) { flat } else { nested };
                    if tests {
                        krate.test_files.insert(f);
                    } else {
                        if let Some(text) = files.get(&f) {
                            module.children.insert(name, child.clone());
                            let code = code_of(text);
                            read_module(krate, files, &f, &child, &code);
                        }
                    }
                    i = k + 1;
                } else if b.get(k) == Some(&b'{') {
                    let close = matching(k);
                    if !tests {
                        module.children.insert(name, child.clone());
                        // An inline module is of the same file, its names its own.
                        let (dir_file, body) = (file.to_owned(), code[k + 1..close].to_owned());
                        read_module(krate, files, &dir_file, &child, &body);
                        // Its children's files sit where the file's would.
                    }
                    i = close + 1;
                } else {
                    i = k;
                }
            }
            "use" => {
                let semi = code[end..].find(';').map_or(b.len(), |p| end + p);
                // `pub use`, `pub(crate) use`: a re-export.
                let before = code[..i].trim_end();
                let public = before.ends_with("pub")
                    || (before.ends_with(')') && {
                        let open = before.rfind('(').unwrap_or(0);
                        before[..open].trim_end().ends_with("pub")
                    });
                for (name, p) in flatten_use(&code[end..semi]) {
                    if public {
                        module.reexports.insert(module.uses.len());
                    }
                    module.uses.push((name, p));
                }
                attrs.clear();
                i = semi + 1;
            }
            "impl" | "fn" if depth == 0 && attrs.iter().any(|a| test_only(a)) => {
                // A test-only function or impl: skipped whole.
                let open = code[end..].find('{').map_or(b.len() - 1, |p| end + p);
                i = matching(open) + 1;
                attrs.clear();
            }
            "struct" | "enum" | "trait" | "type" | "fn" | "const" | "static" | "union" if depth == 0 => {
                let mut j = skip_ws(end);
                // `const fn f`, `static mut X`, `unsafe fn`: the name is after the qualifier.
                while let Some((_, after)) =
                    word_at(j).filter(|(w, _)| matches!(*w, "fn" | "mut" | "unsafe" | "extern"))
                {
                    j = skip_ws(after);
                }
                if let Some((name, after)) = word_at(j) {
                    module.items.insert(name.to_owned());
                    i = after;
                } else {
                    i = end;
                }
                attrs.clear();
            }
            "macro_rules" if code[end..].starts_with('!') => {
                let j = skip_ws(end + 1);
                if let Some((name, after)) = word_at(j) {
                    if attrs.iter().any(|a| a.trim() == "macro_export") {
                        krate.macros.insert(name.to_owned());
                    } else {
                        module.items.insert(name.to_owned());
                    }
                    i = after;
                } else {
                    i = end;
                }
                attrs.clear();
            }
            _ => {
                // A path in code: `crate::a::b`, `super::x`, `self::x`, or through a name
                // (resolved later only when the name is a module a `use` named).
                let mut segs = vec![word.to_owned()];
                module.idents.insert(word.to_owned());
                let mut j = end;
                while code[j..].starts_with("::") {
                    let k = skip_ws(j + 2);
                    if b.get(k) == Some(&b'{') || b.get(k) == Some(&b'<') || b.get(k) == Some(&b'*') {
                        break;
                    }
                    match word_at(k) {
                        Some((w, e)) => {
                            module.idents.insert(w.to_owned());
                            segs.push(w.to_owned());
                            j = e;
                        }
                        None => break,
                    }
                }
                if segs.len() > 1 {
                    module.paths.push(segs);
                }
                i = j.max(i + 1);
            }
        }
    }
    krate.modules.insert(path.to_owned(), module);
}

/// What a path leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Module(String),
    /// An item, in the file that defines it.
    Item(String),
    /// Outside the crate, or not found.
    Nothing,
}

impl Crate {
    fn read(files: &BTreeMap<String, String>) -> Self {
        let mut krate = Crate::default();
        let root = files.get("src/lib.rs").expect("src/lib.rs");
        read_module(&mut krate, files, "src/lib.rs", "crate", &code_of(root));
        krate
    }

    fn parent(path: &str) -> &str {
        path.rsplit_once("::").map_or("crate", |(p, _)| p)
    }

    /// The module a path's first segment starts from, in module `at`, and the rest of the path.
    fn start<'p>(
        &self,
        at: &str,
        path: &'p [String],
        seen: &mut BTreeSet<(String, String)>,
    ) -> Option<(Target, &'p [String])> {
        let first = path.first()?;
        match first.as_str() {
            "crate" | "$crate" => Some((Target::Module("crate".into()), &path[1..])),
            "self" => Some((Target::Module(at.into()), &path[1..])),
            "super" => {
                let mut m = Self::parent(at).to_owned();
                let mut rest = &path[1..];
                while rest.first().is_some_and(|s| s == "super") {
                    m = Self::parent(&m).to_owned();
                    rest = &rest[1..];
                }
                Some((Target::Module(m), rest))
            }
            name => {
                let module = self.modules.get(at)?;
                if let Some(child) = module.children.get(name) {
                    return Some((Target::Module(child.clone()), &path[1..]));
                }
                // A name a `use` of this module binds.
                let t = self.lookup_in(at, name, seen);
                if t == Target::Nothing {
                    None
                } else {
                    Some((t, &path[1..]))
                }
            }
        }
    }

    /// What `name` is in module `m`: a child module, an item defined there, or what a `use`
    /// (a re-export, or a glob) there binds to it.
    fn lookup_in(&self, m: &str, name: &str, seen: &mut BTreeSet<(String, String)>) -> Target {
        if !seen.insert((m.to_owned(), name.to_owned())) {
            return Target::Nothing;
        }
        let Some(module) = self.modules.get(m) else { return Target::Nothing };
        if let Some(child) = module.children.get(name) {
            return Target::Module(child.clone());
        }
        if module.items.contains(name) {
            return Target::Item(module.file.clone());
        }
        if m == "crate" && self.macros.contains(name) {
            return Target::Item(module.file.clone());
        }
        for (bound, path) in &module.uses {
            if bound == name {
                let t = self.resolve(m, path, seen);
                if t != Target::Nothing {
                    return t;
                }
            }
        }
        for (bound, path) in &module.uses {
            if bound == "*" {
                if let Target::Module(g) = self.resolve(m, &path[..path.len() - 1], seen) {
                    let t = self.lookup_in(&g, name, seen);
                    if t != Target::Nothing {
                        return t;
                    }
                }
            }
        }
        Target::Nothing
    }

    /// What `path`, written in module `at`, leads to.
    fn resolve(&self, at: &str, path: &[String], seen: &mut BTreeSet<(String, String)>) -> Target {
        let Some((mut t, rest)) = self.start(at, path, seen) else { return Target::Nothing };
        for seg in rest {
            match &t {
                Target::Module(m) => {
                    let next = self.lookup_in(m, seg, seen);
                    if next == Target::Nothing {
                        // Not found: the module itself (a name of a macro, an enum variant…).
                        return Target::Item(self.modules[m].file.clone());
                    }
                    t = next;
                }
                // Past an item: its associated items, variants, methods.
                Target::Item(_) | Target::Nothing => break,
            }
        }
        t
    }

    /// The files each file imports (its own left out). A re-export (`pub use`) in a
    /// module's own file (`mod.rs`, `lib.rs`) passes names on, an import of the files that
    /// use them rather than of this one; elsewhere it counts as an import, and with
    /// `every_reexport` (the layers' check: what `base/` or `config/` passes on is theirs)
    /// everywhere.
    fn imports(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.imports_counting(false)
    }

    fn imports_counting(&self, every_reexport: bool) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (at, module) in &self.modules {
            let entry = out.entry(module.file.clone()).or_default();
            let mut add = |t: Target| {
                if let Target::Item(f) = t {
                    if f != module.file {
                        entry.insert(f);
                    }
                }
            };
            let passes_on = module.file.ends_with("/mod.rs") || module.file.ends_with("lib.rs");
            for (n, (bound, path)) in module.uses.iter().enumerate() {
                if module.reexports.contains(&n) && passes_on && !every_reexport && !module.idents.contains(bound) {
                    // Passed on (and not used here): an import of the files that use the
                    // name, not of this one.
                    continue;
                }
                match path.split_last() {
                    // A glob imports what the code uses of it: each name written here that
                    // the glob's module has (defined, or brought by its own `use`s).
                    Some((last, prefix)) if last == "*" => match self.resolve(at, prefix, &mut BTreeSet::new()) {
                        Target::Module(m) => {
                            for name in &module.idents {
                                if let t @ Target::Item(_) = self.lookup_in(&m, name, &mut BTreeSet::new()) {
                                    add(t);
                                }
                            }
                        }
                        t => add(t),
                    },
                    _ => add(self.resolve(at, path, &mut BTreeSet::new())),
                }
            }
            for path in &module.paths {
                let first = path[0].as_str();
                let through = matches!(first, "crate" | "super" | "self" | "$crate")
                    || module.children.contains_key(first)
                    || matches!(self.lookup_in(at, first, &mut BTreeSet::new()), Target::Module(_));
                if through {
                    add(self.resolve(at, path, &mut BTreeSet::new()));
                }
            }
        }
        out
    }
}

/// The circles (strongly connected sets of more than one file) of an import graph.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm.
    struct T<'g> {
        g: &'g BTreeMap<String, BTreeSet<String>>,
        index: HashMap<&'g str, usize>,
        low: HashMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'g> T<'g> {
        fn visit(&mut self, v: &'g str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[w].min(self.low[v]);
                    self.low.insert(v, l);
                } else if self.on.contains(w) {
                    let l = self.index[w].min(self.low[v]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut set = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    set.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if set.len() > 1 {
                    set.sort();
                    self.out.push(set);
                }
            }
        }
    }
    let mut t = T {
        g: graph,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

impl Crate {
    /// The engine part (a module of a folder under `src/engine/`) that `path`, written in
    /// module `at`, walks through, if any (`crate::engine::usage::caps::cap` walks through
    /// `crate::engine::usage`; `crate::engine::Ticket`, re-exported by the engine, through none).
    fn part_on_way(&self, at: &str, path: &[String]) -> Option<String> {
        let part = |t: &Target| match t {
            Target::Module(m) if self.modules.get(m).is_some_and(|md| engine_part(&md.file)) => Some(m.clone()),
            _ => None,
        };
        let first = path.first()?.as_str();
        let module = self.modules.get(at)?;
        let through = matches!(first, "crate" | "super" | "self" | "$crate")
            || module.children.contains_key(first)
            || matches!(self.lookup_in(at, first, &mut BTreeSet::new()), Target::Module(_));
        if !through || path.last().is_some_and(|l| l == "*") && path.len() == 1 {
            return None;
        }
        let (mut t, rest) = self.start(at, path, &mut BTreeSet::new())?;
        if let Some(m) = part(&t) {
            return Some(m);
        }
        for seg in rest.iter().filter(|s| *s != "*") {
            let Target::Module(m) = &t else { break };
            let next = self.lookup_in(m, seg, &mut BTreeSet::new());
            if next == Target::Nothing {
                break;
            }
            t = next;
            if let Some(m) = part(&t) {
                return Some(m);
            }
        }
        None
    }

    /// The names through which `from` imports `to`, for a message.
    fn why(&self, from: &str, to: &str) -> String {
        let mut names = BTreeSet::new();
        for (at, module) in self.modules.iter().filter(|(_, m)| m.file == from) {
            for (_, path) in &module.uses {
                let glob = path.last().is_some_and(|l| l == "*");
                if !glob && self.resolve(at, path, &mut BTreeSet::new()) == Target::Item(to.into()) {
                    names.insert(path.join("::"));
                }
                if let Some((last, prefix)) = path.split_last().filter(|(l, _)| *l == "*") {
                    if let Target::Module(m) = self.resolve(at, prefix, &mut BTreeSet::new()) {
                        for name in &module.idents {
                            if self.lookup_in(&m, name, &mut BTreeSet::new()) == Target::Item(to.into()) {
                                names.insert(format!("{}::{last} ({name})", prefix.join("::")));
                            }
                        }
                    }
                }
            }
            for path in &module.paths {
                if self.resolve(at, path, &mut BTreeSet::new()) == Target::Item(to.into()) {
                    names.insert(path.join("::"));
                }
            }
        }
        names.into_iter().collect::<Vec<_>>().join(", ")
    }
}

/// What is wrong with the house whose sources are `files` (path → text): circles, and
/// imports out of `base/` or `config/` that run upward.
fn faults(files: &BTreeMap<String, String>) -> Vec<String> {
    let krate = Crate::read(files);
    let graph = krate.imports();
    let mut faults = Vec::new();
    for circle in circles(&graph) {
        // What ties it, for the message.
        let ties: Vec<String> = circle
            .iter()
            .flat_map(|a| graph[a].iter().filter(|b| circle.contains(b)).map(move |b| (a, b)))
            .map(|(a, b)| format!("{a} -> {b} ({})", krate.why(a, b)))
            .collect();
        faults.push(format!("a circle of {} files: {}", circle.len(), ties.join(", ")));
    }
    // The layers: what `base/` and `config/` import or pass on.
    for (file, imports) in &krate.imports_counting(true) {
        for to in imports {
            let upward = if file.starts_with("src/base/") {
                !to.starts_with("src/base/")
            } else if file.starts_with("src/config/") {
                !to.starts_with("src/config/") && !to.starts_with("src/base/")
            } else {
                false
            };
            if upward {
                faults.push(format!(
                    "{file} imports {to} ({}): base/ imports nothing above it, config/ only base/",
                    krate.why(file, to)
                ));
            }
        }
    }
    // The engine's parts (a folder each) never reach back into its facade: `engine.rs` and
    // the files on top that build on it (`impl Tollgate`).
    let top = |f: &str| f.strip_prefix("src/engine/").is_some_and(|rest| !rest.contains('/'));
    let mut facade: BTreeSet<&String> = graph.keys().filter(|f| f.as_str() == "src/engine/engine.rs").collect();
    // And the files on top that build on the facade, through one another too.
    loop {
        let more: Vec<&String> = graph
            .iter()
            .filter(|(f, imports)| top(f) && !facade.contains(f) && imports.iter().any(|i| facade.contains(i)))
            .map(|(f, _)| f)
            .collect();
        if more.is_empty() {
            break;
        }
        facade.extend(more);
    }
    for (file, imports) in &graph {
        let part = file.starts_with("src/engine/") && !top(file);
        for to in imports.iter().filter(|to| part && facade.contains(to)) {
            faults.push(format!(
                "{file} imports {to} ({}): the engine's parts never import its facade",
                krate.why(file, to)
            ));
        }
    }
    faults
}

/// The rooms of `src/` (a folder, or a file at the top), from the bottom floor up: a file
/// imports only its own room and the rooms of the floors below it (docs/architecture.md,
/// "Source layout"). A new room must be given a floor here.
const FLOORS: &[&[&str]] = &[
    &["src/base/", "src/clock.rs"],
    &["src/config/", "src/metrics.rs"],
    &["src/store/"],
    &["src/tenant/"],
    &["src/billing/"],
    &["src/settings/"],
    &["src/plan.rs"],
    &["src/response/"],
    &["src/engine/"],
    &["src/admin/", "src/layer/"],
    &["src/dashboard/", "src/otel.rs"],
    // The crate root: its modules and what it passes on, above every room.
    &["src/lib.rs"],
];

/// The arrows that run back up today, from a room to a room above it: this list only
/// shrinks. A new upward import is a fault: move the shared item down instead. An arrow
/// listed here that the code no longer draws is a fault too, so that the list is cut with it.
const UPWARD: &[(&str, &str)] = &[
    // The tenant's state holds its compiled plan (`Arc<CompiledPlan>`), which is compiled
    // over the tenant's cells.
    ("src/tenant/", "src/plan.rs"),
];

/// The arrows back up when the floors were drawn (issue 83): `UPWARD` may only lose some.
const UPWARD_WHEN_DRAWN: &[(&str, &str)] = &[("src/tenant/", "src/plan.rs")];

/// The engine's parts: its folders (`src/engine/admit/` …). Outside the engine, nothing
/// imports them: the engine's own files at its top (the facade and what it re-exports) are
/// its surface.
fn engine_part(file: &str) -> bool {
    file.strip_prefix("src/engine/").is_some_and(|rest| rest.contains('/'))
}

/// The room of a source file: its folder under `src/`, or itself at the top.
fn room_of(file: &str) -> String {
    match file.strip_prefix("src/").and_then(|rest| rest.split_once('/')) {
        Some((dir, _)) => format!("src/{dir}/"),
        None => file.to_owned(),
    }
}

/// What is wrong with the floors of the house whose sources are `files`: a room on no floor,
/// an import of a room on the same floor or above (but the `upward` ones), an `upward` arrow
/// the code no longer draws, and a file outside the engine importing an engine part.
fn floor_faults(files: &BTreeMap<String, String>, floors: &[&[&str]], upward: &[(&str, &str)]) -> Vec<String> {
    let krate = Crate::read(files);
    // What a room passes on is its own too: a `pub use` of a higher room's item in a module's
    // own file (`mod.rs`, `lib.rs`) is an arrow from it.
    let graph = krate.imports_counting(true);
    let floor = |room: &str| floors.iter().position(|f| f.contains(&room));
    let mut faults = Vec::new();
    let mut drawn = BTreeSet::new();
    let mut unplaced = BTreeSet::new();
    for (file, imports) in &graph {
        let from = room_of(file);
        let Some(low) = floor(&from) else {
            unplaced.insert(from);
            continue;
        };
        for to in imports {
            let room = room_of(to);
            if room == from {
                continue;
            }
            let Some(high) = floor(&room) else {
                unplaced.insert(room);
                continue;
            };
            if high < low {
                continue;
            }
            if upward.contains(&(from.as_str(), room.as_str())) {
                drawn.insert((from.clone(), room));
                continue;
            }
            let (what, n) = if high == low { ("on its own floor", low + 1) } else { ("above it", high + 1) };
            faults.push(format!(
                "{file} imports {to} ({}): {room} is {what} (floor {n}; {from} is on floor {}): move the shared \
                 item down",
                krate.why(file, to),
                low + 1
            ));
        }
    }
    // Outside the engine, paths into its parts (`crate::engine::usage::…`), whatever file
    // they end in: the engine's surface is what `engine/mod.rs` and its top files name.
    for (at, module) in &krate.modules {
        if module.file.starts_with("src/engine/") {
            continue;
        }
        let written = module.uses.iter().map(|(_, p)| p).chain(module.paths.iter());
        let mut reached = BTreeSet::new();
        for path in written {
            if let Some(part) = krate.part_on_way(at, path) {
                reached.insert((part, path.join("::")));
            }
        }
        for (part, path) in reached {
            faults.push(format!(
                "{} reaches into the engine's part {part} ({path}): outside the engine, nothing does (use the \
                 engine's own items, or move the rule below the engine)",
                module.file
            ));
        }
    }
    for room in unplaced {
        faults.push(format!("{room} is on no floor: give it one in FLOORS"));
    }
    for (from, to) in upward {
        if !drawn.contains(&((*from).to_owned(), (*to).to_owned())) {
            faults.push(format!("{from} no longer imports {to}: take the arrow out of UPWARD (the list only shrinks)"));
        }
    }
    faults
}

fn sources() -> BTreeMap<String, String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = BTreeMap::new();
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                files.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    files
}

/// The crate has no import circle between its files, `base/` imports nothing above it,
/// `config/` imports nothing but `base/`, and the engine's parts (`admit/`, `usage/`,
/// `export/`, `alerts/`) never import its facade (docs/architecture.md, "Where new code goes").
#[test]
fn the_house_has_no_circle_and_its_bottom_stays_at_the_bottom() {
    let files = sources();
    let krate = Crate::read(&files);
    let graph = krate.imports();
    // The reader read the house: every file is a module but those declared only for tests,
    // and the engine's imports were found.
    let unread: Vec<&String> =
        files.keys().filter(|f| !graph.contains_key(*f) && !krate.test_files.contains(*f)).collect();
    assert!(unread.is_empty(), "files the reader did not reach as modules: {unread:?}");
    assert!(graph.values().map(BTreeSet::len).sum::<usize>() > 300, "imports were found");
    let mut faults = faults(&files);
    faults.extend(floor_faults(&files, FLOORS, UPWARD));
    assert!(faults.is_empty(), "the house is not whole:\n{}", faults.join("\n"));
    let grown: Vec<_> = UPWARD.iter().filter(|a| !UPWARD_WHEN_DRAWN.contains(a)).collect();
    assert!(grown.is_empty(), "the arrows that run back up only shrink: {grown:?} is not one of those of issue 83");
}

/// The floors: a room importing one above it is found, as is one importing a room of its own
/// floor, a room on no floor, an allowed upward arrow the code no longer draws, and a file
/// outside the engine reaching into an engine part (an admin file importing a rule of the
/// usage part), but not one importing the engine's facade.
#[test]
fn the_floors_find_an_upward_import_and_a_reach_into_an_engine_part() {
    let tree = |files: &[(&str, &str)]| -> BTreeMap<String, String> {
        files.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect()
    };
    let floors: &[&[&str]] =
        &[&["src/base/"], &["src/store/", "src/billing/"], &["src/engine/"], &["src/admin/"], &["src/lib.rs"]];
    let house = tree(&[
        ("src/lib.rs", "mod base;\nmod store;\nmod billing;\nmod engine;\nmod admin;"),
        ("src/base/mod.rs", "pub struct Id;"),
        ("src/store/mod.rs", "pub struct Row(crate::base::Id);"),
        ("src/billing/mod.rs", "pub struct Sink;"),
        ("src/engine/mod.rs", "mod engine;\nmod usage;\npub use engine::Tollgate;"),
        ("src/engine/engine.rs", "pub struct Tollgate(crate::store::Row);"),
        ("src/engine/usage/mod.rs", "pub(crate) mod caps;"),
        ("src/engine/usage/caps.rs", "pub(crate) fn cap() {}"),
        ("src/admin/mod.rs", "fn f(_: crate::engine::Tollgate) {}"),
    ]);
    assert_eq!(floor_faults(&house, floors, &[]), Vec::<String>::new(), "a whole house");
    // The store reaching up into the engine (no circle: the engine's facade does not import it).
    let mut up = house.clone();
    up.insert(
        "src/store/mod.rs".into(),
        "pub struct Row(crate::base::Id);\nfn f() { crate::engine::usage::caps::cap(); }".into(),
    );
    assert_eq!(
        floor_faults(&up, floors, &[]),
        vec![
            "src/store/mod.rs imports src/engine/usage/caps.rs (crate::engine::usage::caps::cap): src/engine/ is above \
             it (floor 3; src/store/ is on floor 2): move the shared item down",
            "src/store/mod.rs reaches into the engine's part crate::engine::usage (crate::engine::usage::caps::cap): \
             outside the engine, nothing does (use the engine's own items, or move the rule below the engine)",
        ]
    );
    // Allowed, it is no fault; once gone, its allowance is.
    let allowed: &[(&str, &str)] = &[("src/store/", "src/engine/")];
    assert_eq!(floor_faults(&up, floors, allowed).len(), 1, "the reach into a part is still found");
    assert_eq!(
        floor_faults(&house, floors, allowed),
        vec!["src/store/ no longer imports src/engine/: take the arrow out of UPWARD (the list only shrinks)"]
    );
    // A room passing a higher room's item on, from its own `mod.rs`: an arrow up all the same.
    let mut passed = house.clone();
    passed
        .insert("src/store/mod.rs".into(), "pub struct Row(crate::base::Id);\npub use crate::engine::Tollgate;".into());
    assert_eq!(
        floor_faults(&passed, floors, &[]),
        vec![
            "src/store/mod.rs imports src/engine/engine.rs (crate::engine::Tollgate): src/engine/ is above it (floor \
             3; src/store/ is on floor 2): move the shared item down"
        ]
    );
    // Two rooms of one floor.
    let mut side = house.clone();
    side.insert("src/billing/mod.rs".into(), "pub struct Sink(crate::store::Row);".into());
    assert_eq!(
        floor_faults(&side, floors, &[]),
        vec![
            "src/billing/mod.rs imports src/store/mod.rs (crate::store::Row): src/store/ is on its own floor (floor \
             2; src/billing/ is on floor 2): move the shared item down"
        ]
    );
    // An admin file importing an engine part's rule, down the floors but into a part.
    let mut admin = house.clone();
    admin.insert("src/admin/mod.rs".into(), "use crate::engine::usage::caps::cap;\nfn f() { cap() }".into());
    assert_eq!(
        floor_faults(&admin, floors, &[]),
        vec![
            "src/admin/mod.rs reaches into the engine's part crate::engine::usage (crate::engine::usage::caps::cap): \
             outside the engine, nothing does (use the engine's own items, or move the rule below the engine)"
        ]
    );
    // A room on no floor.
    let mut new = house.clone();
    new.insert("src/lib.rs".into(), "mod base;\nmod store;\nmod billing;\nmod engine;\nmod admin;\nmod extra;".into());
    new.insert("src/extra.rs".into(), "pub struct E(crate::base::Id);".into());
    assert_eq!(floor_faults(&new, floors, &[]), vec!["src/extra.rs is on no floor: give it one in FLOORS"]);
}

/// The reader finds what it must: a circle through a re-export, an import through a module a
/// `use` named, a path in code; and it ignores comments, strings and test modules.
#[test]
fn the_house_reader_finds_circles_through_re_exports_and_paths_and_ignores_comments() {
    let tree = |files: &[(&str, &str)]| -> BTreeMap<String, String> {
        files.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect()
    };
    // a → (through engine's re-export) b; b → a by a path in code.
    let circle = tree(&[
        ("src/lib.rs", "mod engine;\nmod a;\npub use engine::B;"),
        ("src/engine/mod.rs", "mod b;\npub use b::B;"),
        ("src/engine/b.rs", "pub struct B;\nfn f() { crate::a::helper(); }"),
        ("src/a.rs", "use crate::engine::B;\npub(crate) fn helper() {}"),
    ]);
    let found = faults(&circle);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("src/a.rs -> src/engine/b.rs (crate::engine::B)"), "{found:?}");
    assert!(found[0].contains("src/engine/b.rs -> src/a.rs (crate::a::helper)"), "{found:?}");
    // The same, tied only by a comment, a doc link, a string and a test module: no circle.
    let quiet = tree(&[
        ("src/lib.rs", "mod engine;\nmod a;"),
        ("src/engine/mod.rs", "mod b;\npub use b::B;"),
        (
            "src/engine/b.rs",
            "/// See [`crate::a::helper`].\npub struct B;\n// crate::a::helper()\nconst S: &str = \"crate::a::helper\";\n\
             #[cfg(test)]\nmod tests { use crate::a::helper; }",
        ),
        ("src/a.rs", "use crate::engine::B;\npub(crate) fn helper() {}"),
    ]);
    assert_eq!(faults(&quiet), Vec::<String>::new());
    // Through a module a `use` named, and `super::`: config importing upward is found.
    let upward = tree(&[
        ("src/lib.rs", "mod config;\nmod engine;"),
        ("src/config/mod.rs", "mod plans;"),
        ("src/config/plans.rs", "use crate::engine;\nfn f() -> engine::usage::Overrun { todo!() }"),
        ("src/engine/mod.rs", "pub(crate) mod usage;"),
        ("src/engine/usage.rs", "pub enum Overrun { A }\nfn g() { super::super::config::plans::x(); }"),
    ]);
    let found = faults(&upward);
    assert!(found.iter().any(|f| f.starts_with("src/config/plans.rs imports src/engine/usage.rs")), "{found:?}");
    // An engine part importing the facade: found.
    let facade = tree(&[
        ("src/lib.rs", "mod engine;"),
        ("src/engine/mod.rs", "mod engine;\nmod usage;\npub use engine::Tollgate;"),
        ("src/engine/engine.rs", "pub struct Tollgate;"),
        ("src/engine/usage/mod.rs", "mod record;"),
        ("src/engine/usage/record.rs", "impl crate::engine::Tollgate {}"),
    ]);
    let found = faults(&facade);
    assert_eq!(
        found,
        vec![
            "src/engine/usage/record.rs imports src/engine/engine.rs (crate::engine::Tollgate): the engine's parts never \
             import its facade"
        ]
    );
    // A file on top that builds on the facade is the facade too: a part importing it is found.
    let door = tree(&[
        ("src/lib.rs", "mod engine;"),
        ("src/engine/mod.rs", "mod engine;\nmod door;\nmod shared;\nmod usage;\npub use engine::Tollgate;"),
        ("src/engine/engine.rs", "pub struct Tollgate;"),
        ("src/engine/door.rs", "pub(crate) struct Cache;\nimpl crate::engine::Tollgate {}"),
        ("src/engine/shared.rs", "pub(crate) struct Shared;"),
        ("src/engine/usage/mod.rs", "mod units;"),
        ("src/engine/usage/units.rs", "use crate::engine::{door::Cache, shared::Shared};"),
    ]);
    assert_eq!(
        faults(&door),
        vec![
            "src/engine/usage/units.rs imports src/engine/door.rs (crate::engine::door::Cache): the engine's parts \
             never import its facade"
        ]
    );
    // Through another file on top: still the facade.
    let mut through = door.clone();
    through.insert(
        "src/engine/mod.rs".into(),
        "mod engine;\nmod door;\nmod record;\nmod shared;\nmod usage;\npub use engine::Tollgate;".into(),
    );
    through.insert("src/engine/record.rs".into(), "pub(crate) struct Recorder(crate::engine::door::Cache);".into());
    through.insert("src/engine/usage/units.rs".into(), "use crate::engine::{record::Recorder, shared::Shared};".into());
    assert_eq!(
        faults(&through),
        vec![
            "src/engine/usage/units.rs imports src/engine/record.rs (crate::engine::record::Recorder): the engine's \
             parts never import its facade"
        ]
    );
    // base importing the store: found.
    let base = tree(&[
        ("src/lib.rs", "mod base;\nmod store;"),
        ("src/base/mod.rs", "use crate::store::{Thing as T, other::*};\nfn f(_: O) {}"),
        ("src/store/mod.rs", "pub struct Thing;\npub mod other;"),
        ("src/store/other.rs", "pub struct O;"),
    ]);
    let found = faults(&base);
    assert_eq!(
        found,
        vec![
            "src/base/mod.rs imports src/store/mod.rs (crate::store::Thing): base/ imports nothing above it, config/ \
             only base/",
            "src/base/mod.rs imports src/store/other.rs (crate::store::other::* (O)): base/ imports nothing above \
             it, config/ only base/",
        ]
    );
    // What base/ passes on is its own, even from its `mod.rs`: found.
    let passed = tree(&[
        ("src/lib.rs", "mod base;\nmod store;"),
        ("src/base/mod.rs", "pub use crate::store::Thing;"),
        ("src/store/mod.rs", "pub struct Thing;"),
    ]);
    assert_eq!(
        faults(&passed),
        vec![
            "src/base/mod.rs imports src/store/mod.rs (crate::store::Thing): base/ imports nothing above it, config/ \
              only base/"
        ]
    );
}

/// A re-export in a file that is not its module's own (`mod.rs`, `lib.rs`) is an import of
/// that file: a circle through it is found; a module's own file passing a child's name on is
/// not tied to the child by it.
#[test]
fn the_house_reader_counts_a_leaf_files_re_exports() {
    let tree = |files: &[(&str, &str)]| -> BTreeMap<String, String> {
        files.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect()
    };
    let leaf = tree(&[
        ("src/lib.rs", "mod a;\nmod b;"),
        ("src/a.rs", "pub(crate) use crate::b::B;\npub(crate) fn helper() {}"),
        ("src/b.rs", "pub struct B;\nfn f() { crate::a::helper(); }"),
    ]);
    let found = faults(&leaf);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("src/a.rs -> src/b.rs (crate::b::B)"), "{found:?}");
    let own = tree(&[
        ("src/lib.rs", "mod engine;"),
        ("src/engine/mod.rs", "mod b;\npub use b::B;\npub(crate) fn helper() {}"),
        ("src/engine/b.rs", "pub struct B;\nfn f() { super::helper(); }"),
    ]);
    assert_eq!(faults(&own), Vec::<String>::new());
    // A module's own file that uses what it passes on imports it: the circle is found.
    let used = tree(&[
        ("src/lib.rs", "mod engine;"),
        ("src/engine/mod.rs", "mod b;\npub(crate) use b::B;\npub(crate) fn helper() -> B { B::new() }"),
        ("src/engine/b.rs", "pub struct B;\nimpl B { fn new() -> Self { super::helper(); B } }"),
    ]);
    let found = faults(&used);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("src/engine/mod.rs -> src/engine/b.rs (B::new, b::B)"), "{found:?}");
    // `const fn` and `static mut` items are found by their names.
    let qualified = tree(&[
        ("src/lib.rs", "mod a;\nmod b;"),
        ("src/a.rs", "pub const fn helper() {}\npub static mut N: u8 = 0;\nfn f() { crate::b::g(); }"),
        ("src/b.rs", "use crate::a::*;\npub fn g() { helper(); }"),
    ]);
    let found = faults(&qualified);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("src/b.rs -> src/a.rs (crate::a::* (helper))"), "{found:?}");
}

/// A glob import (`use super::*`) imports what the code uses of it, traced through the
/// glob's module's own `use`s to the files that define it; a name it does not use ties
/// nothing.
#[test]
fn the_house_reader_traces_a_glob_through_its_modules_uses() {
    let tree = |files: &[(&str, &str)]| -> BTreeMap<String, String> {
        files.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect()
    };
    let files = tree(&[
        ("src/lib.rs", "mod store;"),
        (
            "src/store/mod.rs",
            "mod race;\nmod quota;\nmod usage;\nuse race::Race;\npub struct Store;\npub struct Unused;",
        ),
        ("src/store/race.rs", "pub enum Race { Won }"),
        ("src/store/quota.rs", "use super::*;\nfn f() -> Race { Race::Won }"),
        ("src/store/usage.rs", "use super::*;\nfn g() -> u32 { 1 }"),
    ]);
    let graph = Crate::read(&files).imports();
    assert_eq!(graph["src/store/quota.rs"], BTreeSet::from(["src/store/race.rs".to_owned()]));
    assert_eq!(graph["src/store/usage.rs"], BTreeSet::new());
    // race.rs reaching back into its module's file closes a circle with that `use`.
    let mut circle = files.clone();
    circle.insert("src/store/race.rs".into(), "pub enum Race { Won }\nfn f(_: super::Store) {}".into());
    let found = faults(&circle);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("src/store/mod.rs -> src/store/race.rs (race::Race)"), "{found:?}");
}
