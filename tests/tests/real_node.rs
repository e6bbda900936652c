//! The whole chain in real containers, on the real node of `tests/cluster` (node-up: kubelet,
//! containerd, runc, CNI; images built by tests/cluster/images and imported, never pulled).
//! The operator runs in-process against the real API server, as in tests/tests/operator.rs;
//! everything inside a pod is real: the agent image's init container installs the agent and
//! CRIU, the checkpoint Job's container runs `crac-agent checkpoint` on a real JVM and writes
//! the image to a real directory, restore pods restore it, and answer HTTP on their address.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use crac_api::CracApp;
use crac_api::agent::{self as contract, AgentSummary, Outcome};
use crac_api::cracapp::{Phase, ServingMode};
use crac_tests::operator::{start_operator_with, status_of};
use crac_tests::real_node::{
    AGENT_IMAGE, DEADLINE, HELLO_IMAGE, HELLO_IMAGE_2, claim_dir, hello_app, http_get, logs,
    node_ready, ready_restore_pods,
};
use crac_tests::{TestNamespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use std::time::Duration;

async fn setup(prefix: &str) -> TestNamespace {
    let ns = TestNamespace::new(prefix).await;
    crac_tests::install_crds(&ns.client).await;
    node_ready(&ns.client).await;
    ns
}

/// Waits for the app to be Ready with all its replicas; returns the ready pods and addresses.
async fn ready(ns: &TestNamespace, name: &str, replicas: usize) -> Vec<(String, String)> {
    let apps: Api<CracApp> = ns.api();
    let pods: Api<Pod> = ns.api();
    wait_for(
        &format!("{name} Ready with {replicas} restored pods"),
        DEADLINE,
        || async {
            let status = status_of(&apps, name).await;
            if status.phase != Some(Phase::Ready) {
                return None;
            }
            let ready = ready_restore_pods(&pods, name).await;
            (ready.len() == replicas).then_some(ready)
        },
    )
    .await
}

/// Waits for the app's `CheckpointReady=False` with `reason`, and returns that condition.
async fn checkpoint_failed_with(
    apps: &Api<CracApp>,
    app: &str,
    reason: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    wait_for(
        &format!("{app}: CheckpointReady=False, {reason}"),
        DEADLINE,
        || async {
            let status = status_of(apps, app).await;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "CheckpointReady" && c.status == "False" && c.reason == reason)
        },
    )
    .await
}

/// The summary the agent wrote as the termination message of a finished checkpoint pod.
async fn checkpoint_summaries(ns: &TestNamespace, app: &str) -> Vec<AgentSummary> {
    let pods: Api<Pod> = ns.api();
    let selector = format!(
        "{}={app},{}=checkpoint",
        crac_api::labels::APP,
        crac_api::labels::COMPONENT
    );
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    list.items
        .iter()
        .filter_map(|p| {
            let statuses = p.status.as_ref()?.container_statuses.as_ref()?;
            let app = statuses.iter().find(|c| c.name == "app")?;
            let message = app.state.as_ref()?.terminated.as_ref()?.message.as_ref()?;
            serde_json::from_str(message.trim()).ok()
        })
        .collect()
}

/// What the kubelet reported as the app container's image of each checkpoint pod.
async fn checkpoint_image_ids(ns: &TestNamespace, app: &str) -> Vec<String> {
    let pods: Api<Pod> = ns.api();
    let selector = format!(
        "{}={app},{}=checkpoint",
        crac_api::labels::APP,
        crac_api::labels::COMPONENT
    );
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    list.items
        .iter()
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter(|c| c.name == "app")
        .map(|c| c.image_id.clone())
        .collect()
}

