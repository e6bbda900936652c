//! The operator against the real control plane: checkpoint Job, restore rollout, spec
//! changes, failures, validation by the API server, restarts and deletion. The operator runs
//! in-process, scoped to each test's namespace; a test plays the agent's part in checkpoint
//! pods (no kubelet runs containers here).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use crac_api::CracApp;
use crac_api::agent as contract;
use crac_api::labels;
use crac_tests::operator::{
    AGENT_IMAGE, STAND_IN_DIGEST, create_and_make_ready, end_checkpoint_pod,
    end_checkpoint_pod_reporting, example_app, failure, running_checkpoint, running_job_pods,
    start_operator, status_of, success,
};
use crac_tests::{TestNamespace, install_crds, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

async fn setup(prefix: &str) -> TestNamespace {
    let ns = TestNamespace::new(prefix).await;
    install_crds(&ns.client).await;
    ns
}

fn condition<'a>(
    status: &'a crac_api::CracAppStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[tokio::test]
async fn create_checkpoints_then_rolls_out_restore_pods_to_ready() {
    let ns = setup("op-create").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    // On the node whose pods get addresses an EndpointSlice accepts (see tests/cluster/up).
    let mut app = example_app("demo", "demo:1");
    let pod = app.spec.template.spec.as_mut().unwrap();
    pod.node_selector = Some(
        [(
            "crac.dev/pod-addresses".to_string(),
            "unroutable".to_string(),
        )]
        .into(),
    );
    pod.tolerations =
        Some(vec![serde_json::from_value(serde_json::json!({
        "key": "crac.dev/unroutable-pod-addresses", "operator": "Exists", "effect": "NoSchedule"
    }))
    .unwrap()]);
    // Nothing may dial those addresses: the operator asks no agent how its pod started.
    app.spec.restore.recheckpoint_after_cold_starts = 0;
    apps.create(&PostParams::default(), &app).await.unwrap();

    // The claim and the checkpoint Job look as specified.
    let (job, pod) = running_checkpoint(&ns, "demo").await;
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let claim = claims.get("demo-crac-images").await.unwrap();
    assert_eq!(
        claim.spec.unwrap().resources.unwrap().requests.unwrap()["storage"].0,
        "2Gi",
        "the schema's default size"
    );
    let spec = job.spec.clone().unwrap();
    assert_eq!(
        spec.active_deadline_seconds,
        Some(600 + 120),
        "from the default 10m timeout"
    );
    let pod_spec = spec.template.spec.unwrap();
    let app = &pod_spec.containers[0];
    assert_eq!(
        app.command.as_ref().unwrap()[..5],
        [contract::AGENT_BIN, "checkpoint", "--", "java", "-jar"]
    );
    let caps = app
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(
        caps.add.as_ref().unwrap(),
        &["CHECKPOINT_RESTORE", "SYS_PTRACE"]
    );
    assert_eq!(
        pod_spec.init_containers.unwrap()[0].image.as_deref(),
        Some(AGENT_IMAGE)
    );
    let id = job.metadata.annotations.unwrap()[labels::CHECKPOINT_ID_ANNOTATION].clone();
    // The status is written after the Job is created: wait for it rather than race it.
    wait_for("phase Checkpointing", DEADLINE, || async {
        (status_of(&apps, "demo").await.phase? == crac_api::cracapp::Phase::Checkpointing)
            .then_some(())
    })
    .await;

    // The agent publishes the image; the restore Deployment rolls out and becomes Ready.
    end_checkpoint_pod(&ns.api(), &pod, &success(&id)).await;
    wait_for("demo to be Ready", DEADLINE, || async {
        let s = status_of(&apps, "demo").await;
        (s.phase? == crac_api::cracapp::Phase::Ready && s.ready_replicas == 2).then_some(())
    })
    .await;
    let status = status_of(&apps, "demo").await;
    let image = status.checkpoint.clone().unwrap();
    assert_eq!(image.id, id);
    assert_eq!(
        image.size_bytes,
        Some(59_000_000),
        "read from the agent's summary"
    );
    assert_eq!(image.jdk.as_deref(), Some("17.0.15"));
    assert_eq!(image.digest.as_deref(), Some(STAND_IN_DIGEST));
    assert_eq!(
        condition(&status, "CheckpointReady").unwrap().status,
        "True"
    );
    assert_eq!(condition(&status, "Available").unwrap().status, "True");
    assert_eq!(status.observed_generation, Some(1));

    let deployments: Api<Deployment> = ns.api();
    let d = deployments.get("demo").await.unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.containers[0].command.as_ref().unwrap()[1], "restore");
    let digest = pod.containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == contract::ENV_IMAGE_DIGEST);
    assert_eq!(
        digest.and_then(|e| e.value.as_deref()),
        Some(STAND_IN_DIGEST),
        "restore pods verify the image against the digest the status records"
    );
    let images = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "crac-images")
        .unwrap();
    assert_eq!(
        images.persistent_volume_claim.unwrap().read_only,
        Some(true)
    );

    // The Service has no selector; its slice lists the two ready pods' addresses.
    let services: Api<Service> = ns.api();
    assert!(
        services
            .get("demo")
            .await
            .unwrap()
            .spec
            .unwrap()
            .selector
            .is_none()
    );
    let slices: Api<EndpointSlice> = ns.api();
    let slice = wait_for("the slice to list both pods", DEADLINE, || async {
        let s = slices.get("demo-crac").await.ok()?;
        (s.endpoints.as_ref()?.len() == 2).then_some(s)
    })
    .await;
    let pods: Api<Pod> = ns.api();
    let mut pod_ips: Vec<String> = pods
        .list(
            &ListParams::default().labels("crac.dev/app=demo,app.kubernetes.io/component=restore"),
        )
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.status?.pod_ip)
        .collect();
    pod_ips.sort();
    let slice_ips: Vec<String> = slice
        .endpoints
        .unwrap()
        .into_iter()
        .map(|e| e.addresses[0].clone())
        .collect();
    assert_eq!(
        slice_ips, pod_ips,
        "the slice lists exactly the ready restore pods"
    );

    // Events tell the story.
    let reasons = ns.event_reasons().await;
    for expected in ["Checkpointing", "CheckpointPublished", "PodsReady"] {
        assert!(
            reasons.iter().any(|r| r == expected),
            "no {expected} Event in {reasons:?}"
        );
    }

    // The checkpoint's transitions happen once and are told once: a reconcile working from a
    // status the operator already replaced would publish them again (the Event's series count
    // would go up).
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    for e in events.list(&ListParams::default()).await.unwrap() {
        let reason = e.reason.as_deref().unwrap_or_default();
        if e.reporting_controller.as_deref() == Some(labels::MANAGER)
            && ["Checkpointing", "CheckpointPublished"].contains(&reason)
        {
            assert!(
                e.series.is_none(),
                "{:?} published more than once",
                e.reason
            );
        }
    }

    // A second look changes nothing: no status write when nothing changed.
    let rv = apps.get("demo").await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        apps.get("demo").await.unwrap().metadata.resource_version,
        rv
    );
}

