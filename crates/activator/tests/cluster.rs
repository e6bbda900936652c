//! The built binary against the real test control plane (`tests/cluster/up`: kube-apiserver,
//! controller-manager, scheduler, kwok nodes whose pods get 127.100.x.y addresses). The test
//! plays the operator: it creates a CracApp with the status the operator writes for a sleeping
//! app, waits for the activator's wake request in `status.wakeRequestedAt`, then creates the
//! app's pod (kwok schedules it and marks it Ready) and serves HTTP on the pod's address.
//! Skipped (with a message) when no control plane answers at `target/cluster/kubeconfig`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use crac_api::CracApp;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::json;

fn kubeconfig_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/cluster/kubeconfig")
}

async fn cluster_client() -> Option<Client> {
    let path = kubeconfig_path();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).ok()?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .ok()?;
    let client = Client::try_from(config).ok()?;
    tokio::time::timeout(Duration::from_secs(5), client.apiserver_version())
        .await
        .ok()?
        .ok()?;
    Some(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_on_the_real_control_plane_holds_wakes_and_forwards_to_a_ready_pod() {
    // Start the test control plane when none runs (idempotent); never skip.
    let up = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/cluster/up");
    let started = tokio::task::spawn_blocking(move || std::process::Command::new(up).output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.status.success(),
        "tests/cluster/up failed: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let client = cluster_client().await.unwrap_or_else(|| {
        panic!(
            "no control plane answers at {}",
            kubeconfig_path().display()
        )
    });
    let ssa = PatchParams::apply("crac-activator-test").force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    if crds.get_opt("cracapps.crac.dev").await.unwrap().is_none() {
        crds.patch("cracapps.crac.dev", &ssa, &Patch::Apply(CracApp::crd()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let ns = format!("activator-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    struct Cleanup(Api<Namespace>, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let (api, ns) = (self.0.clone(), self.1.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let _ = rt.block_on(api.delete(&ns, &DeleteParams::background()));
            })
            .join();
        }
    }
    let _cleanup = Cleanup(namespaces.clone(), ns.clone());

    // The app, asleep, as the operator leaves it.
    let activator_port = free_port();
    let target_port = free_port();
    let apps: Api<CracApp> = Api::namespaced(client.clone(), &ns);
    let app: CracApp = serde_json::from_value(json!({
        "apiVersion": "crac.dev/v1alpha1", "kind": "CracApp",
        "metadata": {"name": "demo", "namespace": ns},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "demo", "command": ["java", "-jar", "app.jar"]}]}},
                 "replicas": 1, "scaleToZero": {"enabled": true, "wakeTimeout": "30s"}}
    }))
    .unwrap();
    apps.create(&PostParams::default(), &app).await.unwrap();
    let status = json!({"status": {"phase": "ScaledToZero", "servingMode": "Activator", "replicas": 0, "readyReplicas": 0,
        "activatorPorts": [{"name": "http", "targetPort": target_port, "activatorPort": activator_port}]}});
    apps.patch_status("demo", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let admin_port = free_port();
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_crac-activator"))
            .args(["--kubeconfig", kubeconfig_path().to_str().unwrap()])
            .args(["--listen-address", "127.0.0.1"])
            .args(["--admin-address", &format!("127.0.0.1:{admin_port}")])
            .args(["--drain-timeout", "10s"])
            // The test calls from 127.0.0.1, which is no pod: trusted, like a node's own checks.
            .args(["--trusted-callers", "127.0.0.1/32"])
            .spawn()
            .unwrap(),
    );
    within(Duration::from_secs(30), "readyz", async {
        loop {
            if matches!(get(admin_port, "/readyz").await, Ok(a) if a.status == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        within(Duration::from_secs(10), "listening", async {
            while tokio::net::TcpStream::connect((LOOPBACK, activator_port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        })
        .await
    );

    // A caller arrives while the app sleeps.
    let held = tokio::spawn(get(activator_port, "/echo/cluster"));

    // The activator asks for the wake through the status subresource.
    let requested = within(Duration::from_secs(20), "status.wakeRequestedAt", async {
        loop {
            let app = apps.get_status("demo").await.unwrap();
            if let Some(at) = app.status.and_then(|s| s.wake_requested_at) {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let managed = apps
        .get("demo")
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap_or_default();
    assert!(
        managed
            .iter()
            .any(|m| m.manager.as_deref() == Some("crac-activator")
                && m.subresource.as_deref() == Some("status")),
        "no status field owned by crac-activator: {managed:?}"
    );
    assert!(!held.is_finished(), "answered before any pod existed");
    let _ = requested;

    // The "operator" scales up: kwok schedules the pod, gives it a 127.100.x.y address and
    // marks it Ready; the app process listens on that address.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "demo-0", "labels": {(crac_api::labels::APP): "demo", (crac_api::labels::COMPONENT): "restore"}},
        "spec": {"containers": [{"name": "app", "image": "demo"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod_ip: std::net::IpAddr = within(Duration::from_secs(30), "pod IP", async {
        loop {
            let pod = pods.get("demo-0").await.unwrap();
            if let Some(ip) = pod.status.and_then(|s| s.pod_ip) {
                return ip.parse().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        pod_ip.is_loopback(),
        "pod IP {pod_ip} is not on loopback; refusing to serve on it"
    );
    let backend = start_backend_on(pod_ip, target_port).await;

    let answer = within(Duration::from_secs(30), "held request", held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body, "id:cluster");
    assert_eq!(
        backend
            .state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    let exit = child.terminate().await;
    assert!(exit.success(), "{exit}");
}
