//! Who may call an app through the activator. Pure: the trusted CIDRs, the index of pod IPs to
//! namespaces (fed by the cluster-wide pod watch in [`crate::kube`], or by a test), and the
//! decision itself. No I/O, no clock.
//!
//! The activator listens on ports any pod can reach, so without a check a pod in namespace B
//! would reach namespace A's sleeping app through it, past A's NetworkPolicies. A request is
//! forwarded only when its source IP is in a trusted CIDR, or belongs to a pod in the app's
//! namespace or in its `spec.scaleToZero.callerNamespaces`. An IP the index does not know, or
//! that pods of two namespaces claim at once, is refused (fail closed).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// An address range such as `10.0.0.0/8`, `127.0.0.1/32` or `fd00::/8`. A bare address is a
/// single-address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a
    /// dual-stack socket reports for an IPv4 caller) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address range such as 10.0.0.0/8"))?;
        let network = network.to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Parses a comma-separated list of ranges (`--trusted-callers`); empty means none.
pub fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Cidr::from_str)
        .collect()
}

/// Whether `ip` is in any of `ranges`.
pub fn trusted(ranges: &[Cidr], ip: IpAddr) -> bool {
    ranges.iter().any(|r| r.contains(ip))
}

/// Why a caller was refused (the `reason` label of `crac_activator_requests_refused_total`
/// for the 403s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source IP is no pod the activator knows (or pods of two namespaces claim it), and
    /// not in a trusted range.
    UnknownCaller,
    /// The caller is a pod in a namespace the app does not list.
    NamespaceNotAllowed,
}

/// The decision for a caller that is not in a trusted range: its pod's namespace (if the index
/// knows it) against the app's namespace and `callerNamespaces`.
pub fn check_caller(
    caller_namespace: Option<&str>,
    app_namespace: &str,
    caller_namespaces: &[String],
) -> Result<(), Refusal> {
    let Some(caller) = caller_namespace else {
        return Err(Refusal::UnknownCaller);
    };
    if caller == app_namespace || caller_namespaces.iter().any(|n| n == caller) {
        Ok(())
    } else {
        Err(Refusal::NamespaceNotAllowed)
    }
}

/// What the index keeps of one pod: who it is and the IPs that identify it as a caller. `ips`
/// is empty when it has none (not yet assigned, finished, or on the host network).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddresses {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PodName {
    namespace: Arc<str>,
    name: Box<str>,
}

/// The pods that claim one IP: one, except for the moment between a pod's end and the watch
/// saying so, when its IP may already be another's.
#[derive(Debug)]
enum Claim {
    One(Arc<PodName>),
    Many(Vec<Arc<PodName>>),
}

impl Claim {
    fn pods(&self) -> &[Arc<PodName>] {
        match self {
            Claim::One(p) => std::slice::from_ref(p),
            Claim::Many(ps) => ps,
        }
    }
}

/// Pod IP to namespace, for every pod in the cluster that has its own IP. Keeps only names and
/// addresses (namespaces shared between their pods), never the pod objects. Handles IP reuse:
/// a pod's removal drops only its own claim, and an IP that pods of two namespaces claim at
/// once resolves to nobody until one of them goes.
#[derive(Debug, Default)]
pub struct CallerIndex {
    ips: HashMap<IpAddr, Claim>,
    pods: HashMap<Arc<PodName>, Vec<IpAddr>>,
    namespaces: HashSet<Arc<str>>,
}

impl CallerIndex {
    /// The namespace of the pod whose IP this is; `None` when unknown or claimed by pods of
    /// two namespaces.
    pub fn namespace_of(&self, ip: IpAddr) -> Option<&Arc<str>> {
        let pods = self.ips.get(&ip.to_canonical())?.pods();
        let first = &pods.first()?.namespace;
        pods.iter().all(|p| p.namespace == *first).then_some(first)
    }

    /// IPs known.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// A pod was added or changed: its IPs are now `pod.ips` (none: it is forgotten).
    pub fn apply(&mut self, pod: PodAddresses) {
        let namespace = self.intern(&pod.namespace);
        let key = Arc::new(PodName {
            namespace,
            name: pod.name.into(),
        });
        let mut ips: Vec<IpAddr> = pod.ips.iter().map(|ip| ip.to_canonical()).collect();
        ips.sort();
        ips.dedup();
        let old = self.pods.remove(&key).unwrap_or_default();
        for ip in old.iter().filter(|ip| !ips.contains(ip)) {
            self.unclaim(*ip, &key);
        }
        if ips.is_empty() {
            return;
        }
        for ip in ips.iter().filter(|ip| !old.contains(ip)) {
            self.claim(*ip, &key);
        }
        // Reuse the Arc the claims hold, so both maps share one name.
        let key = self
            .ips
            .get(&ips[0])
            .and_then(|c| c.pods().iter().find(|p| **p == key).cloned())
            .unwrap_or(key);
        self.pods.insert(key, ips);
    }

