//! The library's layering, enforced: reads every `crate::…` and `super::…` path in `agent/src` (code
//! only: comments, strings and `#[cfg(test)]` modules are skipped) and fails on
//! - an import against the layering below (a module may use only modules of lower layers, and the
//!   files of its own top-level module),
//! - an import cycle between files (modules) of the library,
//! - MQTT (`rumqttc`, `rumqttd`) used outside `wire`,
//! - a dependency of the kernels crate on the agent.
//!
//! The same layering is drawn in docs/architecture.md; change both together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. A module may import modules of lower layers only; modules of one layer never
/// import each other.
const LAYERS: &[&[&str]] = &[
    &["fsio", "telemetry", "prometheus"],
    &["classes", "micrograph", "web"],
    &["mask"],
    &["synth", "metrics", "features", "dataset"],
    &["augment"],
    &["model"],
    &["train"],
    &["pipeline"],
    &["wire"],
    &["fleet", "federated"],
    &["study", "console"],
    &["node"],
    &["demo"],
    &["cli"],
];

/// Inside `federated`: the codec, DP and secure aggregation's protocol core, shared, below the two sides, which never import each other.
const FEDERATED_LAYERS: &[&[&str]] = &[
    &["compress", "dp", "schedule"],
    &["secagg"],
    &["edge", "server"],
];

