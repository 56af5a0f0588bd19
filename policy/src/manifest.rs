//! Manifest text to objects: YAML documents (several per file, `kind: List` too) or one JSON
//! value, decoded into the store's objects and the Services and EndpointSlices that `services`
//! reads. Reading files and deciding when to trust them is the agent's (`manifest::ManifestDir`).
use serde::de::DeserializeOwned;
use serde_json::Value;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{ConfigError, Object};

/// What a document holds: an object of the policy store, or a Service or EndpointSlice.
#[derive(Clone, Debug)]
pub enum Item {
    Object(Object),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// An item and where it was read (`file.yaml document 2`).
#[derive(Clone, Debug)]
pub struct Sourced {
    pub item: Item,
    pub origin: String,
}

/// Parses manifest text (YAML documents, or one JSON value) read from `name`. `Ok` holds the
/// objects and the errors of documents that were ignored (foreign kinds); `Err` means the file
/// as a whole cannot be trusted.
pub fn parse_file(
    name: &str,
    text: &str,
    json: bool,
) -> Result<(Vec<Sourced>, Vec<ConfigError>), ConfigError> {
    let label = format!("file {name}");
    let mut docs = Vec::new();
    if json {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::new(&label, "", format!("invalid JSON: {e}")))?;
        docs.push(v);
    } else {
        docs = yaml_documents(text)
            .map_err(|e| ConfigError::new(&label, "", format!("invalid YAML: {e}")))?;
    }
    let mut objects = Vec::new();
    let mut ignored = Vec::new();
    for (i, v) in docs.into_iter().enumerate() {
        if v.is_null() {
            continue; // an empty document (a trailing `---`, comments only)
        }
        let origin = format!("{name} document {}", i + 1);
        decode(&origin, v, true, &mut objects, &mut ignored)?;
    }
    Ok((objects, ignored))
}

/// The YAML documents of `text` as JSON values (an empty document is `null`). Scalars are read
/// as YAML 1.2 core (`yes`, `y`, `0755` and `1_000` stay strings: namespace names and label
/// values, as serde_yaml read them) and merge keys (`<<`) are expanded. The parser's budget
/// keeps its alias-bomb limits; its size limits are raised to what a directory of manifests
/// can hold (the default stops at 1 024 documents).
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1 << 20;
    budget.max_events = 1 << 30;
    budget.max_nodes = 1 << 28;
    budget.max_total_scalar_bytes = 1 << 30;
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    options.budget = Some(budget);
    // One line, naming line and column: the message goes into the status and `palisade stats`.
    options.with_snippet = false;
    serde_saphyr::from_multiple_with_options(text, options)
}

/// Parses manifest text that is not from a file (tests, tools): YAML documents or JSON. The
/// objects of the policy store; `parse_services` has the Services and EndpointSlices.
pub fn parse_str(text: &str) -> Result<Vec<Object>, ConfigError> {
    Ok(parse_items(text)?
        .into_iter()
        .filter_map(|i| match i {
            Item::Object(o) => Some(o),
            _ => None,
        })
        .collect())
}

/// The Services and EndpointSlices of manifest text that is not from a file.
pub fn parse_services(text: &str) -> Result<(Vec<Service>, Vec<EndpointSlice>), ConfigError> {
    let mut out = (Vec::new(), Vec::new());
    for item in parse_items(text)? {
        match item {
            Item::Service(s) => out.0.push(*s),
            Item::EndpointSlice(s) => out.1.push(*s),
            Item::Object(_) => {}
        }
    }
    Ok(out)
}

fn parse_items(text: &str) -> Result<Vec<Item>, ConfigError> {
    let (items, ignored) = parse_file("<input>", text, false)?;
    match ignored.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(items.into_iter().map(|s| s.item).collect()),
    }
}