    /// A pod was deleted.
    pub fn delete(&mut self, namespace: &str, name: &str) {
        self.apply(PodAddresses {
            namespace: namespace.into(),
            name: name.into(),
            ips: Vec::new(),
        });
    }

    fn intern(&mut self, namespace: &str) -> Arc<str> {
        if let Some(ns) = self.namespaces.get(namespace) {
            return Arc::clone(ns);
        }
        let ns: Arc<str> = namespace.into();
        self.namespaces.insert(Arc::clone(&ns));
        ns
    }

    fn claim(&mut self, ip: IpAddr, pod: &Arc<PodName>) {
        match self.ips.get_mut(&ip) {
            None => {
                self.ips.insert(ip, Claim::One(Arc::clone(pod)));
            }
            Some(claim) => {
                let mut pods = claim.pods().to_vec();
                if !pods.contains(pod) {
                    pods.push(Arc::clone(pod));
                }
                *claim = Claim::Many(pods);
            }
        }
    }

    fn unclaim(&mut self, ip: IpAddr, pod: &PodName) {
        let Some(claim) = self.ips.get_mut(&ip) else {
            return;
        };
        let mut rest: Vec<Arc<PodName>> = claim
            .pods()
            .iter()
            .filter(|p| ***p != *pod)
            .cloned()
            .collect();
        match rest.len() {
            0 => {
                self.ips.remove(&ip);
            }
            1 => *claim = Claim::One(rest.remove(0)),
            _ => *claim = Claim::Many(rest),
        }
    }
}

/// The few fields of a pod the caller index needs, read straight from the API server's JSON:
/// the cluster-wide watch sees every pod in the cluster, and a whole `Pod` (spec, managed
/// fields…) would cost far more to decode and hold while it is handled.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "WirePod")]
pub struct CallerPod {
    /// Name, namespace and resourceVersion only (the watch needs the last).
    pub metadata: ObjectMeta,
    pub host_network: bool,
    pub phase: Option<String>,
    pub pod_ips: Vec<String>,
}

impl k8s_openapi::Resource for CallerPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for CallerPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Deserialize)]
struct WirePod {
    #[serde(default)]
    metadata: WireMeta,
    #[serde(default)]
    spec: Option<WireSpec>,
    #[serde(default)]
    status: Option<WireStatus>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSpec {
    host_network: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<WirePodIp>>,
}

#[derive(Deserialize)]
struct WirePodIp {
    ip: Option<String>,
}

impl From<WirePod> for CallerPod {
    fn from(wire: WirePod) -> Self {
        let (phase, pod_ips) = match wire.status {
            Some(status) => {
                let mut ips: Vec<String> = status
                    .pod_ips
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| p.ip)
                    .collect();
                if let Some(ip) = status.pod_ip
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
                (status.phase, ips)
            }
            None => (None, Vec::new()),
        };
        Self {
            metadata: ObjectMeta {
                name: wire.metadata.name,
                namespace: wire.metadata.namespace,
                resource_version: wire.metadata.resource_version,
                ..ObjectMeta::default()
            },
            host_network: wire.spec.and_then(|s| s.host_network).unwrap_or(false),
            phase,
            pod_ips,
        }
    }
}

