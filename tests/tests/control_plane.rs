//! The test control plane is real: a kube-apiserver backed by etcd answers, the scheduler
//! places pods on kwok nodes, the controller-manager runs Deployments and Jobs, and CRD
//! schemas are enforced by the API server itself.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use crac_tests::{TestNamespace, client, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn api_server_reports_its_version() {
    let client = client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    assert_eq!(
        version.minor, "36",
        "the pinned Kubernetes is 1.36: {version:?}"
    );
}

#[tokio::test]
async fn deployment_pods_are_scheduled_onto_kwok_nodes_and_become_ready() {
    let ns = TestNamespace::new("cp-deploy").await;
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "web" } },
            "template": { "metadata": { "labels": { "app": "web" } },
                          "spec": { "containers": [{ "name": "web", "image": "web:1" }] } }
        }
    }))
    .unwrap();
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();

    wait_for(
        "the Deployment to report 2 ready replicas",
        DEADLINE,
        || async {
            let d = deployments.get("web").await.ok()?;
            (d.status?.ready_replicas? == 2).then_some(())
        },
    )
    .await;
    let pods: Api<Pod> = ns.api();
    for pod in pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
    {
        let node = pod
            .spec
            .as_ref()
            .unwrap()
            .node_name
            .clone()
            .unwrap_or_default();
        assert!(node.starts_with("kwok-node-"), "scheduled onto {node:?}");
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let ip: std::net::Ipv4Addr = status.pod_ip.unwrap().parse().unwrap();
        assert!(
            ip.is_loopback(),
            "pod addresses are on loopback so tests can serve on them: {ip}"
        );
    }
}

#[tokio::test]
async fn a_jobs_pod_completes_and_the_job_reports_complete() {
    let ns = TestNamespace::new("cp-job").await;
    // kwok completes pods carrying this label (see tests/cluster/kwok-stages.yaml); pods
    // without it stay Running until a test ends them, as the operator's tests do.
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "once" },
        "spec": { "template": {
            "metadata": { "labels": { "kwok.crac.dev/auto-complete": "true" } },
            "spec": { "restartPolicy": "Never", "containers": [{ "name": "c", "image": "busybox" }] } } }
    }))
    .unwrap();
    let jobs: Api<Job> = ns.api();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    wait_for("the Job's Complete condition", DEADLINE, || async {
        let j = jobs.get("once").await.ok()?;
        let complete = j
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True");
        complete.then_some(())
    })
    .await;
    assert_eq!(
        jobs.get("once").await.unwrap().status.unwrap().succeeded,
        Some(1)
    );
}

#[tokio::test]
async fn a_crd_is_served_and_its_schema_is_enforced_by_the_api_server() {
    let client = client().await;
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": "widgets.test.crac.dev" },
        "spec": {
            "group": "test.crac.dev",
            "names": { "kind": "Widget", "plural": "widgets", "singular": "widget" },
            "scope": "Namespaced",
            "versions": [{ "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "properties": {
                    "spec": { "type": "object", "required": ["size"], "properties": {
                        "size": { "type": "integer", "minimum": 1 } } } } } } }]
        }
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "widgets.test.crac.dev",
        &PatchParams::apply("crac-tests").force(),
        &Patch::Apply(crd),
    )
    .await
    .unwrap();
    let ns = TestNamespace::new("cp-crd").await;
    let gvk = GroupVersionKind::gvk("test.crac.dev", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client, &ns.name, &ApiResource::from_gvk(&gvk));
    let ok: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "test.crac.dev/v1", "kind": "Widget",
        "metadata": { "name": "good" }, "spec": { "size": 3 }
    }))
    .unwrap();
    wait_for("the Widget CRD to be served", DEADLINE, || async {
        widgets.create(&PostParams::default(), &ok).await.ok()
    })
    .await;
    let bad: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "test.crac.dev/v1", "kind": "Widget",
        "metadata": { "name": "bad" }, "spec": { "size": 0 }
    }))
    .unwrap();
    let err = widgets
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err:?}")
    };
    assert_eq!(status.code, 422);
    assert!(status.message.contains("spec.size"), "{}", status.message);
}
