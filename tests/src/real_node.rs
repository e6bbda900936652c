//! Support for the tests on the real node `tests/cluster/node-up` starts (kubelet, containerd,
//! runc, CNI): CracApps placed there, the images `tests/cluster/images` imported into it, HTTP
//! to pod addresses on the node's bridge, pod logs through the kubelet, and the host
//! directories behind the node's volumes.

use crac_api::CracApp;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::Client;
use kube::api::{Api, ListParams, LogParams};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The images node-up imports (tests/cluster/images builds them; nothing is pulled).
pub const AGENT_IMAGE: &str = "ghcr.io/crac-operator/crac-agent:0.1.0";
pub const HELLO_IMAGE: &str = "crac.dev/test/hello-app:1";
pub const HELLO_IMAGE_2: &str = "crac.dev/test/hello-app:2";
/// How the real node is selected and tolerated (node-up sets both).
pub const NODE_LABEL: (&str, &str) = ("crac.dev/node", "real");
pub const NODE_TAINT: &str = "crac.dev/real-node";
pub const STORAGE_CLASS: &str = "crac-node-local";
/// Real JVMs on 2 cores, several tests at once: generous, to catch hangs, not slowness.
pub const DEADLINE: Duration = Duration::from_secs(240);

/// The node's scheduling constraints, as a pod spec's fields.
pub fn placement() -> serde_json::Value {
    serde_json::json!({
        "nodeSelector": { NODE_LABEL.0: NODE_LABEL.1 },
        "tolerations": [{ "key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule" }]
    })
}

/// examples/hello-app as a CracApp on the real node: warmed up with 200 requests, so a
/// restored JVM answers `hello 201` and a cold one `hello 1`.
pub fn hello_app(name: &str, image: &str) -> CracApp {
    let mut pod = placement();
    pod["containers"] = serde_json::json!([{
        "name": "app",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["java", "-XX:-UsePerfData", "-Xmx64m", "-cp", "/app", "Hello", "8080"],
        "env": [{ "name": "HELLO_HOST", "value": "0.0.0.0" }],
        "ports": [{ "containerPort": 8080, "name": "http" }],
        "readinessProbe": { "httpGet": { "path": "/ready", "port": 8080 } },
        "resources": { "limits": { "memory": "256Mi" } }
    }]);
    serde_json::from_value(serde_json::json!({
        "apiVersion": "crac.dev/v1alpha1",
        "kind": "CracApp",
        "metadata": { "name": name },
        "spec": {
            "replicas": 2,
            "template": { "spec": pod },
            "checkpoint": {
                "engine": "criu",
                "warmup": { "requests": [{ "path": "/", "count": 200 }] },
                "storage": { "size": "1Gi", "storageClassName": STORAGE_CLASS },
                "timeout": "2m"
            },
            "restore": { "fallback": "ColdStart" }
        }
    }))
    .unwrap()
}

/// Waits until the real node is registered and Ready.
pub async fn node_ready(client: &Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let selector = format!("{}={}", NODE_LABEL.0, NODE_LABEL.1);
    crate::wait_for("the real node to be Ready", DEADLINE, || async {
        let list = nodes
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()?;
        list.items
            .iter()
            .any(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .then_some(())
    })
    .await;
}

/// One HTTP/1.1 GET to `ip:port`; `(status, body)`, or `None` when it did not get an answer
/// within 5 s.
pub async fn http_get(ip: &str, port: u16, path: &str) -> Option<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(5), http_get_waiting(ip, port, path))
        .await
        .ok()
        .flatten()
}

/// The app's restore pods that are Ready, with their addresses.
pub async fn ready_restore_pods(pods: &Api<Pod>, app: &str) -> Vec<(String, String)> {
    let selector = format!(
        "{}={app},{}=restore",
        crac_api::labels::APP,
        crac_api::labels::COMPONENT
    );
    let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status?;
            let ready = status
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some((p.metadata.name?, status.pod_ip?))
        })
        .collect()
}

/// The log of a pod's container, through the API server and the kubelet.
pub async fn logs(pods: &Api<Pod>, pod: &str, container: &str) -> String {
    pods.logs(
        pod,
        &LogParams {
            container: Some(container.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| format!("<no log: {e}>"))
}

/// The directory on this machine behind a claim of the real node's StorageClass.
pub async fn claim_dir(claims: &Api<PersistentVolumeClaim>, claim: &str) -> PathBuf {
    let uid = claims.get(claim).await.unwrap().metadata.uid.unwrap();
    crate::repo_root()
        .join("target/cluster/node/volumes")
        .join(uid)
}

/// Like [`http_get`], but waits as long as the server holds the request (an activator holding
/// it through a wake), with no timeout of its own: the caller bounds it.
pub async fn http_get_waiting(ip: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = send_get(ip, port, path).await?;
    read_response(&mut stream).await
}

/// Connects to `ip:port` and sends `GET path` (HTTP/1.1, `Connection: close`), leaving the
/// response unread, for a caller that times its first byte (`bench/`).
pub async fn send_get(ip: &str, port: u16, path: &str) -> Option<TcpStream> {
    let mut stream = TcpStream::connect((ip, port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    Some(stream)
}

/// Reads the response to a request [`send_get`] sent, until the server closes: `(status, body)`.
pub async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}