/// What a pod contributes to the index. `None` without a name or namespace (never the case
/// for objects from the API server). A pod on the host network has no IP of its own (its IP is
/// its node's, shared with every host-network pod and the kubelet there), and a finished pod
/// has given its IP back; neither identifies a caller.
pub fn pod_addresses(pod: &CallerPod) -> Option<PodAddresses> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let finished = matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed"));
    let ips = if pod.host_network || finished {
        Vec::new()
    } else {
        pod.pod_ips
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect()
    };
    Some(PodAddresses {
        namespace,
        name,
        ips,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn pod(ns: &str, name: &str, ips: &[&str]) -> PodAddresses {
        PodAddresses {
            namespace: ns.into(),
            name: name.into(),
            ips: ips.iter().map(|s| ip(s)).collect(),
        }
    }

    fn ns_of(index: &CallerIndex, addr: &str) -> Option<String> {
        index.namespace_of(ip(addr)).map(|n| n.to_string())
    }

    #[test]
    fn cidrs_parse_and_match() {
        let ranges = parse_cidrs(" 10.0.0.0/8, 127.0.0.1 ,fd00::/8,").expect("parse");
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges[1].to_string(), "127.0.0.1/32");
        assert!(trusted(&ranges, ip("10.200.3.4")));
        assert!(trusted(&ranges, ip("127.0.0.1")));
        assert!(!trusted(&ranges, ip("127.0.0.2")));
        assert!(trusted(&ranges, ip("fd12::1")));
        assert!(!trusted(&ranges, ip("fe80::1")));
        assert!(
            trusted(&ranges, ip("::ffff:10.1.2.3")),
            "an IPv4 caller on a dual-stack socket"
        );
        assert!(parse_cidrs("").expect("empty").is_empty());
        assert!(trusted(
            &parse_cidrs("0.0.0.0/0").expect("all"),
            ip("8.8.8.8")
        ));
        assert!(!trusted(&parse_cidrs("0.0.0.0/0").expect("all"), ip("::1")));
        for bad in ["10.0.0.0/33", "10.0.0/8", "fd00::/129", "x", "10.0.0.0/"] {
            assert!(parse_cidrs(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn own_namespace_and_listed_namespaces_may_call_others_may_not() {
        let listed = vec!["frontend".to_string()];
        assert_eq!(check_caller(Some("shop"), "shop", &[]), Ok(()));
        assert_eq!(check_caller(Some("frontend"), "shop", &listed), Ok(()));
        assert_eq!(
            check_caller(Some("evil"), "shop", &listed),
            Err(Refusal::NamespaceNotAllowed)
        );
        assert_eq!(
            check_caller(None, "shop", &listed),
            Err(Refusal::UnknownCaller)
        );
    }

    #[test]
    fn index_follows_pods_and_their_deletion() {
        let mut index = CallerIndex::default();
        index.apply(pod("a", "p1", &["10.0.0.1", "fd00::1"]));
        index.apply(pod("b", "p2", &["10.0.0.2"]));
        assert_eq!(ns_of(&index, "10.0.0.1").as_deref(), Some("a"));
        assert_eq!(ns_of(&index, "fd00::1").as_deref(), Some("a"));
        assert_eq!(ns_of(&index, "::ffff:10.0.0.2").as_deref(), Some("b"));
        assert_eq!(ns_of(&index, "10.0.0.3"), None);
        assert_eq!(index.len(), 3);
        // A new sandbox, a new IP: the old one is forgotten.
        index.apply(pod("a", "p1", &["10.0.0.9"]));
        assert_eq!(ns_of(&index, "10.0.0.1"), None);
        assert_eq!(ns_of(&index, "10.0.0.9").as_deref(), Some("a"));
        index.delete("a", "p1");
        index.delete("b", "p2");
        index.delete("b", "never-seen");
        assert!(index.is_empty());
        assert!(index.pods.is_empty());
    }

    #[test]
    fn a_reused_ip_belongs_to_its_new_pod_once_the_old_one_goes() {
        let mut index = CallerIndex::default();
        index.apply(pod("a", "old", &["10.0.0.1"]));
        // The new pod's IP is seen before the old pod's end (watch order across pods is not
        // promised to match the node's): nobody owns it meanwhile.
        index.apply(pod("b", "new", &["10.0.0.1"]));
        assert_eq!(ns_of(&index, "10.0.0.1"), None, "ambiguous: fail closed");
        index.delete("a", "old");
        assert_eq!(ns_of(&index, "10.0.0.1").as_deref(), Some("b"));
        // Deleting a pod that once had the IP does not take it from its new owner.
        index.apply(pod("a", "old", &[]));
        assert_eq!(ns_of(&index, "10.0.0.1").as_deref(), Some("b"));
        // Two pods of one namespace claiming one IP still name that namespace.
        index.apply(pod("b", "twin", &["10.0.0.1"]));
        assert_eq!(ns_of(&index, "10.0.0.1").as_deref(), Some("b"));
        index.delete("b", "new");
        index.delete("b", "twin");
        assert!(index.is_empty());
    }

    #[test]
    fn namespaces_are_shared_between_their_pods() {
        let mut index = CallerIndex::default();
        index.apply(pod("a", "p1", &["10.0.0.1"]));
        index.apply(pod("a", "p2", &["10.0.0.2"]));
        let one = index.namespace_of(ip("10.0.0.1")).expect("p1");
        let two = index.namespace_of(ip("10.0.0.2")).expect("p2");
        assert!(Arc::ptr_eq(one, two));
    }

    #[test]
    fn caller_pod_reads_only_what_it_needs_and_skips_host_network_and_finished_pods() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "42",
                         "labels": {"x": "y"}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.5",
                       "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
        });
        let pod: CallerPod = serde_json::from_value(json.clone()).expect("pod");
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        assert!(pod.metadata.labels.is_none(), "nothing else is kept");
        assert_eq!(
            pod_addresses(&pod),
            Some(PodAddresses {
                namespace: "shop".into(),
                name: "web-1".into(),
                ips: vec![ip("10.1.0.5"), ip("fd00::5")],
            })
        );
        let mut host = json.clone();
        host["spec"]["hostNetwork"] = true.into();
        let host: CallerPod = serde_json::from_value(host).expect("host pod");
        assert!(pod_addresses(&host).expect("entry").ips.is_empty());
        let mut done = json.clone();
        done["status"]["phase"] = "Succeeded".into();
        let done: CallerPod = serde_json::from_value(done).expect("done pod");
        assert!(pod_addresses(&done).expect("entry").ips.is_empty());
        let pending: CallerPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n"}, "status": {"phase": "Pending"}
        }))
        .expect("pending pod");
        assert!(pod_addresses(&pending).expect("entry").ips.is_empty());
    }
}