fn decode(
    origin: &str,
    v: Value,
    top: bool,
    objects: &mut Vec<Sourced>,
    ignored: &mut Vec<ConfigError>,
) -> Result<(), ConfigError> {
    let label = format!("file {origin}");
    let Some(map) = v.as_object() else {
        return Err(ConfigError::new(label, "", "is not an object (a mapping)"));
    };
    let str_field = |k: &str| map.get(k).and_then(Value::as_str).unwrap_or("");
    let kind = str_field("kind").to_string();
    let api_version = str_field("apiVersion").to_string();
    if kind.is_empty() {
        return Err(ConfigError::new(label, "kind", "is missing"));
    }
    let meta = map.get("metadata");
    let meta_str = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (ns, name) = (meta_str("namespace"), meta_str("name"));
    let what = match (ns.is_empty(), name.is_empty()) {
        (_, true) => kind.clone(),
        (true, false) => format!("{kind} {name}"),
        (false, false) => format!("{kind} {ns}/{name}"),
    };
    let label = format!("{label} ({what})");
    let want_version = match kind.as_str() {
        "Namespace" | "Pod" | "List" => "v1",
        "NetworkPolicy" => "networking.k8s.io/v1",
        "ClusterNetworkPolicy" => crate::model::cluster::raw::API_VERSION,
        "Node" => "v1",
        "EgressGateway" => crate::model::egress::API_VERSION,
        "Service" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => {
            ignored.push(ConfigError::new(
                label,
                "kind",
                format!("unsupported kind {kind:?} (ignored)"),
            ));
            return Ok(());
        }
    };
    if api_version != want_version {
        return Err(ConfigError::new(
            label,
            "apiVersion",
            format!("unsupported apiVersion {api_version:?} for {kind} (want {want_version})"),
        ));
    }
    match kind.as_str() {
        "List" if top => {
            let items = match map.get("items") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items.clone(),
                Some(_) => return Err(ConfigError::new(label, "items", "is not a list")),
            };
            for (j, item) in items.into_iter().enumerate() {
                decode(
                    &format!("{origin} items[{j}]"),
                    item,
                    false,
                    objects,
                    ignored,
                )?;
            }
            return Ok(());
        }
        "List" => return Err(ConfigError::new(label, "items", "nested List")),
        _ => {}
    }
    fn typed<T: DeserializeOwned>(label: &str, v: &Value) -> Result<Box<T>, ConfigError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            ConfigError::new(label, field, e.into_inner().to_string())
        })
    }
    let item = match kind.as_str() {
        "Namespace" => Item::Object(Object::Namespace(typed(&label, &v)?)),
        "Pod" => Item::Object(Object::from(*typed::<k8s_openapi::api::core::v1::Pod>(
            &label, &v,
        )?)),
        "Service" => Item::Service(typed(&label, &v)?),
        "EndpointSlice" => Item::EndpointSlice(typed(&label, &v)?),
        "ClusterNetworkPolicy" => Item::Object(Object::ClusterNetworkPolicy(typed(&label, &v)?)),
        "Node" => Item::Object(Object::Node(typed(&label, &v)?)),
        "EgressGateway" => Item::Object(Object::EgressGateway(typed(&label, &v)?)),
        _ => Item::Object(Object::NetworkPolicy(typed(&label, &v)?)),
    };
    objects.push(Sourced {
        item,
        origin: origin.to_string(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {team: x}}\n";
    const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {}}\n";

    /// What the YAML reader must do for manifests: several documents, empty ones skipped,
    /// merge keys expanded, strings that YAML 1.1 would read as booleans kept as strings (label
    /// values), bad YAML an error naming the file.
    #[test]
    fn yaml_documents_as_manifests_need_them() {
        let (items, ignored) = parse_file("x.yaml", "# only a comment\n", false).unwrap();
        assert!(items.is_empty() && ignored.is_empty());
        let (items, _) =
            parse_file("x.yaml", &format!("---\n{NS}---\n---\n{NP}---\n"), false).unwrap();
        assert_eq!(items.len(), 2);
        let merged = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: m\n  labels:\n    <<: {team: x, on: yes, mode: '0755'}\n    id: 0755\n";
        let objs = parse_str(merged).unwrap();
        let Object::Namespace(ns) = &objs[0] else {
            panic!("{objs:?}")
        };
        let labels = ns.metadata.labels.clone().unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("x"));
        assert_eq!(labels.get("on").map(String::as_str), Some("yes"));
        assert_eq!(labels.get("id").map(String::as_str), Some("0755"));
        let e = parse_file("bad.yaml", "kind: [unclosed\n", false).unwrap_err();
        assert!(
            e.to_string().starts_with("file bad.yaml: invalid YAML"),
            "{e}"
        );
    }

    #[test]
    fn parse_str_reads_documents() {
        let objs = parse_str(&format!("{NS}---\n{NP}")).unwrap();
        assert_eq!(objs.len(), 2);
        assert!(parse_str("kind: Pod\napiVersion: v2\n").is_err());
    }
}
