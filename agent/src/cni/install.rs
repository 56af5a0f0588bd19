//! Installation (the DaemonSet's init container): the plugin's entry in the node's CNI
//! configuration list, and the binary in the runtime's plugin directory.
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

use super::{InitialPolicy, PLUGIN_TYPE};

/// What `palisade cni-install` writes into the plugin's configuration entry.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Where the runtime finds plugins (`/opt/cni/bin`, mounted).
    pub bin_dir: PathBuf,
    /// The runtime's configuration directory (`/etc/cni/net.d`, mounted).
    pub conf_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub initial_policy: InitialPolicy,
    /// Remove the entry (and the binary) instead.
    pub uninstall: bool,
}

/// The configuration file the runtime uses: the first (by name) `.conflist`, `.conf` or
/// `.json` of the directory, as libcni picks it.
pub fn active_conf(conf_dir: &Path) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Appends (or updates) the `palisade-cni` entry of the active configuration list, converting
/// a single-plugin `.conf` to a list; copies this binary to `<bin_dir>/palisade-cni`.
/// Idempotent; every file is replaced by a rename, so the runtime never reads half a file.
pub fn install(opts: &InstallOptions) -> Result<String> {
    let plugin_bin = opts.bin_dir.join(PLUGIN_TYPE);
    let conf = active_conf(&opts.conf_dir)?
        .ok_or_else(|| anyhow!("no CNI configuration in {} yet", opts.conf_dir.display()))?;
    let text = fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    let mut v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", conf.display()))?;
    let is_list = v.get("plugins").is_some();
    if !is_list {
        let version = v.get("cniVersion").cloned().unwrap_or(json!("0.4.0"));
        let name = v.get("name").cloned().unwrap_or(json!("k8s-pod-network"));
        v = json!({"cniVersion": version, "name": name, "plugins": [v]});
    }
    let plugins = v
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| anyhow!("{}: plugins is not a list", conf.display()))?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if !opts.uninstall {
        plugins.push(json!({
            "type": PLUGIN_TYPE,
            "pinDir": opts.pin_dir,
            "stateDir": opts.state_dir,
            "initialPolicy": opts.initial_policy,
        }));
    }
    let out_path = if is_list {
        conf.clone()
    } else {
        conf.with_extension("conflist")
    };
    if !opts.uninstall {
        fs::create_dir_all(&opts.bin_dir)?;
        let exe = std::env::current_exe().context("locating this binary")?;
        let tmp = opts.bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
        fs::copy(&exe, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
        fs::rename(&tmp, &plugin_bin)?;
    }
    let tmp = opts.conf_dir.join(".palisade-conflist.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
    fs::rename(&tmp, &out_path)?;
    if out_path != conf {
        // The .conflist sorts after the .conf it replaces; remove the .conf only now.
        fs::remove_file(&conf)?;
    }
    if opts.uninstall {
        let _ = fs::remove_file(&plugin_bin);
    }
    Ok(format!(
        "{} {} in {}",
        if opts.uninstall {
            "removed"
        } else {
            "installed"
        },
        PLUGIN_TYPE,
        out_path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_appends_once_and_converts_a_conf() {
        let dir = std::env::temp_dir().join(format!("palisade-cni-install-{}", std::process::id()));
        let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
        fs::create_dir_all(&conf).unwrap();
        fs::write(
            conf.join("10-ptp.conf"),
            r#"{"cniVersion":"1.0.0","name":"kind","type":"ptp","ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        fs::write(conf.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
        let opts = InstallOptions {
            bin_dir: bin.clone(),
            conf_dir: conf.clone(),
            pin_dir: "/sys/fs/bpf/palisade".into(),
            state_dir: "/run/palisade/cni".into(),
            initial_policy: InitialPolicy::Deny,
            uninstall: false,
        };
        install(&opts).unwrap();
        install(&opts).unwrap();
        assert!(!conf.join("10-ptp.conf").exists());
        let v: Value =
            serde_json::from_str(&fs::read_to_string(conf.join("10-ptp.conflist")).unwrap())
                .unwrap();
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2, "{v}");
        assert_eq!(plugins[0]["type"], "ptp");
        assert_eq!(plugins[1]["type"], PLUGIN_TYPE);
        assert_eq!(plugins[1]["initialPolicy"], "deny");
        assert_eq!(v["name"], "kind");
        assert!(bin.join(PLUGIN_TYPE).exists());
        install(&InstallOptions {
            uninstall: true,
            ..opts
        })
        .unwrap();
        let v: Value =
            serde_json::from_str(&fs::read_to_string(conf.join("10-ptp.conflist")).unwrap())
                .unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
        assert!(!bin.join(PLUGIN_TYPE).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