#[tokio::test]
async fn spec_change_takes_a_new_checkpoint_while_old_pods_keep_serving() {
    let ns = setup("op-change").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let first = create_and_make_ready(&ns, &example_app("shop", "shop:1")).await;

    // A change that shapes the JVM's memory: a new image.
    let apps: Api<CracApp> = ns.api();
    let patch = serde_json::json!({ "spec": { "template": { "spec": { "containers": [{
        "name": "app", "image": "shop:2", "command": ["java", "-jar", "/app/app.jar"],
        "ports": [{ "containerPort": 8080, "name": "http" }] }] } } } });
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let (job, pod) = running_checkpoint(&ns, "shop").await;
    let second = job.metadata.annotations.unwrap()[labels::CHECKPOINT_ID_ANNOTATION].clone();
    assert_ne!(first, second, "the image is part of the checkpoint id");

    // Meanwhile the pods stay on the first image and template.
    let deployments: Api<Deployment> = ns.api();
    let d = deployments.get("shop").await.unwrap();
    let template = d.spec.unwrap().template;
    assert_eq!(
        template.metadata.unwrap().annotations.unwrap()[labels::CHECKPOINT_ID_ANNOTATION],
        first
    );
    assert_eq!(
        template.spec.unwrap().containers[0].image.as_deref(),
        Some("shop:1")
    );
    // The status is written just after the Job is created: wait for it rather than race it.
    let status = wait_for("CheckpointReady: Checkpointing", DEADLINE, || async {
        let s = status_of(&apps, "shop").await;
        (condition(&s, "CheckpointReady")?.reason == "Checkpointing").then_some(s)
    })
    .await;
    assert_eq!(
        status.phase,
        Some(crac_api::cracapp::Phase::Ready),
        "still serving"
    );

    // Once the new image is published, the Deployment moves to it.
    end_checkpoint_pod(&ns.api(), &pod, &success(&second)).await;
    wait_for(
        "the Deployment to restore the second image",
        DEADLINE,
        || async {
            let d = deployments.get("shop").await.ok()?;
            let t = d.spec?.template;
            let on_second = t.metadata?.annotations?[labels::CHECKPOINT_ID_ANNOTATION] == second;
            (on_second && t.spec?.containers[0].image.as_deref() == Some("shop:2")).then_some(())
        },
    )
    .await;
    wait_for(
        "the app to be Ready on the second image",
        DEADLINE,
        || async {
            let s = status_of(&apps, "shop").await;
            (s.checkpoint?.id == second && s.phase? == crac_api::cracapp::Phase::Ready)
                .then_some(())
        },
    )
    .await;

    // A change that does not shape memory needs no checkpoint.
    let jobs_before = ns
        .api::<Job>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    apps.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "replicas": 3 } })),
    )
    .await
    .unwrap();
    wait_for("3 replicas", DEADLINE, || async {
        let d = deployments.get("shop").await.ok()?;
        (d.spec?.replicas? == 3).then_some(())
    })
    .await;
    let jobs_after = ns
        .api::<Job>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(
        jobs_before, jobs_after,
        "replicas is not part of the checkpoint id"
    );
}

/// The image the app container of restore pods runs: `image` of the Deployment's template.
async fn restore_image(deployments: &Api<Deployment>, app: &str) -> Option<String> {
    let d = deployments.get(app).await.ok()?;
    d.spec?.template.spec?.containers[0].image.clone()
}

