//! The observers, started from one place: the ring-buffer reader, the CLI socket and the admin
//! HTTP server (`/metrics`, `/healthz`, `/readyz`), all over one hub; after every reconcile
//! `Observer::publish` updates the names, the state file beside the socket and the metrics.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use palisade_common::{Event, map_names};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, error, info, warn};

use palisade_datapath::{Datapath, writer::ApplyStats};

use crate::{
    admin::AdminServer,
    api::{Problems, ReconcileInfo},
    health::Health,
    hub::Hub,
    inspect::{StateFile, state_path, write_private},
    metrics::{DatapathReader, Metrics},
    verdicts::{History, Names},
};
use palisade_policy::{model::Store, state::DesiredState};

/// Where the agent serves its CLI, metrics and probes.
#[derive(Clone, Debug)]
pub struct ObserveConfig {
    /// The CLI's unix socket; `state.json` goes beside it. `None`: neither.
    pub socket: Option<PathBuf>,
    /// The admin HTTP server (`/metrics`, `/healthz`, `/readyz`). `None`: off.
    pub admin_addr: Option<SocketAddr>,
    /// Verdicts kept for the CLI.
    pub history: usize,
    pub pin_dir: PathBuf,
    pub audit_all: bool,
}

/// What a reconcile did, for `Observer::publish`.
#[derive(Clone, Copy, Debug)]
pub struct Reconciled {
    pub started_at_unix_ms: u128,
    pub reconciled_at_unix_ms: u128,
    pub stats: ApplyStats,
    /// The compiler's IDENTITIES stamp when `applied` is its state as it made it (the pods'
    /// part of the names is rebuilt only when it changes).
    pub pods_stamp: Option<u64>,
}

/// The agent's observation side: verdict reader, CLI socket, admin server.
pub struct Observer {
    pub hub: Arc<Hub>,
    cfg: ObserveConfig,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stops with the observer.
    _admin: Option<AdminServer>,
    /// The pods' part of the names, with the IDENTITIES stamp it was built for.
    pods: std::sync::Mutex<Option<(u64, crate::inspect::PodIndex)>>,
}

impl Observer {
    /// Takes the event and counter maps from the datapath and starts the reader and the socket
    /// server on the current tokio runtime, and the admin server (`/metrics`, and `health`'s
    /// probes) on a thread of its own. A socket or admin address that cannot be bound is
    /// logged, not fatal: enforcement matters more.
    pub fn start(cfg: ObserveConfig, dp: &mut Datapath, health: Health) -> Result<Observer> {
        let ring = RingBuf::try_from(dp.take_map(map_names::EVENTS)?)?;
        let datapath = DatapathReader::new(dp)?;
        let hub = Arc::new(Hub {
            names: RwLock::new(Arc::new(Names::default())),
            history: Mutex::new(History::new(cfg.history)),
            metrics: Metrics::new(),
            datapath,
            undecodable: Default::default(),
            last_reconcile: Mutex::new(None),
            problems: Mutex::default(),
            fqdn: Default::default(),
        });
        let mut tasks = vec![spawn_reader(ring, hub.clone())?];
        if let Some(path) = &cfg.socket {
            match crate::control::bind(path) {
                Ok(listener) => {
                    info!(socket = %path.display(), "serving the CLI");
                    tasks.push(tokio::spawn(crate::control::serve(listener, hub.clone())));
                }
                Err(e) => error!("CLI socket {}: {e:#}", path.display()),
            }
        }
        let admin = cfg.admin_addr.and_then(|addr| {
            let h = hub.clone();
            AdminServer::start(addr, Arc::new(move || crate::stats::scrape(&h)), health)
                .map_err(|e| error!("admin server on {addr}: {e}"))
                .ok()
        });
        Ok(Observer {
            hub,
            cfg,
            tasks,
            _admin: admin,
            pods: Default::default(),
        })
    }

    /// After a reconcile: new names for events, the state file for the CLI, what the last
    /// reconcile did.
    pub fn publish(
        &self,
        applied: &DesiredState,
        store: &Store,
        node_addresses: &[IpAddr],
        reconciled: Reconciled,
    ) {
        let Reconciled {
            started_at_unix_ms,
            reconciled_at_unix_ms,
            stats,
            pods_stamp,
        } = reconciled;
        let pods = {
            let mut cached = self.pods.lock().expect("pods lock");
            match (&*cached, pods_stamp) {
                (Some((stamp, pods)), Some(now)) if *stamp == now && now != 0 => pods.clone(),
                _ => {
                    let pods = crate::inspect::PodIndex::build(applied, store);
                    *cached = pods_stamp.map(|s| (s, pods.clone()));
                    pods
                }
            }
        };
        let file = StateFile::build_with(
            applied,
            store,
            node_addresses,
            &self.cfg.pin_dir,
            self.cfg.audit_all,
            &pods,
        );
        if let Some(socket) = &self.cfg.socket {
            let path = state_path(socket);
            match serde_json::to_vec(&file) {
                Ok(bytes) => {
                    if let Err(e) = write_private(&path, &bytes) {
                        warn!("state file: {e:#}");
                    }
                }
                Err(e) => warn!("state file: {e}"),
            }
        }
        self.hub.datapath.forget_rules(&file.rules);
        *self.hub.last_reconcile.lock().expect("lock") = Some(ReconcileInfo {
            at_unix_ms: reconciled_at_unix_ms as u64,
            duration_ms: reconciled_at_unix_ms.saturating_sub(started_at_unix_ms) as u64,
            endpoints: applied.endpoints.len(),
            policy_entries: applied.policy.len(),
            cidr_entries: applied.cidrs.len(),
            identities: applied.identities.len(),
            rules: file.rules.len(),
            written: stats.written,
            removed: stats.removed,
            failed: stats.failed,
        });
        let names = Arc::new(Names::with_owners(file, applied, pods.ip_owner));
        // The names they replace are dropped here, outside the lock.
        let _old = std::mem::replace(&mut *self.hub.names.write().expect("names lock"), names);
    }

    pub fn set_problems(&self, problems: Problems) {
        *self.hub.problems.lock().expect("problems lock") = problems;
    }

    pub fn socket(&self) -> Option<&Path> {
        self.cfg.socket.as_deref()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = &self.cfg.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Reads the ring buffer whenever it has data and records every event.
pub fn spawn_reader(ring: RingBuf<MapData>, hub: Arc<Hub>) -> Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the ring buffer owns its map fd, which stays open as long as the ring buffer
    // (moved into the AsyncFd) lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the EVENTS ring buffer")?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    error!("EVENTS ring buffer: {e}");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            let mut n = 0usize;
            let mut drained = false;
            loop {
                let Some(item) = ring.next() else {
                    drained = true;
                    break;
                };
                if item.len() < std::mem::size_of::<Event>() {
                    hub.undecodable
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                // SAFETY: the record holds an `Event` written by the datapath (plain data).
                let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                drop(item);
                hub.record(&ev);
                n += 1;
                if n == 1024 {
                    // Let the socket server and the main loop run during a flood; the fd
                    // stays ready, so the rest is read on the next turn.
                    break;
                }
            }
            if drained {
                guard.clear_ready();
            }
            if n > 0 {
                debug!(events = n, "verdicts recorded");
            }
            tokio::task::yield_now().await;
        }
    }))
}
