//! Activator replicas: each one a real `crac-activator` process on a loopback address of its
//! own and a stand-in pod (on the cluster's unroutable node) whose Ready condition the driver
//! keeps equal to the process's `/readyz`, polled every 100 ms, as a kubelet's readiness probe
//! would; the pod is deleted once its process has exited. The operator sees the pods, and the
//! driver's [`Service`] maps each pod to its process.

use super::service::Service;
use anyhow::{Context as _, Result};
use crac_bench::{Child, activator_args, catch_panic, spawn, wait_answers};
use crac_tests::operator::{ACTIVATOR_NAMESPACE, stand_in_activator_named};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Port of each activator's admin server (/metrics, /readyz), on its own address.
pub const ADMIN_PORT: u16 = 19190;

/// How the replicas are started.
pub struct Launcher {
    pub client: Client,
    pub ns: String,
    pub binary: PathBuf,
    pub kubeconfig: String,
    pub logs: PathBuf,
    pub service: Service,
}

pub struct Replica {
    pub name: String,
    pub address: IpAddr,
    child: Option<Child>,
    mirror: JoinHandle<()>,
    /// Set once the process has exited (the mirror then deletes the pod and ends).
    exited: Arc<AtomicBool>,
}

impl Launcher {
    /// Starts the process, waits until it is ready, then creates its stand-in pod.
    pub async fn start(&self, name: &str, address: IpAddr) -> Result<Replica> {
        let log = self.logs.join(format!("chaos-{name}.log"));
        let admin = format!("{address}:{ADMIN_PORT}");
        let child = spawn(
            &self.binary,
            &activator_args(&self.kubeconfig, address, &admin),
            &log,
        )?;
        wait_answers(&format!("activator {name}"), address, ADMIN_PORT, "/readyz").await?;
        self.service.map(name, address);
        let (c, n, pod) = (self.client.clone(), self.ns.clone(), name.to_string());
        catch_panic("the stand-in activator pod", async move {
            stand_in_activator_named(&c, &n, &pod).await
        })
        .await?;
        let exited = Arc::new(AtomicBool::new(false));
        let mirror = tokio::spawn(mirror(
            self.client.clone(),
            name.to_string(),
            address,
            exited.clone(),
        ));
        Ok(Replica {
            name: name.into(),
            address,
            child: Some(child),
            mirror,
            exited,
        })
    }
}

impl Replica {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.0.id())
    }

    /// SIGTERM; returns at once (the process drains on its own).
    pub fn terminate(&self) -> Result<()> {
        let pid = self.pid().context("the activator has exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// SIGKILL.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            child.0.kill().await?;
        }
        self.exited.store(true, Ordering::Release);
        Ok(())
    }

    /// Waits (`limit` at most) for the process to exit, then for its pod to go.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("no process")?;
        let status = tokio::time::timeout(limit, child.0.wait())
            .await
            .with_context(|| format!("activator {} still running after {limit:?}", self.name))??;
        self.exited.store(true, Ordering::Release);
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.mirror).await;
        Ok(status)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.mirror.abort();
    }
}

/// Keeps pod `name`'s Ready condition equal to `/readyz` on `address` until the process has
/// exited, then deletes the pod.
async fn mirror(client: Client, name: String, address: IpAddr, exited: Arc<AtomicBool>) {
    let pods: Api<Pod> = Api::namespaced(client, ACTIVATOR_NAMESPACE);
    let ip = address.to_string();
    let mut shown = Some(true);
    while !exited.load(Ordering::Acquire) {
        let ready = tokio::time::timeout(
            Duration::from_millis(300),
            crac_tests::real_node::http_get(&ip, ADMIN_PORT, "/readyz"),
        )
        .await
        .ok()
        .flatten()
        .is_some_and(|(code, _)| code == 200);
        if shown != Some(ready) {
            let status = if ready { "True" } else { "False" };
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let patch = serde_json::json!({ "status": { "conditions": [
                { "type": "Initialized", "status": "True", "lastTransitionTime": now },
                { "type": "ContainersReady", "status": status, "lastTransitionTime": now },
                { "type": "Ready", "status": status, "lastTransitionTime": now },
            ]}});
            match pods
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    eprintln!("chaos: activator {name} ({ip}) Ready {status}");
                    shown = Some(ready);
                }
                Err(e) => eprintln!("chaos: activator {name}: setting Ready {status}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = pods.delete(&name, &DeleteParams::background()).await;
}
