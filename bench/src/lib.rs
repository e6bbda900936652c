//! What the benchmark drivers share beyond the tests' support (`crac_tests`, which plays the
//! agent's part in checkpoint pods, stands in for the activator's pod and the agent's activity
//! endpoint, and polls): the tests' helpers with their failures as errors, a namespace of
//! their own, reading a component's `/metrics`, and percentiles.

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `q`-quantile of sorted samples (nearest rank: with 20 samples, p99 is the largest).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A `/metrics` text (HTTP/1.0, so the body ends when the connection closes).
pub async fn scrape(addr: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to the metrics at {addr}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .context("no HTTP body from /metrics")?;
    Ok(body)
}

/// [`crac_tests::poll`]: `check` every `every` until it returns `Some`; an error naming `what`
/// after `limit`.
pub async fn until<T, F, Fut>(what: &str, every: Duration, limit: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    crac_tests::poll(every, limit, check)
        .await
        .with_context(|| format!("timed out after {limit:?} waiting for {what}"))
}

/// Runs `helper` (one of the tests', which fail by panicking) as a task of its own, so that a
/// failure comes back as an error naming `what` and the driver can still clean up or go on.
pub async fn catch_panic<T, F>(what: &str, helper: F) -> Result<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(helper)
        .await
        .with_context(|| format!("{what} failed"))
}

/// Creates the namespace `name` (labelled `crac.dev/bench`) and waits until it admits pods
/// (its default ServiceAccount exists).
pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { "crac.dev/bench": "true" } }
    }))?;
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("create namespace {name} (left over from a run?)"))?;
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    until(
        &format!("the default ServiceAccount of {name}"),
        Duration::from_millis(100),
        Duration::from_secs(60),
        || async { sa.get_opt("default").await.ok().flatten() },
    )
    .await?;
    Ok(())
}

// ==================================================================================================
// What the drivers that run the release binaries on the bench control plane share
// (crac-bench-wake, crac-chaos-operator): a fake node of their own whose pods get addresses of a
// loopback /24, "the app" and the agent's activity endpoint served on every one of them, the
// operator's and the activator's processes, and tearing it all down.
// ==================================================================================================

use crac_api::CracApp;
use crac_api::agent::ActivityReport;
use crac_tests::activity::ActivityServer;
use crac_tests::operator::ACTIVATOR_NAMESPACE;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;

/// The node label that puts an app's pods (and only them) on a driver's node.
pub const POD_ADDRESSES_LABEL: &str = "crac.dev/pod-addresses";

/// A fake kwok node of a driver's own: its pods get addresses of `net`.0/24, and only pods
/// that select `label_value` and tolerate `taint` go there.
pub struct FakeNode {
    pub name: &'static str,
    pub label_value: &'static str,
    pub taint: &'static str,
    pub net: [u8; 3],
}

impl FakeNode {
    /// Creates the node and waits until kwok reports it Ready.
    pub async fn create(&self, client: &Client) -> Result<()> {
        let net = self.net;
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": self.name,
                "labels": { "type": "kwok", "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64", POD_ADDRESSES_LABEL: self.label_value },
                "annotations": { "kwok.x-k8s.io/node": "fake" }
            },
            "spec": {
                "podCIDR": format!("{}.{}.{}.0/24", net[0], net[1], net[2]),
                "taints": [{ "key": self.taint, "value": "true", "effect": "NoSchedule" }]
            },
            "status": {
                "allocatable": { "cpu": "32", "memory": "256Gi", "pods": "500" },
                "capacity": { "cpu": "32", "memory": "256Gi", "pods": "500" }
            }
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("create node {} (left over from a run?)", self.name))?;
        until(
            &format!("node {} Ready", self.name),
            Duration::from_millis(50),
            Duration::from_secs(60),
            || async {
                let n = nodes.get(self.name).await.ok()?;
                n.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
                    .then_some(())
            },
        )
        .await
    }

    /// A scale-to-zero CracApp (1 replica, idle after 30 minutes) whose pods go on this node
    /// and listen on `app_port`.
    pub fn app(&self, name: &str, app_port: u16) -> Result<CracApp> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "crac.dev/v1alpha1",
            "kind": "CracApp",
            "metadata": { "name": name },
            "spec": {
                "replicas": 1,
                "template": { "spec": {
                    "nodeSelector": { POD_ADDRESSES_LABEL: self.label_value },
                    "tolerations": [{ "key": self.taint, "operator": "Exists", "effect": "NoSchedule" }],
                    "containers": [{
                        "name": "app",
                        "image": format!("bench/{name}:1"),
                        "command": ["java", "-jar", "/app/app.jar"],
                        "ports": [{ "containerPort": app_port, "name": "http" }],
                        "readinessProbe": { "httpGet": { "path": "/ready", "port": "http" } }
                    }]
                }},
                "checkpoint": { "engine": "criu" },
                "scaleToZero": { "enabled": true, "idleAfter": "30m", "wakeTimeout": "30s" }
            }
        }))?)
    }
}

