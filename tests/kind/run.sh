#!/usr/bin/env bash
# Palisade in a real (kind) cluster, checked by the upstream NetworkPolicy e2e suite.
#
#   tests/kind/run.sh            # create the cluster, install Palisade, run the suite, delete
#
# Needs docker, kind, kubectl, curl, tar and cargo (`cargo xtask image` builds the image).
# Knobs (environment):
#   CLUSTER_NAME  kind cluster name                      (palisade-e2e)
#   NODE_IMAGE    kindest/node image                     (kind's default)
#   E2E_FOCUS     ginkgo focus                           ('\[Feature:NetworkPolicy\]')
#   E2E_SKIP      ginkgo skip                            ('\[Feature:SCTPConnectivity\]|\[Disruptive\]|\[Serial\]')
#   E2E_NODES     parallel ginkgo processes              (4)
#   REPORT_DIR    junit reports and logs                 (target/kind-e2e)
#   KEEP_CLUSTER  1: leave the cluster running at the end
#   SKIP_BUILD    1: use an existing palisade:e2e image
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER_NAME=${CLUSTER_NAME:-palisade-e2e}
E2E_FOCUS=${E2E_FOCUS:-'\[Feature:NetworkPolicy\]'}
E2E_SKIP=${E2E_SKIP:-'\[Feature:SCTPConnectivity\]|\[Disruptive\]|\[Serial\]'}
E2E_NODES=${E2E_NODES:-4}
REPORT_DIR=${REPORT_DIR:-target/kind-e2e}
mkdir -p "$REPORT_DIR"
REPORT_DIR=$(cd "$REPORT_DIR" && pwd)
KUBECONFIG_FILE="$REPORT_DIR/kubeconfig"

for tool in docker kind kubectl curl tar; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is required" >&2; exit 1; }
done

log() { printf '\n== %s\n' "$*"; }

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ] || [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    log "collecting logs into $REPORT_DIR"
    kubectl --kubeconfig "$KUBECONFIG_FILE" -n palisade-system logs -l app.kubernetes.io/name=palisade \
      --all-containers --prefix --tail=-1 >"$REPORT_DIR/palisade.log" 2>&1 || true
    for n in $(kind get nodes --name "$CLUSTER_NAME" 2>/dev/null); do
      docker exec "$n" sh -c 'cat /run/palisade/status.json; echo; cat /run/palisade/cni/plugin.log' \
        >"$REPORT_DIR/$n-palisade.txt" 2>&1 || true
    done
  fi
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER_NAME" >/dev/null 2>&1 || true
  fi
  exit $rc
}
trap cleanup EXIT

log "creating kind cluster $CLUSTER_NAME"
kind delete cluster --name "$CLUSTER_NAME" >/dev/null 2>&1 || true
kind create cluster --name "$CLUSTER_NAME" --config tests/kind/kind-config.yaml \
  ${NODE_IMAGE:+--image "$NODE_IMAGE"} --kubeconfig "$KUBECONFIG_FILE" --wait 0s
export KUBECONFIG="$KUBECONFIG_FILE"

log "CNI: ptp + host-local on every node, routes between nodes"
# Pod CIDRs are assigned by the controller manager shortly after the nodes register.
for _ in $(seq 60); do
  missing=$(kubectl get nodes -o jsonpath='{range .items[?(@.spec.podCIDR=="")]}{.metadata.name}{"\n"}{end}')
  [ -z "$missing" ] && break
  sleep 2
done
nodes=$(kind get nodes --name "$CLUSTER_NAME")
for n in $nodes; do
  cidr=$(kubectl get node "$n" -o jsonpath='{.spec.podCIDR}')
  docker exec -i "$n" sh -c 'cat >/etc/cni/net.d/10-ptp.conflist' <<CONF
{
  "cniVersion": "0.4.0",
  "name": "ptp",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "mtu": 1500,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CONF
  # The agent pins under /sys/fs/bpf and needs a bpffs there (it has no SYS_ADMIN to mount).
  docker exec "$n" sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf'
  # Pods keep their addresses between nodes (policy needs them); leaving the pod network,
  # they are masqueraded.
  docker exec "$n" iptables -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE
  for m in $nodes; do
    [ "$m" = "$n" ] && continue
    mcidr=$(kubectl get node "$m" -o jsonpath='{.spec.podCIDR}')
    mip=$(kubectl get node "$m" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
    docker exec "$n" ip route replace "$mcidr" via "$mip"
  done
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building the palisade:e2e image"
  # The image of ./Dockerfile (what the DaemonSet runs), tagged for tests/kind/'s manifests.
  cargo xtask image --tag palisade:e2e
fi
kind load docker-image palisade:e2e --name "$CLUSTER_NAME"

log "installing Palisade"
kubectl apply -k tests/kind
kubectl -n palisade-system rollout status daemonset/palisade --timeout=10m
kubectl wait --for=condition=Ready nodes --all --timeout=5m
for n in $nodes; do
  docker exec "$n" grep -q palisade-cni /etc/cni/net.d/10-ptp.conflist \
    || { echo "palisade-cni is not chained on $n" >&2; exit 1; }
done
kubectl -n kube-system rollout status deployment/coredns --timeout=5m

log "fetching the e2e suite for the cluster's version"
version=$(kubectl version -o json | sed -n 's/.*"gitVersion": *"\(v[^"]*\)".*/\1/p' | tail -1)
arch=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
e2e_dir="$REPORT_DIR/kubernetes-test-$version"
if [ ! -x "$e2e_dir/kubernetes/test/bin/e2e.test" ]; then
  mkdir -p "$e2e_dir"
  curl -fsSL "https://dl.k8s.io/release/$version/kubernetes-test-linux-$arch.tar.gz" \
    | tar -xz -C "$e2e_dir" kubernetes/test/bin/e2e.test kubernetes/test/bin/ginkgo
fi

log "running the NetworkPolicy e2e suite (focus $E2E_FOCUS)"
"$e2e_dir/kubernetes/test/bin/ginkgo" --nodes="$E2E_NODES" --timeout=3h \
  --focus="$E2E_FOCUS" --skip="$E2E_SKIP" \
  --junit-report=junit.xml --output-dir="$REPORT_DIR" \
  "$e2e_dir/kubernetes/test/bin/e2e.test" -- \
  --kubeconfig="$KUBECONFIG" --provider=local --report-dir="$REPORT_DIR" \
  --dump-logs-on-failure=false

log "passed; reports in $REPORT_DIR"
