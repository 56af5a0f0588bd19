//! What the plugin reports when a command fails: one variant per thing that went wrong, each
//! with the CNI specification's code for it (v1.1, "Error"; codes 0-99 are the spec's, 100 and
//! above the plugin's own).
//!
//! | code | meaning (spec)                                  | variants                                  |
//! | ---- | ----------------------------------------------- | ----------------------------------------- |
//! | 1    | incompatible CNI version                        | `IncompatibleVersion`                     |
//! | 3    | container unknown or does not exist             | `NoRecord`                                |
//! | 4    | invalid necessary environment variables         | `UnknownCommand`                          |
//! | 5    | I/O failure                                     | `Stdin`, `StateDir`, `ReadRecord`, `Netlink`; `OpenMap`, `WriteEntry`, `Attach` (pins, bpffs) |
//! | 6    | failed to decode content                        | `Decode`, `BadRecord`                     |
//! | 7    | invalid network config                          | `NoPrevResult`                            |
//! | 11   | try again later                                 | `NotLoaded` (under `initialPolicy: deny`) |
//! | 50   | STATUS: plugin not available                    | `NotAvailable`                            |
//! | 100  | the pod's interface has no host-side veth       | `NoHostVeth`                              |
//! | 101  | CHECK: the programs are not attached            | `NotAttached`                             |
//! | 102  | a pinned map of another layout (version skew)   | `MapLayout`                               |
//! | 103  | the kernel refused to attach the programs       | `Attach` (other than I/O on the pins)     |
//!
//! 2 (unsupported field) is not used: unknown keys are ignored, as the spec allows. 51 (not
//! available, existing containers may be damaged) is not used either: STATUS sees only whether
//! the programs are pinned, and without them no pod of this node was ever attached by the
//! plugin.
use std::error::Error;
use std::io;
use std::path::PathBuf;

use aya::maps::MapError;
use palisade_datapath::{DatapathError, netlink::NetlinkError};

use super::plugin::SUPPORTED_VERSIONS;

