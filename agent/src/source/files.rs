//! The standalone source: a directory of manifests (`manifest::ManifestDir`), polled.
//!
//! Manifests are read once they have stayed the same for a poll, so that a file being written
//! in place (truncated, then filled) is not taken half-way. Every reconcile reads them against
//! the last settled fingerprint, those the host or the CNI plugin cause too: a file that
//! changed since keeps its last good objects until it settles. (Writing a temporary file and
//! renaming it over the old one avoids the question.) Nothing is enforced before the directory
//! has settled once.
use std::{path::PathBuf, time::Duration};

use tracing::info;

use crate::{
    manifest::{Fingerprint, ManifestDir},
    reconcile::{RunConfig, View, unix_ms},
};
use palisade_policy::{
    model::{Kind, Object, Store},
    services::ServiceStore,
};

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
    /// good objects: `ManifestDir::load_settled`) into the store.
    fn view(&mut self) -> View<'_> {
        let started_at_unix_ms = unix_ms();
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
