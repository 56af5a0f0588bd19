//! The admin HTTP server: `GET /metrics` (Prometheus, OpenMetrics text), `GET /healthz` and
//! `GET /readyz` (the kubelet's probes, `health`) on one listener (`palisade run
//! --admin-addr`, `off` disables it). Another path is 404, another method 405.
//!
//! It runs on a thread and a runtime of its own, not on the main loop's: a reconcile blocks
//! that runtime (it is single-threaded), and under load one can take longer than the kubelet's
//! probe timeout. Liveness must mean "the loop went round lately", not "the loop happened to
//! be idle when the probe came". A scrape reads every counter map: it runs on the blocking
//! pool, so probes are answered meanwhile.
//!
//! HTTP/1.1 (hyper), one request per connection (`connection: close`), as the agent always
//! answered: probes and scrapes come seconds apart, and a client that reads to the end of the
//! stream gets its answer at once.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tracing::{debug, error, info};

use crate::health::{Health, Probe};

/// The default port. Not 9090 (the Prometheus server's own), 9091 (the Pushgateway's, and
/// Calico Felix's metrics: both may run on the node, Felix with host networking as we do),
/// 9093 (Alertmanager), 9100 (node_exporter, on every node with host networking) or 9464 (the
/// OpenTelemetry Prometheus exporter's default). In the 9100-9999 range Prometheus keeps for
/// exporters (its "Default port allocations" wiki page, where this port should be recorded).
pub const DEFAULT_PORT: u16 = 9465;

/// `--admin-addr` by default: every address (Prometheus scrapes the node's), `DEFAULT_PORT`.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9465";

/// A client that has not sent its request head by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// What `/metrics` answers, read when it is asked (on the blocking pool).
pub type Scrape = Arc<dyn Fn() -> String + Send + Sync>;

/// The running server; dropping it stops it (and frees the port).
pub struct AdminServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `addr` now (a failure is the caller's to report) and serves from a thread.
    pub fn start(addr: SocketAddr, scrape: Scrape, health: Health) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || runtime.block_on(serve(listener, scrape, health, rx)))?;
        info!(%addr, "admin server (/metrics, /healthz, /readyz)");
        Ok(AdminServer {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Where it listens (the port chosen, for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    scrape: Scrape,
    health: Health,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!("admin server: {e}");
            return;
        }
    };
    let mut http = http1::Builder::new();
    http.keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    debug!("admin server accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (scrape, health) = (scrape.clone(), health.clone());
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| answer(req, scrape.clone(), health.clone())),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, "admin connection: {e}");
            }
        });
    }
}

/// What a request gets, decided before anything is read.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Reply(StatusCode, &'static str),
}

fn route(method: &Method, path: &str, health: &Health) -> Route {
    if method != Method::GET {
        return Route::Reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let probe = |p: Probe| {
        let status = if p.ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Route::Reply(status, p.body)
    };
    match path {
        "/metrics" => Route::Metrics,
        "/healthz" | "/livez" => probe(health.liveness()),
        "/readyz" => probe(health.readiness()),
        _ => Route::Reply(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

async fn answer(
    req: Request<Incoming>,
    scrape: Scrape,
    health: Health,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match route(req.method(), req.uri().path(), &health) {
        Route::Metrics => match tokio::task::spawn_blocking(move || scrape()).await {
            Ok(text) => (StatusCode::OK, OPENMETRICS, Bytes::from(text)),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                Bytes::from(format!("{e}\n")),
            ),
        },
        Route::Reply(status, body) => (status, TEXT, Bytes::from_static(body.as_bytes())),
    };
    debug!(method = %req.method(), path = req.uri().path(), %status, "admin request");
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response = response.header(header::ALLOW, "GET");
    }
    Ok(response
        .body(Full::new(body))
        .expect("a status and two static headers make a response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Route) -> StatusCode {
        match r {
            Route::Metrics => StatusCode::OK,
            Route::Reply(s, _) => s,
        }
    }

    #[test]
    fn answers() {
        let h = Health::default();
        h.beat();
        let get = |path: &str| status(route(&Method::GET, path, &h));
        assert_eq!(get("/healthz"), StatusCode::OK);
        assert_eq!(get("/readyz"), StatusCode::SERVICE_UNAVAILABLE);
        h.set_ready(true);
        assert_eq!(get("/readyz"), StatusCode::OK);
        assert_eq!(get("/"), StatusCode::NOT_FOUND);
        assert_eq!(get("/nope"), StatusCode::NOT_FOUND);
        assert_eq!(route(&Method::GET, "/metrics", &h), Route::Metrics);
        for m in [Method::POST, Method::HEAD, Method::PUT, Method::DELETE] {
            for path in ["/metrics", "/healthz", "/readyz", "/nope"] {
                assert_eq!(
                    status(route(&m, path, &h)),
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path}"
                );
            }
        }
    }

    /// One request over TCP, read to the end (the server closes): status code and body.
    fn request(addr: SocketAddr, head: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "{head}\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).expect("the server closes");
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    /// The server itself, on a loopback of a network namespace of its own (root).
    #[test]
    fn serves_metrics_and_probes_on_one_listener() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "this test needs root (a network namespace); CI=true forbids skipping"
            );
            eprintln!("skipping: needs root");
            return;
        }
        std::thread::spawn(|| {
            // The thread, and the server's thread it starts, in a namespace of their own.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let mut nl = palisade_datapath::netlink::Netlink::new().expect("netlink");
            let lo = nl.link_by_name("lo").expect("lo").index;
            nl.set_link_up(lo).expect("lo up");
            let health = Health::default();
            health.beat();
            let server = AdminServer::start(
                "127.0.0.1:0".parse().unwrap(),
                Arc::new(|| "palisade_up 1\n# EOF\n".to_string()),
                health.clone(),
            )
            .unwrap();
            let addr = server.local_addr();
            let (code, body) = request(addr, "GET /metrics HTTP/1.1");
            assert_eq!((code, body.as_str()), (200, "palisade_up 1\n# EOF\n"));
            assert_eq!(request(addr, "GET /metrics?x=1 HTTP/1.1").0, 200);
            assert_eq!(request(addr, "GET /healthz HTTP/1.1"), (200, "ok\n".into()));
            assert_eq!(
                request(addr, "GET /readyz HTTP/1.1"),
                (503, "not ready\n".into())
            );
            health.set_ready(true);
            assert_eq!(
                request(addr, "GET /readyz HTTP/1.1"),
                (200, "ready\n".into())
            );
            assert_eq!(request(addr, "GET /nope HTTP/1.1").0, 404);
            assert_eq!(request(addr, "POST /metrics HTTP/1.1").0, 405);
            drop(server);
            assert!(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
                "stopped with its owner"
            );
        })
        .join()
        .unwrap();
    }
}
