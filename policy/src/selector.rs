//! Label selectors with Kubernetes semantics.
//!
//! A selector is a list of requirements that are all ANDed: `matchLabels` entries become
//! `key In (value)`, `matchExpressions` keep their operator. `NotIn` and `DoesNotExist` match
//! objects that lack the key; the empty selector matches everything.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::error::FieldError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    pub fn parse(s: &str) -> Option<Operator> {
        Some(match s {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            _ => return None,
        })
    }
}

/// One requirement on one label key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// Non-empty for `In`/`NotIn`, empty for `Exists`/`DoesNotExist`.
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A validated label selector. Requirements are sorted and deduplicated, so equal selectors
/// compare equal whatever the order they were written in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn new(mut requirements: Vec<Requirement>) -> Selector {
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }

    /// `key=value` for every pair (a `matchLabels` selector).
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Selector {
        Selector::new(
            labels
                .into_iter()
                .map(|(k, v)| Requirement {
                    key: k.to_string(),
                    operator: Operator::In,
                    values: BTreeSet::from([v.to_string()]),
                })
                .collect(),
        )
    }

    /// Validates a Kubernetes `LabelSelector`; `field` is its path in the object
    /// (e.g. `spec.podSelector`) and prefixes the error's field.
    pub fn from_k8s(sel: &LabelSelector, field: &str) -> Result<Selector, FieldError> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            let f = format!("{field}.matchLabels");
            validate_label_key(k).map_err(|m| FieldError::new(&f, m))?;
            validate_label_value(v)
                .map_err(|m| FieldError::new(&f, format!("value of {k:?}: {m}")))?;
            reqs.push(Requirement {
                key: k.clone(),
                operator: Operator::In,
                values: BTreeSet::from([v.clone()]),
            });
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            validate_label_key(&e.key).map_err(|m| FieldError::new(format!("{f}.key"), m))?;
            let operator = Operator::parse(&e.operator).ok_or_else(|| {
                FieldError::new(
                    format!("{f}.operator"),
                    format!(
                        "unknown operator {:?} (want In, NotIn, Exists or DoesNotExist)",
                        e.operator
                    ),
                )
            })?;
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{f}.values"),
                        format!("must be non-empty when operator is {:?}", e.operator),
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{f}.values"),
                        format!("must be empty when operator is {:?}", e.operator),
                    ));
                }
                _ => {}
            }
            for v in &values {
                validate_label_value(v).map_err(|m| FieldError::new(format!("{f}.values"), m))?;
            }
            reqs.push(Requirement {
                key: e.key.clone(),
                operator,
                values,
            });
        }
        Ok(Selector::new(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

impl fmt::Display for Selector {
    /// Kubernetes' selector syntax: `app=web,tier in (a,b),!legacy`; `{}` for everything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let values = || r.values.iter().cloned().collect::<Vec<_>>().join(",");
            match r.operator {
                Operator::In if r.values.len() == 1 => write!(f, "{}={}", r.key, values())?,
                Operator::In => write!(f, "{} in ({})", r.key, values())?,
                Operator::NotIn => write!(f, "{} notin ({})", r.key, values())?,
                Operator::Exists => write!(f, "{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most `max` characters (empty allowed when
/// `allow_empty`).
fn check_name(s: &str, max: usize, allow_empty: bool) -> Result<(), String> {
    if s.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err("must not be empty".into())
        };
    }
    if s.len() > max {
        return Err(format!("{s:?} is longer than {max} characters"));
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let ok = s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must consist of alphanumerics, '-', '_' or '.', and start and end with an alphanumeric"
        ))
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of up to 63 characters.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
        if !ok {
            return Err(format!(
                "label key {key:?}: prefix {p:?} must be a lowercase DNS subdomain"
            ));
        }
    }
    check_name(name, 63, false).map_err(|m| format!("label key {key:?}: {m}"))
}

/// A label value: empty, or up to 63 characters like a label name.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    check_name(value, 63, true).map_err(|m| format!("label value: {m}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    fn sel(ml: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: if ml.is_empty() {
                None
            } else {
                Some(labels(ml))
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        }
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        let s = |e| Selector::from_k8s(&sel(&[], vec![e]), "s").unwrap();

        let in_ = s(expr("app", "In", &["web", "api"]));
        assert!(in_.matches(&web) && !in_.matches(&db) && !in_.matches(&none));
        let not_in = s(expr("app", "NotIn", &["web"]));
        assert!(!not_in.matches(&web) && not_in.matches(&db));
        assert!(
            not_in.matches(&none),
            "NotIn matches when the key is absent"
        );
        let exists = s(expr("tier", "Exists", &[]));
        assert!(exists.matches(&web) && !exists.matches(&db));
        let dne = s(expr("tier", "DoesNotExist", &[]));
        assert!(!dne.matches(&web) && dne.matches(&db) && dne.matches(&none));

        let empty = Selector::from_k8s(&LabelSelector::default(), "s").unwrap();
        assert!(empty.is_empty() && empty.matches(&none) && empty.matches(&web));

        // matchLabels and matchExpressions are ANDed.
        let both = Selector::from_k8s(
            &sel(&[("app", "web")], vec![expr("tier", "In", &["back"])]),
            "s",
        )
        .unwrap();
        assert!(!both.matches(&web));
        assert!(both.matches(&labels(&[("app", "web"), ("tier", "back")])));
        assert_eq!(both.to_string(), "app=web,tier=back");
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let err = |s: LabelSelector| Selector::from_k8s(&s, "spec.podSelector").unwrap_err();
        let e = err(sel(&[], vec![expr("a", "Equals", &["x"])]));
        assert_eq!(e.field, "spec.podSelector.matchExpressions[0].operator");
        assert!(e.message.contains("Equals"), "{e}");
        let e = err(sel(
            &[],
            vec![expr("a", "Exists", &[]), expr("a", "In", &[])],
        ));
        assert_eq!(e.field, "spec.podSelector.matchExpressions[1].values");
        let e = err(sel(&[], vec![expr("a", "DoesNotExist", &["x"])]));
        assert_eq!(e.field, "spec.podSelector.matchExpressions[0].values");
        let e = err(sel(&[("bad key!", "x")], vec![]));
        assert_eq!(e.field, "spec.podSelector.matchLabels");
        let e = err(sel(&[("k", "-bad")], vec![]));
        assert!(e.message.contains("-bad"), "{e}");
        assert!(Selector::from_k8s(&sel(&[("example.com/app", "")], vec![]), "s").is_ok());
    }
}
