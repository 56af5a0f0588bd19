//! The agent's main loop, one for every source of configuration: `files` (a manifest
//! directory, polled) and `kube` (the API server, watched).
//!
//! Shaped like a kube-rs controller: a source keeps a store of the objects it has been shown
//! (watch events, files read), the loop asks it for a `View` whenever something changed and
//! hands that to the reconcile step (`reconcile::Agent::reconcile`: compile, write the maps,
//! publish to the observers, report problems); health, metrics and logs stay at the edges.
//! What else wants a reconcile is the same for every source and is watched here: the host's
//! interfaces and routes (and pins removed by hand, failed work due again), and the CNI
//! plugin's records (and its wake-ups).
//!
//! Bad input never loosens enforcement: a view that is not whole is not enforced
//! (`Source::ready`), a reconcile that fails leaves the maps as they were, and meanwhile the
//! pinned maps keep enforcing the last good state.
pub mod files;
pub mod kube;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::reconcile::{Agent, RunConfig, View};
use palisade_policy::model::{ConfigError, Store};

/// Where the desired configuration comes from.
pub trait Source {
    /// How often the loop goes round when nothing wakes it (and calls `poll`).
    fn tick(&self) -> Duration;

    /// Logged once the datapath is loaded and the loop starts.
    fn started(&self, cfg: &RunConfig);

    /// Waits for the source's next event and takes it into the store; `Ok(true)` if the view
    /// changed. A source that is only polled has none (the future never completes). An error
    /// ends the loop: the source is gone.
    fn event(&mut self) -> impl Future<Output = Result<bool>>;

    /// On every turn of the loop: takes in what is pending without waiting (a burst of events
    /// is one reconcile) or what a poll finds; true if the view changed.
    fn poll(&mut self) -> bool;

    /// Whether the view is whole enough to enforce (a source that is not says why in the log,
    /// now and then). Until it is, nothing is enforced: the pinned state stays in force.
    fn ready(&mut self) -> bool;

    /// The view to enforce now.
    fn view(&mut self) -> View<'_>;

    /// The store as the last `view` left it (what the observers name pods by).
    fn store(&self) -> &Store;
}

/// The longest the observers and the status file wait for a burst of changes to end.
const PUBLISH_AT_LATEST: Duration = Duration::from_millis(200);

