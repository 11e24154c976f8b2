//! Keeps the module graph honest: no import cycle between the top-level
//! modules of `src/`, and docs/architecture.md shows the graph the code has.
//!
//! The graph is read from the source text: a file under `src/<top>/` (or
//! `src/<top>.rs`) depends on every `crate::<other>` it names. That is a
//! slight over-approximation (a path in a doc comment counts), which errs on
//! the side of reporting a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module name → the top-level modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src/") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`None` for lib.rs and main.rs).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first name of each element of a `{a::x, b, c::{..}}` group that
/// starts `s` (after the `{`).
fn group_heads(s: &str) -> Vec<String> {
    let (mut out, mut depth, mut at_start) = (Vec::new(), 1usize, true);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => break,
            '}' => depth -= 1,
            ',' if depth == 1 => at_start = true,
            c if c.is_whitespace() => {}
            _ if at_start && depth == 1 => {
                out.push(ident(&s[i..]));
                at_start = false;
            }
            _ => {}
        }
    }
    out
}

/// The top-level modules a path that reached the crate root names: one
/// name, or every head of a `{..}` group.
fn heads_after_root(rest: &str, out: &mut BTreeSet<String>) {
    match rest.strip_prefix('{') {
        Some(group) => out.extend(group_heads(group)),
        None => {
            out.insert(ident(rest));
        }
    }
}

/// Every top-level module `text` names, for a file `depth` modules below
/// the crate root (src/a.rs and src/a/mod.rs: 1; src/a/b.rs: 2): the `x`
/// of `crate::x`, of `crate::{x::.., y}`, and of `super::super::x` chains
/// that climb to the root (an inline module such as `mod tests` is one
/// level deeper than its file).
fn crate_paths(text: &str, depth: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // `meshca_crate::x` or `xcrate::` are not ours.
        let before = text[..i].chars().next_back();
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            heads_after_root(&text[i + "crate::".len()..], &mut out);
        }
    }
    for (i, _) in text.match_indices("super::") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue; // the middle of a chain, counted from its start
        }
        let mut rest = &text[i..];
        let mut ups = 0;
        let depth = depth + inline_modules_before(text, i);
        while let Some(r) = rest.strip_prefix("super::") {
            rest = r;
            ups += 1;
        }
        if ups >= depth {
            heads_after_root(rest, &mut out);
        }
    }
    out.remove("");
    out.remove("self");
    out
}

/// How many inline `mod name {` blocks open before byte `at`. Inline
/// modules (`mod tests`) sit at the end of a file by convention, so each
/// one is taken to run to the end of the file.
fn inline_modules_before(text: &str, at: usize) -> usize {
    text[..at]
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("pub(crate) ")
                .or(l.strip_prefix("pub "))
                .unwrap_or(l);
            l.strip_prefix("mod ")
                .is_some_and(|r| r.trim_end().ends_with('{'))
        })
        .count()
}