#[tokio::test]
async fn hello_app_is_checkpointed_in_a_job_and_restored_in_real_pods() {
    let ns = setup("real-hello").await;
    let _operator = start_operator_with(&ns.client, &ns.name, AGENT_IMAGE);
    let apps: Api<CracApp> = ns.api();
    let pods: Api<Pod> = ns.api();
    apps.create(&PostParams::default(), &hello_app("hello", HELLO_IMAGE))
        .await
        .unwrap();
    let ready = ready(&ns, "hello", 2).await;

    // The checkpoint Job's container really ran the agent: its summary is the one the
    // operator published.
    let summaries = checkpoint_summaries(&ns, "hello").await;
    let summary = summaries
        .iter()
        .find(|s| s.outcome == Some(Outcome::Checkpointed))
        .unwrap_or_else(|| panic!("no checkpoint pod reported a checkpoint: {summaries:?}"));
    let status = status_of(&apps, "hello").await;
    let checkpoint = status.checkpoint.unwrap();
    assert_eq!(
        summary.checkpoint_id.as_deref(),
        Some(checkpoint.id.as_str())
    );
    assert!(
        checkpoint.size_bytes.unwrap_or(0) > 1_000_000,
        "{checkpoint:?}"
    );
    assert!(
        checkpoint.jdk.as_deref().unwrap_or("").starts_with("17"),
        "{checkpoint:?}"
    );
    // The image was restored once inside its checkpoint pod, with the pod's capabilities,
    // before it was published.
    assert!(checkpoint.trial_restore_ms.is_some(), "{checkpoint:?}");
    assert_eq!(checkpoint.trial_restore_ms, summary.trial_restore_ms);

    // The image is on the volume: a real directory on this machine.
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let dir = claim_dir(&claims, "hello-crac-images").await;
    let image = dir.join("hello").join(&checkpoint.id);
    for file in ["metadata.json", "inventory.img"] {
        assert!(
            image.join(file).is_file(),
            "{} missing",
            image.join(file).display()
        );
    }

    // The checkpoint pod ran the tag; the kubelet reported the image's repository digest
    // (node-up imports each image with one), so the restore pods run exactly that image,
    // pinned by digest, and restore on it.
    let pinned = checkpoint.app_image.clone().unwrap_or_default();
    let reported = checkpoint_image_ids(&ns, "hello").await;
    let digest = pinned
        .strip_prefix("crac.dev/test/hello-app@sha256:")
        .unwrap_or_else(|| {
            panic!("not pinned to a digest in the spec's repository: {pinned:?}; the checkpoint pods' imageIDs: {reported:?}")
        });
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{pinned}"
    );
    let deployments: Api<Deployment> = ns.api();
    let template = deployments
        .get("hello")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template;
    assert_eq!(
        template.spec.unwrap().containers[0].image.as_deref(),
        Some(pinned.as_str())
    );

    // Each restore pod restored (not a cold start) and continues the checkpointed counter.
    for (pod, ip) in &ready {
        let spec = pods.get(pod).await.unwrap().spec.unwrap();
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some(pinned.as_str()),
            "{pod}"
        );
        let log = logs(&pods, pod, "app").await;
        assert!(
            log.contains("restored (pid"),
            "{pod} did not restore:\n{log}"
        );
        let (code, body) = http_get(ip, 8080, "/").await.expect("an answer");
        assert_eq!(code, 200);
        assert_eq!(body.trim(), "hello 201", "{pod} at {ip}");
    }
}