/// The status of the app `name` in `apps` (default when it has none, or cannot be read: the
/// drivers' waits then look again).
pub async fn app_status(apps: &Api<CracApp>, name: &str) -> crac_api::CracAppStatus {
    apps.get(name)
        .await
        .ok()
        .and_then(|a| a.status)
        .unwrap_or_default()
}

/// Creates `app` in `ns` and ends its checkpoint pod as the agent would, so the operator
/// makes it Ready.
pub async fn create_ready_app(client: &Client, ns: &str, app: &CracApp) -> Result<()> {
    use crac_tests::operator::{end_checkpoint_pod, success};
    use kube::ResourceExt;
    let name = app.name_any();
    let apps: Api<CracApp> = Api::namespaced(client.clone(), ns);
    apps.create(&PostParams::default(), app).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let checkpoints = ListParams::default().labels(&format!(
        "{}=checkpoint,{}={name}",
        crac_api::labels::COMPONENT,
        crac_api::labels::APP
    ));
    let (pod, id) = until(
        "the app's checkpoint pod running",
        Duration::from_millis(20),
        Duration::from_secs(60),
        || async {
            let list = pods.list(&checkpoints).await.ok()?;
            list.items.iter().find_map(|p| {
                let running = p.status.as_ref()?.phase.as_deref() == Some("Running");
                running.then(|| Some((p.name_any(), crac_tests::checkpoint_id_of(p)?)))?
            })
        },
    )
    .await?;
    let end = async move { end_checkpoint_pod(&pods, &pod, &success(&id)).await };
    catch_panic("ending the checkpoint pod", end).await
}

/// `127.B.C.0/24` as `[127, B, C]` (a `--node-cidr` flag).
pub fn loopback_24(value: &str) -> Result<[u8; 3]> {
    let wrong = || anyhow::anyhow!("{value}: not a loopback /24 such as 127.151.0.0/24");
    let net = value.strip_suffix(".0/24").ok_or_else(wrong)?;
    let octets: Vec<u8> = net
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| wrong())?;
    match octets[..] {
        [127, b, c] => Ok([127, b, c]),
        _ => Err(wrong()),
    }
}

/// When "the app" was reached, and on which pod address.
pub type Hits = Arc<Mutex<Vec<(Instant, Ipv4Addr)>>>;