/// How many modules below the crate root a file's module is.
fn depth(src: &Path, file: &Path) -> usize {
    let rel = file.strip_prefix(src).expect("under src/");
    let n = rel.components().count();
    if rel.file_name().is_some_and(|f| f == "mod.rs") {
        n - 1
    } else {
        n
    }
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g = Graph::new();
    for f in &files {
        let Some(top) = top_module(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        let deps = g.entry(top.clone()).or_default();
        for d in crate_paths(&text, depth(&src, f)) {
            if d != top {
                deps.insert(d);
            }
        }
    }
    // `crate::proto` is generated code declared in lib.rs, not a module file.
    let known: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    g
}

/// One cycle, if the graph has any (depth-first search with colours).
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        n: &str,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            match state.get(d).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s == d).expect("on stack");
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(g, d, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(g, n, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// The graph as the Mermaid block docs/architecture.md embeds.
fn mermaid(g: &Graph) -> String {
    let mut out = String::from("```mermaid\nflowchart TD\n");
    for (n, deps) in g {
        for d in deps {
            out.push_str(&format!("    {n} --> {d}\n"));
        }
    }
    out.push_str("```\n");
    out
}

#[test]
fn the_checker_sees_a_cycle_when_there_is_one() {
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        crate_paths("use crate::trust::x; meshca_crate::y;", 1),
        names(&["trust"])
    );
    // Grouped imports and `super::` chains that climb to the crate root
    // name top-level modules too (a review fooled the first version so).
    assert_eq!(
        crate_paths("use crate::{ca::Authority as _, trust,\n util::{a, b}};", 2),
        names(&["ca", "trust", "util"])
    );
    assert_eq!(
        crate_paths("use super::super::trust as _;", 2),
        names(&["trust"])
    );
    assert_eq!(
        crate_paths("use super::super::{ca, x::y};", 2),
        names(&["ca", "x"])
    );
    // Inside the same top-level module: not a dependency on another one.
    assert_eq!(crate_paths("use super::super::trust as _;", 3), names(&[]));
    assert_eq!(crate_paths("use super::store::X;", 2), names(&[]));
    // In an inline module, one more `super` stays in the file's module.
    assert_eq!(
        crate_paths("mod tests {\n    use super::super::client::X;\n}", 2),
        names(&[])
    );
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let g = graph();
    assert!(g.len() > 10, "read too few modules: {g:?}");
    if let Some(c) = find_cycle(&g) {
        panic!("import cycle between top-level modules: {}", c.join(" -> "));
    }
}

#[test]
fn architecture_doc_shows_the_module_graph_the_code_has() {
    let g = graph();
    let want = mermaid(&g);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md");
    let doc = std::fs::read_to_string(&path).expect("read docs/architecture.md");
    assert!(
        doc.contains(&want),
        "docs/architecture.md's module graph is out of date; replace its mermaid block with:\n\n{want}"
    );
}

// ---------------------------------------------------------------------------
// Function length: a function should fit on a screen or two. The check reads
// the source text (comments, strings and char literals blanked out first, so
// a brace inside them does not count) and measures each `fn` from the line
// that names it to the line of its closing brace.

/// The longest a function in `src/` may be, in lines (signature line to
/// closing brace, doc comments and attributes not counted).
const MAX_FN_LINES: usize = 120;

/// Functions allowed to be longer, as (file under `src/`, function name),
/// each with a comment saying why. A name covers every function of that name
/// in the file. Only declarative tables belong here for good; a
/// "TODO(issue 12)" entry is a function its owner is still splitting. An
/// entry that is no longer needed fails the test, so the list cannot go stale.
const LONG_FN_ALLOWED: &[(&str, &str)] = &[];

/// `text` with comments and the contents of string and char literals
/// replaced by spaces (newlines kept, so line numbers stay right).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let prev_ident = i > 0 && ident(c[i - 1]);
        // Line comment.
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
            continue;
        }
        // Block comment (they nest in Rust).
        if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            continue;
        }
        // Raw string: r"…", r#"…"#, br#"…"#.
        if c[i] == 'r' && (!prev_ident || (i > 0 && c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
        {
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) == Some(&'"') {
                let hashes = j - i - 1;
                for _ in i..=j {
                    out.push(' ');
                }
                i = j + 1;
                while i < c.len() {
                    if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                        for _ in 0..=hashes {
                            out.push(' ');
                        }
                        i += hashes + 1;
                        break;
                    }
                    out.push(blank(c[i]));
                    i += 1;
                }
                continue;
            }
        }
        // String (or byte string).
        if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
            continue;
        }
        // Char literal ('x', '\n', '\u{7b}'); a lifetime ('a) is left alone.
        if c[i] == '\'' {
            let end = if c.get(i + 1) == Some(&'\\') {
                (i + 2..c.len()).find(|&j| c[j] == '\'')
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            if let Some(end) = end {
                for _ in i..=end {
                    out.push(' ');
                }
                i = end + 1;
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

/// The function a line declares, if it starts with
/// `[pub[(…)]] [const] [async] [unsafe] fn name`.
fn declared_fn(line: &str) -> Option<String> {
    let mut rest = line.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("pub(") {
            rest = r.split_once(')')?.1.trim_start();
        } else if let Some(r) = ["pub ", "const ", "async ", "unsafe ", "default "]
            .iter()
            .find_map(|k| rest.strip_prefix(k))
        {
            rest = r.trim_start();
        } else {
            break;
        }
    }
    let name: String = rest
        .strip_prefix("fn ")?
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Every function with a body in `text`: (name, first line (1-based), lines).
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = declared_fn(line) else {
            continue;
        };
        // Find the body's opening brace (a `;` outside brackets first means
        // a declaration without a body), then its matching close.
        let (mut depth, mut nesting, mut started) = (0usize, 0usize, false);
        'scan: for (j, l) in lines.iter().enumerate().skip(i) {
            for ch in l.chars() {
                match ch {
                    '(' | '[' if !started => nesting += 1,
                    ')' | ']' if !started => nesting = nesting.saturating_sub(1),
                    ';' if !started && nesting == 0 => break 'scan,
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' if started => {
                        depth -= 1;
                        if depth == 0 {
                            out.push((name.clone(), i + 1, j - i + 1));
                            break 'scan;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Every function in `src/` longer than `MAX_FN_LINES`:
/// (file under src/, name, first line, lines).
fn long_functions() -> Vec<(String, String, usize, usize)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&src)
            .expect("under src/")
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(f).expect("read source");
        for (name, line, len) in functions(&text) {
            if len > MAX_FN_LINES {
                out.push((rel.clone(), name, line, len));
            }
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.3));
    out
}

#[test]
fn the_length_check_measures_bodies_not_braces_in_literals_or_comments() {
    let text = r##"
pub(crate) async fn three() {
    let s = "}}}";
}
fn declared(x: [u8; 4]) -> u8;
fn braces_in_literals<'a>(x: &'a str) -> char {
    // } a comment brace
    /* } /* nested } */ still a comment { */
    let r = r#"}"#;
    let c = '}';
    let e = '\'';
    let b = br"}";
    if x.is_empty() {
        c
    } else {
        '{'
    }
}
impl X {
    const fn f(&self) -> [u8; 2] { [0; 2] }
}
"##;
    let got = functions(text);
    assert_eq!(
        got,
        vec![
            ("three".to_string(), 2, 3),
            ("braces_in_literals".to_string(), 6, 13),
            ("f".to_string(), 20, 1),
        ]
    );
    // A function one line over the limit is reported.
    let body = "    let _ = 1;\n".repeat(MAX_FN_LINES - 1);
    let long = format!("fn long() {{\n{body}}}\n");
    assert_eq!(
        functions(&long),
        vec![("long".to_string(), 1, MAX_FN_LINES + 1)]
    );
}

#[test]
fn no_function_in_src_is_longer_than_a_screenful_or_two() {
    let long = long_functions();
    let allowed = |file: &str, name: &str| {
        LONG_FN_ALLOWED
            .iter()
            .any(|(f, n)| *f == file && *n == name)
    };
    let offenders: Vec<String> = long
        .iter()
        .filter(|(f, n, _, _)| !allowed(f, n))
        .map(|(f, n, line, len)| format!("src/{f}:{line} fn {n}: {len} lines"))
        .collect();
    assert!(
        offenders.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them into named steps; only a declarative \
         table may go in LONG_FN_ALLOWED, with a comment why):\n  {}",
        offenders.join("\n  ")
    );
    let stale: Vec<String> = LONG_FN_ALLOWED
        .iter()
        .filter(|(f, n)| !long.iter().any(|(lf, ln, _, _)| lf == f && ln == n))
        .map(|(f, n)| format!("(\"{f}\", \"{n}\")"))
        .collect();
    assert!(
        stale.is_empty(),
        "LONG_FN_ALLOWED (tests/architecture.rs) lists functions that are now short enough or \
         gone; delete these entries:\n  {}",
        stale.join("\n  ")
    );
}
