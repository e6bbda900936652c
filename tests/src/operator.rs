//! Running the operator in-process for a test, and playing the agent's part in checkpoint
//! pods (no kubelet runs containers here: a test sets the pod's end state and termination
//! message exactly as the agent and the kubelet would).

use crac_api::CracApp;
use crac_api::agent::{AgentSummary, Outcome};
use crac_operator::context::{ActivatorRef, Context, Settings};
use crac_operator::metrics::Metrics;
use crac_operator::ports::PortTable;
use crac_operator::watches;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use std::sync::Arc;

pub const AGENT_IMAGE: &str = "crac-agent:test";
/// Checkpoint retries wait this long at first in tests (30 s in production).
pub const TEST_RETRY_BASE: std::time::Duration = std::time::Duration::from_secs(3);
/// Tests put their stand-in activator pods here, labelled with the test's namespace.
pub const ACTIVATOR_NAMESPACE: &str = "crac-test-activators";
pub const ACTIVATOR_LABEL: &str = "crac.dev/test-activator-for";

/// The operator, reconciling one namespace, until dropped.
pub struct OperatorHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OperatorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn start_operator(client: &Client, namespace: &str) -> OperatorHandle {
    start_operator_with(client, namespace, AGENT_IMAGE)
}

/// The operator injecting `agent_image` (the real node's tests use the image it imported).
pub fn start_operator_with(client: &Client, namespace: &str, agent_image: &str) -> OperatorHandle {
    // RUST_LOG=crac_operator=debug shows the operator's logs in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    // One operator would hand out activator ports cluster-wide; the in-process operators of
    // tests running at once share one table so they never hand out the same port twice.
    static PORTS: std::sync::OnceLock<PortTable> = std::sync::OnceLock::new();
    let settings = Settings {
        retry_base: TEST_RETRY_BASE,
        activator: ActivatorRef {
            namespace: ACTIVATOR_NAMESPACE.into(),
            selector: format!("{ACTIVATOR_LABEL}={namespace}"),
        },
        namespace: Some(namespace.to_string()),
        activator_ports: PORTS.get_or_init(Default::default).clone(),
        ..Settings::new(agent_image, format!("test-{namespace}"))
    };
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics));
    let task = tokio::spawn(watches::run(ctx, 4, || {}));
    OperatorHandle { task }
}

/// A CracApp like a user would write: one `app` container with a command and a port.
pub fn example_app(name: &str, image: &str) -> CracApp {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "crac.dev/v1alpha1",
        "kind": "CracApp",
        "metadata": { "name": name },
        "spec": {
            "replicas": 2,
            "template": { "spec": { "containers": [{
                "name": "app",
                "image": image,
                "command": ["java", "-jar", "/app/app.jar"],
                "ports": [{ "containerPort": 8080, "name": "http" }],
                "readinessProbe": { "httpGet": { "path": "/ready", "port": 8080 } }
            }]}},
            "checkpoint": { "engine": "criu" }
        }
    }))
    .unwrap()
}

/// Ends a checkpoint pod as the agent would: the summary in the app container's
/// termination message, exit code 0 on success or 1 on failure.
pub async fn end_checkpoint_pod(pods: &Api<Pod>, pod: &str, summary: &AgentSummary) {
    end_checkpoint_pod_reporting(pods, pod, summary, "").await;
}