/// A failed plugin command: `code()`, `msg` (the `Display`) and `details()` are the CNI error
/// object's fields.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("reading the network configuration from stdin")]
    Stdin(#[source] io::Error),
    #[error("cannot decode the network configuration")]
    Decode(#[source] serde_json::Error),
    #[error("unsupported cniVersion {version}")]
    IncompatibleVersion { version: String },
    #[error("unknown CNI_COMMAND {0:?}")]
    UnknownCommand(String),
    #[error("palisade-cni is a chained plugin: it needs a prevResult")]
    NoPrevResult,
    /// No host-side veth for the pod's interface, neither by its peer nor in `prevResult`
    /// (100: the interface plugin before this one made something else, or nothing).
    #[error("cannot find the pod's host-side veth: {why}")]
    NoHostVeth { why: String },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Under `initialPolicy: deny` the pod cannot run unenforced: the code is the cause's.
    #[error("enforcing from the first packet (initialPolicy deny)")]
    NotEnforced(#[source] ProvisionError),
    #[error("{doing} {}", .path.display())]
    StateDir {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// CHECK of an attachment the plugin has no record of.
    #[error("no record {}", .path.display())]
    NoRecord { path: PathBuf },
    #[error("reading the record {}", .path.display())]
    ReadRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot decode the record {}", .path.display())]
    BadRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// CHECK: the pod's interface is recorded but its programs are not attached (101).
    #[error("the programs are not attached to {host_ifname} (ifindex {host_ifindex})")]
    NotAttached {
        host_ifname: String,
        host_ifindex: u32,
    },
    /// STATUS: the agent's programs are not pinned, so ADD cannot enforce (50).
    #[error("the Palisade datapath is not loaded on this node")]
    NotAvailable { path: PathBuf },
}

/// Why the provisional entry or the programs could not be put in place on ADD (under
/// `initialPolicy: allow` the pod passes anyway, with this in the log).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The agent has not loaded the datapath yet (a node starting up): the pod cannot be
    /// enforced from its first packet, so ADD says "try again later" (11) and the runtime
    /// retries.
    #[error("{} is missing: the agent has not loaded the datapath", .path.display())]
    NotLoaded { path: PathBuf },
    #[error("opening {} (is the agent running?)", .path.display())]
    OpenMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    /// The pinned map's key or value size is not this plugin's: a plugin of another version
    /// than the datapath refuses rather than writes a wrong layout (102).
    #[error("map {map}")]
    MapLayout {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{doing}")]
    WriteEntry {
        doing: &'static str,
        #[source]
        source: MapError,
    },
    /// Attaching the pinned programs (I/O on the pins: 5; the kernel refusing: 103).
    #[error(transparent)]
    Attach(#[from] DatapathError),
}

impl CniError {
    /// The CNI specification's code (or the plugin's own, 100 and above).
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => 1,
            CniError::NoRecord { .. } => 3,
            CniError::UnknownCommand(_) => 4,
            CniError::Stdin(_)
            | CniError::StateDir { .. }
            | CniError::ReadRecord { .. }
            | CniError::Netlink(_) => 5,
            CniError::Decode(_) | CniError::BadRecord { .. } => 6,
            CniError::NoPrevResult => 7,
            CniError::NotEnforced(e) => e.code(),
            CniError::NotAvailable { .. } => 50,
            CniError::NoHostVeth { .. } => 100,
            CniError::NotAttached { .. } => 101,
        }
    }

    /// The error object's `details`: what to do about it, or the causes.
    pub fn details(&self) -> String {
        match self {
            CniError::IncompatibleVersion { .. } => {
                format!("supported: {}", SUPPORTED_VERSIONS.join(", "))
            }
            CniError::NoPrevResult => {
                "list it after the plugin that creates the pod's interface".into()
            }
            CniError::UnknownCommand(_) => String::new(),
            CniError::Decode(e) => e.to_string(),
            CniError::NotAvailable { path } => format!("{} is missing", path.display()),
            _ => chain(self),
        }
    }
}

impl ProvisionError {
    pub fn code(&self) -> u32 {
        match self {
            ProvisionError::NotLoaded { .. } => 11,
            ProvisionError::OpenMap { .. } | ProvisionError::WriteEntry { .. } => 5,
            ProvisionError::MapLayout { .. } => 102,
            ProvisionError::Attach(DatapathError::Io { .. } | DatapathError::Pinned { .. }) => 5,
            ProvisionError::Attach(_) => 103,
        }
    }
}

/// The error and its causes, `: `-separated; a cause whose text its parent already printed
/// is not repeated.
pub(super) fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_error() -> MapError {
        MapError::InvalidKeySize {
            size: 8,
            expected: 4,
        }
    }

    fn io_error() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    fn json_error() -> serde_json::Error {
        serde_json::from_str::<serde_json::Value>("not json").unwrap_err()
    }

    #[test]
    fn every_variant_has_its_code() {
        let path = || PathBuf::from("/x");
        let cases: Vec<(CniError, u32)> = vec![
            (
                CniError::IncompatibleVersion {
                    version: "9.9.9".into(),
                },
                1,
            ),
            (CniError::NoRecord { path: path() }, 3),
            (CniError::UnknownCommand("FROB".into()), 4),
            (CniError::Stdin(io_error()), 5),
            (
                CniError::StateDir {
                    doing: "creating",
                    path: path(),
                    source: io_error(),
                },
                5,
            ),
            (
                CniError::ReadRecord {
                    path: path(),
                    source: io_error(),
                },
                5,
            ),
            (
                CniError::Netlink(NetlinkError::Socket {
                    netns: None,
                    source: io_error(),
                }),
                5,
            ),
            (CniError::Decode(json_error()), 6),
            (
                CniError::BadRecord {
                    path: path(),
                    source: json_error(),
                },
                6,
            ),
            (CniError::NoPrevResult, 7),
            (CniError::NotAvailable { path: path() }, 50),
            (CniError::NoHostVeth { why: "none".into() }, 100),
            (
                CniError::NotAttached {
                    host_ifname: "veth1".into(),
                    host_ifindex: 5,
                },
                101,
            ),
        ];
        for (e, code) in &cases {
            assert_eq!(e.code(), *code, "{e:?}");
        }
        let provision: Vec<(ProvisionError, u32)> = vec![
            (ProvisionError::NotLoaded { path: path() }, 11),
            (
                ProvisionError::OpenMap {
                    path: path(),
                    source: map_error(),
                },
                5,
            ),
            (
                ProvisionError::WriteEntry {
                    doing: "writing",
                    source: map_error(),
                },
                5,
            ),
            (
                ProvisionError::MapLayout {
                    map: "ENDPOINTS",
                    source: map_error(),
                },
                102,
            ),
            (
                ProvisionError::Attach(DatapathError::Io {
                    doing: "pinning link at",
                    path: path(),
                    cause: io_error(),
                }),
                5,
            ),
            (
                ProvisionError::Attach(DatapathError::Pinned {
                    path: path(),
                    cause: Box::new(map_error()),
                }),
                5,
            ),
            (
                ProvisionError::Attach(DatapathError::KernelVersion("?".into())),
                103,
            ),
        ];
        for (e, code) in provision {
            assert_eq!(e.code(), code, "{e:?}");
            // Under initialPolicy deny the cause's code is the command's.
            assert_eq!(CniError::NotEnforced(e).code(), code);
        }
    }

    #[test]
    fn details_carry_the_causes_once() {
        let e = CniError::NotEnforced(ProvisionError::NotLoaded {
            path: "/p/progs/to_pod".into(),
        });
        assert!(e.to_string().contains("initialPolicy deny"), "{e}");
        assert_eq!(
            e.details(),
            "enforcing from the first packet (initialPolicy deny): /p/progs/to_pod is missing: \
             the agent has not loaded the datapath"
        );
        // NetlinkError prints its source already.
        let e = CniError::Netlink(NetlinkError::Socket {
            netns: None,
            source: io_error(),
        });
        let d = e.details();
        assert_eq!(d.matches(&io_error().to_string()).count(), 1, "{d}");
        assert!(
            CniError::IncompatibleVersion {
                version: "9".into()
            }
            .details()
            .contains("1.0.0")
        );
    }
}