#[tokio::test]
async fn a_new_image_rolls_out_while_the_old_pods_serve() {
    let ns = setup("real-rollout").await;
    let _operator = start_operator_with(&ns.client, &ns.name, AGENT_IMAGE);
    let apps: Api<CracApp> = ns.api();
    let pods: Api<Pod> = ns.api();
    apps.create(&PostParams::default(), &hello_app("roll", HELLO_IMAGE))
        .await
        .unwrap();
    let before = ready(&ns, "roll", 2).await;
    let first = status_of(&apps, "roll").await.checkpoint.unwrap();

    // A pod told to stop keeps serving through its preStop sleep, while the removal of its
    // address spreads; without it the agent gets SIGTERM at once and the JVM is gone in
    // well under a second.
    let (stopping, ip) = &before[0];
    pods.delete(stopping, &DeleteParams::default())
        .await
        .unwrap();
    let deleted = tokio::time::Instant::now();
    while deleted.elapsed() < Duration::from_secs(3) {
        let answer = http_get(ip, 8080, "/").await;
        assert!(
            matches!(&answer, Some((200, body)) if body.starts_with("hello ")),
            "{stopping} stopped serving {:?} after it was deleted: {answer:?}",
            deleted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ready(&ns, "roll", 2).await;

    // A merge patch replaces the containers list: send the whole template.
    let body = serde_json::json!({ "spec": { "template": hello_app("roll", HELLO_IMAGE_2).spec.template } });
    apps.patch("roll", &PatchParams::default(), &Patch::Merge(body))
        .await
        .unwrap();

    // Until every ready pod runs the new image, some ready pod answers, every 200 ms.
    let start = tokio::time::Instant::now();
    let mut probes = 0;
    loop {
        let ready = ready_restore_pods(&pods, "roll").await;
        let mut images = Vec::new();
        for (name, _) in &ready {
            let pod = pods.get(name).await.unwrap();
            images.push(pod.spec.unwrap().containers[0].image.clone().unwrap());
        }
        // The new pods run hello-app:2 pinned by digest, the digest its checkpoint pod ran.
        let status = status_of(&apps, "roll").await;
        let rolled = status.checkpoint.as_ref().is_some_and(|c| {
            c.id != first.id
                && c.app_image.is_some()
                && c.app_image != first.app_image
                && images.iter().all(|i| Some(i) == c.app_image.as_ref())
        }) && ready.len() == 2;
        if rolled {
            break;
        }
        let mut answered = false;
        for (_, ip) in &ready {
            if let Some((200, body)) = http_get(ip, 8080, "/").await {
                answered = body.starts_with("hello ");
                if answered {
                    break;
                }
            }
        }
        assert!(
            answered,
            "no ready pod answered during the rollout (after {probes} probes): {ready:?}"
        );
        probes += 1;
        assert!(start.elapsed() < DEADLINE, "the new image did not roll out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        probes > 0,
        "the rollout finished before it could be watched"
    );
    // The new pods restored the new image's checkpoint: its 200 warm-up requests are in the
    // counter (the probes above may have added a few since).
    for (pod, ip) in ready_restore_pods(&pods, "roll").await {
        assert!(logs(&pods, &pod, "app").await.contains("restored (pid"));
        let body = http_get(&ip, 8080, "/").await.unwrap().1;
        let n: u64 = body.trim().trim_start_matches("hello ").parse().unwrap();
        assert!(n > 200, "{pod} answered {body:?}");
    }
}

#[tokio::test]
async fn a_checkpoint_that_fails_in_the_container_is_reported_and_retried_with_backoff() {
    let ns = setup("real-ckpt-fail").await;
    let _operator = start_operator_with(&ns.client, &ns.name, AGENT_IMAGE);
    let apps: Api<CracApp> = ns.api();
    let jobs: Api<Job> = ns.api();
    let mut app = hello_app("never", HELLO_IMAGE);
    // The app never becomes ready: the agent gives up after the checkpoint timeout.
    app.spec.template.spec.as_mut().unwrap().containers[0].readiness_probe = Some(
        serde_json::from_value(
            serde_json::json!({ "httpGet": { "path": "/never", "port": 8080 } }),
        )
        .unwrap(),
    );
    app.spec.checkpoint.timeout = "30s".into();
    apps.create(&PostParams::default(), &app).await.unwrap();

    let condition = checkpoint_failed_with(&apps, "never", "ReadinessTimeout").await;
    assert!(
        condition.message.contains("/never") || condition.message.contains("ready"),
        "{condition:?}"
    );
    // The agent's own summary came out of the container.
    let summaries = checkpoint_summaries(&ns, "never").await;
    assert!(
        summaries.iter().any(|s| s.outcome == Some(Outcome::Failed)
            && s.reason.as_deref() == Some("ReadinessTimeout")),
        "{summaries:?}"
    );

    // Retried, with backoff: over a minute more, a few attempts, not a hot loop.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let attempts = jobs
        .list(&ListParams::default().labels(&format!("{}=checkpoint", crac_api::labels::COMPONENT)))
        .await
        .unwrap()
        .items
        .len();
    let failures = status_of(&apps, "never")
        .await
        .pending_checkpoint
        .map(|p| p.failures)
        .unwrap_or(0);
    assert!(
        failures >= 2,
        "the checkpoint was not retried: {failures} failures"
    );
    // One Event per failure: reconciles during a backoff repeat the same text (the next
    // attempt's time, not a countdown), so they publish nothing new.
    let events = ns
        .event_reasons()
        .await
        .into_iter()
        .filter(|r| r == "ReadinessTimeout")
        .count();
    assert!(
        events >= 1 && events <= failures as usize + 1,
        "{events} ReadinessTimeout Events for {failures} failures"
    );
    assert!(
        attempts <= 6,
        "{attempts} checkpoint Jobs in ~90 s: no backoff"
    );
}

#[tokio::test]
async fn an_image_that_fails_its_trial_restore_is_never_rolled_out() {
    let ns = setup("real-trial").await;
    let _operator = start_operator_with(&ns.client, &ns.name, AGENT_IMAGE);
    let apps: Api<CracApp> = ns.api();
    let mut app = hello_app("trial", HELLO_IMAGE);
    // The last warm-up request arms hello-app to exit on its next readiness check: the dump
    // succeeds, and the image's JVM exits as soon as its trial restore asks whether it is ready.
    app.spec.checkpoint.warmup.requests = serde_json::from_value(serde_json::json!([
        { "path": "/", "count": 5 },
        { "path": "/exit-on-next-ready", "count": 1 }
    ]))
    .unwrap();
    apps.create(&PostParams::default(), &app).await.unwrap();

    let condition = checkpoint_failed_with(&apps, "trial", "TrialRestoreFailed").await;
    assert!(condition.message.contains("JvmExited"), "{condition:?}");
    // Nothing was published, so nothing restores from it: no image, no restore pods.
    let status = status_of(&apps, "trial").await;
    assert_eq!(status.checkpoint, None, "{status:?}");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = ns.api();
    assert!(deployments.get_opt("trial").await.unwrap().is_none());
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let dir = claim_dir(&claims, "trial-crac-images").await.join("trial");
    let published: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(published.is_empty(), "{published:?} in {}", dir.display());
}

#[tokio::test]
async fn a_restore_that_fails_in_the_container_falls_back_to_a_cold_start() {
    let ns = setup("real-fallback").await;
    let _operator = start_operator_with(&ns.client, &ns.name, AGENT_IMAGE);
    let apps: Api<CracApp> = ns.api();
    let pods: Api<Pod> = ns.api();
    let mut app = hello_app("fall", HELLO_IMAGE);
    app.spec.replicas = 1;
    apps.create(&PostParams::default(), &app).await.unwrap();
    let ready_before = ready(&ns, "fall", 1).await;
    let id = status_of(&apps, "fall").await.checkpoint.unwrap().id;

    // Rewrite the published image on the volume the way another app sharing it could: a pages
    // file and, consistently, its size and sha256 in metadata.json. Then replace the pod: the
    // new pod's agent checks the metadata against the digest in its own spec, refuses the
    // image and starts the JVM cold instead.
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let image = claim_dir(&claims, "fall-crac-images")
        .await
        .join("fall")
        .join(&id);
    let pages = std::fs::read_dir(&image)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages image");
    let mut bytes = std::fs::read(&pages).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b ^= 0xff;
    }
    std::fs::write(&pages, &bytes).unwrap();
    let metadata_path = image.join(contract::METADATA_FILE);
    let mut metadata: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metadata_path).unwrap()).unwrap();
    let name = pages.file_name().unwrap().to_string_lossy().to_string();
    metadata["files"][&name]["sha256"] = sha256_hex(&bytes).into();
    std::fs::write(&metadata_path, serde_json::to_vec(&metadata).unwrap()).unwrap();
    pods.delete(&ready_before[0].0, &DeleteParams::default())
        .await
        .unwrap();

    let (pod, ip) = wait_for("a replacement pod, ready", DEADLINE, || async {
        ready_restore_pods(&pods, "fall")
            .await
            .into_iter()
            .find(|(name, _)| *name != ready_before[0].0)
    })
    .await;
    let log = logs(&pods, &pod, "app").await;
    assert!(log.contains("restore failed"), "{log}");
    assert!(log.contains("ImageNotTrusted"), "{log}");
    // Cold: the counter starts again.
    assert_eq!(http_get(&ip, 8080, "/").await.unwrap().1.trim(), "hello 1");
    // The operator asked the pod's agent how it started, and counted it against the image
    // (1 of the default 3 before a new checkpoint), with the agent's reason in the Event.
    let counted = wait_for(
        "the cold start counted against the image",
        DEADLINE,
        || async {
            let image = status_of(&apps, "fall").await.checkpoint?;
            (!image.cold_started_pods.is_empty()).then_some(image.cold_started_pods)
        },
    )
    .await;
    assert_eq!(counted, std::slice::from_ref(&pod));
    let events: Api<k8s_openapi::api::core::v1::Event> = ns.api();
    let fell_back = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("RestoreFellBack"))
        .expect("a RestoreFellBack Event");
    let note = fell_back.message.unwrap_or_default();
    assert!(
        note.contains(&pod) && note.contains("ImageNotTrusted"),
        "{note}"
    );
}

