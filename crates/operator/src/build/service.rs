//! The user-facing Service and its EndpointSlice. The Service has no selector: the operator
//! owns the slice, which lists the app's ready pods (serve mode) or the activator (while the
//! app sleeps). Callers keep one stable name and ClusterIP either way.

use super::{app_name, labels_for, owner_ref};
use crate::validate::ValidatedApp;
use crac_api::CracApp;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

/// Marks the slice as ours, so the EndpointSlice controller leaves it alone.
pub const SLICE_MANAGER: &str = "crac-operator.crac.dev";

/// One port of the app: its name and the container port it listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppPort {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: String,
}

/// The ports of the app container that the Service exposes.
pub fn app_ports(validated: &ValidatedApp) -> Vec<AppPort> {
    validated
        .container
        .ports
        .iter()
        .flatten()
        .map(|p| AppPort {
            name: p.name.clone(),
            port: p.container_port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        })
        .collect()
}

/// `None` when the container declares no port: there is nothing to serve.
pub fn service_for(app: &CracApp, ports: &[AppPort]) -> Option<Service> {
    if ports.is_empty() {
        return None;
    }
    let name = app_name(app);
    Some(Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: app.metadata.namespace.clone(),
            labels: Some(labels_for(name, "service")),
            owner_references: Some(vec![owner_ref(app)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        target_port: Some(IntOrString::Int(p.port)),
                        protocol: Some(p.protocol.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Where the slice sends traffic: addresses, and for each app port the port to use there.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Backends {
    pub addresses: Vec<String>,
    /// `(app port, port on the backend)`: the same number for pods, the app's activator
    /// port for the activator.
    pub ports: Vec<(AppPort, i32)>,
}

/// Whether the API server accepts `address` in an EndpointSlice: it refuses loopback,
/// link-local, multicast and unspecified addresses. (Real pods never have those; the test
/// control plane gives some pods loopback addresses so tests can serve on them.)
pub fn slice_accepts(address: &str) -> bool {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            !(ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || ip.is_unspecified())
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            !(ip.is_loopback() || ip.is_multicast() || ip.is_unspecified())
        }
        Err(_) => false,
    }
}

pub fn endpoint_slice_name(app: &str) -> String {
    format!("{app}-crac")
}

pub fn endpoint_slice_for(app: &CracApp, backends: &Backends) -> EndpointSlice {
    let name = app_name(app);
    let mut labels = labels_for(name, "service");
    labels.insert("kubernetes.io/service-name".into(), name.to_string());
    labels.insert(
        "endpointslice.kubernetes.io/managed-by".into(),
        SLICE_MANAGER.into(),
    );
    let mut addresses: Vec<String> = backends
        .addresses
        .iter()
        .filter(|a| slice_accepts(a))
        .cloned()
        .collect();
    addresses.sort();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(endpoint_slice_name(name)),
            namespace: app.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![owner_ref(app)]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            addresses
                .into_iter()
                .map(|address| Endpoint {
                    addresses: vec![address],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            backends
                .ports
                .iter()
                .map(|(app_port, port)| EndpointPort {
                    name: Some(app_port.name.clone().unwrap_or_default()),
                    port: Some(*port),
                    protocol: Some(app_port.protocol.clone()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{tests::app, validate};

    #[test]
    fn service_has_no_selector_and_exposes_the_app_ports() {
        let a = app();
        let ports = app_ports(&validate(&a, &Default::default()).unwrap());
        let svc = service_for(&a, &ports).unwrap();
        let spec = svc.spec.unwrap();
        assert!(spec.selector.is_none());
        let port = &spec.ports.unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("http"), 8080));
    }

    #[test]
    fn slice_lists_backends_under_the_service_name() {
        let a = app();
        let ports = app_ports(&validate(&a, &Default::default()).unwrap());
        let backends = Backends {
            addresses: vec!["10.244.1.2".into(), "10.244.1.1".into(), "127.0.0.1".into()],
            ports: vec![(ports[0].clone(), 8080)],
        };
        let slice = endpoint_slice_for(&a, &backends);
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "demo");
        assert_eq!(
            labels["endpointslice.kubernetes.io/managed-by"],
            SLICE_MANAGER
        );
        let addrs: Vec<_> = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.addresses[0].as_str())
            .collect();
        assert_eq!(
            addrs,
            ["10.244.1.1", "10.244.1.2"],
            "sorted, loopback left out"
        );
        assert_eq!(slice.ports.unwrap()[0].port, Some(8080));
    }
}
