//! What can go wrong between the agent and the kernel, saying which map, program, interface or
//! path it was. Each message carries its cause's text, so `{}` prints it whole.
use std::{io, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    programs::{ProgramError, links::LinkError},
};

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("parsing the eBPF object: {0}")]
    Object(String),
    #[error("loading the eBPF object (maps): {0}")]
    Load(Box<EbpfError>),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("verifier rejected program {program}: {cause}")]
    Verifier {
        program: &'static str,
        cause: Box<ProgramError>,
    },
    #[error("program {program}: {cause}")]
    Program {
        program: &'static str,
        cause: Box<ProgramError>,
    },
    #[error("map {0} missing from the object (or already taken)")]
    MissingMap(String),
    #[error("map {map}: {doing}: {cause}")]
    Map {
        map: String,
        doing: &'static str,
        cause: Box<MapError>,
    },
    #[error("map {map}: endpoint {endpoint}: {doing}: {cause}")]
    MapEntry {
        map: &'static str,
        endpoint: u32,
        doing: &'static str,
        cause: Box<MapError>,
    },
    #[error("opening pinned map {path}: {cause}")]
    Pinned { path: PathBuf, cause: Box<MapError> },
    #[error("map {map}: {why}")]
    MapKind { map: String, why: &'static str },
    #[error("attaching {program} to {ifname} (ifindex {ifindex}): {cause}")]
    Attach {
        program: &'static str,
        ifname: String,
        ifindex: u32,
        cause: Box<DatapathError>,
    },
    #[error("link {path}: {cause}")]
    Link {
        path: PathBuf,
        cause: Box<LinkError>,
    },
    #[error("{doing} {path}: {cause}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("no interface with ifindex {ifindex}: {cause}")]
    NoInterface { ifindex: u32, cause: nix::Error },
    #[error("reading the kernel version: {0}")]
    KernelVersion(String),
    #[error("the conntrack quota per endpoint must be at least 1")]
    ZeroQuota,
    #[error("starting the conntrack sweep: {0}")]
    Thread(io::Error),
}

impl DatapathError {
    pub(crate) fn io(
        doing: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |cause| DatapathError::Io { doing, path, cause }
    }

    pub(crate) fn map(map: &str, doing: &'static str) -> impl FnOnce(MapError) -> Self {
        let map = map.to_string();
        move |cause| DatapathError::Map {
            map,
            doing,
            cause: Box::new(cause),
        }
    }
}
