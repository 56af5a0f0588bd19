//! What `GET /healthz` (liveness) and `GET /readyz` (readiness) answer, for the DaemonSet's
//! probes (served by `admin`).
//!
//! Live: the main loop went round within the last `STALL` (it ticks every second whatever
//! happens; a loop stuck in a syscall or a deadlock stops answering). Ready: the agent has
//! enforced a complete view at least once (in cluster mode: every watch has listed) and the
//! last reconcile did not fail.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The main loop is considered stuck after this long without a beat.
pub const STALL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    /// Milliseconds since `started` of the last beat.
    beat_ms: AtomicU64,
    ready: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            inner: Arc::new(Inner {
                started: Instant::now(),
                beat_ms: AtomicU64::new(0),
                ready: AtomicBool::new(false),
            }),
        }
    }
}

/// A probe's answer: whether it passes, and the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    pub body: &'static str,
}

impl Health {
    pub fn beat(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.beat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        let last = Duration::from_millis(self.inner.beat_ms.load(Ordering::Relaxed));
        self.inner.started.elapsed().saturating_sub(last) < STALL
    }

    /// `/healthz` (also `/livez`).
    pub fn liveness(&self) -> Probe {
        if self.is_live() {
            Probe {
                ok: true,
                body: "ok\n",
            }
        } else {
            Probe {
                ok: false,
                body: "main loop stalled\n",
            }
        }
    }

    /// `/readyz`: ready, and live.
    pub fn readiness(&self) -> Probe {
        if self.is_ready() && self.is_live() {
            Probe {
                ok: true,
                body: "ready\n",
            }
        } else {
            Probe {
                ok: false,
                body: "not ready\n",
            }
        }
    }
}
