# Shared settings for the test control plane scripts (sourced, not run).
# Everything here can be overridden from the environment.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cluster_src="$root/tests/cluster"
# Binaries are built once per set of pinned module versions and kept outside the checkout,
# so a fresh clone on a warm machine starts in seconds.
cache="${CRAC_CACHE:-$HOME/.cache/crac-operator}"
state="${CRAC_CLUSTER_DIR:-$root/target/cluster}"
logs="$state/logs"
pki="$state/pki"
kubeconfig="$state/kubeconfig"

etcd_port="${CRAC_ETCD_PORT:-23790}"
etcd_peer_port="${CRAC_ETCD_PEER_PORT:-23800}"
api_port="${CRAC_API_PORT:-16443}"
kcm_port="${CRAC_KCM_PORT:-16257}"
sched_port="${CRAC_SCHED_PORT:-16259}"
kwok_port="${CRAC_KWOK_PORT:-16260}"
# Pods get addresses on the loopback range, so a test can run a real process on a pod's
# address and reach it. Service ClusterIPs are only allocated, never dialled.
pod_cidr="${CRAC_POD_CIDR:-127.100.0.1/16}"
service_cidr="${CRAC_SERVICE_CIDR:-10.96.0.0/16}"
nodes="${CRAC_NODES:-3}"
# Requests per second (and burst) of the controller-manager's and scheduler's clients.
controller_qps="${CRAC_CONTROLLER_QPS:-500}"

# The binaries' directory for the current pins: a hash of the module files and the build script.
bin_dir() {
  local key
  key=$(cat "$cluster_src"/k8s/go.sum "$cluster_src"/etcd/go.sum "$cluster_src"/kwok/go.sum \
    "$cluster_src"/k8s/go.mod "$cluster_src"/etcd/go.mod "$cluster_src"/kwok/go.mod "$cluster_src"/build | sha256sum | cut -c1-16)
  echo "$cache/cluster-bin/$key"
}

# The real node (node-up, node-down): a kubelet and containerd whose pods sit on a bridge this
# machine creates. The node's address is the bridge's own; pod addresses come from its subnet.
node_dir="$state/node"
node_name="${CRAC_NODE_NAME:-crac-real-node}"
node_bridge="${CRAC_NODE_BRIDGE:-crac-br0}"
node_subnet="${CRAC_NODE_SUBNET:-10.201.0.0/24}"
node_prefix="${node_subnet#*/}"
node_ip="${CRAC_NODE_IP:-10.201.0.1}"
node_pod_range_start="${CRAC_NODE_POD_RANGE_START:-10.201.0.10}"
kubelet_port="${CRAC_KUBELET_PORT:-10250}"
kubelet_healthz_port="${CRAC_KUBELET_HEALTHZ_PORT:-10248}"
node_storage_class=crac-node-local
pause_image="crac.dev/test/pause:3.10"
# 1: `up` also starts the real node (node-up); 0: the control plane and kwok only.
real_node="${CRAC_REAL_NODE:-1}"
