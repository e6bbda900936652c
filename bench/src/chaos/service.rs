//! The driver as kube-proxy: where a connection to the app's Service goes, from the app's
//! EndpointSlice as the operator writes it.
//!
//! - The slice's port is the app's activator port: its endpoints are the stand-in activator
//!   pods (ready ones only: the operator lists those), and a connection goes to the activator
//!   process each stand-in pod stands for.
//! - The slice's port is the app port: its endpoints are the app's ready pods. The operator
//!   writes them, but the API server refuses loopback addresses in a slice (the pods here have
//!   loopback ones), so the addresses come from the driver's own pod watch ([`Pods::ready`]),
//!   which is what the slice would list.
//!
//! No endpoint at all: the connection is refused, as kube-proxy's reject rule does.

use super::pods::Pods;
use crac_tests::operator::{ACTIVATOR_LABEL, ACTIVATOR_NAMESPACE};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Api, Client, ResourceExt};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

#[derive(Clone, Debug, Default, PartialEq)]
enum Slice {
    /// No slice (yet), or one without ports.
    #[default]
    None,
    /// The activator's port, and the stand-in pods' addresses the slice lists.
    Activator(u16, Vec<IpAddr>),
    /// The app's pods.
    Pods,
}

#[derive(Default)]
struct State {
    slice: Slice,
    /// Stand-in pod address → the activator process's address.
    stand_ins: HashMap<IpAddr, IpAddr>,
    /// Stand-in pod name → the activator process's address (set by the driver).
    processes: HashMap<String, IpAddr>,
    /// Stand-in pod name → its address (from the watch).
    pod_ips: HashMap<String, IpAddr>,
}

#[derive(Clone)]
pub struct Service {
    state: Arc<Mutex<State>>,
    pods: Pods,
    next: Arc<AtomicU64>,
}

/// Where one connection goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Route {
    Activator(SocketAddr),
    Pod(SocketAddr),
}

impl Route {
    pub fn addr(self) -> SocketAddr {
        match self {
            Route::Activator(a) | Route::Pod(a) => a,
        }
    }
}

impl Service {
    pub fn new(pods: Pods) -> Service {
        Service {
            state: Arc::default(),
            pods,
            next: Arc::default(),
        }
    }

    /// The stand-in pod `pod` stands for the activator process on `process`.
    pub fn map(&self, pod: &str, process: IpAddr) {
        let mut s = self.state.lock().expect("service lock");
        s.processes.insert(pod.to_string(), process);
        if let Some(ip) = s.pod_ips.get(pod).copied() {
            s.stand_ins.insert(ip, process);
        }
    }

    /// A backend for a new connection (round-robin, as kube-proxy's ipvs mode would), or
    /// `None` when the Service has no endpoint.
    pub fn route(&self) -> Option<Route> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let s = self.state.lock().expect("service lock");
        match &s.slice {
            Slice::None => None,
            Slice::Activator(port, ips) => {
                let targets: Vec<IpAddr> = ips
                    .iter()
                    .filter_map(|ip| s.stand_ins.get(ip))
                    .copied()
                    .collect();
                let ip = *targets.get(n % targets.len().max(1))?;
                Some(Route::Activator(SocketAddr::new(ip, *port)))
            }
            Slice::Pods => {
                let ready = self.pods.ready();
                let ip = *ready.get(n % ready.len().max(1))?;
                Some(Route::Pod(SocketAddr::new(
                    IpAddr::V4(ip),
                    self.pods.port(),
                )))
            }
        }
    }

    /// Follows the app's EndpointSlices and the stand-in activator pods of namespace `ns`.
    pub fn follow(&self, client: &Client, ns: &str, app: &str) -> Vec<JoinHandle<()>> {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={app}"));
        let (state, app_port) = (self.state.clone(), self.pods.port());
        let slices = tokio::spawn(async move {
            let mut stream = Box::pin(watch(slices, config).default_backoff().applied_objects());
            while let Ok(Some(slice)) = stream.try_next().await {
                let port = slice
                    .ports
                    .iter()
                    .flatten()
                    .find_map(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok());
                let ips = slice
                    .endpoints
                    .iter()
                    .flatten()
                    .flat_map(|e| e.addresses.iter())
                    .filter_map(|a| a.parse().ok())
                    .collect();
                let seen = match port {
                    None => Slice::None,
                    Some(p) if p == app_port => Slice::Pods,
                    Some(p) => Slice::Activator(p, ips),
                };
                state.lock().expect("service lock").slice = seen;
            }
        });
        let stand_ins: Api<Pod> = Api::namespaced(client.clone(), ACTIVATOR_NAMESPACE);
        let config = watcher::Config::default().labels(&format!("{ACTIVATOR_LABEL}={ns}"));
        let state = self.state.clone();
        let pods = tokio::spawn(async move {
            let mut stream = Box::pin(watch(stand_ins, config).default_backoff());
            while let Ok(Some(event)) = stream.try_next().await {
                let (Event::Apply(pod) | Event::InitApply(pod)) = event else {
                    continue;
                };
                let ip = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok());
                let Some(ip) = ip else { continue };
                let mut s = state.lock().expect("service lock");
                s.pod_ips.insert(pod.name_any(), ip);
                if let Some(process) = s.processes.get(&pod.name_any()).copied() {
                    s.stand_ins.insert(ip, process);
                }
            }
        });
        vec![slices, pods]
    }
}