/// Issue 16: restore pods run the container image the checkpoint pod ran, pinned by the digest
/// the kubelet reported for it, in the spec's own repository; a new checkpoint of the same
/// tag (`kubectl crac checkpoint` after the tag was pushed again) moves them to the new
/// digest; an `imageID` that is no repository digest (a config digest, anything forged)
/// leaves them on the tag.
#[tokio::test]
async fn restore_pods_run_the_checkpointed_image_pinned_by_digest() {
    let ns = setup("op-pinned").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));

    // Checkpointed, then ended with `imageID` as the kubelet reports it for `image`; returns
    // the checkpoint id.
    let checkpoint_reporting = |app: &'static str, image_id: String| {
        let ns = &ns;
        async move {
            let (job, pod) = running_checkpoint(ns, app).await;
            let id = job.metadata.annotations.unwrap()[labels::CHECKPOINT_ID_ANNOTATION].clone();
            end_checkpoint_pod_reporting(&ns.api(), &pod, &success(&id), &image_id).await;
            id
        }
    };

    let tag = "reg.example:5000/team/shop:1";
    apps.create(&PostParams::default(), &example_app("pinned", tag))
        .await
        .unwrap();
    let first = checkpoint_reporting(
        "pinned",
        format!("reg.example:5000/team/shop@{}", digest('a')),
    )
    .await;
    let pinned = format!("reg.example:5000/team/shop@{}", digest('a'));
    // The Deployment is applied before the status is written: wait for both.
    let image = wait_for("the pods to run the pinned image", DEADLINE, || async {
        let image = status_of(&apps, "pinned").await.checkpoint?;
        (restore_image(&deployments, "pinned").await? == pinned).then_some(image)
    })
    .await;
    assert_eq!(image.id, first);
    assert_eq!(image.app_image.as_deref(), Some(pinned.as_str()));

    // The tag was pushed again; a checkpoint asked for by hand runs the tag anew and its pod
    // reports the new digest (the way docker's runtime writes it): the pods follow.
    let request = serde_json::json!({ "metadata": { "annotations": {
        labels::CHECKPOINT_REQUESTED_AT: "2027-01-15T08:00:00Z" } } });
    apps.patch("pinned", &PatchParams::default(), &Patch::Merge(request))
        .await
        .unwrap();
    let second = checkpoint_reporting(
        "pinned",
        format!(
            "docker-pullable://reg.example:5000/team/shop@{}",
            digest('b')
        ),
    )
    .await;
    assert_ne!(first, second);
    let repinned = format!("reg.example:5000/team/shop@{}", digest('b'));
    // The Deployment is applied before the status is written: wait for both.
    let image = wait_for("the pods to run the new digest", DEADLINE, || async {
        let image = status_of(&apps, "pinned").await.checkpoint?;
        (restore_image(&deployments, "pinned").await? == repinned && image.id == second)
            .then_some(image)
    })
    .await;
    assert_eq!(
        (image.id.as_str(), image.app_image.as_deref()),
        (second.as_str(), Some(repinned.as_str()))
    );

    // A config digest (an image with no repository digest: kwok, `ctr import`) and a forged
    // value: published all the same, on the tag, with nothing recorded.
    for (app, image_id) in [
        ("config-digest", digest('c')),
        (
            "forged",
            format!("shop@sha256:{} --privileged", "d".repeat(64)),
        ),
    ] {
        apps.create(&PostParams::default(), &example_app(app, "shop:1"))
            .await
            .unwrap();
        let id = checkpoint_reporting(app, image_id).await;
        let status = wait_for(&format!("{app} to be Ready"), DEADLINE, || async {
            let s = status_of(&apps, app).await;
            (s.phase? == crac_api::cracapp::Phase::Ready).then_some(s)
        })
        .await;
        let image = status.checkpoint.unwrap();
        assert_eq!((image.id.as_str(), image.app_image), (id.as_str(), None));
        assert_eq!(
            restore_image(&deployments, app).await.as_deref(),
            Some("shop:1")
        );
    }
}

/// Issue 15: a checkpoint Job of a spec that changed before it ended is deleted (with its pod),
/// so it cannot publish late and prune the new spec's image; the new Job runs and the app ends
/// Ready on the new image. Each Job tells its agent the spec generation it was made for.
#[tokio::test]
async fn a_spec_change_deletes_the_superseded_checkpoint_job() {
    let ns = setup("op-supersede").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();
    apps.create(&PostParams::default(), &example_app("shop", "shop:1"))
        .await
        .unwrap();
    let (old_job, old_pod) = running_checkpoint(&ns, "shop").await;
    let old_id =
        old_job.metadata.annotations.clone().unwrap()[labels::CHECKPOINT_ID_ANNOTATION].clone();
    let generation_of = |job: &Job| {
        let pod = job.spec.clone()?.template.spec?;
        let app = pod.containers.into_iter().find(|c| c.name == "app")?;
        app.env?
            .into_iter()
            .find(|e| e.name == contract::ENV_SPEC_GENERATION)?
            .value
    };
    assert_eq!(generation_of(&old_job).as_deref(), Some("1"));

    // An env var shapes the JVM's memory: a new checkpoint id, while the first Job still runs.
    let patch = serde_json::json!({ "spec": { "template": { "spec": { "containers": [{
        "name": "app", "image": "shop:1", "command": ["java", "-jar", "/app/app.jar"],
        "env": [{ "name": "FEATURE", "value": "on" }],
        "ports": [{ "containerPort": 8080, "name": "http" }] }] } } } });
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();

    let (new_job, new_pod) = wait_for("the new spec's checkpoint pod", DEADLINE, || async {
        let list = jobs
            .list(&ListParams::default().labels(&format!("{}=checkpoint", labels::COMPONENT)))
            .await
            .ok()?;
        let job = list.items.into_iter().find(|j| {
            j.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a[labels::CHECKPOINT_ID_ANNOTATION] != old_id)
        })?;
        let pod = running_job_pods(&pods, job.metadata.name.as_deref()?)
            .await
            .into_iter()
            .next()?;
        Some((job, pod))
    })
    .await;
    let new_id =
        new_job.metadata.annotations.clone().unwrap()[labels::CHECKPOINT_ID_ANNOTATION].clone();
    assert_eq!(generation_of(&new_job).as_deref(), Some("2"));

    // The superseded Job is deleted, and its pod with it (background propagation: a Job's
    // own default would orphan the pod, whose agent would then publish and prune).
    let old_name = old_job.name_any();
    wait_for("the superseded Job deleted", DEADLINE, || async {
        let found = jobs.get_opt(&old_name).await.ok()?;
        found
            .is_none_or(|j| j.metadata.uid != old_job.metadata.uid)
            .then_some(())
    })
    .await;
    wait_for("the superseded Job's pod deleted", DEADLINE, || async {
        pods.get_opt(&old_pod).await.ok()?.is_none().then_some(())
    })
    .await;
    // The current Job is left alone.
    let current = jobs.get(&new_job.name_any()).await.unwrap();
    assert_eq!(current.metadata.uid, new_job.metadata.uid);
    assert!(current.metadata.deletion_timestamp.is_none());

    // The new spec's image is published and the app is Ready on it.
    end_checkpoint_pod(&pods, &new_pod, &success(&new_id)).await;
    wait_for("Ready on the new spec's image", DEADLINE, || async {
        let s = status_of(&apps, "shop").await;
        (s.checkpoint?.id == new_id && s.phase? == crac_api::cracapp::Phase::Ready).then_some(())
    })
    .await;
    let d = ns.api::<Deployment>().get("shop").await.unwrap();
    assert_eq!(
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[labels::CHECKPOINT_ID_ANNOTATION],
        new_id
    );
    // Only the new spec's Job is left.
    let left: Vec<String> = jobs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(left, [new_job.name_any()]);
}