#[tokio::test]
async fn deleting_an_app_on_a_shared_claim_runs_the_cleanup_job_and_its_images_are_gone() {
    let ns = setup("real-cleanup").await;
    let _operator = start_operator_with(&ns.client, &ns.name, AGENT_IMAGE);
    let apps: Api<CracApp> = ns.api();
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "shared" },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": crac_tests::real_node::STORAGE_CLASS,
            "resources": { "requests": { "storage": "1Gi" } }
        }
    }))
    .unwrap();
    claims.create(&PostParams::default(), &claim).await.unwrap();
    let mut app = hello_app("tidy", HELLO_IMAGE);
    app.spec.replicas = 1;
    app.spec.checkpoint.storage.existing_claim = Some("shared".into());
    app.spec.checkpoint.storage.storage_class_name = None;
    apps.create(&PostParams::default(), &app).await.unwrap();
    ready(&ns, "tidy", 1).await;
    let app_dir = claim_dir(&claims, "shared").await.join("tidy");
    assert!(app_dir.is_dir(), "{} missing", app_dir.display());

    apps.delete("tidy", &DeleteParams::default()).await.unwrap();
    wait_for("the CracApp to be gone", DEADLINE, || async {
        apps.get_opt("tidy").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(!app_dir.exists(), "{} still there", app_dir.display());
    // The claim stays: it is not the app's.
    assert!(claims.get_opt("shared").await.unwrap().is_some());
}

/// Uninstalls the real-node release however the test ends (the kwok install test installs the
/// same release name with its own values).
struct Uninstall;

impl Drop for Uninstall {
    fn drop(&mut self) {
        // The components' logs outlive their pods, for whoever reads a failure.
        let logs = crac_tests::repo_root().join("target/cluster/logs");
        for name in ["crac-operator", "crac-activator"] {
            let out = crac_tests::kubectl(&["-n", SYSTEM_NS, "logs", &format!("deploy/{name}")]);
            let _ = std::fs::write(logs.join(format!("chart-{name}.log")), out.stdout);
        }
        let _ = helm(&[
            "uninstall",
            "crac-operator",
            "--namespace",
            SYSTEM_NS,
            "--wait",
        ]);
    }
}

const SYSTEM_NS: &str = "crac-system";

fn helm(args: &[&str]) -> std::process::Output {
    let kubeconfig = crac_tests::kubeconfig_path().display().to_string();
    std::process::Command::new(crac_tests::repo_root().join("scripts/helm"))
        .args(args)
        .args(["--kubeconfig", &kubeconfig])
        .output()
        .expect("run scripts/helm")
}

/// `helm install` onto the real node: the operator and the activator run as real pods from
/// their images under the chart's ServiceAccounts, take hello-app to Ready, put it to sleep,
/// and a request at zero is held by the activator pod, wakes the app and is answered.
#[tokio::test]
async fn the_chart_runs_operator_and_activator_pods_that_sleep_and_wake_an_app() {
    let ns = setup("real-helm").await;
    // The app's namespace opts in to the chart's pod-security policy, as docs/install.md tells
    // platform teams to: the real checkpoint and restore pods must pass it.
    let opt_in = serde_json::json!({ "metadata": { "labels": {
        "pod-security.kubernetes.io/enforce": "privileged",
        "crac.dev/pod-security": "enforce",
    } } });
    Api::<k8s_openapi::api::core::v1::Namespace>::all(ns.client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&opt_in))
        .await
        .unwrap();
    let _uninstall = Uninstall;
    let out = helm(&[
        "upgrade",
        "--install",
        "crac-operator",
        &crac_tests::repo_root()
            .join("charts/crac-operator")
            .display()
            .to_string(),
        "--namespace",
        SYSTEM_NS,
        "--create-namespace",
        "--values",
        &crac_tests::repo_root()
            .join("tests/cluster/node-values.yaml")
            .display()
            .to_string(),
        "--set",
        &format!("operator.watchNamespace={}", ns.name),
        "--wait",
        "--timeout",
        "4m",
    ]);
    assert!(
        out.status.success(),
        "helm install failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The components really run on the real node, under the chart's ServiceAccounts.
    let system: Api<Pod> = Api::namespaced(ns.client.clone(), SYSTEM_NS);
    for name in ["crac-operator", "crac-activator"] {
        let list = system
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={name}")))
            .await
            .unwrap();
        let pod = list
            .items
            .first()
            .unwrap_or_else(|| panic!("no {name} pod"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("crac-real-node"), "{name}");
        assert_eq!(spec.service_account_name.as_deref(), Some(name));
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"), "{name}");
    }

    let apps: Api<CracApp> = ns.api();
    let mut app = hello_app("nap", HELLO_IMAGE);
    app.spec.replicas = 1;
    app.spec.scale_to_zero = Some(asked_to_sleep_only(None));
    apps.create(&PostParams::default(), &app).await.unwrap();
    ready(&ns, "nap", 1).await;

    // Asked to sleep (as `kubectl crac sleep` does): drained and scaled to zero, the Service's
    // endpoints now the activator pod.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({ "metadata": { "annotations": {
        crac_api::labels::SLEEP_REQUESTED_AT: now } } });
    apps.patch("nap", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    wait_for("the app asleep", DEADLINE, || async {
        (status_of(&apps, "nap").await.phase? == Phase::ScaledToZero).then_some(())
    })
    .await;
    let pods: Api<Pod> = ns.api();
    wait_for("its pods gone", DEADLINE, || async {
        let selector = format!(
            "{}=nap,{}=restore",
            crac_api::labels::APP,
            crac_api::labels::COMPONENT
        );
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    let activator_ip = system
        .list(&ListParams::default().labels("app.kubernetes.io/name=crac-activator"))
        .await
        .unwrap()
        .items[0]
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .clone()
        .unwrap();
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = ns.api();
    let port = wait_for(
        "the Service's endpoints at the activator",
        DEADLINE,
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=nap"))
                .await
                .ok()?;
            list.items.iter().find_map(|s| {
                let at_activator = s
                    .endpoints
                    .iter()
                    .flatten()
                    .any(|e| e.addresses.contains(&activator_ip));
                let port = s.ports.as_ref()?.first()?.port?;
                at_activator.then_some(port)
            })
        },
    )
    .await;

    // A request at zero, where a caller of the Service is sent: held, the app woken by
    // restoring, the request answered by the restored JVM.
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(90),
        crac_tests::real_node::http_get_waiting(&activator_ip, port as u16, "/"),
    )
    .await
    .expect("the held request was answered within the wake timeout");
    let (code, body) = answer.expect("an answer");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body.trim(), "hello 201", "answered by a restored JVM");
    let status = wait_for("the app awake again", DEADLINE, || async {
        let s = status_of(&apps, "nap").await;
        (s.phase? == Phase::Ready).then_some(status_of(&apps, "nap").await)
    })
    .await;
    assert!(status.last_wake.is_some(), "the wake is recorded");
    eprintln!("request at zero answered in {:?}", started.elapsed());
    // The operator pod asked the woken pod's agent how it started: the wake's split.
    let wake = wait_for("the wake's split in the status", DEADLINE, || async {
        let wake = status_of(&apps, "nap").await.last_wake?;
        wake.outcome.is_some().then_some(wake)
    })
    .await;
    assert_eq!(wake.outcome.as_deref(), Some("restored"), "{wake:?}");
    assert!(wake.restore_ms.is_some_and(|ms| ms > 0), "{wake:?}");

    sleeping_in_place(&ns, &activator_ip).await;
}

