//! Pure routing state: which app a local port belongs to (and which ports two apps claim),
//! which pods of an app are ready (in the order they became ready), round-robin over them, and
//! whether the activator still serves an app at all. No I/O, no clock (instants are passed
//! in): the watches in [`crate::kube`] feed these from Kubernetes objects and the tests feed
//! them directly.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crac_api::CracApp;
use crac_api::cracapp::ServingMode;
use k8s_openapi::api::core::v1::Pod;

/// Names a CracApp: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppKey {
    pub namespace: String,
    pub name: String,
}

impl AppKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One app port: connections arriving on `activator_port` go to `podIP:target_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub activator_port: u16,
    pub target_port: u16,
}

/// What the activator needs to know about one CracApp.
#[derive(Clone, Debug, PartialEq)]
pub struct AppConfig {
    pub key: AppKey,
    pub ports: Vec<PortMapping>,
    /// How long a held request waits for a ready pod.
    pub wake_timeout: Duration,
    /// Where the operator currently points the Service: the activator serves the app while it
    /// is `Activator`, and for a grace period after it turns `Pods` (see [`Serving`]).
    pub serving_mode: Option<ServingMode>,
    /// `spec.scaleToZero.callerNamespaces`: namespaces besides the app's own whose pods may
    /// call it through the activator.
    pub caller_namespaces: Vec<String>,
    /// How to ask a woken pod, before it is Ready, whether its app answers ([`crate::early`]).
    pub probe: Option<crate::early::AppProbe>,
    /// The app's UID when it sleeps in place (its `status.sleepMode`): its pods' control
    /// token is derived from it, and the activator wakes sleeping pods itself.
    pub in_place_uid: Option<String>,
}

/// Default wake deadline when `spec.scaleToZero.wakeTimeout` is unset (the CRD's documented
/// default).
pub use crac_api::cracapp::DEFAULT_WAKE_TIMEOUT;

/// Reads the activator's view of a CracApp. `None` when it has no namespace or name (never the
/// case for objects from the API server). A malformed `wakeTimeout` (the schema forbids it)
/// falls back to `default_wake_timeout` rather than making the app unreachable.
pub fn app_config(app: &CracApp, default_wake_timeout: Duration) -> Option<AppConfig> {
    let namespace = app.metadata.namespace.clone()?;
    let name = app.metadata.name.clone()?;
    let scale_to_zero = app.spec.scale_to_zero.as_ref();
    let wake_timeout = scale_to_zero
        .and_then(|s| s.wake_timeout.as_deref())
        .and_then(crac_api::duration::parse)
        .filter(|d| !d.is_zero())
        .unwrap_or(default_wake_timeout);
    let status = app.status.as_ref();
    let ports: Vec<PortMapping> = status
        .map(|s| {
            s.activator_ports
                .iter()
                .filter_map(|p| {
                    let activator_port =
                        u16::try_from(p.activator_port).ok().filter(|p| *p != 0)?;
                    let target_port = u16::try_from(p.target_port).ok().filter(|p| *p != 0)?;
                    Some(PortMapping {
                        activator_port,
                        target_port,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(AppConfig {
        key: AppKey::new(namespace, name),
        wake_timeout,
        serving_mode: status.and_then(|s| s.serving_mode),
        // The operator's resolution of the app's list and its policy's. A tenant who writes its
        // own app's status can only widen who reaches its own app.
        caller_namespaces: status
            .map(|s| s.caller_namespaces.clone())
            .unwrap_or_default(),
        probe: crate::early::app_probe(app, ports.first().map(|p| p.target_port)),
        in_place_uid: status
            .and_then(|s| s.sleep_mode)
            .filter(|m| *m == crac_api::cracapp::SleepMode::InPlace)
            .and(app.metadata.uid.clone()),
        ports,
    })
}

/// Where a connection that arrived on a local port goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRoute {
    pub app: AppKey,
    pub target_port: u16,
}

/// The local-port table: the port each app owns alone, and the ports two or more apps claim.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortTable {
    pub routes: BTreeMap<u16, PortRoute>,
    /// Ports claimed by more than one app, with every claimant. The operator assigns unique
    /// ports, so this is a bug, a race between two operators, or a status someone forged (a
    /// tenant may write its own CracApp's status) to take another app's wake traffic. Such a
    /// port is served to none of them: choosing one, by any rule, would let a forger win.
    pub contested: BTreeMap<u16, BTreeSet<AppKey>>,
}

/// Builds the local-port table from every known app.
pub fn port_table<'a>(apps: impl IntoIterator<Item = &'a AppConfig>) -> PortTable {
    let mut claims: BTreeMap<u16, Vec<PortRoute>> = BTreeMap::new();
    for app in apps {
        for port in &app.ports {
            let claimants = claims.entry(port.activator_port).or_default();
            // The same app listing a port twice: keep its first mapping.
            if !claimants.iter().any(|c| c.app == app.key) {
                claimants.push(PortRoute {
                    app: app.key.clone(),
                    target_port: port.target_port,
                });
            }
        }
    }
    let mut table = PortTable::default();
    for (port, mut claimants) in claims {
        if claimants.len() == 1 {
            table.routes.insert(port, claimants.remove(0));
        } else {
            table
                .contested
                .insert(port, claimants.into_iter().map(|c| c.app).collect());
        }
    }
    table
}

/// Whether the activator serves an app, as it saw the app's `status.servingMode` change.
///
/// While the mode is `Activator` (asleep or waking) the Service points at the activator and it
/// serves. When the mode turns `Pods` the Service points at the pods again, but endpoints take
/// a while to reach every node and requests held during the wake are still in flight, so the
/// activator serves for a grace period more, timed on its own clock from when it saw the
/// switch. After that a request reaching it came by a stale path, and is told to reconnect.
/// An app first seen in `Pods` mode (or with none set yet) gets no grace: no switch was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serving {
    Activator,
    /// Switched to `Pods` at this instant.
    PodsSince(Instant),
    /// `Pods` (or unset), with no switch seen.
    Pods,
}

impl Serving {
    /// The state of an app seen for the first time.
    pub fn first_seen(mode: Option<ServingMode>) -> Self {
        match mode {
            Some(ServingMode::Activator) => Serving::Activator,
            _ => Serving::Pods,
        }
    }

    /// The app's mode was seen (again) at `now`.
    pub fn observe(self, mode: Option<ServingMode>, now: Instant) -> Self {
        match (self, mode) {
            (_, Some(ServingMode::Activator)) => Serving::Activator,
            (Serving::Activator, _) => Serving::PodsSince(now),
            (unchanged, _) => unchanged,
        }
    }

    /// Whether a request arriving at `now` is served.
    pub fn serves(self, now: Instant, grace: Duration) -> bool {
        match self {
            Serving::Activator => true,
            Serving::PodsSince(since) => now.saturating_duration_since(since) < grace,
            Serving::Pods => false,
        }
    }
}

/// What one pod contributes: the app it belongs to (from the `crac.dev/app` label) and its IP
/// when it is ready to take traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub app: AppKey,
    pub pod: String,
    pub ready_ip: Option<IpAddr>,
    /// The pod runs and has an address but is not Ready yet (see [`starting_ip`]).
    pub starting_ip: Option<IpAddr>,
    /// The operator marked it asleep in place ([`crac_api::labels::ASLEEP_IN_PLACE_SINCE`]).
    pub asleep: bool,
}

/// Reads a pod. `None` when it has no `crac.dev/app` label (or no name or namespace).
pub fn pod_entry(pod: &Pod) -> Option<PodEntry> {
    let namespace = pod.metadata.namespace.clone()?;
    let pod_name = pod.metadata.name.clone()?;
    let app = pod
        .metadata
        .labels
        .as_ref()?
        .get(crac_api::labels::APP)?
        .clone();
    Some(PodEntry {
        app: AppKey::new(namespace, app),
        pod: pod_name,
        ready_ip: ready_ip(pod),
        starting_ip: starting_ip(pod),
        asleep: pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(crac_api::labels::ASLEEP_IN_PLACE_SINCE)),
    })
}

/// The pod's IP if it should receive traffic (the rule shared with the operator).
pub fn ready_ip(pod: &Pod) -> Option<IpAddr> {
    crac_api::serving::serving_address(pod)?.parse().ok()
}

/// The pod's IP while its containers run and it is not Ready yet, nor being deleted: a woken
/// pod the activator may probe itself ([`crate::early`]).
pub fn starting_ip(pod: &Pod) -> Option<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() || ready_ip(pod).is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// Pods that run but are not Ready yet, per app (no order: any of them may answer first), and
/// whether each sleeps in place.
#[derive(Debug, Default)]
pub struct StartingPods {
    pods: HashMap<AppKey, BTreeMap<String, (IpAddr, bool)>>,
}

impl StartingPods {
    pub fn ips(&self, app: &AppKey) -> Vec<IpAddr> {
        self.pods
            .get(app)
            .map(|p| p.values().map(|(ip, _)| *ip).collect())
            .unwrap_or_default()
    }

    /// Those the operator marked asleep in place.
    pub fn asleep_ips(&self, app: &AppKey) -> Vec<IpAddr> {
        self.pods
            .get(app)
            .map(|p| {
                p.values()
                    .filter(|(_, asleep)| *asleep)
                    .map(|(ip, _)| *ip)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A pod was added, changed or (with `starting_ip: None`) deleted. Returns the app whose
    /// starting pods changed, if any.
    pub fn apply(&mut self, entry: &PodEntry) -> Option<AppKey> {
        let pods = self.pods.entry(entry.app.clone()).or_default();
        let changed = match entry.starting_ip {
            Some(ip) => {
                let value = (ip, entry.asleep);
                pods.insert(entry.pod.clone(), value) != Some(value)
            }
            None => pods.remove(&entry.pod).is_some(),
        };
        if pods.is_empty() {
            self.pods.remove(&entry.app);
        }
        changed.then(|| entry.app.clone())
    }

    /// A relist's pods replace everything. Returns every app whose starting pods changed.
    pub fn replace(&mut self, entries: &[PodEntry]) -> Vec<AppKey> {
        let mut next: HashMap<AppKey, BTreeMap<String, (IpAddr, bool)>> = HashMap::new();
        for e in entries {
            if let Some(ip) = e.starting_ip {
                next.entry(e.app.clone())
                    .or_default()
                    .insert(e.pod.clone(), (ip, e.asleep));
            }
        }
        let mut changed: BTreeSet<AppKey> = BTreeSet::new();
        for app in self.pods.keys().chain(next.keys()) {
            if self.pods.get(app) != next.get(app) {
                changed.insert(app.clone());
            }
        }
        self.pods = next;
        changed.into_iter().collect()
    }
}

/// Ready pods per app, each app's list in the order its pods became ready, so "the first ready
/// pod" is stable while later pods come and go.
#[derive(Debug, Default)]
pub struct PodIndex {
    /// app -> [(pod name, ip)] in readiness order.
    ready: HashMap<AppKey, Vec<(String, IpAddr)>>,
    /// Pods seen since a relist started; applied at its end.
    relist: Option<Vec<PodEntry>>,
}

impl PodIndex {
    /// The ready IPs of an app, first-ready first.
    pub fn ready_ips(&self, app: &AppKey) -> Vec<IpAddr> {
        self.ready
            .get(app)
            .map(|pods| pods.iter().map(|(_, ip)| *ip).collect())
            .unwrap_or_default()
    }

    /// A pod was added or changed. Returns the app whose ready set changed, if any.
    pub fn apply(&mut self, entry: PodEntry) -> Option<AppKey> {
        let pods = self.ready.entry(entry.app.clone()).or_default();
        let position = pods.iter().position(|(name, _)| *name == entry.pod);
        let changed = match (position, entry.ready_ip) {
            (Some(i), Some(ip)) if pods[i].1 == ip => false,
            (Some(i), Some(ip)) => {
                pods[i].1 = ip;
                true
            }
            (Some(i), None) => {
                pods.remove(i);
                true
            }
            (None, Some(ip)) => {
                pods.push((entry.pod, ip));
                true
            }
            (None, None) => false,
        };
        if pods.is_empty() {
            self.ready.remove(&entry.app);
        }
        changed.then_some(entry.app)
    }

    /// A pod was deleted. Returns the app whose ready set changed, if any.
    pub fn delete(&mut self, entry: &PodEntry) -> Option<AppKey> {
        self.apply(PodEntry {
            ready_ip: None,
            starting_ip: None,
            ..entry.clone()
        })
    }

    /// A relist (watch restart) begins: pods seen until [`Self::finish_relist`] replace the
    /// current state.
    pub fn start_relist(&mut self) {
        self.relist = Some(Vec::new());
    }

    pub fn relist_pod(&mut self, entry: PodEntry) {
        self.relist.get_or_insert_with(Vec::new).push(entry);
    }

    /// Ends a relist. Pods still ready keep their place; new ones go last. Returns every app
    /// whose ready set changed.
    pub fn finish_relist(&mut self) -> Vec<AppKey> {
        let listed = self.relist.take().unwrap_or_default();
        let mut fresh: HashMap<AppKey, HashMap<String, IpAddr>> = HashMap::new();
        for entry in listed {
            if let Some(ip) = entry.ready_ip {
                fresh.entry(entry.app).or_default().insert(entry.pod, ip);
            }
        }
        let mut changed: HashSet<AppKey> = HashSet::new();
        let mut next: HashMap<AppKey, Vec<(String, IpAddr)>> = HashMap::new();
        for (app, old) in &self.ready {
            let new_pods = fresh.get(app);
            let mut kept: Vec<(String, IpAddr)> = old
                .iter()
                .filter_map(|(name, _)| {
                    new_pods
                        .and_then(|p| p.get(name))
                        .map(|ip| (name.clone(), *ip))
                })
                .collect();
            let mut added: Vec<(String, IpAddr)> = new_pods
                .map(|p| {
                    p.iter()
                        .filter(|(name, _)| !old.iter().any(|(n, _)| n == *name))
                        .map(|(n, ip)| (n.clone(), *ip))
                        .collect()
                })
                .unwrap_or_default();
            added.sort();
            kept.extend(added);
            if kept != *old {
                changed.insert(app.clone());
            }
            if !kept.is_empty() {
                next.insert(app.clone(), kept);
            }
        }
        for (app, pods) in fresh {
            if self.ready.contains_key(&app) {
                continue;
            }
            let mut list: Vec<(String, IpAddr)> = pods.into_iter().collect();
            list.sort();
            changed.insert(app.clone());
            next.insert(app, list);
        }
        self.ready = next;
        let mut changed: Vec<AppKey> = changed.into_iter().collect();
        changed.sort();
        changed
    }
}

/// Round-robin over an app's ready backends.
#[derive(Debug, Default)]
pub struct RoundRobin(AtomicUsize);

impl RoundRobin {
    pub fn pick<T: Copy>(&self, backends: &[T]) -> Option<T> {
        if backends.is_empty() {
            return None;
        }
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        Some(backends[n % backends.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crac_api::cracapp::{ActivatorPort, CracAppStatus, ScaleToZeroSpec};
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn app(ns: &str, name: &str, ports: &[(i32, i32)], wake: Option<&str>) -> CracApp {
        let spec: crac_api::CracAppSpec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "command": ["java"]}]}}
        }))
        .expect("spec");
        let mut app = CracApp::new(name, spec);
        app.metadata.namespace = Some(ns.into());
        app.spec.scale_to_zero = wake.map(|w| ScaleToZeroSpec {
            wake_timeout: Some(w.into()),
            ..Default::default()
        });
        app.status = Some(CracAppStatus {
            serving_mode: Some(ServingMode::Activator),
            activator_ports: ports
                .iter()
                .map(|(a, t)| ActivatorPort {
                    name: None,
                    target_port: *t,
                    activator_port: *a,
                })
                .collect(),
            ..Default::default()
        });
        app
    }

    fn pod(
        ns: &str,
        name: &str,
        app: Option<&str>,
        ready: bool,
        ip: Option<&str>,
        deleting: bool,
    ) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some(ns.into());
        pod.metadata.name = Some(name.into());
        if let Some(app) = app {
            pod.metadata.labels =
                Some([(crac_api::labels::APP.to_string(), app.to_string())].into());
        }
        if deleting {
            pod.metadata.deletion_timestamp = Some(Time(Default::default()));
        }
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ip.map(String::from),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        pod
    }

    fn entry(app: &str, pod: &str, ip_: Option<&str>) -> PodEntry {
        PodEntry {
            app: AppKey::new("ns", app),
            pod: pod.into(),
            ready_ip: ip_.map(ip),
            starting_ip: None,
            asleep: false,
        }
    }

    #[test]
    fn a_pod_is_starting_while_it_runs_unready_and_is_not_being_deleted() {
        let running =
            |ready, deleting| pod("ns", "p", Some("a"), ready, Some("10.0.0.7"), deleting);
        assert_eq!(starting_ip(&running(false, false)), Some(ip("10.0.0.7")));
        assert_eq!(starting_ip(&running(true, false)), None, "ready");
        assert_eq!(starting_ip(&running(false, true)), None, "deleting");
        let mut pending = running(false, false);
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(starting_ip(&pending), None);
        let e = pod_entry(&running(false, false)).unwrap();
        assert_eq!((e.ready_ip, e.starting_ip), (None, Some(ip("10.0.0.7"))));
    }

    #[test]
    fn starting_pods_follow_applies_deletes_and_relists() {
        let mut s = StartingPods::default();
        let a = AppKey::new("ns", "a");
        let starting = |pod: &str, ip_: Option<&str>| PodEntry {
            starting_ip: ip_.map(ip),
            ..entry("a", pod, None)
        };
        assert_eq!(s.apply(&starting("p1", Some("10.0.0.1"))), Some(a.clone()));
        assert_eq!(
            s.apply(&starting("p1", Some("10.0.0.1"))),
            None,
            "no change"
        );
        assert_eq!(s.apply(&starting("p2", Some("10.0.0.2"))), Some(a.clone()));
        assert_eq!(s.ips(&a), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(s.apply(&starting("p1", None)), Some(a.clone()));
        assert_eq!(s.ips(&a), vec![ip("10.0.0.2")]);
        assert_eq!(
            s.replace(&[starting("p3", Some("10.0.0.3"))]),
            vec![a.clone()]
        );
        assert_eq!(s.ips(&a), vec![ip("10.0.0.3")]);
        assert!(s.asleep_ips(&a).is_empty());
        // Marked asleep in place by the operator: a change, and listed as such.
        let asleep = PodEntry {
            asleep: true,
            ..starting("p3", Some("10.0.0.3"))
        };
        assert_eq!(s.apply(&asleep), Some(a.clone()));
        assert_eq!(s.asleep_ips(&a), vec![ip("10.0.0.3")]);
        assert_eq!(s.replace(&[]), vec![a.clone()]);
        assert!(s.ips(&a).is_empty());
        assert_eq!(s.apply(&starting("p4", None)), None, "an unknown pod gone");
    }

    #[test]
    fn app_config_reads_ports_and_wake_timeout() {
        let cfg = app_config(
            &app(
                "shop",
                "demo",
                &[(30001, 8080), (30002, 9090)],
                Some("1m30s"),
            ),
            DEFAULT_WAKE_TIMEOUT,
        )
        .expect("config");
        assert_eq!(cfg.key, AppKey::new("shop", "demo"));
        assert_eq!(
            cfg.ports,
            vec![
                PortMapping {
                    activator_port: 30001,
                    target_port: 8080
                },
                PortMapping {
                    activator_port: 30002,
                    target_port: 9090
                },
            ]
        );
        assert_eq!(cfg.wake_timeout, Duration::from_secs(90));
        assert_eq!(cfg.serving_mode, Some(ServingMode::Activator));
    }

    #[test]
    fn app_config_defaults_and_skips_invalid_ports() {
        let cfg = app_config(
            &app(
                "shop",
                "demo",
                &[(0, 8080), (70000, 80), (30001, 8080)],
                None,
            ),
            Duration::from_secs(7),
        )
        .expect("config");
        assert_eq!(
            cfg.ports,
            vec![PortMapping {
                activator_port: 30001,
                target_port: 8080
            }]
        );
        assert_eq!(cfg.wake_timeout, Duration::from_secs(7));
        let bad = app_config(
            &app("shop", "demo", &[], Some("soon")),
            Duration::from_secs(7),
        )
        .expect("config");
        assert_eq!(bad.wake_timeout, Duration::from_secs(7));
    }

    #[test]
    fn a_port_two_apps_claim_is_served_to_neither_whatever_the_order() {
        let a = app_config(
            &app("ns", "b-app", &[(1000, 80), (1001, 81)], None),
            DEFAULT_WAKE_TIMEOUT,
        )
        .expect("a");
        // Another namespace forges a claim on b-app's second port.
        let b = app_config(
            &app("evil", "a-app", &[(1001, 90), (1002, 91)], None),
            DEFAULT_WAKE_TIMEOUT,
        )
        .expect("b");
        for order in [vec![&a, &b], vec![&b, &a]] {
            let table = port_table(order);
            assert_eq!(
                table.routes[&1000],
                PortRoute {
                    app: AppKey::new("ns", "b-app"),
                    target_port: 80
                }
            );
            assert_eq!(
                table.routes[&1002],
                PortRoute {
                    app: AppKey::new("evil", "a-app"),
                    target_port: 91
                }
            );
            assert!(!table.routes.contains_key(&1001), "no winner");
            assert_eq!(
                table.contested,
                BTreeMap::from([(
                    1001,
                    BTreeSet::from([AppKey::new("ns", "b-app"), AppKey::new("evil", "a-app")])
                )])
            );
        }
    }

    #[test]
    fn three_claimants_and_an_app_listing_a_port_twice() {
        let twice = AppConfig {
            ports: vec![
                PortMapping {
                    activator_port: 1000,
                    target_port: 80,
                },
                PortMapping {
                    activator_port: 1000,
                    target_port: 81,
                },
            ],
            ..app_config(&app("ns", "a", &[], None), DEFAULT_WAKE_TIMEOUT).expect("a")
        };
        let table = port_table([&twice]);
        assert_eq!(table.routes[&1000].target_port, 80, "its first mapping");
        assert!(table.contested.is_empty(), "one app is no conflict");

        let others: Vec<AppConfig> = ["b", "c"]
            .iter()
            .map(|n| app_config(&app("ns", n, &[(1000, 80)], None), DEFAULT_WAKE_TIMEOUT))
            .collect::<Option<_>>()
            .expect("others");
        let table = port_table(others.iter().chain([&twice]));
        assert!(table.routes.is_empty());
        assert_eq!(table.contested[&1000].len(), 3);
        // The conflict ends when the forged claims go.
        assert_eq!(port_table([&twice]).routes.len(), 1);
    }

    #[test]
    fn serving_while_activator_and_for_the_grace_after_a_seen_switch() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);

        let asleep = Serving::first_seen(Some(ServingMode::Activator));
        assert!(asleep.serves(at(1000), grace), "asleep: always");
        let woke = asleep.observe(Some(ServingMode::Pods), at(10));
        assert_eq!(woke, Serving::PodsSince(at(10)));
        assert!(woke.serves(at(10), grace));
        assert!(woke.serves(at(39), grace));
        assert!(!woke.serves(at(40), grace), "grace over");
        // Seeing Pods again does not restart the grace.
        assert_eq!(woke.observe(Some(ServingMode::Pods), at(35)), woke);
        // Back to sleep: served again, and a later wake starts a new grace.
        let slept = woke.observe(Some(ServingMode::Activator), at(100));
        assert_eq!(slept, Serving::Activator);
        assert_eq!(
            slept.observe(None, at(200)),
            Serving::PodsSince(at(200)),
            "an unset mode is not the activator's"
        );

        for mode in [Some(ServingMode::Pods), None] {
            let awake = Serving::first_seen(mode);
            assert_eq!(awake, Serving::Pods);
            assert!(!awake.serves(t0, grace), "no switch seen, no grace");
            assert_eq!(awake.observe(mode, at(5)), Serving::Pods);
        }
    }

    #[test]
    fn app_config_reads_caller_namespaces_from_the_status() {
        let mut a = app("shop", "demo", &[(30001, 8080)], None);
        assert!(
            app_config(&a, DEFAULT_WAKE_TIMEOUT)
                .expect("config")
                .caller_namespaces
                .is_empty()
        );
        a.status
            .get_or_insert_with(Default::default)
            .caller_namespaces = vec!["frontend".into()];
        assert_eq!(
            app_config(&a, DEFAULT_WAKE_TIMEOUT)
                .expect("config")
                .caller_namespaces,
            vec!["frontend".to_string()]
        );
    }

    #[test]
    fn an_ended_pod_with_a_stale_ready_condition_gets_no_traffic() {
        let mut ended = pod("ns", "p", Some("a"), true, Some("10.0.0.1"), false);
        ended.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(ready_ip(&ended), None);
    }

    #[test]
    fn pod_readiness_needs_ready_condition_ip_and_no_deletion() {
        assert_eq!(
            ready_ip(&pod("ns", "p", Some("a"), true, Some("10.0.0.1"), false)),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(
            ready_ip(&pod("ns", "p", Some("a"), false, Some("10.0.0.1"), false)),
            None
        );
        assert_eq!(
            ready_ip(&pod("ns", "p", Some("a"), true, None, false)),
            None
        );
        assert_eq!(
            ready_ip(&pod("ns", "p", Some("a"), true, Some("10.0.0.1"), true)),
            None
        );
        assert_eq!(
            pod_entry(&pod("ns", "p", None, true, Some("10.0.0.1"), false)),
            None
        );
        let e =
            pod_entry(&pod("ns", "p", Some("a"), true, Some("10.0.0.1"), false)).expect("entry");
        assert_eq!(e.app, AppKey::new("ns", "a"));
    }

    #[test]
    fn pod_index_keeps_readiness_order() {
        let mut idx = PodIndex::default();
        let a = AppKey::new("ns", "a");
        assert_eq!(
            idx.apply(entry("a", "p2", Some("10.0.0.2"))),
            Some(a.clone())
        );
        assert_eq!(
            idx.apply(entry("a", "p1", Some("10.0.0.1"))),
            Some(a.clone())
        );
        assert_eq!(
            idx.apply(entry("a", "p1", Some("10.0.0.1"))),
            None,
            "no change, no event"
        );
        assert_eq!(idx.ready_ips(&a), vec![ip("10.0.0.2"), ip("10.0.0.1")]);
        assert_eq!(idx.apply(entry("a", "p2", None)), Some(a.clone()));
        assert_eq!(idx.ready_ips(&a), vec![ip("10.0.0.1")]);
        assert_eq!(idx.delete(&entry("a", "p1", None)), Some(a.clone()));
        assert!(idx.ready_ips(&a).is_empty());
        assert_eq!(
            idx.apply(entry("a", "p3", None)),
            None,
            "an unready pod changes nothing"
        );
    }

    #[test]
    fn pod_index_relist_keeps_order_and_reports_changes() {
        let mut idx = PodIndex::default();
        idx.apply(entry("a", "p1", Some("10.0.0.1")));
        idx.apply(entry("a", "p2", Some("10.0.0.2")));
        idx.apply(entry("gone", "g1", Some("10.0.1.1")));
        idx.start_relist();
        idx.relist_pod(entry("a", "p3", Some("10.0.0.3")));
        idx.relist_pod(entry("a", "p2", Some("10.0.0.2")));
        idx.relist_pod(entry("a", "p1", Some("10.0.0.1")));
        idx.relist_pod(entry("new", "n1", Some("10.0.2.1")));
        let changed = idx.finish_relist();
        assert_eq!(
            changed,
            vec![
                AppKey::new("ns", "a"),
                AppKey::new("ns", "gone"),
                AppKey::new("ns", "new")
            ]
        );
        assert_eq!(
            idx.ready_ips(&AppKey::new("ns", "a")),
            vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]
        );
        assert!(idx.ready_ips(&AppKey::new("ns", "gone")).is_empty());
        idx.start_relist();
        idx.relist_pod(entry("a", "p1", Some("10.0.0.1")));
        idx.relist_pod(entry("a", "p2", Some("10.0.0.2")));
        idx.relist_pod(entry("a", "p3", Some("10.0.0.3")));
        idx.relist_pod(entry("new", "n1", Some("10.0.2.1")));
        assert!(
            idx.finish_relist().is_empty(),
            "an identical relist changes nothing"
        );
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let rr = RoundRobin::default();
        let backends = [1, 2, 3];
        let mut counts = [0; 4];
        for _ in 0..300 {
            counts[rr.pick(&backends).expect("pick")] += 1;
        }
        assert_eq!(&counts[1..], &[100, 100, 100]);
        assert_eq!(rr.pick::<u8>(&[]), None);
    }
}
