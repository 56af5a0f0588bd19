//! No module imports one that imports it back, in the agent, the policy, datapath and eBPF
//! crates and the fuzzer: the module graph (`use crate::…` and `crate::…` paths outside `#[cfg(test)] mod
//! tests`) has no cycle.
//! A cycle is how "pure" logic ends up depending on I/O, and how a file stops being readable
//! on its own.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Top-level module -> the top-level modules it uses.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                files.push(e.unwrap().path());
            }
            continue;
        }
        if p.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = p.strip_prefix(src).unwrap();
        let top = rel
            .iter()
            .next()
            .unwrap()
            .to_string_lossy()
            .replace(".rs", "");
        if matches!(top.as_str(), "lib" | "main" | "bin") {
            continue;
        }
        let text = fs::read_to_string(&p).unwrap();
        let code = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        let deps = graph.entry(top.clone()).or_default();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("");
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    deps.insert(name);
                }
            }
        }
        // Names inside `use crate::{ a::…, b, … };` blocks, at the block's top level.
        let mut rest = code;
        while let Some(i) = rest.find("use crate::{") {
            let body = &rest[i + "use crate::{".len()..];
            let (mut depth, mut token, mut end) = (0i32, String::new(), body.len());
            for (j, ch) in body.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = j;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        take(&mut token, deps);
                        continue;
                    }
                    _ if depth == 0 => token.push(ch),
                    _ => {}
                }
            }
            take(&mut token, deps);
            rest = &body[end..];
        }
        deps.remove(&top);
    }
    let names: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| names.contains(d));
    }
    graph
}

fn take(token: &mut String, deps: &mut BTreeSet<String>) {
    let t = token.trim();
    let name: String = t
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() && name != "self" {
        deps.insert(name);
    }
    token.clear();
}

/// A cycle through `start`, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in &graph[&node] {
            if next == start {
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

fn assert_acyclic(crate_src: &Path) {
    let graph = module_graph(crate_src);
    assert!(
        graph.len() > 3,
        "read no modules under {}",
        crate_src.display()
    );
    for m in graph.keys() {
        if let Some(path) = cycle_through(&graph, m) {
            panic!(
                "{}: modules import each other in a circle: {} -> {m}",
                crate_src.display(),
                path.join(" -> ")
            );
        }
    }
}

#[test]
fn the_agent_has_no_import_cycle() {
    assert_acyclic(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
}

#[test]
fn the_policy_crate_has_no_import_cycle() {
    assert_acyclic(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/src"));
}

#[test]
fn the_datapath_crate_has_no_import_cycle() {
    assert_acyclic(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../datapath/src"));
}

#[test]
fn the_fuzzer_has_no_import_cycle() {
    assert_acyclic(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/src"));
}

#[test]
fn the_ebpf_crate_has_no_import_cycle() {
    assert_acyclic(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/src"));
}

#[test]
fn the_check_sees_a_cycle() {
    let dir = std::env::temp_dir().join(format!("palisade-cycle-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    for (name, text) in [
        ("a.rs", "use crate::{b::X, c};\n"),
        ("b.rs", "pub struct X;\nfn f() { crate::d::g() }\n"),
        ("c.rs", ""),
        ("d.rs", "use crate::{\n    a::{self, Y},\n};\n"),
    ] {
        fs::write(dir.join(name), text).unwrap();
    }
    let graph = module_graph(&dir);
    let path = cycle_through(&graph, "a").expect("a -> b -> d -> a");
    assert_eq!(path, ["a", "b", "d"]);
    assert!(cycle_through(&graph, "c").is_none());
    fs::remove_dir_all(&dir).unwrap();
}