/// Scale to zero that the tests drive (idle for half an hour first: the app sleeps when asked),
/// in `mode`.
fn asked_to_sleep_only(
    mode: Option<crac_api::cracapp::SleepMode>,
) -> crac_api::cracapp::ScaleToZeroSpec {
    crac_api::cracapp::ScaleToZeroSpec {
        enabled: Some(true),
        caller_namespaces: Vec::new(),
        idle_after: Some("30m".into()),
        wake_timeout: Some("60s".into()),
        mode,
    }
}

/// Asks an app to sleep now, as `kubectl crac sleep` does.
async fn ask_to_sleep(apps: &Api<CracApp>, name: &str) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({ "metadata": { "annotations": {
        crac_api::labels::SLEEP_REQUESTED_AT: now } } });
    apps.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// The one restore pod of `app`, once it is marked asleep in place (or, `asleep: false`, once
/// it is Ready and unmarked).
async fn the_pod(pods: &Api<Pod>, app: &str, asleep: bool) -> Pod {
    let selector = format!(
        "{}={app},{}=restore",
        crac_api::labels::APP,
        crac_api::labels::COMPONENT
    );
    wait_for(
        &format!(
            "{app}'s pod {}",
            if asleep {
                "asleep in place"
            } else {
                "awake and Ready"
            }
        ),
        DEADLINE,
        || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            let live: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let [pod] = live.as_slice() else { return None };
            let marked = pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(crac_api::labels::ASLEEP_IN_PLACE_SINCE));
            let ready = pod
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let wanted = if asleep { marked } else { ready && !marked };
            wanted.then(|| pod.clone())
        },
    )
    .await
}

