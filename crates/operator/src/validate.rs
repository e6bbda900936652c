//! Turns a `CracApp` into a [`ValidatedApp`]: everything the builders need, checked once.
//! The CRD's schema and CEL rules refuse most bad input at the API server; this catches what
//! they cannot see (a readiness probe that names a port the container does not declare).

use crate::pod_security::{self, PodAllowance};
use crac_api::cracapp::{APP_CONTAINER, CracApp};
use crac_api::duration;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::time::Duration;

/// A `CracApp` whose spec the operator can act on.
#[derive(Clone, Debug)]
pub struct ValidatedApp {
    pub name: String,
    pub namespace: String,
    /// The container that runs the JVM.
    pub container: Container,
    /// The cold-start command: the container's `command` followed by its `args`.
    pub command: Vec<String>,
    /// What the agent checks before warming up and checkpointing.
    pub readiness: String,
    /// The port the app serves on (first declared port, or the probe's port).
    pub app_port: Option<i32>,
    pub checkpoint_timeout: Duration,
}

/// Why a spec cannot be acted on. Reported in the conditions; the operator waits for a change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("spec.template.spec.containers has no container named 'app'")]
    NoAppContainer,
    #[error("the 'app' container has no command: the agent needs the JVM's start command")]
    NoCommand,
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
    /// The template asks for more than restore needs (see [`crate::pod_security`]).
    #[error("{field}: {problem}")]
    Forbidden { field: String, problem: String },
}

impl SpecError {
    /// The condition and Event reason: `Forbidden` for a template asking for too much, so a
    /// platform team can alert on it apart from mistakes.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::Forbidden { .. } => "Forbidden",
            _ => "InvalidSpec",
        }
    }
}

pub fn validate(app: &CracApp, allowance: &PodAllowance) -> Result<ValidatedApp, SpecError> {
    let name = app.metadata.name.clone().unwrap_or_default();
    let namespace = app.metadata.namespace.clone().unwrap_or_default();
    let pod = app
        .spec
        .template
        .spec
        .as_ref()
        .ok_or(SpecError::NoAppContainer)?;
    pod_security::check(pod, allowance).map_err(|r| SpecError::Forbidden {
        field: r.field,
        problem: r.problem,
    })?;
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == APP_CONTAINER)
        .ok_or(SpecError::NoAppContainer)?
        .clone();
    let mut command = container.command.clone().unwrap_or_default();
    if command.is_empty() {
        return Err(SpecError::NoCommand);
    }
    command.extend(container.args.clone().unwrap_or_default());

    let checkpoint_timeout =
        duration::parse(&app.spec.checkpoint.timeout).ok_or_else(|| SpecError::Invalid {
            field: "spec.checkpoint.timeout".into(),
            problem: format!(
                "{:?} is not a duration such as 10m",
                app.spec.checkpoint.timeout
            ),
        })?;
    let first_port = container
        .ports
        .as_ref()
        .and_then(|ports| ports.first())
        .map(|p| p.container_port);
    let (readiness, probe_port) = readiness_of(&container, first_port)?;
    let in_place = app
        .spec
        .scale_to_zero
        .as_ref()
        .and_then(|s| s.mode)
        .is_some_and(|m| m == crac_api::cracapp::SleepMode::InPlace);
    if in_place && container.liveness_probe.is_some() {
        return Err(SpecError::Invalid {
            field: "spec.scaleToZero.mode".into(),
            problem: "InPlace needs the 'app' container without a livenessProbe: while the pod \
                      sleeps no JVM answers it, and the kubelet would restart the container; \
                      remove the probe or use mode Recreate"
                .into(),
        });
    }
    Ok(ValidatedApp {
        name,
        namespace,
        command,
        readiness,
        app_port: first_port.or(probe_port),
        checkpoint_timeout,
        container,
    })
}

