//! The shape of the source tree, held to what the issues promise: no source file over 700
//! lines, no import cycle among the controller's modules, and a README whose layout names
//! every source file and no file that does not exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

/// Every `.rs` file under `dir`, relative to `base`.
fn rust_files(dir: &Path, base: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.strip_prefix(base).unwrap().display().to_string());
        }
    }
}

fn sources() -> Vec<String> {
    let mut files = vec![];
    for dir in ["src", "bench/src"] {
        let d = root().join(dir);
        if d.is_dir() {
            rust_files(&d, &root(), &mut files);
        }
    }
    files.sort();
    files
}

#[test]
fn no_source_file_is_over_700_lines() {
    let long: Vec<String> = sources()
        .into_iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(root().join(&f))
                .unwrap()
                .lines()
                .count();
            (n > 700).then(|| format!("{f}: {n} lines"))
        })
        .collect();
    assert!(long.is_empty(), "split these along a concept: {long:?}");
}

/// The controller module a file is (`controller/managed_secret/plan.rs` → `managed_secret`).
fn controller_module(file: &str) -> Option<String> {
    let rest = file.strip_prefix("src/controller/")?;
    let first = rest.split('/').next()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

#[test]
fn the_controller_modules_depend_on_each_other_one_way() {
    let files: Vec<String> = sources()
        .into_iter()
        .filter(|f| f.starts_with("src/controller/"))
        .collect();
    let modules: BTreeSet<String> = files.iter().filter_map(|f| controller_module(f)).collect();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = controller_module(f).unwrap();
        if me == "mod" {
            continue; // declares the modules and re-exports; runs `wiring`
        }
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        for other in &modules {
            let named = [
                format!("super::{other}::"),
                format!("super::{other},"),
                format!("super::{{{other}"),
                format!(" {other}::"),
                format!("crate::controller::{other}"),
            ];
            if other != &me && named.iter().any(|n| text.contains(n.as_str())) {
                uses.entry(me.clone()).or_default().insert(other.clone());
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        uses: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("import cycle: {} -> {m}", path[at..].join(" -> "));
        }
        if !done.insert(m.to_owned()) {
            return;
        }
        path.push(m.to_owned());
        for next in uses.get(m).into_iter().flatten() {
            visit(next, uses, path, done);
        }
        path.pop();
    }
    for m in &modules {
        visit(m, &uses, &mut vec![], &mut BTreeSet::new());
    }
    assert!(
        uses.contains_key("managed_secret"),
        "the scan found the reconciler's imports"
    );
}

/// The README's layout block: the fenced block that starts with `src/`.
fn readme_layout() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("```\nsrc/\n")
        .expect("README.md has a layout block starting with src/");
    let block = &readme[start + 4..];
    block[..block.find("```").unwrap()].to_owned()
}

#[test]
fn the_readme_layout_names_every_source_file_and_no_missing_one() {
    let layout = readme_layout();
    // Each line names a path relative to the directory lines above it (`src/`, `  api/`…).
    let mut dirs: Vec<(usize, String)> = vec![];
    let mut named = BTreeSet::new();
    for line in layout.lines() {
        let indent = line.len() - line.trim_start().len();
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        if !first.ends_with('/') && !first.contains('.') {
            continue; // a description's continuation line
        }
        dirs.retain(|(i, _)| *i < indent);
        let prefix: String = dirs.iter().map(|(_, d)| d.as_str()).collect();
        let path = format!("{prefix}{first}");
        if first.ends_with('/') {
            dirs.push((indent, first.to_owned()));
        }
        named.insert(path);
    }
    let missing: Vec<&String> = named
        .iter()
        .filter(|p| !root().join(p.as_str()).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "the README's layout names files that do not exist: {missing:?}"
    );
    let unnamed: Vec<String> = sources()
        .into_iter()
        .filter(|f| !named.contains(f))
        .collect();
    assert!(
        unnamed.is_empty(),
        "the README's layout does not name: {unnamed:?}"
    );
}
