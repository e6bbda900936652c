//! Support for tests against the real control plane of `tests/cluster`: connect (starting it
//! when it is not running), give each test its own namespace, wait for conditions with
//! generous deadlines, and play the parts no process plays here (the agent in a checkpoint
//! pod, since no kubelet runs containers).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub mod activity;
pub mod operator;
pub mod real_node;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The admin kubeconfig `tests/cluster/up` writes.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("CRAC_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/cluster/kubeconfig"))
}

/// Starts the control plane once per test process (a no-op when it already runs).
fn ensure_cluster() {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        let up = repo_root().join("tests/cluster/up");
        let out = Command::new(&up).output().expect("run tests/cluster/up");
        assert!(
            out.status.success(),
            "the test control plane did not start ({}):\n{}{}",
            up.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A client with the admin identity of the test control plane.
pub async fn client() -> Client {
    tokio::task::spawn_blocking(ensure_cluster).await.unwrap();
    client_from(&kubeconfig_path()).await
}

pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A namespace of its own for one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let client = client().await;
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "crac.dev/test": "true" } }
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        // Pods are admitted only once the namespace's default ServiceAccount exists.
        let sa =
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &name);
        wait_for(
            "the namespace's default ServiceAccount",
            Duration::from_secs(30),
            || async { sa.get_opt("default").await.ok().flatten() },
        )
        .await;
        TestNamespace { name, client }
    }

    /// The reasons of every Event in the namespace.
    pub async fn event_reasons(&self) -> Vec<String> {
        let events: Api<k8s_openapi::api::core::v1::Event> = self.api();
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        let path = kubeconfig_path();
        // Drop cannot await, and the test's runtime may be shutting down: use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = client_from(&path).await;
                // No operator runs after the test: release the CracApps' finalizers so the
                // namespace can go.
                let apps = Api::<crac_api::CracApp>::namespaced(client.clone(), &name);
                if let Ok(list) = apps.list(&ListParams::default()).await {
                    for app in list {
                        let patch = serde_json::json!({ "metadata": { "finalizers": null } });
                        let _ = apps
                            .patch(
                                &app.metadata.name.unwrap_or_default(),
                                &PatchParams::default(),
                                &Patch::Merge(patch),
                            )
                            .await;
                    }
                }
                // A stand-in activator pod of this test, if it made one.
                let activators = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(
                    client.clone(),
                    operator::ACTIVATOR_NAMESPACE,
                );
                let _ = activators
                    .delete(&format!("activator-{name}"), &DeleteParams::background())
                    .await;
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await;
            });
        })
        .join();
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails the test after `deadline`
/// naming what it waited for. Deadlines are generous: they catch hangs, not slowness.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll(Duration::from_millis(100), deadline, check)
        .await
        .unwrap_or_else(|| {
            panic!(
                "timed out after {deadline:?} waiting for {what} (component logs: {})",
                repo_root().join("target/cluster/logs").display()
            )
        })
}

/// Polls `check` every `every` until it returns `Some`, or returns `None` once `deadline`
/// has passed. [`wait_for`] is this at the tests' pace; the benchmarks (`bench/`) poll faster
/// where they time what they wait for, and report a timeout as an error.
pub async fn poll<T, F, Fut>(every: Duration, deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// The checkpoint id the operator gave a checkpoint pod (its app container's
/// `CRAC_CHECKPOINT_ID`): what the agent would report back, for
/// [`operator::end_checkpoint_pod`] when only the pod is at hand.
pub fn checkpoint_id_of(pod: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    let app = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == "app")?;
    app.env
        .as_ref()?
        .iter()
        .find(|e| e.name == crac_api::agent::ENV_CHECKPOINT_ID)?
        .value
        .clone()
}

/// Applies every CRD in `crds/` (server-side apply; idempotent) and waits until served.
pub async fn install_crds(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let text = std::fs::read_to_string(repo_root().join("crds/crds.yaml")).unwrap();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for doc in text
        .split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
        .filter(|d| !d.trim().is_empty())
    {
        let crd: CustomResourceDefinition = yaml_serde::from_str(doc).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        let mut body = serde_json::to_value(&crd).unwrap();
        body["apiVersion"] = "apiextensions.k8s.io/v1".into();
        body["kind"] = "CustomResourceDefinition".into();
        crds.patch(
            &name,
            &PatchParams::apply("crac-tests").force(),
            &Patch::Apply(body),
        )
        .await
        .unwrap_or_else(|e| panic!("the API server refused CRD {name}: {e}"));
        wait_for(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || async {
                let crd = crds.get(&name).await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            },
        )
        .await;
    }
}

/// Runs the control plane's kubectl with the admin kubeconfig.
pub fn kubectl(args: &[&str]) -> std::process::Output {
    let bin = Command::new(repo_root().join("tests/cluster/build"))
        .output()
        .expect("tests/cluster/build");
    let dir = String::from_utf8_lossy(&bin.stdout).trim().to_string();
    Command::new(Path::new(&dir).join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .output()
        .expect("run kubectl")
}
