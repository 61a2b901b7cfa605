//! The layer rule of `src/lib.rs` and docs/ARCHITECTURE.md, checked: every module of `src/`
//! imports only modules of its own layer or a lower one, and the two edges, `proxy` and `admin`,
//! never import each other. The check reads the source: each `crate::<module>` path outside
//! `#[cfg(test)]` code is an import of that top-level module.
//!
//! The table below is the map. When a change needs an import the map forbids, either the code
//! moves or the map is redrawn here and in both documents, in the same commit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Every top-level module and its layer: 0 pure, 1 foundations, 2 state, 3 edges, 4 wiring.
const LAYERS: &[(&str, u8)] = &[
    ("credential", 0),
    ("policy", 0),
    ("target", 0),
    ("config", 1),
    ("metrics", 1),
    ("store", 1),
    ("tls", 1),
    ("silence", 1),
    ("tasks", 1),
    ("auth", 2),
    ("credits", 2),
    ("limits", 2),
    ("metering", 2),
    ("refusal", 2),
    ("admin", 3),
    ("listener", 3),
    ("proxy", 3),
    ("app", 4),
    ("cli", 4),
    ("shutdown", 4),
];

/// Pairs of modules that must not import each other, whatever their layers.
const APART: &[(&str, &str)] = &[("proxy", "admin"), ("admin", "proxy")];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// Every `.rs` file below `dir`, but test-only files (`…/tests.rs`).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("read src/");
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

/// The top-level modules that `code` names as `crate::<module>`, `crate::{<module>, …}`
/// included.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The module's own code: what precedes its `#[cfg(test)]` module (tests may reach anywhere).
fn non_test(code: &str) -> &str {
    code.split("#[cfg(test)]").next().unwrap_or(code)
}

/// Every import the map forbids, as `file: module (layer) imports other (layer)`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("below src/");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer(&top) else {
            bad.push(format!(
                "{}: module `{top}` is not on the map",
                rel.display()
            ));
            continue;
        };
        let code = std::fs::read_to_string(&file).expect("read source");
        for other in imports(non_test(&code)) {
            if other == top {
                continue;
            }
            match layer(&other) {
                None => bad.push(format!(
                    "{}: imports `{other}`, which is not on the map",
                    rel.display()
                )),
                Some(l) if l > own => bad.push(format!(
                    "{}: `{top}` (layer {own}) imports `{other}` (layer {l})",
                    rel.display()
                )),
                Some(_) if APART.contains(&(top.as_str(), other.as_str())) => bad.push(format!(
                    "{}: `{top}` imports `{other}`; the two edges stay apart",
                    rel.display()
                )),
                Some(_) => {}
            }
        }
    }
    bad
}

#[test]
fn every_module_imports_only_its_own_layer_or_lower() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "imports against the layer map:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_sees_single_grouped_and_upward_imports() {
    let code = "use crate::store::Store;\nuse crate::{policy, refusal::Refusal};\n\
                fn f() { crate::metrics::Metrics::new(); }\n#[cfg(test)]\nmod tests { use crate::app; }";
    let got: Vec<String> = imports(non_test(code)).into_iter().collect();
    assert_eq!(got, ["metrics", "policy", "refusal", "store"]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("store.rs"), "use crate::proxy::Proxy;\n").expect("write");
    std::fs::write(dir.path().join("admin.rs"), "use crate::proxy::Proxy;\n").expect("write");
    let bad = violations(dir.path());
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].contains("`admin` imports `proxy`"), "{bad:?}");
    assert!(
        bad[1].contains("`store` (layer 1) imports `proxy` (layer 3)"),
        "{bad:?}"
    );
}