#[tokio::test]
async fn checkpoint_failure_is_reported_with_the_agents_reason_and_retried_with_backoff() {
    let ns = setup("op-fail").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    apps.create(&PostParams::default(), &example_app("slow", "slow:1"))
        .await
        .unwrap();
    let (job, pod) = running_checkpoint(&ns, "slow").await;
    let first_job = job.metadata.name.clone().unwrap();
    let reason = "the app did not answer GET /ready on port 8080 within 600s";
    end_checkpoint_pod(&ns.api(), &pod, &failure("ReadinessTimeout", reason)).await;

    let status = wait_for("the failure in the conditions", DEADLINE, || async {
        let s = status_of(&apps, "slow").await;
        let c = condition(&s, "CheckpointReady")?;
        (c.reason == "ReadinessTimeout").then(|| s.clone())
    })
    .await;
    assert_eq!(
        status.phase,
        Some(crac_api::cracapp::Phase::Failed),
        "no image to serve yet"
    );
    let c = condition(&status, "CheckpointReady").unwrap();
    assert_eq!(c.status, "False");
    assert!(c.message.contains(reason), "{}", c.message);
    assert_eq!(status.pending_checkpoint.as_ref().unwrap().failures, 1);

    let events: Api<Event> = ns.api();
    let warning = wait_for("a Warning Event with the reason", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("ReadinessTimeout") && e.type_.as_deref() == Some("Warning")
        })
    })
    .await;
    assert!(warning.message.unwrap_or_default().contains(reason));

    // Backoff: no second Job at once, then one with the next attempt number.
    let jobs: Api<Job> = ns.api();
    let count = jobs.list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(count, 1, "the retry waits for its backoff");
    let (retry, _) = running_checkpoint(&ns, "slow").await;
    let retry_name = retry.metadata.name.clone().unwrap();
    assert_ne!(retry_name, first_job);
    assert!(retry_name.ends_with("-1"), "{retry_name}");
    let created = |j: &Job| j.metadata.creation_timestamp.clone().unwrap().0;
    let first = jobs.get(&first_job).await.unwrap();
    let gap = created(&retry).duration_since(created(&first));
    assert!(
        gap.as_secs_f64() >= 2.0,
        "the retry waited for the backoff: {gap:?}"
    );
}

