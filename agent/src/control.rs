//! The CLI's unix socket: newline-delimited JSON, one request per connection.
//!
//! Only root opens it: its directory is created 0700, the socket is 0600, and the server also
//! checks the peer's credentials (uid 0 or the agent's own uid). A client writes one
//! [`Request`] line and reads [`Reply`] lines: `verdicts` answers with the matching history then
//! `end`, or with `follow` keeps streaming new verdicts until the client goes away; `stats`
//! answers with one report.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast::error::RecvError,
};
use tracing::{debug, warn};

use crate::{
    api::{Reply, Request},
    hub::Hub,
    stats::stats_report,
};

/// Where the agent listens by default.
pub const DEFAULT_SOCKET: &str = "/run/palisade/palisade.sock";

/// Creates the socket's directory (0700 if new), replaces a stale socket, binds, sets 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    // Created with no access for group and others, then set exactly.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts CLI connections until the task is aborted.
pub async fn serve(listener: UnixListener, hub: Arc<Hub>) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("CLI socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match conn.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == own_uid => {}
            Ok(c) => {
                warn!(uid = c.uid(), "CLI connection refused: not root");
                continue;
            }
            Err(e) => {
                warn!("CLI connection without credentials: {e}");
                continue;
            }
        }
        let hub = hub.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, hub).await {
                debug!("CLI connection: {e:#}");
            }
        });
    }
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

async fn handle(conn: UnixStream, hub: Arc<Hub>) -> Result<()> {
    let (r, mut w) = conn.into_split();
    let mut r = TokioBufReader::new(r.take(64 * 1024));
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .context("no request within 10 s")??;
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            send(
                &mut w,
                &Reply::Error {
                    message: format!("bad request: {e}"),
                },
            )
            .await?;
            return Ok(());
        }
    };
    match req {
        Request::Stats => {
            let h = hub.clone();
            let report = tokio::task::spawn_blocking(move || stats_report(&h)).await?;
            send(&mut w, &Reply::Stats(Box::new(report))).await?;
        }
        Request::Verdicts {
            filter,
            follow,
            limit,
        } => {
            // Subscribe before reading the history, so nothing falls between the two.
            let (mut rx, past) = {
                let h = hub.history.lock().expect("history lock");
                (h.subscribe(), h.query(&filter))
            };
            let skip = limit.map_or(0, |l| past.len().saturating_sub(l));
            let mut last_seq = 0;
            let mut out = tokio::io::BufWriter::new(&mut w);
            for v in past.into_iter().skip(skip) {
                last_seq = v.seq;
                send(&mut out, &Reply::Verdict(Box::new((*v).clone()))).await?;
            }
            send(&mut out, &Reply::End).await?;
            out.flush().await?;
            drop(out);
            if !follow {
                return Ok(());
            }
            let mut probe = [0u8; 1];
            loop {
                tokio::select! {
                    got = rx.recv() => match got {
                        Ok(v) => {
                            if v.seq > last_seq && filter.matches(&v) {
                                send(&mut w, &Reply::Verdict(Box::new((*v).clone()))).await?;
                            }
                        }
                        Err(RecvError::Lagged(missed)) => {
                            send(&mut w, &Reply::Lagged { missed }).await?;
                        }
                        Err(RecvError::Closed) => return Ok(()),
                    },
                    // The client closing its end (or sending anything) ends the stream.
                    n = r.read(&mut probe) => {
                        if matches!(n, Ok(0) | Err(_)) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    w.shutdown().await.ok();
    Ok(())
}

/// The client side: sends `req` and returns the reply lines as they arrive.
pub fn request(socket: &Path, req: &Request) -> Result<impl Iterator<Item = Result<Reply>>> {
    let mut conn = StdUnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `palisade run` running, and are you root?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    let reader = BufReader::new(conn);
    Ok(reader.lines().map(|l| {
        let l = l.context("reading from the agent")?;
        serde_json::from_str::<Reply>(&l).with_context(|| format!("bad reply from the agent: {l}"))
    }))
}

/// Sends `req` and returns its one reply (`stats`).
pub fn request_one(socket: &Path, req: &Request) -> Result<Reply> {
    match request(socket, req)?.next() {
        Some(r) => r,
        None => bail!("the agent closed the connection without a reply"),
    }
}
