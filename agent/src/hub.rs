//! The state the observers share: the names of things as of the last reconcile, the verdict
//! history, the agent's metrics and the datapath's counters, what is wrong now.
use std::sync::{Arc, Mutex, RwLock};

use palisade_common::Event;

use crate::{
    api::{Problems, ReconcileInfo, Verdict},
    metrics::{DatapathReader, Metrics},
    verdicts::{History, Names, wall_ms_of},
};

/// State shared by the event reader, the socket server and the metrics endpoint.
pub struct Hub {
    pub names: RwLock<Arc<Names>>,
    pub history: Mutex<History>,
    pub metrics: Metrics,
    pub datapath: DatapathReader,
    /// Events that could not be decoded (short records).
    pub undecodable: std::sync::atomic::AtomicU64,
    pub last_reconcile: Mutex<Option<ReconcileInfo>>,
    pub problems: Mutex<Problems>,
    /// The FQDN learner's counters, once it runs.
    pub fqdn: std::sync::OnceLock<Arc<crate::fqdn::FqdnStats>>,
}

impl Hub {
    pub fn record(&self, ev: &Event) -> Arc<Verdict> {
        let names = self.names.read().expect("names lock").clone();
        let mut v = names.decode(ev, wall_ms_of(ev.ts_ns));
        if ev.dir == palisade_common::DIR_EGRESS
            && let Some(f) = self.fqdn.get()
        {
            v.domain = palisade_common::ip_of(ev.family, &ev.dst)
                .and_then(|ip| f.name_of(ev.endpoint, ip));
        }
        self.metrics.observe_verdict(&v);
        self.history.lock().expect("history lock").push(v)
    }
}
