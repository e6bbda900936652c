//! The workspace's layering. Between crates, as `cargo tree` sees it: the contract crate
//! (`crac-api`) and the agent, which runs inside every app container, build without a
//! Kubernetes client, TLS or an async runtime; a dependency that pulls one of them back in
//! fails here. Within a crate: no two modules import each other, directly or round a loop.

use crac_tests::repo_root;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates that belong to a client, its TLS or its runtime, never to the contract.
const CLIENT_SIDE: [&str; 7] = [
    "kube-client",
    "kube-runtime",
    "hyper",
    "rustls",
    "ring",
    "tokio",
    "tower",
];

fn normal_dependencies(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args([
            "tree", "-p", package, "-e", "normal", "--prefix", "none", "--format", "{p}",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn the_contract_crate_and_the_agent_build_without_a_kubernetes_client() {
    for package in ["crac-api", "crac-agent"] {
        let deps = normal_dependencies(package);
        assert!(
            deps.iter().any(|d| d == "kube-core"),
            "{package}: cargo tree lists no kube-core, so this check sees nothing: {deps:?}"
        );
        let client: std::collections::BTreeSet<_> = deps
            .iter()
            .filter(|d| CLIENT_SIDE.contains(&d.as_str()))
            .collect();
        assert!(
            client.is_empty(),
            "{package} depends on {client:?}: keep crates/api free of kube's client features"
        );
    }
}

/// The modules of the crate whose sources are in `src` (one per `src/*.rs` file, and one per
/// directory `src/<name>/` with every file under it folded in; the crate root, `main.rs` and
/// `src/bin/` left out) and, for each, the other modules its code names by `crate::` paths:
/// `use crate::x::…;`, `use crate::{x::…, y};`, `crate::x::f()` inline. Comments are skipped.
/// `super::` paths are not followed: in these crates they stay inside the module (its tests,
/// a directory's files).
fn module_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("read the crate's src/") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            if name != "bin" {
                files.entry(name).or_default().extend(rust_files(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            files.entry(name).or_default().push(path);
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, paths)| {
            let named = paths
                .iter()
                .flat_map(|p| crate_paths(&std::fs::read_to_string(p).expect("read a source file")))
                .filter(|m| m != module && modules.contains(m))
                .collect();
            (module.clone(), named)
        })
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read a module's directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The first segment after each `crate::` in `source` (each group member's, for
/// `crate::{…}`), comments left out.
fn crate_paths(source: &str) -> Vec<String> {
    let code = without_comments(source);
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `some_crate::`, not `crate::`
        }
        let rest = code[at + "crate::".len()..].trim_start();
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        // The group's top-level members: split at commas outside nested braces.
        let (mut depth, mut member) = (0usize, String::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(ident(&member));
                    member.clear();
                    continue;
                }
                _ => {}
            }
            member.push(c);
        }
        out.push(ident(&member));
    }
    out.retain(|m| !m.is_empty());
    out
}

/// `source` with its `//` and `/* */` comments blanked (string literals are not told apart:
/// none of these crates has `//` or `crate::` inside one that matters here).
fn without_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find('/') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if rest.starts_with("//") {
            rest = rest.find('\n').map_or("", |end| &rest[end..]);
        } else if rest.starts_with("/*") {
            rest = rest.find("*/").map_or("", |end| &rest[end + 2..]);
            out.push(' ');
        } else {
            out.push('/');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// A cycle among the modules, as the path round it (`a → b → a`), if there is one.
fn module_cycle(imports: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| m == module) {
            let mut cycle = path[start..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_string());
        for next in imports.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, imports, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(module.to_string());
        None
    }
    let mut done = BTreeSet::new();
    imports
        .keys()
        .find_map(|m| visit(m, imports, &mut Vec::new(), &mut done))
}

/// Fails when two modules of the crate in `crate_dir` import each other, directly or round a
/// longer loop: such modules cannot be read, tested or moved one at a time.
fn assert_no_module_cycle(crate_dir: &Path) {
    let imports = module_imports(&crate_dir.join("src"));
    assert!(
        imports.values().any(|named| !named.is_empty()),
        "{}: no module names another through `crate::`, so this check sees nothing: {imports:?}",
        crate_dir.display()
    );
    if let Some(cycle) = module_cycle(&imports) {
        panic!(
            "{}: the modules {} import each other (`crate::` paths); move what they share into \
             a module below them",
            crate_dir.display(),
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_activators_modules_import_each_other_in_one_direction_only() {
    assert_no_module_cycle(&repo_root().join("crates/activator"));
}

#[test]
fn the_operators_modules_import_each_other_in_one_direction_only() {
    assert_no_module_cycle(&repo_root().join("crates/operator"));
}

#[test]
fn the_module_cycle_check_sees_use_lines_groups_and_inline_paths() {
    let source = "use crate::a::X;\n// use crate::commented::Y;\nuse crate::{b::Z, c, d::{e, f}};\n\
                  fn g() { crate::h::i(); some_crate::j(); } /* crate::k */";
    assert_eq!(crate_paths(source), ["a", "b", "c", "d", "h"]);
    let graph = |edges: &[(&str, &str)]| {
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            imports
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
            imports.entry(to.to_string()).or_default();
        }
        imports
    };
    let looped = graph(&[("kube", "registry"), ("registry", "hold"), ("hold", "kube")]);
    assert_eq!(
        module_cycle(&looped).unwrap(),
        ["hold", "kube", "registry", "hold"]
    );
    let layered = graph(&[("kube", "registry"), ("registry", "hold"), ("hold", "wake")]);
    assert_eq!(module_cycle(&layered), None);
}