/// The only top-level module that may name the MQTT crates.
const MQTT_MODULE: &str = "wire";

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `a/b.rs` → `a::b`, `a/mod.rs` → `a`, `lib.rs` → `` (the crate root); `main.rs` is the binary.
fn module_of(rel: &Path) -> Option<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && stem == "main" {
        return None;
    }
    if stem != "mod" && !(parts.is_empty() && stem == "lib") {
        parts.push(stem.to_owned());
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source with comments and string/char literals blanked out (same length, newlines kept).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
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
        } else if b[i] == b'r' && (b[i..].starts_with(b"r#\"") || b[i..].starts_with(b"r\"")) {
            // Raw string: r"…" or r#"…"#.
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let start = i + 2 + hashes;
            let end = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| start + p + close.len());
            out.extend(b[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else if b[i] == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('x', '\n', '\''); lifetimes ('a) are left alone.
            let end = b[i + 1..]
                .iter()
                .enumerate()
                .skip(1)
                .find(|&(_, &c)| c == b'\'')
                .map_or(b.len(), |(k, _)| i + 1 + k + 1);
            out.extend(b[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Removes `#[cfg(test)] mod NAME { … }` blocks: test code may reach anywhere.
fn without_test_modules(code: &str) -> String {
    let mut s = code.to_owned();
    while let Some(at) = s.find("#[cfg(test)]") {
        let rest = &s[at..];
        let Some(open) = rest.find('{') else { break };
        let head = &rest[..open];
        if !head.contains("mod ") {
            // A test-only item other than a module: blank the attribute only.
            s.replace_range(at..at + "#[cfg(test)]".len(), &" ".repeat(12));
            continue;
        }
        let mut depth = 0;
        let mut end = s.len();
        for (k, c) in s[at + open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = at + open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        s.replace_range(at..end, "");
    }
    s
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a use-tree that starts at `s` (just after `crate::`): `a::b::{c, d::e}` → the paths.
fn expand(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    let mut i = 0;
    let chars: Vec<char> = s.chars().collect();
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '{' {
            i += 1;
            loop {
                while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
                    i += 1;
                }
                if i >= chars.len() || chars[i] == '}' {
                    return i + 1;
                }
                let rest: String = chars[i..].iter().collect();
                i += expand(&rest, &path, out);
            }
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        if i > start {
            path.push(chars[start..i].iter().collect());
        }
        let after: String = chars[i..chars.len().min(i + 3)].iter().collect();
        if after.starts_with("::") {
            i += 2;
            continue;
        }
        out.push(path);
        return i;
    }
}

/// Every module path named in `code` of module `me` (`crate::…`, `super::…`).
fn named_paths(me: &str, code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    let mut k = 0;
    while k < chars.len() {
        let (at, c) = chars[k];
        k += 1;
        let prev_ident = at > 0 && code[..at].chars().next_back().is_some_and(is_ident);
        if prev_ident || !(c == 'c' || c == 's') {
            continue;
        }
        let rest = &code[at..];
        if let Some(r) = rest.strip_prefix("crate::") {
            expand(r, &[], &mut out);
        } else if rest.starts_with("super::") {
            let mut base: Vec<String> = me.split("::").map(str::to_owned).collect();
            let mut r = rest;
            while let Some(next) = r.strip_prefix("super::") {
                base.pop();
                r = next;
            }
            expand(r, &base, &mut out);
        }
    }
    out
}

struct Library {
    /// Module path → its code (comments, strings and test modules removed).
    code: BTreeMap<String, String>,
    /// Module → modules it imports (the longest known prefix of each named path).
    imports: BTreeMap<String, BTreeSet<String>>,
}

fn library() -> Library {
    let root = src_dir();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut code = BTreeMap::new();
    for f in files {
        if let Some(m) = module_of(f.strip_prefix(&root).unwrap()) {
            let src = std::fs::read_to_string(&f).unwrap();
            code.insert(m, without_test_modules(&code_only(&src)));
        }
    }
    let known: BTreeSet<String> = code.keys().cloned().collect();
    let mut imports = BTreeMap::new();
    for (m, c) in &code {
        let mut to = BTreeSet::new();
        for path in named_paths(m, c) {
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|p| known.contains(p));
            if let Some(t) = target
                && &t != m
            {
                to.insert(t);
            }
        }
        imports.insert(m.clone(), to);
    }
    Library { code, imports }
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or("")
}

fn rank(layers: &[&[&str]], name: &str) -> Option<usize> {
    layers.iter().position(|l| l.contains(&name))
}

/// Whether `from` may import `to` under the layering; `None` when allowed, else why not.
fn violation(from: &str, to: &str) -> Option<String> {
    let (a, b) = (top(from), top(to));
    if from.is_empty() || to.is_empty() {
        return None; // the crate root declares the modules
    }
    if a == b {
        if a == "federated" {
            let sub = |m: &str| m.split("::").nth(1).unwrap_or("").to_owned();
            let (sa, sb) = (sub(from), sub(to));
            if sa.is_empty() || sb.is_empty() || sa == sb {
                return None;
            }
            let (ra, rb) = (rank(FEDERATED_LAYERS, &sa)?, rank(FEDERATED_LAYERS, &sb)?);
            if rb >= ra {
                return Some(format!(
                    "federated::{sa} may not import federated::{sb} (layers {FEDERATED_LAYERS:?})"
                ));
            }
        }
        return None;
    }
    match (rank(LAYERS, a), rank(LAYERS, b)) {
        (Some(ra), Some(rb)) if rb < ra => None,
        (Some(_), Some(_)) => Some(format!(
            "{a} may not import {b}: {b} is not in a lower layer"
        )),
        _ => Some(format!(
            "{a} or {b} is missing from LAYERS: place new modules in the layering"
        )),
    }
}

fn is_ancestor(a: &str, b: &str) -> bool {
    a.is_empty() || b.starts_with(&format!("{a}::"))
}

/// Cycles in the import graph between modules that are not each other's ancestors (a parent
/// module declares and re-exports its children).
fn cycles(imports: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components, iteratively simple enough for a few hundred nodes.
    struct State<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        let g = s.g;
        for w in g.get(v).into_iter().flatten() {
            if is_ancestor(v, w) || is_ancestor(w, v) {
                continue;
            }
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(lw));
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g: imports,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in imports.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn every_import_follows_the_layering() {
    let lib = library();
    assert!(lib.code.len() > 50, "read only {} modules", lib.code.len());
    let mut bad = Vec::new();
    for (from, tos) in &lib.imports {
        for to in tos {
            if let Some(why) = violation(from, to) {
                bad.push(format!("{from} → {to}: {why}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_import_cycles_between_modules() {
    let lib = library();
    let found = cycles(&lib.imports);
    assert!(found.is_empty(), "import cycles: {found:#?}");
}

#[test]
fn only_wire_touches_mqtt() {
    let lib = library();
    let bad: Vec<&String> = lib
        .code
        .iter()
        .filter(|(m, c)| top(m) != MQTT_MODULE && (c.contains("rumqttc") || c.contains("rumqttd")))
        .map(|(m, _)| m)
        .collect();
    assert!(
        bad.is_empty(),
        "MQTT crates used outside {MQTT_MODULE}: {bad:?}"
    );
}

#[test]
fn every_module_has_a_place_in_the_layering() {
    let lib = library();
    let missing: BTreeSet<&str> = lib
        .code
        .keys()
        .map(|m| top(m))
        .filter(|t| !t.is_empty() && rank(LAYERS, t).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "modules missing from LAYERS: {missing:?}"
    );
}

#[test]
fn the_kernels_crate_does_not_depend_on_the_agent() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let deps: toml::Table = text.parse().unwrap();
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(t) = deps.get(section).and_then(|d| d.as_table()) {
            assert!(
                !t.contains_key("microfed"),
                "kernels/Cargo.toml [{section}] names the agent crate"
            );
        }
    }
}

// The checker itself, on small inputs: it must see what it is meant to see.
#[test]
fn the_checker_finds_paths_cycles_and_violations() {
    let code = code_only(
        "use crate::{fsio::write_atomic, wire::{link::Link, protocol}};\n\
         // use crate::demo::X;\n\
         let s = \"crate::cli::run\";\n\
         fn f() { super::sibling::g(); crate::model::runtime::Segmenter::load(p); }\n",
    );
    let paths: BTreeSet<String> = named_paths("pipeline::capture", &code)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "fsio::write_atomic",
        "wire::link::Link",
        "wire::protocol",
        "pipeline::sibling::g",
        "model::runtime::Segmenter::load",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(paths, want);
    let stripped = without_test_modules("fn a() {}\n#[cfg(test)]\nmod tests { use crate::cli; }\n");
    assert!(!stripped.contains("crate::cli"));

    assert!(violation("pipeline::capture", "wire::link").is_some());
    assert!(violation("wire::link", "pipeline::publish").is_none());
    assert!(violation("fleet::store", "federated::edge::participant").is_some());
    assert!(violation("federated::edge::local", "federated::server::merge").is_some());
    assert!(violation("federated::server::aggregator", "federated::compress").is_none());
    assert!(violation("federated::compress", "federated::edge::local").is_some());

    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a::x".into()).or_default().insert("a::y".into());
    g.entry("a::y".into()).or_default().insert("a::x".into());
    g.entry("a".into()).or_default().insert("a::x".into());
    g.entry("a::x".into()).or_default().insert("a".into());
    assert_eq!(cycles(&g), vec![vec!["a::x".to_owned(), "a::y".to_owned()]]);
}
