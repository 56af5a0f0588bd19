//! `GET /healthz` (liveness) and `GET /readyz` (readiness) for the DaemonSet's probes.
//!
//! Live: the main loop went round within the last `STALL` (it ticks every second whatever
//! happens; a loop stuck in a syscall or a deadlock stops answering). Ready: the agent has
//! enforced a complete view at least once (in cluster mode: every watch has listed) and the
//! last reconcile did not fail. No HTTP framework for two paths.
//!
//! The probes are answered on a thread of their own, not on the main loop's runtime: a
//! reconcile blocks that runtime (it is single-threaded), and under load one can take longer
//! than the kubelet's probe timeout. Liveness must mean "the loop went round lately", not
//! "the loop happened to be idle when the probe came" (that made `/healthz` miss answers in
//! a loaded test run).
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{error, info};

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

    /// Serves the probes on `addr` from a thread of its own (a failure to bind is logged:
    /// the agent enforces anyway).
    pub fn serve(&self, addr: SocketAddr) {
        let listener = match std::net::TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                error!("health endpoint on {addr}: {e}");
                return;
            }
        };
        info!(%addr, "health endpoint (/healthz, /readyz)");
        let health = self.clone();
        let spawned = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    health.reply(&mut conn);
                }
            });
        if let Err(e) = spawned {
            error!("health endpoint on {addr}: no thread: {e}");
        }
    }

    /// Answers one connection (one request; a slow client gets 5 s).
    fn reply(&self, conn: &mut std::net::TcpStream) {
        use std::io::{Read, Write};
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 1024];
        let mut n = 0;
        // Up to the end of the request line (a client may write it in pieces).
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            match conn.read(&mut buf[n..]) {
                Ok(0) | Err(_) => break,
                Ok(m) => n += m,
            }
        }
        let (code, body) = self.answer(&buf[..n]);
        let reply = format!(
            "HTTP/1.1 {code}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(reply.as_bytes());
    }

    /// The status line and body for a request.
    fn answer(&self, request: &[u8]) -> (&'static str, String) {
        let line = String::from_utf8_lossy(request);
        let path = line.split_whitespace().nth(1).unwrap_or("");
        match path {
            "/healthz" | "/livez" => {
                if self.is_live() {
                    ("200 OK", "ok\n".into())
                } else {
                    ("503 Service Unavailable", "main loop stalled\n".into())
                }
            }
            "/readyz" => {
                if self.is_ready() && self.is_live() {
                    ("200 OK", "ready\n".into())
                } else {
                    ("503 Service Unavailable", "not ready\n".into())
                }
            }
            _ => ("404 Not Found", "try /healthz or /readyz\n".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let h = Health::default();
        h.beat();
        assert_eq!(h.answer(b"GET /healthz HTTP/1.1\r\n\r\n").0, "200 OK");
        assert!(
            h.answer(b"GET /readyz HTTP/1.1\r\n\r\n")
                .0
                .starts_with("503")
        );
        h.set_ready(true);
        assert_eq!(h.answer(b"GET /readyz HTTP/1.1\r\n\r\n").0, "200 OK");
        assert!(h.answer(b"GET / HTTP/1.1\r\n\r\n").0.starts_with("404"));
    }
}