/// Serves the app's port (answering `hello from <address>` at once) and the agent's activity
/// endpoint (the tests' stand-in, reporting no open connections) on every address of `net`'s
/// /24, so whatever address kwok gives a pod, the operator and the activator reach a socket.
/// The activity endpoints serve until the returned servers are dropped.
pub async fn serve_pod_addresses(
    net: [u8; 3],
    app_port: u16,
) -> Result<(Hits, Vec<ActivityServer>)> {
    let hits: Hits = Arc::default();
    let idle = ActivityReport {
        mode: "restored".into(),
        open_connections: 0,
        ..Default::default()
    };
    let mut agents = Vec::new();
    for host in 1..=254u8 {
        let ip = Ipv4Addr::new(net[0], net[1], net[2], host);
        let app = TcpListener::bind((ip, app_port))
            .await
            .with_context(|| format!("bind the app port {ip}:{app_port}"))?;
        agents.push(ActivityServer::start(&ip.to_string(), idle.clone()).await);
        let hits = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = app.accept().await {
                if let Ok(mut hits) = hits.lock() {
                    hits.push((Instant::now(), ip));
                }
                tokio::spawn(answer(stream, format!("hello from {ip}")));
            }
        });
    }
    Ok((hits, agents))
}

/// Answers one HTTP/1.1 request with `body` once its head has arrived.
async fn answer(mut stream: tokio::net::TcpStream, body: String) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Child(pub tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Starts `bin` with `args`, its stdout and stderr appended to `log`.
pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let child = tokio::process::Command::new(bin)
        .args(args)
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    Ok(Child(child))
}

/// The activator's flags: listening on `address`, its admin server on `admin`, trusting callers
/// on this machine (the drivers call from here, not from a pod).
pub fn activator_args(kubeconfig: &str, address: IpAddr, admin: &str) -> Vec<String> {
    [
        "--kubeconfig",
        kubeconfig,
        "--listen-address",
        &address.to_string(),
        "--admin-address",
        admin,
        "--trusted-callers",
        "127.0.0.0/8",
        "--control-key-namespace",
        ACTIVATOR_NAMESPACE,
    ]
    .map(String::from)
    .to_vec()
}

/// The operator's flags: one replica (no lease), reconciling `ns`, with the tests' stand-in
/// activator pod for `ns` as its activator.
pub fn operator_args(metrics: &str, ns: &str) -> Vec<String> {
    vec![
        "--leader-elect=false".into(),
        "--metrics-addr".into(),
        metrics.into(),
        "--namespace".into(),
        ns.into(),
        "--activator-namespace".into(),
        ACTIVATOR_NAMESPACE.into(),
        "--activator-selector".into(),
        format!("{}={ns}", crac_tests::operator::ACTIVATOR_LABEL),
    ]
}

/// Waits until `ip:port` answers `GET path` with 200.
pub async fn wait_answers(what: &str, ip: IpAddr, port: u16, path: &str) -> Result<()> {
    let ip = ip.to_string();
    until(
        &format!("{what}'s {path}"),
        Duration::from_millis(20),
        Duration::from_secs(60),
        || async {
            (crac_tests::real_node::http_get(&ip, port, path).await?.0 == 200).then_some(())
        },
    )
    .await
}

/// Removes what a driver made: releases the finalizers of the CracApps left in `ns` (no
/// operator runs any more), deletes `ns`, the stand-in activator pod for it and `node`, and
/// waits (up to two minutes) until `ns` is gone.
pub async fn tear_down(client: &Client, ns: &str, node: &str) {
    let apps: Api<CracApp> = Api::namespaced(client.clone(), ns);
    let release = serde_json::json!({ "metadata": { "finalizers": null } });
    for app in apps
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let name = app.metadata.name.unwrap_or_default();
        let _ = apps
            .patch(&name, &PatchParams::default(), &Patch::Merge(&release))
            .await;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::background()).await;
    let _ = Api::<Pod>::namespaced(client.clone(), ACTIVATOR_NAMESPACE)
        .delete(&format!("activator-{ns}"), &DeleteParams::background())
        .await;
    let _ = Api::<Node>::all(client.clone())
        .delete(node, &DeleteParams::background())
        .await;
    let gone = until(
        &format!("namespace {ns} gone"),
        Duration::from_millis(200),
        Duration::from_secs(120),
        || async { namespaces.get_opt(ns).await.ok()?.is_none().then_some(()) },
    )
    .await;
    if let Err(e) = gone {
        eprintln!("{e}");
    }
}
