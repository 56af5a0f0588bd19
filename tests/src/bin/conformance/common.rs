//! What both case schemas share: reading a case file, protocols, address placeholders, and
//! writing manifest files for the agent.
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use palisade_tests::rig::Proto;
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::Value;

/// The first YAML document of a case file, read as the agent reads YAML (1.2: `y` and `n`,
/// namespace names in the schema v1 cases, are strings, not booleans).
pub fn first_document(text: &str) -> Result<Value> {
    palisade_policy::manifest::yaml_documents(text)?
        .into_iter()
        .next()
        .context("an empty case file")
}

/// The case's `schema_version`; a file without one is schema 1 (the first cases had none to
/// need).
pub fn schema_version(doc: &Value) -> Result<u64> {
    match doc.get("schema_version") {
        None => Ok(1),
        Some(v) => v
            .as_u64()
            .with_context(|| format!("schema_version: {v} is not a number")),
    }
}

/// Decodes a case document; an error names the field (`steps[2].probes[0].port: ...`).
pub fn decode<T: DeserializeOwned>(doc: Value) -> Result<T> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            anyhow::anyhow!("{inner}")
        } else {
            anyhow::anyhow!("{path}: {inner}")
        }
    })
}

/// A protocol as the cases spell it (`TCP`, `UDP`, `SCTP`; any case).
pub fn proto(name: &str) -> Result<Proto> {
    Ok(match name.to_ascii_uppercase().as_str() {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        "SCTP" => Proto::Sctp,
        other => bail!("unknown protocol {other}"),
    })
}

/// `#[serde(deserialize_with = "common::de_proto")]`: a protocol field.
pub fn de_proto<'de, D: Deserializer<'de>>(d: D) -> Result<Proto, D::Error> {
    let s = String::deserialize(d)?;
    proto(&s).map_err(serde::de::Error::custom)
}

/// The addresses placeholders stand for: pods (`ns/pod`) and nodes (by name).
#[derive(Default)]
pub struct Addresses {
    pub pods: BTreeMap<String, IpAddr>,
    pub nodes: BTreeMap<String, IpAddr>,
}

impl Addresses {
    /// Expands the placeholders in every string of `v`; an error names the place under `path`
    /// (`policies[2].object.spec.egress[0].to[0].networks[0]`).
    pub fn expand(&self, v: &Value, path: &str) -> Result<Value> {
        Ok(match v {
            Value::String(s) => {
                Value::String(self.expand_str(s).with_context(|| path.to_string())?)
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.expand(item, &format!("{path}[{i}]")))
                    .collect::<Result<_>>()?,
            ),
            Value::Object(m) => {
                let mut out = serde_json::Map::new();
                for (k, v) in m {
                    out.insert(k.clone(), self.expand(v, &format!("{path}.{k}"))?);
                }
                Value::Object(out)
            }
            other => other.clone(),
        })
    }

    /// Expands `{{ip ns/pod}}`, `{{cidr ns/pod len}}` (tests/conformance/README.md) and
    /// `{{node-ip node}}` (tests/conformance/cnp/README.md). An IPv6 address followed by `/32`
    /// (`'{{ip ns/pod}}/32'`, a host CIDR written for IPv4) gets `/128`, as upstream does on
    /// IPv6 clusters.
    pub fn expand_str(&self, s: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find("}}")
                .with_context(|| format!("unclosed placeholder in {s:?}"))?
                + start;
            let inner: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
            rest = &rest[end + 2..];
            let host = match inner.as_slice() {
                ["ip", pod] => *self
                    .pods
                    .get(*pod)
                    .with_context(|| format!("{s:?}: no pod {pod}"))?,
                ["node-ip", node] => *self
                    .nodes
                    .get(*node)
                    .with_context(|| format!("{s:?}: no node {node}"))?,
                ["cidr", pod, len] => {
                    let ip = *self
                        .pods
                        .get(*pod)
                        .with_context(|| format!("{s:?}: no pod {pod}"))?;
                    let len: u8 = len
                        .parse()
                        .with_context(|| format!("{s:?}: prefix length {len:?}"))?;
                    let net = ipnetwork::IpNetwork::new(ip, len)
                        .with_context(|| format!("{s:?}: /{len} of {ip}"))?;
                    out.push_str(&format!("{}/{}", net.network(), len));
                    continue;
                }
                _ => bail!("unknown placeholder in {s:?}"),
            };
            out.push_str(&host.to_string());
            if host.is_ipv6()
                && let Some(r) = rest.strip_prefix("/32")
                && !r.starts_with(|c: char| c.is_ascii_digit())
            {
                out.push_str("/128");
                rest = r;
            }
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Replaces `path` atomically with `docs`; no documents: the file goes (an empty file keeps
/// its last good objects, by design).
pub fn write_docs(path: &Path, docs: &[Value]) -> Result<()> {
    if docs.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        };
    }
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_saphyr::to_string(d)?);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(ipv6: bool) -> Addresses {
        let (pod, node): (IpAddr, IpAddr) = if ipv6 {
            (
                "fd00:244::a".parse().unwrap(),
                "fd00:243::1".parse().unwrap(),
            )
        } else {
            (
                "10.244.0.10".parse().unwrap(),
                "10.243.0.1".parse().unwrap(),
            )
        };
        Addresses {
            pods: [("x/a".to_string(), pod)].into(),
            nodes: [("node-1".to_string(), node)].into(),
        }
    }

    #[test]
    fn placeholders_expand_in_either_family() {
        let v4 = addresses(false);
        assert_eq!(v4.expand_str("{{ip x/a}}/32").unwrap(), "10.244.0.10/32");
        assert_eq!(v4.expand_str("{{cidr x/a 4}}").unwrap(), "0.0.0.0/4");
        assert_eq!(v4.expand_str("{{node-ip node-1}}").unwrap(), "10.243.0.1");
        let v6 = addresses(true);
        assert_eq!(v6.expand_str("{{ip x/a}}/32").unwrap(), "fd00:244::a/128");
        assert_eq!(
            v6.expand_str("{{node-ip node-1}}/32").unwrap(),
            "fd00:243::1/128"
        );
        assert_eq!(v6.expand_str("{{ip x/a}}").unwrap(), "fd00:244::a");
        assert_eq!(v6.expand_str("{{cidr x/a 16}}").unwrap(), "fd00::/16");
        assert_eq!(v6.expand_str("::/0").unwrap(), "::/0");
    }

    #[test]
    fn bad_placeholders_are_errors_naming_the_place() {
        let a = addresses(false);
        for bad in [
            "{{ip x/b}}",
            "{{node-ip node-0}}",
            "{{ip x/a",
            "{{what x/a}}",
        ] {
            assert!(a.expand_str(bad).is_err(), "{bad}");
        }
        let v = serde_json::json!({"spec": {"to": [{"networks": ["{{ip y/z}}/32"]}]}});
        let e = a.expand(&v, "policies[0].object").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "policies[0].object.spec.to[0].networks[0]: \"{{ip y/z}}/32\": no pod y/z"
        );
    }
}
