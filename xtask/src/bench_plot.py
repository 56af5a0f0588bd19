"""Draws the benchmark report's figures: plot.py REPORT_JSON OUT_PNG (run by `cargo xtask bench`).

Writes OUT_PNG (every section) and, beside it, per_packet.png (the per-packet BPF test-run
figures against the number of rules, one line per path)."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

report = json.load(open(sys.argv[1]))
out = sys.argv[2]

VARIANTS = ["baseline", "palisade", "ipset", "iptables", "nftables"]
COLORS = {
    "baseline": "#777777",
    "palisade": "#1f77b4",
    "ipset": "#ff7f0e",
    "iptables": "#d62728",
    "nftables": "#2ca02c",
}


def fig(path):
    node = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def med(path):
    f = fig(path)
    return f["median"] if isinstance(f, dict) and "median" in f else None


def minimum(path):
    f = fig(path)
    return f["min"] if isinstance(f, dict) and "min" in f else None


fig_, axes = plt.subplots(2, 3, figsize=(17, 9.5))
machine = report.get("machine", {})
fig_.suptitle(
    "Palisade benchmarks ({} run, {} CPUs, Linux {}, {})".format(
        report.get("mode", "?"), machine.get("cpus", "?"), machine.get("kernel", "?"), machine.get("date", "?")
    ),
    fontsize=13,
)

# 1. Per-packet cost against the number of rules.
ax = axes[0][0]
scales = [1, 100, 10000, 100000]
styles = {"ct_hit": ("o", "established"), "new_allow": ("s", "new allowed"), "new_deny": ("^", "new denied")}
for kind, (marker, label) in styles.items():
    for fam, ls in (("ipv4", "-"), ("ipv6", "--")):
        ys = [med("ns_per_packet.{}.{}.{}".format(kind, fam, n)) for n in scales]
        pts = [(n, y) for n, y in zip(scales, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker=marker, label="{} {}".format(label, fam))
ax.axhline(60, color="green", lw=0.8, ls=":")
ax.axhline(250, color="purple", lw=0.8, ls=":")
ax.text(1, 62, "goal: established ≤ 60 ns", color="green", fontsize=8)
ax.text(1, 252, "goal: new flow ≤ 250 ns", color="purple", fontsize=8)
ax.set_xscale("log")
ax.set_ylim(bottom=0)
ax.set_xlabel("ipBlock rules per family on the endpoint")
ax.set_ylabel("ns per packet (BPF test run, median)")
ax.set_title("Per-packet cost of the programs")
ax.legend(fontsize=7)

# 2-4. Throughput figures per variant and number of rules.
rules = report.get("config", {}).get("throughput_rules", [10, 1000, 10000])


def bars(ax, metric, title, ylabel, scale=1.0):
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        xs, ys, errs = [], [], []
        for j, n in enumerate(rules):
            m = med("throughput.{}.{}.{}".format(metric, v, n))
            lo = minimum("throughput.{}.{}.{}".format(metric, v, n))
            if m is None:
                continue
            xs.append(j + (i - (len(VARIANTS) - 1) / 2) * width)
            ys.append(m * scale)
            errs.append(max(0.0, (m - lo) * scale) if lo is not None else 0.0)
        ax.bar(xs, ys, width, color=COLORS[v], label=v, yerr=[errs, [0] * len(errs)], capsize=2)
    ax.set_xticks(range(len(rules)))
    ax.set_xticklabels(["{} rules".format(n) for n in rules])
    ax.set_title(title)
    ax.set_ylabel(ylabel)


bars(axes[0][1], "tcp_gbps", "TCP throughput (iperf3, 1 stream)", "Gbit/s (median; bar to min)")
axes[0][1].legend(fontsize=8)
bars(axes[0][2], "udp_pps", "UDP, 64-byte payloads, received", "thousand datagrams/s", 1e-3)
bars(axes[1][0], "crr_us", "New connection + request/response (CRR)", "µs per transaction (lower is better)")

# 5. Churn: distribution of change-to-maps-right times.
ax = axes[1][1]
samples = sorted((fig("churn_detail") or {}).get("samples_ms", []))
if samples:
    ys = [(i + 1) / len(samples) for i in range(len(samples))]
    ax.plot(samples, ys, color="#1f77b4")
    ax.axvline(50, color="green", lw=0.8, ls=":")
    ax.text(51, 0.05, "goal: p99 ≤ 50 ms", color="green", fontsize=8)
    p99 = med("churn_ms.p99")
    if p99 is not None:
        ax.axvline(p99, color="red", lw=0.8)
        ax.text(p99, 0.5, " p99 {:.0f} ms".format(p99), color="red", fontsize=8)
ax.set_xlabel("policy or pod change → maps right (ms)")
ax.set_ylabel("fraction of changes")
ax.set_title("Churn: 1 000 policies, 10 000 pods, 100 local")

# 6. Memory.
ax = axes[1][2]
maps = (fig("memory_detail") or {}).get("bpf_maps_mib", {})
labels, values, colors = [], [], []
rss = med("agent_rss_mib")
if rss is not None:
    labels.append("agent RSS")
    values.append(rss)
    colors.append("#1f77b4")
for name, mib in sorted(maps.items(), key=lambda kv: -kv[1]):
    if mib >= 0.5:
        labels.append("map " + name)
        values.append(mib)
        colors.append("#999999")
ax.barh(labels[::-1], values[::-1], color=colors[::-1])
ax.axvline(64, color="green", lw=0.8, ls=":")
ax.text(64.5, 0, "goal: RSS ≤ 64 MiB", color="green", fontsize=8)
ax.set_xlabel("MiB")
ax.set_title("Memory (BPF maps: kernel accounting)")

fig_.tight_layout(rect=[0, 0, 1, 0.96])
fig_.savefig(out, dpi=110)
print("plot: wrote " + out)

# per_packet.png: ns per packet (BPF test run) against the number of rules, one line per path.
paths = [
    ("ns_per_packet.ct_hit", "o", "established"),
    ("ns_per_packet_detail.ct_reply", "D", "established, reply"),
    ("ns_per_packet.new_allow", "s", "new allowed"),
    ("ns_per_packet.new_deny", "^", "new denied"),
]
fig2, ax = plt.subplots(figsize=(9, 6))
drawn = 0
for base, marker, label in paths:
    for fam, ls in (("ipv4", "-"), ("ipv6", "--")):
        per_scale = fig("{}.{}".format(base, fam)) or {}
        pts = sorted(
            (int(n), f["median"])
            for n, f in per_scale.items()
            if n.isdigit() and isinstance(f, dict) and f.get("median") is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker=marker, label="{} {}".format(label, fam))
            drawn += 1
floor = med("ns_per_packet_detail.empty_program")
if floor is not None:
    ax.axhline(floor, color="#777777", lw=0.8, ls=":")
    ax.text(1, floor + 2, "empty program (test-run floor) {:.0f} ns".format(floor), color="#777777", fontsize=8)
ax.set_xscale("log")
ax.set_ylim(bottom=0)
ax.set_xlabel("ipBlock rules per family on the endpoint (log)")
ax.set_ylabel("ns per packet (BPF test run, median)")
ax.set_title(
    "Per-packet cost by path ({} run, Linux {}, {})".format(
        report.get("mode", "?"), machine.get("kernel", "?"), machine.get("date", "?")
    )
)
if drawn:
    ax.legend(fontsize=8)
else:
    ax.text(0.5, 0.5, "no per-packet figures in this report", transform=ax.transAxes, ha="center")
fig2.tight_layout()
out2 = os.path.join(os.path.dirname(out), "per_packet.png")
fig2.savefig(out2, dpi=110)
print("plot: wrote " + out2)