fn app_requests(pod: &Pod) -> (Option<String>, Option<String>) {
    let c = &pod.spec.as_ref().unwrap().containers;
    let app = c.iter().find(|c| c.name == "app").unwrap();
    let requests = app
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    (
        requests.get("memory").map(|q| q.0.clone()),
        app.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .map(|q| q.0.clone()),
    )
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "app"))
        .map_or(-1, |c| c.restart_count)
}

/// What the pod's agent says of it (`GET /activity` on its port).
async fn agent_mode(ip: &str) -> String {
    let (code, body) =
        crac_tests::real_node::http_get(ip, contract::DEFAULT_ACTIVITY_PORT, "/activity")
            .await
            .expect("the agent answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["mode"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The app's activator port, from its status.
async fn activator_port(apps: &Api<CracApp>, app: &str) -> u16 {
    wait_for("the app's activator port", DEADLINE, || async {
        let s = status_of(apps, app).await;
        s.activator_ports.first().map(|p| p.activator_port as u16)
    })
    .await
}

/// A request through the activator, as a caller of the sleeping app's Service would send it.
async fn through_the_activator(activator_ip: &str, port: u16) -> (u16, String, Duration) {
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(90),
        crac_tests::real_node::http_get_waiting(activator_ip, port, "/"),
    )
    .await
    .expect("the held request was answered within the wake timeout")
    .expect("an answer");
    (answer.0, answer.1, started.elapsed())
}

/// `scaleToZero.mode: InPlace` on the real node, under the chart's operator and activator:
/// asleep, the pod stays (same UID, no restart) with only its agent, its requests shrunk in
/// place; a request at zero is answered by the JVM restored inside it; a request racing the
/// sleep (the pod still listed Ready, its JVM gone) is answered the same way; a pod replaced
/// while the app sleeps is put to sleep too; and a wake whose image is gone starts the JVM cold
/// in place.
async fn sleeping_in_place(ns: &TestNamespace, activator_ip: &str) {
    let apps: Api<CracApp> = ns.api();
    let pods: Api<Pod> = ns.api();
    let mut app = hello_app("doze", HELLO_IMAGE);
    app.spec.replicas = 1;
    app.spec.scale_to_zero = Some(asked_to_sleep_only(Some(
        crac_api::cracapp::SleepMode::InPlace,
    )));
    apps.create(&PostParams::default(), &app).await.unwrap();
    let (name, ip) = ready(ns, "doze", 1).await.remove(0);
    assert_eq!(
        status_of(&apps, "doze").await.sleep_mode,
        Some(crac_api::cracapp::SleepMode::InPlace)
    );
    let awake = the_pod(&pods, "doze", false).await;
    assert_eq!(
        app_requests(&awake).0.as_deref(),
        Some("256Mi"),
        "requests default to limits"
    );
    let uid = awake.metadata.uid.clone().unwrap();
    let port = activator_port(&apps, "doze").await;

    // Asleep: the same pod, its JVM gone, its agent answering, its requests shrunk (limits
    // untouched), and its app port refusing.
    ask_to_sleep(&apps, "doze").await;
    let asleep = the_pod(&pods, "doze", true).await;
    assert_eq!(
        asleep.metadata.uid.as_deref(),
        Some(uid.as_str()),
        "the pod stays"
    );
    assert_eq!(restarts(&asleep), 0);
    assert_eq!(agent_mode(&ip).await, "sleeping");
    let shrunk = wait_for("the sleeping pod's requests shrunk", DEADLINE, || async {
        let p = pods.get(&name).await.ok()?;
        (app_requests(&p).0.as_deref() == Some("16Mi")).then_some(p)
    })
    .await;
    assert_eq!(
        app_requests(&shrunk).1.as_deref(),
        Some("256Mi"),
        "limits unchanged"
    );
    assert!(
        crac_tests::real_node::http_get(&ip, 8080, "/")
            .await
            .is_none(),
        "nothing listens on the app's port while it sleeps"
    );
    wait_for("the app asleep", DEADLINE, || async {
        (status_of(&apps, "doze").await.phase? == Phase::ScaledToZero).then_some(())
    })
    .await;

    // A request at zero: the activator wakes the pod where it is.
    let (code, body, took) = through_the_activator(activator_ip, port).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body.trim(),
        "hello 201",
        "answered by a JVM restored in place"
    );
    eprintln!("in place: request at zero answered in {took:?}");
    let woken = the_pod(&pods, "doze", false).await;
    assert_eq!(
        woken.metadata.uid.as_deref(),
        Some(uid.as_str()),
        "woken in the same pod"
    );
    assert_eq!(restarts(&woken), 0, "no container restart");
    wait_for("the woken pod grown back", DEADLINE, || async {
        let p = pods.get(&name).await.ok()?;
        (app_requests(&p).0.as_deref() == Some("256Mi")).then_some(())
    })
    .await;
    // Awake on its pods again, the wake recorded (the phase alone may say Ready a moment
    // earlier: the kubelet may not have seen the pod sleep at all).
    let status = wait_for("the app awake on its pods again", DEADLINE, || async {
        let s = status_of(&apps, "doze").await;
        (s.phase? == Phase::Ready && s.serving_mode? == ServingMode::Pods).then_some(s)
    })
    .await;
    let first_wake = status.last_wake.expect("the wake is recorded").at;

    // A request racing the sleep: sent the moment the app is recorded asleep, while the pod is
    // still listed Ready (the kubelet probes every 10 s) and its JVM is already gone.
    ask_to_sleep(&apps, "doze").await;
    wait_for("the app asleep again", DEADLINE, || async {
        status_of(&apps, "doze").await.slept_at.map(|_| ())
    })
    .await;
    let (code, body, took) = through_the_activator(activator_ip, port).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body.trim(), "hello 201", "{body}");
    eprintln!("in place: request racing the sleep answered in {took:?}");
    let woken = the_pod(&pods, "doze", false).await;
    assert_eq!(woken.metadata.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(restarts(&woken), 0);
    wait_for(
        "the app awake on its pods after the race",
        DEADLINE,
        || async {
            let s = status_of(&apps, "doze").await;
            let woke = s.last_wake?.at;
            (s.phase? == Phase::Ready && s.serving_mode? == ServingMode::Pods && woke > first_wake)
                .then_some(())
        },
    )
    .await;

    // A pod replaced while the app sleeps (evicted, its node drained) restores at start, and
    // is put to sleep as well.
    ask_to_sleep(&apps, "doze").await;
    the_pod(&pods, "doze", true).await;
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    let replacement = wait_for("the replacement asleep in place", DEADLINE, || async {
        let p = the_pod(&pods, "doze", true).await;
        (p.metadata.name.as_deref() != Some(name.as_str())).then_some(p)
    })
    .await;
    let replacement_ip = replacement.status.as_ref().unwrap().pod_ip.clone().unwrap();
    assert_eq!(agent_mode(&replacement_ip).await, "sleeping");

    // The image gone while the app sleeps: the wake cannot restore, and the JVM starts cold in
    // place (fallback: ColdStart), still answering the held request.
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let dir = claim_dir(&claims, "doze-crac-images").await;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path()).unwrap();
        }
    }
    let (code, body, _) = through_the_activator(activator_ip, port).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body.trim(), "hello 1", "a cold JVM answers: {body}");
    let woken = the_pod(&pods, "doze", false).await;
    assert_eq!(
        woken.metadata.uid, replacement.metadata.uid,
        "still in place"
    );
    assert_eq!(agent_mode(&replacement_ip).await, "coldStarted");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
