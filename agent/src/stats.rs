//! `palisade stats` and the `/metrics` text (served by `admin`), from the hub: the datapath's
//! counters read at each call, the agent's own registry, what is wrong now.
use std::collections::BTreeMap;

use palisade_common::{
    AUDITED_BY_REASON, CT_FLAG_AUDIT, CT_FLAG_CLOSING, Counter as DpCounter, DROPPED_BY_REASON,
    Reason, capacity, map_names,
};
use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    api::{ConntrackStats, EventStats, MapFill, PolicyStats, Problems, RuleCount, StatsReport},
    hub::Hub,
    inspect::RuleInfo,
};

type Labels = Vec<(String, String)>;

/// Endpoints listed in `ConntrackStats::top_holders`.
const TOP_HOLDERS: usize = 5;

const COUNTER_NAMES: [(DpCounter, &str); 14] = [
    (DpCounter::CtHit, "ct_hit"),
    (DpCounter::NewAllowed, "new_allowed"),
    (DpCounter::Dropped, "dropped"),
    (DpCounter::Malformed, "malformed"),
    (DpCounter::Audited, "would_drop"),
    (DpCounter::EventsSent, "events_sent"),
    (DpCounter::EventsSuppressed, "events_suppressed"),
    (DpCounter::EventsLost, "events_lost"),
    (DpCounter::CtInsertFailed, "ct_insert_failed"),
    (DpCounter::Revalidated, "revalidated"),
    (DpCounter::DnsHeld, "dns_held"),
    (DpCounter::DnsUnheld, "dns_unheld"),
    (DpCounter::DnsCopyFailed, "dns_copy_failed"),
    (DpCounter::DnsUntrusted, "dns_untrusted"),
];