/// Runs the agent on `source` until SIGTERM or SIGINT. Pinned maps and links stay: enforcement
/// goes on while no agent runs, and the next agent adopts them.
pub async fn run(cfg: RunConfig, mut source: impl Source, object: &[u8]) -> Result<()> {
    let mut agent = Agent::start(cfg.clone(), object)?;
    let health = agent.health();
    let notify = match &cfg.cni_state_dir {
        Some(dir) => crate::cni::bind_notify(dir)
            .map_err(|e| error!("CNI wake-ups are off (the records are still read): {e:#}"))
            .ok(),
        None => None,
    };
    let mut notify_buf = [0u8; 64];
    // The kernel's link, address and route notifications wake the loop at once (a new pod's
    // veth and route); the host is still polled every `host_poll` without them.
    let host_changes = agent.host_changes_fd().and_then(|fd| {
        // SAFETY: the socket is the agent's, which outlives this registration (declared
        // after it, dropped before it).
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                BorrowedRawFd(fd),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| error!("host change notifications are off: {e}"))
        .ok()
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(source.tick());
    // The host is read on the first turn, then every `host_poll`.
    let mut host_read: Option<Instant> = None;
    // Something changed since the last reconcile.
    let mut dirty = false;
    // The first enforce not yet published.
    let mut unpublished_since: Option<Instant> = None;
    source.started(&cfg);
    loop {
        tokio::select! {
            // Whatever else is ready comes first; `publish` waits for a quiet turn.
            biased;
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = source.event() => dirty |= changed?,
            woken = async {
                match &notify {
                    Some(s) => s.recv(&mut notify_buf).await,
                    None => std::future::pending().await,
                }
            } => dirty |= woken.is_ok(),
            _ = async {
                match &host_changes {
                    Some(fd) => match fd.readable().await {
                        // Edge-triggered: cleared before `poll_host` drains the socket, so a
                        // notification that comes after is seen.
                        Ok(mut ready) => ready.clear_ready(),
                        Err(_) => std::future::pending().await,
                    },
                    None => std::future::pending().await,
                }
            } => host_read = None,
            _ = tick.tick() => {}
            _ = std::future::ready(()), if unpublished_since.is_some() && !dirty => {
                publish(&mut agent, source.store(), &mut unpublished_since);
                continue;
            }
        }
        health.beat();
        dirty |= source.poll();
        // Records of pods the CNI plugin added or removed, also without a wake-up.
        dirty |= agent.cni_records_changed();
        if host_read.is_none_or(|t| t.elapsed() >= cfg.host_poll) {
            host_read = Some(Instant::now());
            dirty |= agent.poll_host();
        }
        if !source.ready() {
            continue; // `dirty` stays: the first whole view is enforced
        }
        if !std::mem::take(&mut dirty) {
            continue;
        }
        match agent.enforce(source.view()) {
            Ok(()) => health.set_ready(true),
            Err(e) => {
                error!("reconcile failed: {e:#}");
                health.set_ready(false);
            }
        }
        if agent.publish_due() {
            let since = *unpublished_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= PUBLISH_AT_LATEST {
                publish(&mut agent, source.store(), &mut unpublished_since);
            }
        }
    }
    info!("stopping; pinned maps and links keep enforcing");
    Ok(())
}

/// Tells the observers and the status file of the enforced changes.
fn publish(agent: &mut Agent, store: &Store, unpublished_since: &mut Option<Instant>) {
    *unpublished_since = None;
    if let Err(e) = agent.publish(store) {
        error!("publishing the reconcile: {e:#}");
    }
    release_freed_memory();
}

/// A descriptor the agent owns, watched for readiness (not closed here).
struct BorrowedRawFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for BorrowedRawFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// Named ports that no pod declares (with that protocol): valid, as the API server accepts
/// them, but they match nothing, which is rarely what was meant. The pods are read only until
/// every name the policies use has been seen (usually a few pods, not the cluster's).
pub(crate) fn unresolved_named_ports(store: &Store) -> Vec<ConfigError> {
    use palisade_policy::model::{PortMatch, Protocol};
    use palisade_policy::state::Direction;
    use std::collections::BTreeSet;
    // (policy, direction, rule, port, name, protocol) of every named port.
    let mut named = Vec::new();
    for p in store.policies.values() {
        for dir in Direction::BOTH {
            for (i, rule) in p.rules(dir).unwrap_or_default().iter().enumerate() {
                for (k, port) in rule.ports.iter().flatten().enumerate() {
                    if let PortMatch::Named(name) = &port.port {
                        named.push((p, dir, i, k, name.as_str(), port.protocol));
                    }
                }
            }
        }
    }
    let mut unseen: BTreeSet<(&str, Protocol)> = named
        .iter()
        .map(|&(.., name, protocol)| (name, protocol))
        .collect();
    for pod in store.pods.values() {
        if unseen.is_empty() {
            break;
        }
        for n in pod.container_ports.iter() {
            unseen.remove(&(n.name.as_str(), n.protocol));
        }
    }
    named
        .into_iter()
        .filter(|&(.., name, protocol)| unseen.contains(&(name, protocol)))
        .map(|(p, dir, i, k, name, protocol)| {
            ConfigError::new(
                format!("NetworkPolicy {}/{}", p.namespace, p.name),
                format!("spec.{dir}[{i}].ports[{k}].port"),
                format!("no pod declares a {protocol} port named {name:?}: it matches nothing"),
            )
        })
        .collect()
}

/// Hands the heap a reconcile freed (parsed manifests, compiled state, diffs) back to the
/// kernel: glibc keeps it mapped otherwise, and the agent's resident set would stay at its peak.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: demo}
spec: {containers: [{name: c, ports: [{name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.244.0.3}
";

    fn policy(name: &str, ports: &str) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: {name}, namespace: demo}}\n\
             spec: {{podSelector: {{}}, ingress: [{{ports: {ports}}}]}}\n"
        )
    }

    fn unresolved(yaml: &str) -> Vec<String> {
        let store = Store::from_objects(palisade_policy::manifest::parse_str(yaml).unwrap());
        assert!(store.errors().is_empty(), "{:?}", store.errors());
        unresolved_named_ports(&store)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_named_port_no_pod_declares_with_that_protocol_is_reported() {
        let yaml = [
            PODS.to_string(),
            policy("a", "[{port: http}, {port: dns, protocol: UDP}]"),
            policy("b", "[{port: 80}, {port: dns}, {port: metrics}]"),
        ]
        .concat();
        assert_eq!(
            unresolved(&yaml),
            [
                "NetworkPolicy demo/b: spec.ingress[0].ports[1].port: no pod declares a TCP port \
                 named \"dns\": it matches nothing",
                "NetworkPolicy demo/b: spec.ingress[0].ports[2].port: no pod declares a TCP port \
                 named \"metrics\": it matches nothing",
            ]
        );
        // Every name declared: nothing to say, whichever pod declares it.
        let yaml = [
            PODS.to_string(),
            policy("a", "[{port: dns, protocol: UDP}, {port: http}]"),
        ]
        .concat();
        assert!(unresolved(&yaml).is_empty());
        // No pods: every name is unresolved.
        assert_eq!(unresolved(&policy("a", "[{port: http}]")).len(), 1);
    }
}