#[tokio::test]
async fn a_missing_storage_class_is_reported_and_no_job_runs() {
    let ns = setup("op-storage").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let mut app = example_app("nosc", "nosc:1");
    app.spec.checkpoint.storage.storage_class_name = Some("does-not-exist".into());
    let apps: Api<CracApp> = ns.api();
    apps.create(&PostParams::default(), &app).await.unwrap();
    let status = wait_for("the storage problem in status", DEADLINE, || async {
        let s = status_of(&apps, "nosc").await;
        (condition(&s, "CheckpointReady")?.reason == "StorageClassNotFound").then_some(s)
    })
    .await;
    assert_eq!(status.phase, Some(crac_api::cracapp::Phase::Pending));
    assert!(
        condition(&status, "CheckpointReady")
            .unwrap()
            .message
            .contains("does-not-exist")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs: Api<Job> = ns.api();
    assert!(
        jobs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let rv = apps.get("nosc").await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        apps.get("nosc").await.unwrap().metadata.resource_version,
        rv,
        "not retried in a hot loop"
    );
}

#[tokio::test]
async fn invalid_objects_are_refused_by_the_api_server_naming_the_field() {
    let ns = setup("op-invalid").await;
    let apps: Api<CracApp> = ns.api();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "no app container",
            serde_json::json!({ "spec": { "template": { "spec": { "containers": [{ "name": "web", "image": "x", "command": ["java"] }] } } } }),
            "spec.template",
        ),
        (
            "no command",
            serde_json::json!({ "spec": { "template": { "spec": { "containers": [{ "name": "app", "image": "x" }] } } } }),
            "command",
        ),
        (
            "negative size",
            serde_json::json!({ "spec": { "checkpoint": { "storage": { "size": "-1Gi" } } } }),
            "spec.checkpoint.storage.size",
        ),
        (
            "zero size",
            serde_json::json!({ "spec": { "checkpoint": { "storage": { "size": "0" } } } }),
            "spec.checkpoint.storage.size",
        ),
        (
            "unknown engine",
            serde_json::json!({ "spec": { "checkpoint": { "engine": "docker" } } }),
            "spec.checkpoint.engine",
        ),
        (
            "retain 0",
            serde_json::json!({ "spec": { "checkpoint": { "retain": 0 } } }),
            "spec.checkpoint.retain",
        ),
        (
            "idleAfter under 30s",
            serde_json::json!({ "spec": { "scaleToZero": { "idleAfter": "10s" } } }),
            "spec.scaleToZero.idleAfter",
        ),
        (
            "malformed timeout",
            serde_json::json!({ "spec": { "checkpoint": { "timeout": "ten minutes" } } }),
            "spec.checkpoint.timeout",
        ),
        (
            "negative replicas",
            serde_json::json!({ "spec": { "replicas": -1 } }),
            "spec.replicas",
        ),
        (
            "long name",
            serde_json::json!({ "metadata": { "name": "a".repeat(41) } }),
            "metadata.name",
        ),
        (
            "name starting with a digit",
            serde_json::json!({ "metadata": { "name": "1app" } }),
            "metadata.name",
        ),
        (
            "name with a dot",
            serde_json::json!({ "metadata": { "name": "a.b" } }),
            "metadata.name",
        ),
        (
            "host PID",
            serde_json::json!({ "spec": { "template": { "spec": { "hostPID": true } } } }),
            "spec.template.spec.hostPID",
        ),
        (
            "host network",
            serde_json::json!({ "spec": { "template": { "spec": { "hostNetwork": true } } } }),
            "spec.template.spec.hostNetwork",
        ),
        (
            "hostPath volume",
            serde_json::json!({ "spec": { "template": { "spec": { "volumes": [{ "name": "root", "hostPath": { "path": "/" } }] } } } }),
            "spec.template.spec.volumes",
        ),
        (
            "privileged app container",
            serde_json::json!({ "spec": { "template": { "spec": { "containers": [app_container(serde_json::json!({ "privileged": true }))] } } } }),
            "spec.template.spec.containers",
        ),
        (
            "privileged init container",
            serde_json::json!({ "spec": { "template": { "spec": { "initContainers": [{ "name": "setup", "image": "x", "securityContext": { "privileged": true } }] } } } }),
            "spec.template.spec.initContainers",
        ),
    ];
    for (what, overlay, field) in cases {
        let mut body = serde_json::to_value(example_app("bad", "x:1")).unwrap();
        merge(&mut body, &overlay);
        let app: CracApp = match serde_json::from_value(body.clone()) {
            Ok(app) => app,
            Err(_) => {
                // Not even a CracApp in Rust's eyes (an unknown engine): send the raw JSON.
                let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
                    ns.client.clone(),
                    &ns.name,
                    &kube::api::ApiResource::erase::<CracApp>(&()),
                );
                let obj: kube::api::DynamicObject = serde_json::from_value(body).unwrap();
                let err = raw.create(&PostParams::default(), &obj).await.unwrap_err();
                assert_refused(what, field, err);
                continue;
            }
        };
        let err = apps.create(&PostParams::default(), &app).await.unwrap_err();
        assert_refused(what, field, err);
    }
}

/// The example app's container with `security` as its securityContext.
fn app_container(security: serde_json::Value) -> serde_json::Value {
    let mut container = serde_json::to_value(
        &example_app("x", "x:1")
            .spec
            .template
            .spec
            .unwrap()
            .containers[0],
    )
    .unwrap();
    container["securityContext"] = security;
    container
}

#[tokio::test]
async fn a_template_asking_for_more_than_restore_needs_is_refused_and_nothing_is_created() {
    let ns = setup("op-forbidden").await;
    let _operator = start_operator(&ns.client, &ns.name);
    // Beyond what the API server's rules see: a capability restore does not need, and a
    // sidecar with a host port.
    let cases = [
        (
            "greedy",
            serde_json::json!([app_container(
                serde_json::json!({ "capabilities": { "add": ["CHECKPOINT_RESTORE", "SYS_ADMIN"] } })
            )]),
            "spec.template.spec.containers[app].securityContext.capabilities.add",
        ),
        (
            "hostport",
            serde_json::json!([
                app_container(serde_json::json!({})),
                { "name": "proxy", "image": "proxy:1", "ports": [{ "containerPort": 9000, "hostPort": 9000 }] }
            ]),
            "spec.template.spec.containers[proxy].ports[9000].hostPort",
        ),
    ];
    let apps: Api<CracApp> = ns.api();
    for (name, containers, _) in &cases {
        let mut app = example_app(name, "x:1");
        app.spec.template.spec.as_mut().unwrap().containers =
            serde_json::from_value(containers.clone()).unwrap();
        apps.create(&PostParams::default(), &app).await.unwrap();
    }
    let events: Api<Event> = ns.api();
    for (name, _, field) in &cases {
        let status = wait_for("the refusal in status", DEADLINE, || async {
            let s = status_of(&apps, name).await;
            (condition(&s, "CheckpointReady")?.reason == "Forbidden").then_some(s)
        })
        .await;
        assert_eq!(status.phase, Some(crac_api::cracapp::Phase::Failed));
        let message = &condition(&status, "CheckpointReady").unwrap().message;
        assert!(message.contains(field), "{name}: {message}");
        wait_for("a Warning Event naming the field", DEADLINE, || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("Forbidden")
                    && e.involved_object.name.as_deref() == Some(*name)
                    && e.message.as_deref().is_some_and(|n| n.contains(field))
            })
        })
        .await;
    }
    // Nothing was created for either app.
    assert_eq!(count::<Job>(&ns).await, 0);
    assert_eq!(count::<Deployment>(&ns).await, 0);
    assert_eq!(count::<Service>(&ns).await, 0);
    assert_eq!(count::<PersistentVolumeClaim>(&ns).await, 0);
}

/// How many objects of kind `K` the namespace holds.
async fn count<K>(ns: &TestNamespace) -> usize
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    ns.api::<K>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len()
}

