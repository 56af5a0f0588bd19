//! FQDN egress, the pure part: which domain class a DNS name gets at an endpoint, and what a
//! DNS answer teaches (`answer`).
use crate::model::cluster::domain_matches;
use crate::state::DomainTable;

impl DomainTable {
    /// The (class, audit view's class) for a DNS name (0: none), or `None` if no pattern
    /// matches it.
    pub fn classes_of(&self, name: &str) -> Option<(u32, u32)> {
        let class = class_of(&self.classes, name);
        let audit = class_of(&self.audit_classes, name);
        (class != 0 || audit != 0).then_some((class, audit))
    }

    /// Does any pattern match `name`?
    pub fn matches(&self, name: &str) -> bool {
        self.classes_of(name).is_some()
    }
}

/// The class of exactly the patterns (of `classes`) that match `name`, 0 if none does.
fn class_of(classes: &[(Vec<String>, u32)], name: &str) -> u32 {
    let mut matched: Vec<&str> = classes
        .iter()
        .flat_map(|(p, _)| p.iter())
        .filter(|p| domain_matches(p, name))
        .map(String::as_str)
        .collect();
    matched.sort_unstable();
    matched.dedup();
    if matched.is_empty() {
        return 0;
    }
    classes
        .iter()
        .find(|(p, _)| p.iter().map(String::as_str).eq(matched.iter().copied()))
        .map_or(0, |(_, c)| *c)
}
