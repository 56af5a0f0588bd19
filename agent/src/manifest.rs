//! The standalone source: Namespace, Pod and NetworkPolicy manifests from a directory.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file of the directory (not its subdirectories; hidden
//! files skipped) is read in name order. YAML files may hold several documents (`---`); any file
//! may hold a `kind: List`. Bad input never loosens enforcement:
//!
//! * a file that cannot be read or parsed, or that holds a document which is not a recognizable
//!   object, or one of our kinds that does not decode, fails as a whole: the objects last read
//!   successfully from that file are kept (per-file last good) and the error names the file,
//!   the document and, when known, the line or field;
//! * documents of other kinds (Deployment, ConfigMap, ...) are ignored, with an error (Services
//!   and EndpointSlices are read from the same files by `services`);
//! * an object defined twice (same kind, namespace and name) keeps its first definition in file
//!   order, with an error naming both places;
//! * a file that holds no document at all (zero length, or only whitespace and comments) keeps
//!   its last good objects too, with an error: that is what a file rewritten in place looks like
//!   half-way (`truncate`, then `write`). Deleting the file is how its objects are removed;
//! * a file is taken only once it is settled: the run loop passes the fingerprint it saw
//!   unchanged over a whole poll (`load_settled`), and a file that differs from it, or that
//!   changed while being read, keeps its last good objects until it settles.
//!
//! Writing a temporary file and renaming it over the old one (what `kubectl`-like tools and
//! editors do) avoids every half-way state.
//!
//! Validation of the objects themselves is `model::Store`'s job.
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use palisade_policy::manifest::{Item, Sourced, parse_file};

use palisade_policy::model::{ConfigError, Object};

/// What one `load` read.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub objects: Vec<Object>,
    /// Services and EndpointSlices (Service VIPs in egress policy: `services`).
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub errors: Vec<ConfigError>,
    /// Files (or the directory) that could not be read or parsed: what they hold is what was
    /// last read from them successfully, nothing if they never were.
    pub failed: Vec<String>,
}

/// A cheap summary of the directory: changes whenever a manifest file is added, removed,
/// renamed, replaced or written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    files: Vec<FileStamp>,
    /// The directory could not be listed.
    error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    name: String,
    len: u64,
    modified: Option<SystemTime>,
    /// Inode and change time (Unix), so that a same-size rewrite within one mtime tick or an
    /// atomic rename is noticed too.
    ino: u64,
    ctime_ns: i128,
}

pub struct ManifestDir {
    dir: PathBuf,
    /// File name -> the objects last read successfully from it.
    last_good: BTreeMap<String, Vec<Sourced>>,
    /// File name -> its stamp when it was last parsed successfully, and what parsing it
    /// reported: a file whose stamp is unchanged is not read again.
    parsed: BTreeMap<String, (FileStamp, Vec<ConfigError>)>,
}

