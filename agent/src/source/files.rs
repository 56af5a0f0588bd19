//! The standalone source: a directory of manifests (`manifest::ManifestDir`), polled.
//!
//! Manifests are read once they have stayed the same for a poll, so that a file being written
//! in place (truncated, then filled) is not taken half-way. Every reconcile reads them against
//! the last settled fingerprint, those the host or the CNI plugin cause too: a file that
//! changed since keeps its last good objects until it settles. (Writing a temporary file and
//! renaming it over the old one avoids the question.) Nothing is enforced before the directory
//! has settled once. A reconcile the host or the CNI plugin cause while the settled fingerprint
//! is the one last read reads no file and converts nothing: it gets the store and the errors
//! of that read.
use std::{path::PathBuf, time::Duration};

use tracing::info;

use crate::{
    manifest::{Fingerprint, ManifestDir},
    reconcile::{RunConfig, View, unix_ms},
};
use palisade_policy::{
    model::{ConfigError, Kind, Object, Store},
    services::ServiceStore,
};

/// What reading the directory at one settled fingerprint reported, besides the store.
struct Read {
    /// `None`: read before the directory settled, good for that view only.
    fingerprint: Option<Fingerprint>,
    errors: Vec<ConfigError>,
    incomplete: Vec<String>,
}

pub struct FileSource {
    dir: PathBuf,
    poll: Duration,
    manifests: ManifestDir,
    /// The objects last read (each file's last good ones), validated.
    store: Store,
    services: ServiceStore,
    /// The fingerprint seen on the poll before.
    previous: Option<Fingerprint>,
    /// The last fingerprint that stayed the same over a poll: what reconciles read.
    settled: Option<Fingerprint>,
    /// The last read, which `store` and `services` hold.
    read: Option<Read>,
}

impl FileSource {
    /// The manifests in `dir`, checked for changes every `poll`.
    pub fn new(dir: PathBuf, poll: Duration) -> FileSource {
        FileSource {
            manifests: ManifestDir::new(&dir),
            dir,
            poll,
            store: Store::default(),
            services: ServiceStore::default(),
            previous: None,
            settled: None,
            read: None,
        }
    }

    /// Reads the manifests at the settled fingerprint into `store` and `services`; what the
    /// read reported, good while that fingerprint stays.
    fn read_settled(&mut self) -> Read {
        let loaded = self.manifests.load_settled(self.settled.as_ref());
        let mut errors = loaded.errors;
        let policies: Vec<_> = loaded
            .objects
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Object::NetworkPolicy(_)
                        | Object::ClusterNetworkPolicy(_)
                        | Object::EgressGateway(_)
                )
            })
            .map(|o| o.key())
            .collect();
        errors.extend(self.store.replace_all(loaded.objects));
        errors.extend(super::unresolved_named_ports(&self.store));
        let (services, service_errors) =
            ServiceStore::from_manifests(&loaded.services, &loaded.endpoint_slices);
        errors.extend(service_errors);
        self.services = services;
        // What this view lacks for want of a last good version: files that never parsed,
        // policies that never validated (since this agent started).
        let mut incomplete: Vec<String> = loaded
            .failed
            .iter()
            .map(|f| format!("{f} does not parse"))
            .collect();
        incomplete.extend(
            policies
                .iter()
                .filter(|k| match k.kind {
                    Kind::ClusterNetworkPolicy => {
                        !self.store.cluster_policies.contains_key(&k.name)
                    }
                    Kind::EgressGateway => !self.store.egress_gateways.contains_key(&k.name),
                    _ => !self
                        .store
                        .policies
                        .contains_key(&(k.namespace.clone(), k.name.clone())),
                })
                .map(|k| format!("{k} is invalid")),
        );
        Read {
            fingerprint: self.settled.clone(),
            errors,
            incomplete,
        }
    }
}

impl super::Source for FileSource {
    fn tick(&self) -> Duration {
        self.poll
    }

    fn started(&self, cfg: &RunConfig) {
        info!(manifests = %self.dir.display(), pin_dir = %cfg.pin_dir.display(), "standalone agent running");
    }

    async fn event(&mut self) -> anyhow::Result<bool> {
        std::future::pending().await
    }

    /// Whether the directory settled on a new fingerprint.
    fn poll(&mut self) -> bool {
        let fp = self.manifests.fingerprint();
        let settled = self.previous.as_ref() == Some(&fp);
        self.previous = Some(fp.clone());
        let changed = settled && self.settled.as_ref() != Some(&fp);
        if changed {
            self.settled = Some(fp);
        }
        changed
    }

    fn ready(&mut self) -> bool {
        self.settled.is_some()
    }

    /// Reads the manifests (those that changed since the settled fingerprint keep their last
    /// good objects: `ManifestDir::load_settled`) into the store, unless they were last read
    /// at this very fingerprint.
    fn view(&mut self) -> View<'_> {
        let started_at_unix_ms = unix_ms();
        let current = self.settled.is_some()
            && self
                .read
                .as_ref()
                .is_some_and(|r| r.fingerprint == self.settled);
        if !current {
            let read = self.read_settled();
            self.read = Some(read);
        }
        let (errors, incomplete) = self
            .read
            .as_ref()
            .map(|r| (r.errors.clone(), r.incomplete.clone()))
            .unwrap_or_default();
        View {
            store: &self.store,
            services: &self.services,
            errors,
            incomplete,
            started_at_unix_ms,
        }
    }

    fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Source;

    const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                      metadata: {name: deny, namespace: a}\nspec: {podSelector: {}}\n";

    fn settle(s: &mut FileSource) -> bool {
        s.poll();
        s.poll()
    }

    #[test]
    fn a_reconcile_between_settled_changes_reads_no_file() {
        let dir = std::env::temp_dir().join(format!("palisade-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("np.yaml"), NP).unwrap();
        let mut s = FileSource::new(dir.clone(), Duration::from_millis(100));
        assert!(settle(&mut s) && s.ready());
        let key = ("a".to_string(), "deny".to_string());
        assert!(s.view().store.policies.contains_key(&key));
        // Deleted, not yet settled: a reconcile the host causes meanwhile gets the store of
        // the settled directory (reading it would have dropped the policy at once).
        std::fs::remove_file(dir.join("np.yaml")).unwrap();
        std::fs::write(dir.join("broken.yaml"), "kind: [").unwrap();
        let v = s.view();
        assert!(v.store.policies.contains_key(&key));
        assert!(v.errors.is_empty() && v.incomplete.is_empty());
        // Settled: read again.
        assert!(settle(&mut s));
        let v = s.view();
        assert!(!v.store.policies.contains_key(&key));
        assert_eq!(v.incomplete.len(), 1, "{:?}", v.incomplete);
        assert!(v.incomplete[0].ends_with("broken.yaml does not parse"));
        assert_eq!(v.errors.len(), 1, "{:?}", v.errors);
        // And kept for the next reconcile without a change, errors included.
        let again = s.view();
        assert_eq!(again.errors.len(), 1);
        assert_eq!(again.incomplete.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