/// Reads every datapath counter and the agent's own figures.
pub fn stats_report(hub: &Hub) -> StatsReport {
    let names = hub.names.read().expect("names lock").clone();
    let mut r = StatsReport::default();
    let m = hub.datapath.maps.lock().expect("maps lock");
    let slot = |i: u32| -> u64 { m.counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    for (c, name) in COUNTER_NAMES {
        r.counters.insert(name.to_string(), slot(c as u32));
    }
    if let Some(f) = hub.fqdn.get() {
        r.fqdn = fqdn_report(f);
    }
    for reason in Reason::ALL {
        let d = slot(DROPPED_BY_REASON + reason as u32);
        if d > 0 {
            r.drops_by_reason.insert(reason.name().into(), d);
        }
        let a = slot(AUDITED_BY_REASON + reason as u32);
        if a > 0 {
            r.would_drop_by_reason.insert(reason.name().into(), a);
        }
    }

    // Per rule, grouped by policy.
    let mut by_policy: BTreeMap<String, PolicyStats> = BTreeMap::new();
    let mut rule_entries = 0u64;
    for info in names.file.rules.values().filter(|r| r.slot != 0) {
        rule_entries += 1;
        let Ok(per_cpu) = m.rule_stats.get(&u32::from(info.slot), 0) else {
            continue;
        };
        let packets: u64 = per_cpu.iter().map(|s| s.packets).sum();
        let bytes: u64 = per_cpu.iter().map(|s| s.bytes).sum();
        if packets == 0 {
            continue;
        }
        let p = by_policy
            .entry(info.policy_id())
            .or_insert_with(|| policy_stats(info));
        p.packets += packets;
        p.bytes += bytes;
        p.rules.push(RuleCount {
            id: info.id,
            rule: format!("{}[{}]", info.direction, info.index),
            name: info.tier.as_ref().and_then(|t| t.name.clone()),
            action: info.tier.as_ref().map(|t| t.action.to_string()),
            packets,
            bytes,
        });
    }
    // Policies in force with no traffic yet show up with zeros.
    for info in names.file.rules.values() {
        by_policy
            .entry(info.policy_id())
            .or_insert_with(|| policy_stats(info));
    }
    r.policies = by_policy.into_values().collect();
    for p in &mut r.policies {
        p.rules.sort_by(|a, b| a.rule.cmp(&b.rule));
    }

    let mut ct = ConntrackStats::default();
    let mut held: BTreeMap<u32, u64> = BTreeMap::new();
    for item in m.conntrack.iter() {
        let Ok((k, e)) = item else { continue };
        ct.entries += 1;
        *held.entry(k.endpoint).or_default() += 1;
        if e.flags & CT_FLAG_AUDIT != 0 {
            ct.audited += 1;
        }
        if e.flags & CT_FLAG_CLOSING != 0 {
            ct.closing += 1;
        }
    }
    let mut held: Vec<(u32, u64)> = held.into_iter().collect();
    held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ct.top_holders = held
        .into_iter()
        .take(TOP_HOLDERS)
        .map(|(id, n)| (endpoint_name(&names, id), n))
        .collect();
    let fragments = m.fragments.keys().filter(|k| k.is_ok()).count() as u64;
    let mut suppressed_by_endpoint = BTreeMap::new();
    let mut ep_states = 0u64;
    for item in m.ep_state.iter() {
        let Ok((id, st)) = item else { continue };
        ep_states += 1;
        if st.suppressed > 0 {
            let name = endpoint_name(&names, id);
            suppressed_by_endpoint.insert(name, st.suppressed);
        }
    }
    drop(m);

    let rec = hub.last_reconcile.lock().expect("lock").clone();
    let fill = |map: &str, entries: u64, cap: u32| MapFill {
        map: map.to_string(),
        entries,
        capacity: u64::from(cap),
        fill: entries as f64 / f64::from(cap.max(1)),
    };
    let (eps, ids, cidrs, policy) = rec
        .as_ref()
        .map(|r| {
            (
                r.endpoints as u64,
                r.identities as u64,
                r.cidr_entries as u64,
                r.policy_entries as u64,
            )
        })
        .unwrap_or_default();
    r.maps = vec![
        fill(map_names::ENDPOINTS, eps, capacity::ENDPOINTS),
        fill(map_names::IDENTITIES, ids, capacity::IDENTITIES),
        fill(map_names::CIDRS, cidrs, capacity::CIDRS),
        fill(map_names::POLICY, policy, capacity::POLICY),
        fill(map_names::CONNTRACK, ct.entries, capacity::CONNTRACK),
        fill(map_names::FRAGMENTS, fragments, capacity::FRAGMENTS),
        fill(map_names::EP_STATE, ep_states, capacity::ENDPOINTS),
        fill(map_names::RULE_STATS, rule_entries, capacity::RULE_STATS),
    ];
    r.conntrack = ct;
    let history = hub.history.lock().expect("history lock");
    r.events = EventStats {
        sent: r.counters["events_sent"],
        suppressed: r.counters["events_suppressed"],
        lost: r.counters["events_lost"],
        recorded: history.total(),
        history: history.len(),
        history_capacity: history.capacity(),
        undecodable: hub.undecodable.load(std::sync::atomic::Ordering::Relaxed),
        suppressed_by_endpoint,
    };
    r.reconcile = rec;
    r.problems = hub.problems.lock().expect("problems lock").clone();
    r
}

/// A policy's row, without counts yet: its kind, and a ClusterNetworkPolicy's tier and
/// priority.
fn policy_stats(info: &RuleInfo) -> PolicyStats {
    PolicyStats {
        policy: info.policy_id(),
        kind: match info.tier {
            Some(_) => "ClusterNetworkPolicy",
            None => "NetworkPolicy",
        }
        .to_string(),
        tier: info.tier.as_ref().map(|t| t.tier.to_string()),
        priority: info.tier.as_ref().map(|t| t.priority),
        audit: info.audit,
        ..PolicyStats::default()
    }
}

/// `namespace/name` of an endpoint id, or `endpoint N` for one that is gone.
fn endpoint_name(names: &crate::verdicts::Names, id: u32) -> String {
    names
        .file
        .endpoints
        .get(&id)
        .map(|m| m.pod.to_string())
        .unwrap_or_else(|| format!("endpoint {id}"))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The scrape: the agent's registry, then the datapath's figures, OpenMetrics text.
/// One series per configuration error, labelled with its object and field (alert on
/// `palisade_config_errors > 0`, read the message in `palisade stats`), and the failures that
/// leave an endpoint failing closed.
/// Per-rule packets and bytes. A ClusterNetworkPolicy is cluster-scoped: its series have an
/// empty `namespace` and, beyond a NetworkPolicy's labels, `kind="ClusterNetworkPolicy"` and
/// its `tier` (a NetworkPolicy's series keep their labels; in PromQL a missing label is "").
fn render_rules(reg: &mut Registry, policies: &[PolicyStats]) {
    let pkts = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for p in policies {
        let (ns, name) = p.policy.split_once('/').unwrap_or(("", p.policy.as_str()));
        for rule in &p.rules {
            let mut l = labels(&[("namespace", ns), ("policy", name), ("rule", &rule.rule)]);
            if let Some(tier) = &p.tier {
                l.extend(labels(&[("kind", &p.kind), ("tier", tier)]));
            }
            pkts.get_or_create(&l).inc_by(rule.packets);
            bytes.get_or_create(&l).inc_by(rule.bytes);
        }
    }
    reg.register(
        "palisade_rule_packets",
        "Packets let through per policy rule (first packets of the flows it allowed and every later packet of them)",
        pkts,
    );
    reg.register(
        "palisade_rule_bytes",
        "Bytes let through per policy rule",
        bytes,
    );
}

fn render_problems(reg: &mut Registry, p: &Problems) {
    let config = Family::<Labels, Gauge>::default();
    for e in &p.config_errors {
        config
            .get_or_create(&labels(&[("object", &e.object), ("field", &e.field)]))
            .inc();
    }
    reg.register(
        "palisade_config_error",
        "Configuration errors now, by object and field (the object's last good version stays in force)",
        config,
    );
    let total: Gauge = Gauge::default();
    total.set(p.config_errors.len() as i64);
    reg.register(
        "palisade_config_errors",
        "Configuration errors now (bad manifests and objects, failing watches)",
        total,
    );
    let pending: Gauge = Gauge::default();
    pending.set(p.pending_endpoints.len() as i64);
    reg.register(
        "palisade_pending_endpoints",
        "Endpoints failing closed because their policy could not be written (a full map)",
        pending,
    );
    let failures: Counter = Counter::default();
    failures.inc_by(p.map_write_failures_total);
    reg.register(
        "palisade_map_write_failures",
        "Map writes that failed since the agent started (each failed its endpoint closed)",
        failures,
    );
}

/// The FQDN learner's counters, read now.
fn fqdn_report(f: &crate::fqdn::FqdnStats) -> crate::api::FqdnReport {
    use std::sync::atomic::{AtomicU64, Ordering};
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let hold = f.hold_percentiles();
    crate::api::FqdnReport {
        answers: g(&f.answers),
        released: g(&f.released),
        release_failures: g(&f.release_failures),
        unparsed: g(&f.unparsed),
        learned: g(&f.learned),
        evicted: g(&f.evicted),
        expired: g(&f.expired),
        write_failures: g(&f.write_failures),
        addresses: g(&f.addresses),
        hold_p50_us: hold.map(|p| p.0),
        hold_p99_us: hold.map(|p| p.1),
    }
}

/// The FQDN learner's series.
fn render_fqdn(reg: &mut Registry, f: &crate::api::FqdnReport) {
    let counters = [
        (
            "palisade_fqdn_answers",
            "DNS answers read from DNS_ANSWERS",
            f.answers,
        ),
        (
            "palisade_fqdn_released",
            "Held DNS answers sent on to their pods",
            f.released,
        ),
        (
            "palisade_fqdn_release_failures",
            "Held DNS answers that could not be sent on (the client retries)",
            f.release_failures,
        ),
        (
            "palisade_fqdn_unparsed",
            "DNS answers that taught nothing: not A/AAAA answers, malformed",
            f.unparsed,
        ),
        (
            "palisade_fqdn_learned",
            "Addresses learned (written to FQDN_IPS)",
            f.learned,
        ),
        (
            "palisade_fqdn_evicted",
            "Learned addresses dropped for the per-name and per-endpoint bounds",
            f.evicted,
        ),
        (
            "palisade_fqdn_expired",
            "Learned addresses forgotten after their TTL (and their last flow)",
            f.expired,
        ),
        (
            "palisade_fqdn_write_failures",
            "FQDN_IPS writes that failed (the address stays closed)",
            f.write_failures,
        ),
    ];
    for (name, help, v) in counters {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    }
    let g = Gauge::<i64>::default();
    g.set(f.addresses as i64);
    reg.register(
        "palisade_fqdn_addresses",
        "Learned addresses in FQDN_IPS",
        g,
    );
}

pub fn render(hub: &Hub, report: &StatsReport) -> String {
    let mut reg = Registry::default();
    let dp = Family::<Labels, Counter>::default();
    for (name, v) in &report.counters {
        dp.get_or_create(&labels(&[("counter", name)])).inc_by(*v);
    }
    reg.register(
        "palisade_datapath_packets",
        "Datapath counters: conntrack hits, new allowed flows, drops, would-drops, malformed packets, events, revalidations",
        dp,
    );
    let drops = Family::<Labels, Counter>::default();
    for (reason, v) in &report.drops_by_reason {
        drops
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*v);
    }
    reg.register("palisade_drops", "Dropped packets by reason", drops);
    render_fqdn(&mut reg, &report.fqdn);
    let would = Family::<Labels, Counter>::default();
    for (reason, v) in &report.would_drop_by_reason {
        would
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*v);
    }
    reg.register(
        "palisade_would_drops",
        "Packets denied by audit policies only and let through, by reason",
        would,
    );
    render_rules(&mut reg, &report.policies);
    let entries = Family::<Labels, Gauge>::default();
    let caps = Family::<Labels, Gauge>::default();
    let ratio = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for m in &report.maps {
        let l = labels(&[("map", &m.map)]);
        entries.get_or_create(&l).set(m.entries as i64);
        caps.get_or_create(&l).set(m.capacity as i64);
        ratio.get_or_create(&l).set(m.fill);
    }
    reg.register("palisade_map_entries", "Entries in each BPF map", entries);
    reg.register("palisade_map_capacity", "Capacity of each BPF map", caps);
    reg.register(
        "palisade_map_fill_ratio",
        "Map pressure: entries / capacity",
        ratio,
    );
    let ev = |v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        c
    };
    reg.register(
        "palisade_events_suppressed",
        "Verdict events refused by the per-endpoint rate limit",
        ev(report.events.suppressed),
    );
    reg.register(
        "palisade_events_lost",
        "Verdict events lost because the ring buffer was full",
        ev(report.events.lost),
    );
    reg.register(
        "palisade_events_sent",
        "Verdict events written to the ring buffer",
        ev(report.events.sent),
    );
    let ct: Gauge = Gauge::default();
    ct.set(report.conntrack.entries as i64);
    reg.register("palisade_conntrack_entries", "Conntrack entries", ct);
    render_problems(&mut reg, &report.problems);

    let mut out = String::new();
    let _ = encode_registry(&mut out, &hub.metrics.registry);
    let _ = encode_registry(&mut out, &reg);
    let _ = encode_eof(&mut out);
    out
}