impl FileStamp {
    fn of(name: String, m: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            name,
            len: m.len(),
            modified: m.modified().ok(),
            ino: m.ino(),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

impl ManifestDir {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        ManifestDir {
            dir: dir.as_ref().to_path_buf(),
            last_good: BTreeMap::new(),
            parsed: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Manifest files (following symlinks), sorted by name.
    fn files(&self) -> std::io::Result<Vec<(String, fs::Metadata)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !is_manifest_name(&name) {
                continue;
            }
            match fs::metadata(entry.path()) {
                Ok(m) if m.is_file() => out.push((name, m)),
                _ => continue,
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        match self.files() {
            Ok(files) => Fingerprint {
                files: files
                    .into_iter()
                    .map(|(name, m)| FileStamp::of(name, &m))
                    .collect(),
                error: None,
            },
            Err(e) => Fingerprint {
                files: Vec::new(),
                error: Some(e.to_string()),
            },
        }
    }

    /// Reads the directory, taking every file as it is now. Objects of files that fail, or
    /// hold no document, are their last good objects.
    pub fn load(&mut self) -> LoadResult {
        self.load_settled(None)
    }

    /// `load`, except that with `settled` (a fingerprint seen unchanged over a poll), a file
    /// whose stamp differs from the one in `settled`, or that is not in it, is not read: its
    /// objects are its last good objects (none for a new file) until it settles.
    pub fn load_settled(&mut self, settled: Option<&Fingerprint>) -> LoadResult {
        let mut errors = Vec::new();
        let mut failed = Vec::new();
        let dir_label = self.dir.display().to_string();
        match self.files() {
            Ok(files) => {
                let mut fresh = BTreeMap::new();
                let mut stamps = BTreeMap::new();
                for (name, meta) in files {
                    // Stamped before reading: a write during the read changes the stamp, so
                    // the next load reads the file again.
                    let stamp = FileStamp::of(name.clone(), &meta);
                    let unsettled = settled.is_some_and(|fp| !fp.files.contains(&stamp));
                    if unsettled {
                        // Being written: what it held before, until it settles.
                        if let Some(objects) = self.last_good.remove(&name) {
                            fresh.insert(name.clone(), objects);
                        }
                        if let Some(p) = self.parsed.remove(&name) {
                            errors.extend(p.1.iter().cloned());
                            stamps.insert(name, p);
                        }
                        continue;
                    }
                    if let Some((last, reported)) = self.parsed.remove(&name)
                        && last == stamp
                        && let Some(objects) = self.last_good.remove(&name)
                    {
                        errors.extend(reported.iter().cloned());
                        fresh.insert(name.clone(), objects);
                        stamps.insert(name, (last, reported));
                        continue;
                    }
                    let label = format!("file {}", self.dir.join(&name).display());
                    let parsed = fs::read(self.dir.join(&name))
                        .map_err(|e| ConfigError::new(&label, "", format!("cannot read: {e}")))
                        .and_then(|bytes| {
                            String::from_utf8(bytes)
                                .map_err(|_| ConfigError::new(&label, "", "is not valid UTF-8"))
                        })
                        .and_then(|text| {
                            let path = self.dir.join(&name).display().to_string();
                            parse_file(&path, &text, name.ends_with(".json"))
                        });
                    let changed_while_read = fs::metadata(self.dir.join(&name))
                        .map(|m| FileStamp::of(name.clone(), &m) != stamp)
                        .unwrap_or(true);
                    if changed_while_read {
                        // Read half-way through a write: the next load reads it again.
                        if let Some(objects) = self.last_good.remove(&name) {
                            fresh.insert(name, objects);
                        }
                        continue;
                    }
                    match parsed {
                        Ok((objects, ignored))
                            if objects.is_empty()
                                && ignored.is_empty()
                                && self.last_good.get(&name).is_some_and(|o| !o.is_empty()) =>
                        {
                            let kept = self.last_good.remove(&name).unwrap_or_default();
                            errors.push(ConfigError::new(
                                &label,
                                "",
                                format!(
                                    "holds no document (keeping the {} object(s) last read from \
                                     it; delete the file to remove them)",
                                    kept.len()
                                ),
                            ));
                            fresh.insert(name, kept);
                        }
                        Ok((objects, ignored)) => {
                            errors.extend(ignored.iter().cloned());
                            stamps.insert(name.clone(), (stamp, ignored));
                            fresh.insert(name, objects);
                        }
                        Err(e) => {
                            failed.push(self.dir.join(&name).display().to_string());
                            let kept = self.last_good.remove(&name).unwrap_or_default();
                            let mut e = e;
                            e.message = format!(
                                "{} (keeping the {} object(s) last read from it)",
                                e.message,
                                kept.len()
                            );
                            errors.push(e);
                            fresh.insert(name, kept);
                        }
                    }
                }
                self.last_good = fresh;
                self.parsed = stamps;
            }
            Err(e) => {
                failed.push(dir_label.clone());
                errors.push(ConfigError::new(
                    format!("directory {dir_label}"),
                    "",
                    format!("cannot be read: {e} (keeping the objects last read from it)"),
                ));
            }
        }

        // First definition wins.
        let mut seen: HashMap<palisade_policy::model::ObjectKey, &str> = HashMap::new();
        let mut objects = Vec::new();
        let mut services = Vec::new();
        let mut endpoint_slices = Vec::new();
        for s in self.last_good.values().flatten() {
            let object = match &s.item {
                Item::Object(o) => o,
                Item::Service(svc) => {
                    services.push((**svc).clone());
                    continue;
                }
                Item::EndpointSlice(slice) => {
                    endpoint_slices.push((**slice).clone());
                    continue;
                }
            };
            let key = object.key();
            if !key.name.is_empty() {
                if let Some(first) = seen.get(&key) {
                    errors.push(ConfigError::new(
                        key.to_string(),
                        "",
                        format!("defined in both {first} and {}; using the first", s.origin),
                    ));
                    continue;
                }
                seen.insert(key, &s.origin);
            }
            objects.push(object.clone());
        }
        LoadResult {
            objects,
            services,
            endpoint_slices,
            errors,
            failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::manifest::parse_str;
    use palisade_policy::model::{Kind, Store};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "palisade-manifest-{tag}-{}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn write(&self, name: &str, text: &str) {
            fs::write(self.0.join(name), text).unwrap();
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {team: x}}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {containers: [{name: c}]}\n";
    const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {}}\n";

    fn kinds(r: &LoadResult) -> Vec<String> {
        r.objects.iter().map(|o| o.key().to_string()).collect()
    }

    #[test]
    fn reads_documents_lists_and_json() {
        let d = TempDir::new("read");
        d.write(
            "1-ns.yaml",
            &format!("{NS}---\n{POD}---\n# only a comment\n"),
        );
        d.write(
            "2-list.yml",
            &format!(
                "apiVersion: v1\nkind: List\nitems:\n- {}",
                NP.replace('\n', "\n  ")
            ),
        );
        d.write(
            "3.json",
            r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}}"#,
        );
        d.write(
            "4-svc.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n---\n",
        );
        d.write("notes.txt", "not a manifest");
        d.write(".hidden.yaml", "{{{");
        let mut m = ManifestDir::new(&d.0);
        let r = m.load();
        assert_eq!(
            kinds(&r),
            [
                "Namespace a",
                "Pod a/p",
                "NetworkPolicy a/deny",
                "Namespace b"
            ]
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let e = r.errors[0].to_string();
        assert!(
            e.contains("4-svc.yaml document 1") && e.contains("\"ConfigMap\""),
            "{e}"
        );
        let store = Store::from_objects(r.objects);
        assert_eq!(store.namespaces["a"].labels["team"], "x");
        assert!(store.errors().is_empty());
    }

    #[test]
    fn unchanged_files_are_not_read_again() {
        let d = TempDir::new("cache");
        d.write(
            "a.yaml",
            &format!("{NS}---\nkind: Frobnicator\napiVersion: v1\n"),
        );
        d.write("b.yaml", POD);
        let mut m = ManifestDir::new(&d.0);
        let first = m.load();
        assert_eq!(kinds(&first), ["Namespace a", "Pod a/p"]);
        assert_eq!(first.errors.len(), 1, "{:?}", first.errors);
        // Unchanged: the same objects, and the cached file's report is repeated.
        let again = m.load();
        assert_eq!(kinds(&again), kinds(&first));
        assert_eq!(again.errors, first.errors, "reports of cached files repeat");
        // Any change is read: same length, new content.
        d.write("b.yaml", &POD.replace("name: p", "name: q"));
        assert_eq!(kinds(&m.load()), ["Namespace a", "Pod a/q"]);
    }

    #[test]
    fn pods_are_kept_as_policy_sees_them() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: a\n  labels: {app: web}\n  \
                    annotations: {palisade.io/interface: veth1, other: x}\n  ownerReferences: [{apiVersion: v1, kind: X, name: o, uid: u}]\n\
                    spec:\n  nodeName: n1\n  containers:\n  - name: c\n    image: nginx\n    env: [{name: A, value: b}]\n    \
                    ports: [{name: http, containerPort: 80}]\n  initContainers:\n  - {name: once, image: x, ports: [{name: i, containerPort: 1}]}\n  \
                    - {name: side, image: x, restartPolicy: Always, ports: [{name: s, containerPort: 2}]}\n\
                    status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}], conditions: [{type: Ready, status: 'True'}]}\n";
        let objects = parse_str(text).unwrap();
        let Object::Pod(pod) = &objects[0] else {
            panic!("a pod")
        };
        let full: k8s_openapi::api::core::v1::Pod = serde_saphyr::from_str(text).unwrap();
        let (_, expected, _) = palisade_policy::model::PodInfo::from_k8s(&full).unwrap();
        let info = pod.info().expect("converted");
        assert_eq!(info, &expected);
        assert_eq!(info.labels["app"], "web");
        assert_eq!(
            info.annotations.keys().collect::<Vec<_>>(),
            ["palisade.io/interface"]
        );
        let names: Vec<&str> = info
            .container_ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["http", "s"],
            "containers and sidecars, not init containers"
        );
        assert_eq!(info.node_name.as_deref(), Some("n1"));
        assert_eq!(info.ips, ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
    }

    #[test]
    fn services_and_slices_are_read_with_the_rest() {
        let d = TempDir::new("svc");
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {name: web-1, namespace: a, labels: {kubernetes.io/service-name: web}}\nendpoints: [{addresses: [10.0.0.1]}]\n";
        d.write("a.yaml", &format!("{NS}---\n{svc}---\n{slice}"));
        let mut m = ManifestDir::new(&d.0);
        let r = m.load();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(kinds(&r), ["Namespace a"]);
        assert_eq!(r.services.len(), 1);
        assert_eq!(r.endpoint_slices.len(), 1);
        // A Service that does not decode fails its file like any object, naming the field.
        d.write(
            "a.yaml",
            &format!(
                "{NS}---\n{}",
                svc.replace("ports: [{port: 80}]", "ports: [{port: x}]")
            ),
        );
        let r = m.load();
        let e = r.errors[0].to_string();
        assert!(
            e.contains("(Service a/web)") && e.contains("spec.ports[0].port"),
            "{e}"
        );
        assert_eq!(r.services.len(), 1, "the last good Service stays");
    }

    #[test]
    fn a_file_emptied_in_place_keeps_its_objects_until_deleted() {
        let d = TempDir::new("emptied");
        d.write("a.yaml", &format!("{NS}---\n{NP}"));
        let mut m = ManifestDir::new(&d.0);
        assert_eq!(kinds(&m.load()), ["Namespace a", "NetworkPolicy a/deny"]);
        // Truncated in place (the first half of `fs::write`), then comments only: both are
        // what a rewrite looks like half-way, never "no policy".
        for text in ["", "\n  \n# being rewritten\n---\n"] {
            d.write("a.yaml", text);
            let r = m.load();
            assert_eq!(
                kinds(&r),
                ["Namespace a", "NetworkPolicy a/deny"],
                "{text:?}"
            );
            let e = r.errors[0].to_string();
            assert!(
                e.contains("a.yaml") && e.contains("holds no document") && e.contains("delete"),
                "{e}"
            );
            assert!(
                r.failed.is_empty(),
                "last good objects exist: not incomplete"
            );
        }
        // Rewritten: the new content counts.
        d.write("a.yaml", NS);
        let r = m.load();
        assert_eq!(kinds(&r), ["Namespace a"]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        // A file that never held anything is no error; deleting a file removes its objects.
        d.write("b.yaml", "");
        assert!(m.load().errors.is_empty());
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        assert!(m.load().objects.is_empty());
    }

    #[test]
    fn an_unsettled_file_keeps_its_last_good_objects() {
        let d = TempDir::new("settle");
        d.write("a.yaml", &format!("{NS}---\n{NP}"));
        let mut m = ManifestDir::new(&d.0);
        let settled = m.fingerprint();
        assert_eq!(m.load_settled(Some(&settled)).objects.len(), 2);
        // Changed after the fingerprint the caller saw settled: not read yet, whatever it holds.
        d.write("a.yaml", NS);
        d.write("b.yaml", POD);
        let r = m.load_settled(Some(&settled));
        assert_eq!(kinds(&r), ["Namespace a", "NetworkPolicy a/deny"]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        // Once settled, read.
        let settled = m.fingerprint();
        assert_eq!(
            kinds(&m.load_settled(Some(&settled))),
            ["Namespace a", "Pod a/p"]
        );
        // A deletion needs no settling.
        fs::remove_file(d.0.join("b.yaml")).unwrap();
        assert_eq!(kinds(&m.load_settled(Some(&settled))), ["Namespace a"]);
    }

    #[test]
    fn broken_file_keeps_last_good_objects() {
        let d = TempDir::new("lastgood");
        d.write("a.yaml", &format!("{NS}---\n{NP}"));
        d.write("b.yaml", POD);
        let mut m = ManifestDir::new(&d.0);
        let fp0 = m.fingerprint();
        assert_eq!(m.load().objects.len(), 3);
        assert_eq!(m.fingerprint(), fp0, "nothing changed");

        // Malformed YAML: the file's previous objects stay, the error names file and line.
        d.write(
            "a.yaml",
            &format!("{NS}---\nkind: NetworkPolicy\n  bad: [indent\n"),
        );
        assert_ne!(m.fingerprint(), fp0);
        let r = m.load();
        assert_eq!(
            kinds(&r),
            ["Namespace a", "NetworkPolicy a/deny", "Pod a/p"]
        );
        assert_eq!(r.errors.len(), 1);
        let e = r.errors[0].to_string();
        assert!(e.contains("a.yaml") && e.contains("line"), "{e}");

        // A known kind that does not decode fails the file too, naming the field.
        d.write(
            "a.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {ingress: [{ports: [{endPort: abc}]}]}\n",
        );
        let r = m.load();
        assert_eq!(r.objects.len(), 3);
        let e = r.errors[0].to_string();
        assert!(
            e.contains("a.yaml document 1 (NetworkPolicy a/deny)")
                && e.contains("spec.ingress[0].ports[0].endPort"),
            "{e}"
        );

        // Wrong apiVersion, missing kind: the same.
        d.write(
            "a.yaml",
            &NP.replace("networking.k8s.io/v1", "extensions/v1beta1"),
        );
        let r = m.load();
        assert!(
            r.errors[0].to_string().contains("apiVersion"),
            "{:?}",
            r.errors
        );
        assert_eq!(r.objects.len(), 3);
        d.write("a.yaml", "just: a map\n");
        assert_eq!(m.load().objects.len(), 3);

        // Fixed: the new content replaces the old.
        d.write("a.yaml", NS);
        let r = m.load();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(kinds(&r), ["Namespace a", "Pod a/p"]);

        // A removed file's objects go.
        fs::remove_file(d.0.join("b.yaml")).unwrap();
        assert_eq!(kinds(&m.load()), ["Namespace a"]);

        // An unreadable directory keeps everything.
        let mut gone = ManifestDir::new(d.0.join("nope"));
        let r = gone.load();
        assert!(r.objects.is_empty() && r.errors[0].to_string().contains("nope"));
    }

    #[test]
    fn duplicates_keep_the_first() {
        let d = TempDir::new("dup");
        d.write("a.yaml", POD);
        d.write(
            "b.yaml",
            &POD.replace("namespace: a}", "namespace: a, labels: {v: second}}"),
        );
        let r = ManifestDir::new(&d.0).load();
        assert_eq!(r.objects.len(), 1);
        let Object::Pod(p) = &r.objects[0] else {
            panic!()
        };
        assert!(p.info().unwrap().labels.is_empty(), "the first one");
        let e = r.errors[0].to_string();
        assert!(
            e.starts_with("Pod a/p: defined in both /")
                && e.contains("/a.yaml document 1 and /")
                && e.ends_with("/b.yaml document 1; using the first"),
            "{e}"
        );
        assert_eq!(r.objects[0].key().kind, Kind::Pod);
    }

    #[test]
    fn examples_load_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
        let r = ManifestDir::new(&dir).load();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(!r.objects.is_empty());
        let store = Store::from_objects(r.objects);
        assert!(store.errors().is_empty(), "{:?}", store.errors());
        assert!(!store.policies.is_empty());
    }
}