fn assert_refused(what: &str, field: &str, err: kube::Error) {
    let kube::Error::Api(status) = err else {
        panic!("{what}: expected an API error, got {err:?}")
    };
    assert_eq!(status.code, 422, "{what}: {}", status.message);
    assert!(
        status.message.contains(field),
        "{what}: the message should name {field}: {}",
        status.message
    );
}

fn merge(base: &mut serde_json::Value, overlay: &serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[tokio::test]
async fn a_restarted_operator_converges_without_duplicate_jobs() {
    let ns = setup("op-restart").await;
    let operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    apps.create(&PostParams::default(), &example_app("again", "again:1"))
        .await
        .unwrap();
    let (job, pod) = running_checkpoint(&ns, "again").await;
    drop(operator);

    let operator = start_operator(&ns.client, &ns.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let jobs: Api<Job> = ns.api();
    let names: Vec<_> = jobs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    assert_eq!(
        names,
        [job.metadata.name.clone().unwrap()],
        "the restarted operator found the Job"
    );

    // Mid-flow again: the image is published while no operator runs.
    drop(operator);
    let id = job.metadata.annotations.unwrap()[labels::CHECKPOINT_ID_ANNOTATION].clone();
    end_checkpoint_pod(&ns.api(), &pod, &success(&id)).await;
    let _operator = start_operator(&ns.client, &ns.name);
    wait_for("Ready after the restart", DEADLINE, || async {
        let s = status_of(&apps, "again").await;
        (s.phase? == crac_api::cracapp::Phase::Ready && s.checkpoint?.id == id).then_some(())
    })
    .await;
    assert_eq!(
        jobs.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn deleting_an_app_removes_everything_it_owned() {
    let ns = setup("op-delete").await;
    let _operator = start_operator(&ns.client, &ns.name);
    create_and_make_ready(&ns, &example_app("gone", "gone:1")).await;
    let apps: Api<CracApp> = ns.api();
    apps.delete("gone", &DeleteParams::background())
        .await
        .unwrap();
    wait_for(
        "the CracApp and everything it owned to go",
        DEADLINE,
        || async {
            let app_gone = apps.get_opt("gone").await.ok()?.is_none();
            let deployment_gone = ns.api::<Deployment>().get_opt("gone").await.ok()?.is_none();
            let service_gone = ns.api::<Service>().get_opt("gone").await.ok()?.is_none();
            let slice_gone = ns
                .api::<EndpointSlice>()
                .get_opt("gone-crac")
                .await
                .ok()?
                .is_none();
            let jobs_gone = ns
                .api::<Job>()
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty();
            // A claim in use by pods waits for them (pvc-protection); it must be on its way out.
            let claim_going = ns
                .api::<PersistentVolumeClaim>()
                .get_opt("gone-crac-images")
                .await
                .ok()?
                .is_none_or(|c| c.metadata.deletion_timestamp.is_some());
            (app_gone && deployment_gone && service_gone && slice_gone && jobs_gone && claim_going)
                .then_some(())
        },
    )
    .await;
}

/// A claim `shared` made by the user, and the app `tenant` Ready with its images on it.
async fn tenant_on_a_shared_claim(ns: &TestNamespace) {
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "shared" },
        "spec": { "accessModes": ["ReadWriteMany"], "resources": { "requests": { "storage": "1Gi" } } }
    }))
    .unwrap();
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
    let mut app = example_app("tenant", "tenant:1");
    app.spec.checkpoint.storage.existing_claim = Some("shared".into());
    create_and_make_ready(ns, &app).await;
}

#[tokio::test]
async fn deleting_the_namespace_of_an_app_on_a_shared_claim_finishes() {
    let ns = setup("op-nsgone").await;
    let _operator = start_operator(&ns.client, &ns.name);
    tenant_on_a_shared_claim(&ns).await;
    assert!(
        ns.api::<CracApp>()
            .get("tenant")
            .await
            .unwrap()
            .finalizers()
            .len()
            == 1,
        "the app holds the cleanup finalizer"
    );

    // No cleanup Job can start in a terminating namespace: the finalizer must not hold it.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ns.client.clone());
    namespaces
        .delete(&ns.name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the namespace gone", Duration::from_secs(120), || async {
        namespaces
            .get_opt(&ns.name)
            .await
            .ok()
            .and_then(|found| found.is_none().then_some(()))
    })
    .await;
}