/// What `GET /metrics` answers: the datapath's counters read now, rendered with the agent's
/// registry (OpenMetrics text). Reads every counter map: call it off the main loop.
pub fn scrape(hub: &Hub) -> String {
    render(hub, &stats_report(hub))
}

/// The per-rule series of one rule with these counts (tests elsewhere in the crate).
#[cfg(test)]
pub(crate) fn rule_series_for_tests(info: &RuleInfo, packets: u64, bytes: u64) -> String {
    let mut p = policy_stats(info);
    p.rules.push(RuleCount {
        id: info.id,
        rule: format!("{}[{}]", info.direction, info.index),
        packets,
        bytes,
        ..RuleCount::default()
    });
    let mut reg = Registry::default();
    render_rules(&mut reg, &[p]);
    let mut out = String::new();
    encode_registry(&mut out, &reg).unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::model::ConfigError;

    #[test]
    fn configuration_errors_are_series_naming_object_and_field() {
        let problems = Problems {
            config_errors: vec![
                ConfigError::new(
                    "NetworkPolicy demo/c-ingress",
                    "spec.ingress[0].from[0].ipBlock.cidr",
                    "invalid CIDR",
                ),
                ConfigError::new("file bad.yaml", "", "invalid YAML"),
            ],
            errors: vec![],
            pending_endpoints: vec!["demo/b (ifindex 7)".into()],
            map_write_failures_total: 3,
        };
        let mut reg = Registry::default();
        render_problems(&mut reg, &problems);
        let mut out = String::new();
        encode_registry(&mut out, &reg).unwrap();
        for line in [
            r#"palisade_config_error{object="NetworkPolicy demo/c-ingress",field="spec.ingress[0].from[0].ipBlock.cidr"} 1"#,
            r#"palisade_config_error{object="file bad.yaml",field=""} 1"#,
            "palisade_config_errors 2",
            "palisade_pending_endpoints 1",
            "palisade_map_write_failures_total 3",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        // All clear: the totals say so, and no stale series.
        let mut reg = Registry::default();
        render_problems(&mut reg, &Problems::default());
        let mut out = String::new();
        encode_registry(&mut out, &reg).unwrap();
        assert!(
            out.lines().any(|l| l == "palisade_config_errors 0"),
            "{out}"
        );
        assert!(!out.contains("palisade_config_error{"), "{out}");
    }
}