/// The agent's readiness target, from the container's readiness probe (httpGet or tcpSocket),
/// else a TCP connect to its first port.
fn readiness_of(
    container: &Container,
    first_port: Option<i32>,
) -> Result<(String, Option<i32>), SpecError> {
    let probe: Option<&Probe> = container.readiness_probe.as_ref();
    if let Some(http) = probe.and_then(|p| p.http_get.as_ref()) {
        let port = resolve_port(container, &http.port, "readinessProbe.httpGet.port")?;
        let scheme = http
            .scheme
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_lowercase();
        let path = http.path.as_deref().unwrap_or("/");
        return Ok((format!("{scheme}://127.0.0.1:{port}{path}"), Some(port)));
    }
    if let Some(tcp) = probe.and_then(|p| p.tcp_socket.as_ref()) {
        let port = resolve_port(container, &tcp.port, "readinessProbe.tcpSocket.port")?;
        return Ok((format!("tcp://127.0.0.1:{port}"), Some(port)));
    }
    match first_port {
        Some(port) => Ok((format!("tcp://127.0.0.1:{port}"), None)),
        None => Err(SpecError::Invalid {
            field: "spec.template.spec.containers[app]".into(),
            problem: "declare a port or an httpGet/tcpSocket readinessProbe, so the agent \
                      knows when the JVM is ready to checkpoint"
                .into(),
        }),
    }
}

fn resolve_port(container: &Container, port: &IntOrString, field: &str) -> Result<i32, SpecError> {
    match port {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .ok_or_else(|| SpecError::Invalid {
                field: format!("spec.template.spec.containers[app].{field}"),
                problem: format!("names port {name:?}, which the container does not declare"),
            }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid app, shared by the builder tests.
    pub fn app() -> CracApp {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "crac.dev/v1alpha1",
            "kind": "CracApp",
            "metadata": { "name": "demo", "namespace": "shop", "uid": "uid-1", "generation": 1 },
            "spec": {
                "template": { "spec": { "containers": [{
                    "name": "app",
                    "image": "registry.example/demo:0.0.1",
                    "command": ["java", "-jar", "/home/app/demo.jar"],
                    "args": ["--server.port=8080"],
                    "ports": [{ "containerPort": 8080, "name": "http" }],
                    "readinessProbe": { "httpGet": { "path": "/ready", "port": "http" } }
                }]}},
                "replicas": 2,
                "checkpoint": { "engine": "criu", "warmup": { "requests": [{ "path": "/", "count": 5 }] },
                                "storage": { "size": "1Gi", "accessModes": ["ReadWriteOnce"] },
                                "retain": 2, "timeout": "10m" },
                "restore": { "fallback": "ColdStart" }
            }
        }))
        .expect("test app parses")
    }

    #[test]
    fn command_is_command_then_args() {
        let v = validate(&app(), &PodAllowance::default()).unwrap();
        assert_eq!(
            v.command,
            ["java", "-jar", "/home/app/demo.jar", "--server.port=8080"]
        );
        assert_eq!(v.checkpoint_timeout, Duration::from_secs(600));
    }

    #[test]
    fn readiness_comes_from_the_probe_with_named_port_resolved() {
        let v = validate(&app(), &PodAllowance::default()).unwrap();
        assert_eq!(v.readiness, "http://127.0.0.1:8080/ready");
        assert_eq!(v.app_port, Some(8080));
    }

    #[test]
    fn readiness_falls_back_to_tcp_on_first_port() {
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].readiness_probe = None;
        assert_eq!(
            validate(&a, &PodAllowance::default()).unwrap().readiness,
            "tcp://127.0.0.1:8080"
        );
    }

    #[test]
    fn unknown_probe_port_name_is_reported_with_its_field() {
        let mut a = app();
        let c = &mut a.spec.template.spec.as_mut().unwrap().containers[0];
        c.readiness_probe
            .as_mut()
            .unwrap()
            .http_get
            .as_mut()
            .unwrap()
            .port = IntOrString::String("admin".into());
        let err = validate(&a, &PodAllowance::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("readinessProbe.httpGet.port"), "{err}");
        assert!(err.contains("admin"), "{err}");
    }

    #[test]
    fn missing_app_container_or_command_is_refused() {
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].name = "web".into();
        assert_eq!(
            validate(&a, &PodAllowance::default()).unwrap_err(),
            SpecError::NoAppContainer
        );
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].command = Some(vec![]);
        assert_eq!(
            validate(&a, &PodAllowance::default()).unwrap_err(),
            SpecError::NoCommand
        );
    }

    #[test]
    fn sleeping_in_place_with_a_liveness_probe_is_refused_naming_the_field() {
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].liveness_probe =
            Some(Default::default());
        assert!(validate(&a, &PodAllowance::default()).is_ok(), "Recreate");
        a.spec.scale_to_zero = Some(crac_api::cracapp::ScaleToZeroSpec {
            mode: Some(crac_api::cracapp::SleepMode::InPlace),
            ..Default::default()
        });
        let err = validate(&a, &PodAllowance::default()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("spec.scaleToZero.mode: InPlace needs"),
            "{err}"
        );
    }
}