#[tokio::test]
async fn a_service_someone_else_made_is_not_taken_over() {
    let ns = setup("op-takeover").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let theirs: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "billing", "labels": { "team": "payments" } },
        "spec": { "ports": [{ "port": 443, "targetPort": 8443 }], "selector": { "app": "billing" } }
    }))
    .unwrap();
    let services: Api<Service> = ns.api();
    services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    let apps: Api<CracApp> = ns.api();
    apps.create(&PostParams::default(), &example_app("billing", "billing:1"))
        .await
        .unwrap();
    let status = wait_for("the conflict in status", DEADLINE, || async {
        let s = status_of(&apps, "billing").await;
        (condition(&s, "CheckpointReady")?.reason == "NameTaken").then_some(s)
    })
    .await;
    let message = &condition(&status, "CheckpointReady").unwrap().message;
    assert!(
        message.contains("Service") && message.contains("billing"),
        "{message}"
    );
    assert!(
        ns.event_reasons().await.iter().any(|r| r == "NameTaken"),
        "a Warning Event says so"
    );
    let after = services.get("billing").await.unwrap();
    assert!(after.metadata.owner_references.is_none(), "not adopted");
    assert_eq!(
        after.spec.unwrap().selector,
        theirs.spec.clone().unwrap().selector
    );

    // Deleting the app leaves their Service alone.
    apps.delete("billing", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the app gone", DEADLINE, || async {
        apps.get_opt("billing")
            .await
            .ok()
            .and_then(|a| a.is_none().then_some(()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(services.get_opt("billing").await.unwrap().is_some());
}

#[tokio::test]
async fn an_existing_claim_holding_another_apps_images_is_refused() {
    let ns = setup("op-claimowner").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let owner = example_app("owner", "owner:1");
    create_and_make_ready(&ns, &owner).await;
    let own_claim = ns
        .api::<PersistentVolumeClaim>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .expect("the owner's claim")
        .name_any();

    let mut intruder = example_app("intruder", "intruder:1");
    intruder.spec.checkpoint.storage.existing_claim = Some(own_claim.clone());
    let apps: Api<CracApp> = ns.api();
    apps.create(&PostParams::default(), &intruder)
        .await
        .unwrap();
    let status = wait_for("the refusal in status", DEADLINE, || async {
        let s = status_of(&apps, "intruder").await;
        (condition(&s, "CheckpointReady")?.reason == "ClaimOwnedByAnotherApp").then_some(s)
    })
    .await;
    let message = &condition(&status, "CheckpointReady").unwrap().message;
    assert!(
        message.contains("existingClaim") && message.contains("owner"),
        "{message}"
    );
    let jobs = ns.api::<Job>().list(&ListParams::default()).await.unwrap();
    assert!(
        jobs.items
            .iter()
            .all(|j| !j.name_any().starts_with("intruder")),
        "no checkpoint Job mounts the owner's claim for the intruder"
    );
}

#[tokio::test]
async fn images_on_a_shared_claim_are_cleaned_before_the_app_goes() {
    let ns = setup("op-shared").await;
    let _operator = start_operator(&ns.client, &ns.name);
    tenant_on_a_shared_claim(&ns).await;

    let apps: Api<CracApp> = ns.api();
    apps.delete("tenant", &DeleteParams::background())
        .await
        .unwrap();
    let jobs: Api<Job> = ns.api();
    let cleanup = wait_for("the cleanup Job", DEADLINE, || async {
        jobs.get_opt("tenant-crac-cleanup").await.ok().flatten()
    })
    .await;
    let container = &cleanup.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(
        container.command.as_ref().unwrap()[1..],
        [
            "clean".to_string(),
            format!("{}/tenant", contract::IMAGE_MOUNT)
        ]
    );
    assert!(
        apps.get_opt("tenant").await.unwrap().is_some(),
        "held by the finalizer until cleaned"
    );

    // Play the cleanup pod's part.
    let pods: Api<Pod> = ns.api();
    let pod = wait_for("the cleanup pod", DEADLINE, || async {
        running_job_pods(&pods, "tenant-crac-cleanup")
            .await
            .into_iter()
            .next()
    })
    .await;
    end_checkpoint_pod(&pods, &pod, &success("cleanup")).await;
    wait_for("the app to go", DEADLINE, || async {
        apps.get_opt("tenant").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        ns.api::<PersistentVolumeClaim>()
            .get_opt("shared")
            .await
            .unwrap()
            .is_some(),
        "a shared claim is never deleted"
    );
}

#[tokio::test]
async fn only_one_replica_holds_the_leader_lease() {
    use crac_operator::leader::{Elector, LeaseSettings, release, try_acquire};
    let ns = TestNamespace::new("op-lease").await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
    let elector = |identity: &str| {
        Elector::new(LeaseSettings {
            duration: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(1),
            retry_period: Duration::from_millis(200),
            ..LeaseSettings::new("crac-operator", identity)
        })
    };
    let (mut a, mut b) = (elector("a"), elector("b"));
    let (got_a, got_b) = tokio::join!(try_acquire(&leases, &mut a), try_acquire(&leases, &mut b));
    assert!(
        got_a.unwrap() ^ got_b.unwrap(),
        "exactly one of two racing replicas leads"
    );
    let (leader, other) = if try_acquire(&leases, &mut a).await.unwrap() {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        !try_acquire(&leases, other).await.unwrap(),
        "a live lease is respected"
    );
    // A leader that shuts down releases the lease: the other takes it at once.
    assert!(release(&leases, leader).await.unwrap(), "released");
    assert!(
        try_acquire(&leases, other).await.unwrap(),
        "a released lease is taken at once"
    );
    assert!(
        !release(&leases, leader).await.unwrap(),
        "a lease that is not ours is not released"
    );
    // The new holder stops renewing (it died): the first replica takes the lease once it has
    // seen it unchanged for the lease duration, on its own clock.
    assert!(!try_acquire(&leases, leader).await.unwrap(), "live again");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        try_acquire(&leases, leader).await.unwrap(),
        "an expired lease is taken over"
    );
}

#[tokio::test]
async fn kubectl_scale_works_through_the_scale_subresource() {
    let ns = setup("op-scale").await;
    let _operator = start_operator(&ns.client, &ns.name);
    create_and_make_ready(&ns, &example_app("sized", "sized:1")).await;
    // What `kubectl scale` and a HorizontalPodAutoscaler do.
    let out = crac_tests::kubectl(&["-n", &ns.name, "scale", "cracapp/sized", "--replicas=3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deployments: Api<Deployment> = ns.api();
    wait_for("the Deployment at 3 replicas", DEADLINE, || async {
        (deployments.get("sized").await.ok()?.spec?.replicas? == 3).then_some(())
    })
    .await;
    let apps: Api<CracApp> = ns.api();
    let status = wait_for("3 ready replicas in status", DEADLINE, || async {
        let s = status_of(&apps, "sized").await;
        (s.ready_replicas == 3).then_some(s)
    })
    .await;
    // The scale subresource reports what an autoscaler needs.
    let scale = crac_tests::kubectl(&[
        "-n",
        &ns.name,
        "get",
        "--raw",
        &format!(
            "/apis/crac.dev/v1alpha1/namespaces/{}/cracapps/sized/scale",
            ns.name
        ),
    ]);
    let scale: serde_json::Value = serde_json::from_slice(&scale.stdout).unwrap();
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["replicas"], 3);
    assert_eq!(scale["status"]["selector"], status.selector.unwrap());
}

#[tokio::test]
async fn objects_changed_or_deleted_by_someone_else_are_put_back() {
    let ns = setup("op-drift").await;
    let _operator = start_operator(&ns.client, &ns.name);
    create_and_make_ready(&ns, &example_app("drift", "drift:1")).await;
    let deployments: Api<Deployment> = ns.api();
    let slices: Api<EndpointSlice> = ns.api();
    wait_for("the slice", DEADLINE, || async {
        slices.get_opt("drift-crac").await.unwrap()
    })
    .await;

    // The operator skips applies that would change nothing; a change it did not make is
    // still seen (the object's version moved) and undone.
    let patch = serde_json::json!({ "spec": { "replicas": 5 } });
    deployments
        .patch("drift", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    slices
        .delete("drift-crac", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("replicas back to the app's 2", DEADLINE, || async {
        let d = deployments.get("drift").await.unwrap();
        (d.spec?.replicas? == 2).then_some(())
    })
    .await;
    wait_for("the slice back", DEADLINE, || async {
        slices.get_opt("drift-crac").await.unwrap()
    })
    .await;
}

#[tokio::test]
async fn a_repeated_event_becomes_a_series_and_a_new_message_a_new_event() {
    use crac_operator::events::{Events, Note};
    let ns = setup("op-events").await;
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(ns.name.clone()),
        name: Some("subject".into()),
        uid: Some("0b9ac3f2-0000-4000-8000-000000000001".into()),
        ..Default::default()
    };
    let events = Events::new(ns.client.clone(), "crac-operator", "test");
    let note = |message: &str| Note {
        warning: true,
        reason: "CheckpointFailed",
        action: "Reconcile",
        message: message.into(),
    };
    for message in [
        "attempt 1 failed: oom",
        "attempt 1 failed: oom",
        "attempt 2 failed: timeout",
    ] {
        events.publish(&note(message), &regarding).await.unwrap();
    }

    let api: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    let mut listed = api.list(&ListParams::default()).await.unwrap().items;
    listed.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
    let said: Vec<(Option<String>, Option<i32>)> = listed
        .iter()
        .map(|e| (e.note.clone(), e.series.as_ref().map(|s| s.count)))
        .collect();
    assert_eq!(
        said,
        [
            (Some("attempt 1 failed: oom".into()), Some(2)),
            (Some("attempt 2 failed: timeout".into()), None)
        ],
        "the repeat counted on the first Event; the new message its own Event"
    );
    let first = &listed[0];
    assert_eq!(first.type_.as_deref(), Some("Warning"));
    assert_eq!(first.reporting_controller.as_deref(), Some("crac-operator"));
    assert_eq!(
        first.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("subject")
    );
}

/// Restore pods that start cold instead of restoring (their agents say so on the activity
/// endpoint, served here on the kwok pods' loopback addresses) are counted against the image;
/// at `recheckpointAfterColdStarts` the operator marks the image stale and a new checkpoint
/// of the same spec follows, whose image the pods then restore, the count starting again.
#[tokio::test]
async fn restore_pods_that_start_cold_make_the_image_stale_and_a_new_checkpoint_follows() {
    let ns = setup("op-stale").await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    let mut app = example_app("stale", "stale:1");
    app.spec.replicas = 2;
    app.spec.restore.recheckpoint_after_cold_starts = 2;
    let first = create_and_make_ready(&ns, &app).await;
    let pods: Api<Pod> = ns.api();
    let selector = format!("{}=stale,{}=restore", labels::APP, labels::COMPONENT);
    let ready = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items;
    let mut agents = Vec::new();
    for pod in &ready {
        let ip = crac_api::serving::serving_address(pod).unwrap();
        let report = contract::ActivityReport {
            mode: "coldStarted".into(),
            reason: Some("CpuFeaturesMissing".into()),
            ..Default::default()
        };
        agents.push(crac_tests::activity::ActivityServer::start(ip, report).await);
    }

    let counted = wait_for(
        "both pods counted and the image marked stale",
        DEADLINE,
        || async {
            let app = apps.get("stale").await.ok()?;
            let image = app.status.as_ref()?.checkpoint.clone()?;
            let marked = app.annotations().contains_key(labels::STALE_IMAGE_AT);
            (image.id == first && image.cold_started_pods.len() == 2 && marked)
                .then_some(image.cold_started_pods)
        },
    )
    .await;
    let mut names: Vec<String> = ready.iter().map(|p| p.name_any()).collect();
    names.sort();
    let mut counted = counted;
    counted.sort();
    assert_eq!(counted, names);
    let reasons = ns.event_reasons().await;
    for r in ["RestoreFellBack", "ImageStale"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} Event in {reasons:?}"
        );
    }

    // A new checkpoint of the same spec, under another id; its image replaces the stale one.
    let (job, pod) = running_checkpoint(&ns, "stale").await;
    let second = job.annotations()[labels::CHECKPOINT_ID_ANNOTATION].clone();
    assert_ne!(second, first);
    drop(agents);
    end_checkpoint_pod(&pods, &pod, &success(&second)).await;
    wait_for(
        "the new image published, its count at zero",
        DEADLINE,
        || async {
            let image = status_of(&apps, "stale").await.checkpoint?;
            (image.id == second && image.cold_started_pods.is_empty()).then_some(())
        },
    )
    .await;
}