/// [`end_checkpoint_pod`], with the app container's `imageID` as the kubelet reports the
/// image it ran (`repo@sha256:<hex>` when pulled by containerd; `""` says nothing).
pub async fn end_checkpoint_pod_reporting(
    pods: &Api<Pod>,
    pod: &str,
    summary: &AgentSummary,
    image_id: &str,
) {
    let ok = summary.outcome == Some(Outcome::Checkpointed);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = serde_json::json!({
        "status": {
            "phase": if ok { "Succeeded" } else { "Failed" },
            "conditions": [{ "type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now }],
            "containerStatuses": [{
                "name": "app", "image": "x", "imageID": image_id, "ready": false, "restartCount": 0,
                "state": { "terminated": {
                    "exitCode": if ok { 0 } else { 1 },
                    "reason": if ok { "Completed" } else { "Error" },
                    "message": serde_json::to_string(summary).unwrap(),
                    "startedAt": now, "finishedAt": now
                }}
            }]
        }
    });
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

/// The running (not yet ended) pods of a Job.
pub async fn running_job_pods(pods: &Api<Pod>, job: &str) -> Vec<String> {
    pods.list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter_map(|p| p.metadata.name)
                .collect()
        })
        .unwrap_or_default()
}

/// The image digest a stand-in checkpoint reports (kwok pods run no agent to compute one).
pub const STAND_IN_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

pub fn success(id: &str) -> AgentSummary {
    AgentSummary {
        outcome: Some(Outcome::Checkpointed),
        checkpoint_id: Some(id.into()),
        engine: Some("criu".into()),
        jdk: Some("17.0.15".into()),
        image_bytes: Some(59_000_000),
        image_digest: Some(STAND_IN_DIGEST.into()),
        checkpoint_ms: Some(900),
        ..Default::default()
    }
}

pub fn failure(reason: &str, message: &str) -> AgentSummary {
    AgentSummary {
        outcome: Some(Outcome::Failed),
        reason: Some(reason.into()),
        message: Some(message.into()),
        ..Default::default()
    }
}

/// Creates (once per test namespace) a pod standing in for the activator, on the node whose
/// addresses EndpointSlices accept, and waits until it is ready. Returns its address.
pub async fn stand_in_activator(client: &Client, test_namespace: &str) -> String {
    let name = format!("activator-{test_namespace}");
    stand_in_activator_named(client, test_namespace, &name).await
}

/// [`stand_in_activator`] under another pod name: one more activator replica.
pub async fn stand_in_activator_named(client: &Client, test_namespace: &str, name: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::PostParams;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ACTIVATOR_NAMESPACE}}))
            .unwrap();
    let _ = namespaces.create(&PostParams::default(), &ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ACTIVATOR_NAMESPACE);
    crate::wait_for(
        "the activators' namespace to admit pods",
        std::time::Duration::from_secs(30),
        || async {
            let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                Api::namespaced(client.clone(), ACTIVATOR_NAMESPACE);
            sa.get_opt("default").await.ok().flatten()
        },
    )
    .await;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { ACTIVATOR_LABEL: test_namespace } },
        "spec": {
            "nodeSelector": { "crac.dev/pod-addresses": "unroutable" },
            "tolerations": [{ "key": "crac.dev/unroutable-pod-addresses", "operator": "Exists", "effect": "NoSchedule" }],
            "containers": [{ "name": "activator", "image": "crac-activator:test" }]
        }
    }))
    .unwrap();
    let _ = pods.create(&PostParams::default(), &pod).await;
    crate::wait_for(
        "the stand-in activator to be ready",
        std::time::Duration::from_secs(60),
        || async {
            let p = pods.get(name).await.ok()?;
            crac_api::serving::serving_address(&p).map(String::from)
        },
    )
    .await
}

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The app's status (default when it has none yet).
pub async fn status_of(apps: &Api<CracApp>, name: &str) -> crac_api::CracAppStatus {
    apps.get(name).await.unwrap().status.unwrap_or_default()
}

/// Waits for the app's running checkpoint Job and its running pod.
pub async fn running_checkpoint(
    ns: &crate::TestNamespace,
    app: &str,
) -> (k8s_openapi::api::batch::v1::Job, String) {
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = ns.api();
    let pods: Api<Pod> = ns.api();
    let checkpoints =
        ListParams::default().labels(&format!("{}=checkpoint", crac_api::labels::COMPONENT));
    crate::wait_for(
        &format!("a running checkpoint pod of {app}"),
        DEADLINE,
        || async {
            let list = jobs.list(&checkpoints).await.ok()?;
            let job = list.items.into_iter().find(|j| {
                let name = j.metadata.name.as_deref().unwrap_or_default();
                name.starts_with(&format!("{app}-ckpt-"))
                    && j.status.as_ref().and_then(|s| s.active).unwrap_or(0) > 0
            })?;
            let pod = running_job_pods(&pods, job.metadata.name.as_deref()?)
                .await
                .into_iter()
                .next()?;
            Some((job, pod))
        },
    )
    .await
}

/// Creates the app, publishes its image as the agent would, waits for Ready; returns the id.
pub async fn create_and_make_ready(ns: &crate::TestNamespace, app: &CracApp) -> String {
    let name = app.metadata.name.clone().unwrap();
    let apps: Api<CracApp> = ns.api();
    apps.create(&kube::api::PostParams::default(), app)
        .await
        .unwrap();
    let (job, pod) = running_checkpoint(ns, &name).await;
    let id = job.metadata.annotations.unwrap()[crac_api::labels::CHECKPOINT_ID_ANNOTATION].clone();
    end_checkpoint_pod(&ns.api(), &pod, &success(&id)).await;
    crate::wait_for(&format!("{name} to be Ready"), DEADLINE, || async {
        (status_of(&apps, &name).await.phase? == crac_api::cracapp::Phase::Ready).then_some(())
    })
    .await;
    id
}
