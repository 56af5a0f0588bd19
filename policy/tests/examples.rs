//! Every manifest under manifests/examples parses and validates: no document ignored, no
//! configuration error once all of them are in one store, and the ClusterNetworkPolicy
//! examples are there.
use std::path::Path;

use palisade_policy::{
    cnp::{Action, Tier},
    manifest::{Item, parse_file},
    model::Store,
};

#[test]
fn examples_parse_and_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    let mut objects = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(f).unwrap();
        let json = f.extension().is_some_and(|e| e == "json");
        let (items, ignored) =
            parse_file(&name, &text, json).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(ignored.is_empty(), "{name}: {ignored:?}");
        assert!(!items.is_empty(), "{name}: no objects");
        for s in items {
            match s.item {
                Item::Object(o) => objects.push(o),
                _ => panic!("{}: the examples hold no Services", s.origin),
            }
        }
    }
    let store = Store::from_objects(objects);
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    // An Admin Deny, an Admin Pass and a Baseline Deny among them.
    let has = |tier: Tier, action: Action| {
        store.cluster_policies.values().any(|p| {
            p.tier == tier
                && p.ingress
                    .iter()
                    .map(|r| r.action)
                    .chain(p.egress.iter().map(|r| r.action))
                    .any(|a| a == action)
        })
    };
    assert!(has(Tier::Admin, Action::Deny));
    assert!(has(Tier::Admin, Action::Pass));
    assert!(has(Tier::Baseline, Action::Deny));
}
