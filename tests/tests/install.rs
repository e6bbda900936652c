//! The Helm chart and the plain manifests, on the real control plane: the chart lints clean,
//! refuses bad values, `deploy/` is what the chart renders, and after `helm install` the real
//! operator, running under the chart's ServiceAccount (not as admin), takes a CracApp to
//! Ready. The API server's audit log then proves the chart's RBAC is minimal: every verb a
//! rule grants was used, and no request was refused.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use crac_api::CracApp;
use crac_api::labels;
use crac_api::policy::CracScalePolicy;
use crac_operator::context::{Context, Settings};
use crac_operator::leader::{self, Elector, LeaseSettings};
use crac_operator::metrics::Metrics;
use crac_operator::watches;
use crac_tests::operator::{end_checkpoint_pod, example_app, running_job_pods, success};
use crac_tests::{TestNamespace, client, kubeconfig_path, kubectl, repo_root, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

/// Deletes the test's cluster-scoped CracScalePolicy however the test ends.
struct DeleteOnDrop(String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let _ = kubectl(&[
            "delete",
            "cracscalepolicy",
            &self.0,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

const DEADLINE: Duration = Duration::from_secs(90);
const SYSTEM_NS: &str = "crac-system";

fn helm(args: &[&str]) -> Output {
    Command::new(repo_root().join("scripts/helm"))
        .args(args)
        .output()
        .expect("run scripts/helm")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn chart() -> String {
    repo_root()
        .join("charts/crac-operator")
        .display()
        .to_string()
}

#[test]
fn chart_lints_clean() {
    let out = helm(&["lint", "--strict", &chart()]);
    assert!(out.status.success(), "helm lint failed:\n{}", text(&out));
}

#[test]
fn bad_values_fail_at_install_with_a_clear_message() {
    for (set, expected) in [
        ("operator.replicas=0", "/operator/replicas"),
        (
            "activator.defaultWakeTimeout=thirty",
            "/activator/defaultWakeTimeout",
        ),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("operator.replica=2", "additional properties 'replica'"),
    ] {
        let out = helm(&["template", "x", &chart(), "--set", set]);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            text(&out).contains(expected),
            "--set {set}: the error should name {expected}:\n{}",
            text(&out)
        );
    }
    let out = helm(&[
        "template",
        "x",
        &chart(),
        "--set",
        "operator.replicas=2",
        "--set",
        "operator.leaderElection=false",
    ]);
    assert!(
        text(&out).contains("/operator/leaderElection"),
        "two replicas without leader election must be refused:\n{}",
        text(&out)
    );
}

#[test]
fn deploy_manifest_and_chart_crds_are_not_stale() {
    let root = repo_root();
    let chart_crds = std::fs::read_to_string(root.join("charts/crac-operator/crds/crds.yaml"));
    let crds = std::fs::read_to_string(root.join("crds/crds.yaml")).unwrap();
    assert!(
        chart_crds.as_ref().ok() == Some(&crds),
        "charts/crac-operator/crds/crds.yaml differs from crds/crds.yaml; run `make crds`"
    );
    let out = Command::new(root.join("scripts/render-manifests"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "render-manifests: {}", text(&out));
    let committed =
        std::fs::read_to_string(root.join("deploy/crac-operator.yaml")).unwrap_or_default();
    assert!(
        committed == String::from_utf8_lossy(&out.stdout),
        "deploy/crac-operator.yaml is stale: regenerate it with `scripts/render-manifests` \
         (or `make manifests`) and commit it"
    );
}

#[test]
fn dockerfiles_copy_only_binaries_the_workspace_builds() {
    let root = repo_root();
    let metadata = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "cargo metadata: {}",
        text(&metadata)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let bins: BTreeSet<String> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    let mut agent_destinations = vec![];
    for image in ["operator", "activator", "agent"] {
        let path = root.join(format!("images/{image}/Dockerfile"));
        let dockerfile =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let copies = copied_binaries(&dockerfile);
        assert!(
            !copies.is_empty(),
            "{} copies no binary from a build stage",
            path.display()
        );
        for (binary, destination) in copies {
            assert!(
                bins.contains(&binary),
                "{} copies {binary:?}, which no workspace crate builds (bins: {bins:?})",
                path.display()
            );
            if binary == "crac-agent" {
                agent_destinations.push(destination);
            }
        }
    }
    assert_eq!(
        agent_destinations,
        [crac_operator::build::AGENT_IMAGE_BINARY],
        "the agent image must hold the agent where the operator's init container runs it"
    );
}

/// `(binary name, destination)` of each `COPY --from=<stage> <path>/<bin> <dest>` (line
/// continuations joined). Directories copied (`<path>/`, the agent's CRIU bundle) are not binaries.
fn copied_binaries(dockerfile: &str) -> Vec<(String, String)> {
    let joined = dockerfile.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| l.to_ascii_uppercase().starts_with("COPY "))
        .filter(|l| l.contains("--from="))
        .filter_map(|l| {
            let words: Vec<&str> = l
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let (source, dest) = (words.get(1)?, words.last()?);
            if source.ends_with('/') {
                return None;
            }
            let binary = source.rsplit('/').next()?.to_string();
            let dest = if dest.ends_with('/') {
                format!("{dest}{binary}")
            } else {
                dest.to_string()
            };
            Some((binary, dest))
        })
        .collect()
}

/// A kubeconfig that authenticates as `sa` in crac-system with a TokenRequest token.
async fn service_account_client(sa: &str) -> (kube::Client, PathBuf) {
    let token = kubectl(&["create", "token", sa, "-n", SYSTEM_NS, "--duration", "2h"]);
    assert!(
        token.status.success(),
        "kubectl create token: {}",
        text(&token)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let view = kubectl(&["config", "view", "--raw", "--minify", "-o", "json"]);
    let mut config: serde_json::Value = serde_json::from_slice(&view.stdout).unwrap();
    config["users"] = serde_json::json!([{ "name": sa, "user": { "token": token } }]);
    config["contexts"][0]["context"]["user"] = sa.into();
    let path = repo_root().join(format!("target/cluster/{sa}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    (kube::Client::try_from(config).unwrap(), path)
}

/// One request in the audit log, reduced to what RBAC decides on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    group: String,
    resource: String,
    verb: String,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)
    }
}

fn audit_log() -> PathBuf {
    repo_root().join("target/cluster/logs/audit.log")
}

fn audit_offset() -> u64 {
    std::fs::metadata(audit_log()).map(|m| m.len()).unwrap_or(0)
}

/// What `user` asked for since `offset`: every request, and the refused ones. An apply that
/// created its object (201) was also authorized as a `create`.
fn accesses_since(offset: u64, user: &str) -> (BTreeSet<Access>, Vec<String>) {
    let log = std::fs::read(audit_log()).unwrap();
    let log = String::from_utf8_lossy(&log[offset as usize..]).to_string();
    let mut used = BTreeSet::new();
    let mut refused = vec![];
    for line in log.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["user"]["username"] != user {
            continue;
        }
        let object = &event["objectRef"];
        let Some(resource) = object["resource"].as_str() else {
            continue;
        };
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        };
        let group = object["apiGroup"].as_str().unwrap_or_default().to_string();
        let verb = event["verb"].as_str().unwrap_or_default().to_string();
        let code = event["responseStatus"]["code"].as_i64().unwrap_or(0);
        if code == 403 {
            refused.push(format!("{verb} {group}/{resource} {}", event["requestURI"]));
        }
        if verb == "patch" && code == 201 {
            used.insert(Access {
                group: group.clone(),
                resource: resource.clone(),
                verb: "create".into(),
            });
        }
        used.insert(Access {
            group,
            resource,
            verb,
        });
    }
    (used, refused)
}

fn granted(rules: &[PolicyRule]) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "wildcard in a rule: {rule:?}"
                    );
                    out.insert(Access {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Every granted verb was used (bar the listed exceptions, each with its reason) and nothing
/// was refused.
fn assert_minimal(
    who: &str,
    granted: &BTreeSet<Access>,
    used: &BTreeSet<Access>,
    refused: &[String],
    exceptions: &[(&str, &str)],
) {
    assert!(
        refused.is_empty(),
        "the chart does not grant {who} what it needs; refused requests:\n{}",
        refused.join("\n")
    );
    let unused: Vec<String> = granted
        .difference(used)
        .map(ToString::to_string)
        .filter(|a| !exceptions.iter().any(|(e, _)| e == a))
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants {who} rights it never used: {unused:?}\n(used: {:?})",
        used.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
}

async fn helm_install() {
    let kubeconfig = kubeconfig_path().display().to_string();
    let out = helm(&[
        "upgrade",
        "--install",
        "crac-operator",
        &chart(),
        "--namespace",
        SYSTEM_NS,
        "--create-namespace",
        "--kubeconfig",
        &kubeconfig,
        "--wait",
        "--timeout",
        "3m",
    ]);
    assert!(out.status.success(), "helm install failed:\n{}", text(&out));
    assert!(
        text(&out).contains("kubectl crac status"),
        "NOTES.txt should tell the user what to do next:\n{}",
        text(&out)
    );
}

/// The whole install: helm, then the real operator under the chart's ServiceAccount takes an
/// app to Ready and deletes it, and the activator's watches and wake request run under its
/// own; the audit log shows each chart rule used and nothing refused.
#[tokio::test]
async fn helm_install_runs_the_operator_with_minimal_rbac() {
    let admin = client().await;
    helm_install().await;

    // What the chart created (pods are Running only in kwok's sense: no kubelet here).
    let deployments = Api::<Deployment>::namespaced(admin.clone(), SYSTEM_NS);
    for (name, replicas) in [("crac-operator", 1), ("crac-activator", 2)] {
        wait_for(&format!("{name} ready"), DEADLINE, || async {
            let d = deployments.get(name).await.ok()?;
            (d.status?.ready_replicas? == replicas).then_some(())
        })
        .await;
        let d = deployments.get(name).await.unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{name}");
        assert_eq!(
            sc.capabilities.unwrap().drop,
            Some(vec!["ALL".to_string()]),
            "{name}"
        );
        assert_eq!(
            pod.security_context.unwrap().run_as_non_root,
            Some(true),
            "{name}"
        );
        assert_eq!(pod.service_account_name.as_deref(), Some(name));
    }
    let sas = Api::<ServiceAccount>::namespaced(admin.clone(), SYSTEM_NS);
    sas.get("crac-operator").await.unwrap();
    sas.get("crac-activator").await.unwrap();

    // A fresh Lease, so this run takes it by creating it and then renews it.
    let leases = Api::<Lease>::namespaced(admin.clone(), SYSTEM_NS);
    let _ = leases
        .delete("crac-operator", &DeleteParams::default())
        .await;
    wait_for("the old Lease gone", DEADLINE, || async {
        leases
            .get_opt("crac-operator")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    let (operator_client, _) = service_account_client("crac-operator").await;
    let (activator_client, _) = service_account_client("crac-activator").await;
    let ns = TestNamespace::new("install").await;
    let offset = audit_offset();

    // A policy that governs this test's namespace only (by its name label), with a cap: the
    // operator reads namespace labels and counts awake apps for it.
    let policies = Api::<CracScalePolicy>::all(admin.clone());
    let policy: CracScalePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "crac.dev/v1alpha1",
        "kind": "CracScalePolicy",
        "metadata": { "name": ns.name },
        "spec": {
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": ns.name } },
            "maxAwake": 5
        }
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let _policy = DeleteOnDrop(ns.name.clone());

    // Leader election as the binary does it: take the Lease, then renew it.
    let lease_api = Api::<Lease>::namespaced(operator_client.clone(), SYSTEM_NS);
    let mut lease = Elector::new(LeaseSettings {
        retry_period: Duration::from_millis(200),
        ..LeaseSettings::new("crac-operator", "install-test")
    });
    leader::acquire(&lease_api, &mut lease).await;
    assert!(
        leader::try_acquire(&lease_api, &mut lease).await.unwrap(),
        "renewal"
    );

    // The operator, in-process, as the chart's ServiceAccount.
    let mut registry = prometheus_client::registry::Registry::default();
    let settings = Settings {
        namespace: Some(ns.name.clone()),
        ..Settings::new("crac-agent:test", "install-test")
    };
    let ctx = Arc::new(Context::new(
        operator_client.clone(),
        settings,
        Arc::new(Metrics::register(&mut registry)),
    ));
    // What the binary's /readyz reports: set once the controller's watches have synced.
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_synced = synced.clone();
    // The operator binary also keeps the policies' status (its own loop, beside the controller).
    let policy_status = tokio::spawn(crac_operator::policies::keep_status(
        ctx.clone(),
        std::time::Duration::from_secs(1),
    ));
    let operator = tokio::spawn(watches::run(ctx, 4, move || {
        on_synced.store(true, std::sync::atomic::Ordering::Relaxed)
    }));

    // The activator's watches and a wake request, as its ServiceAccount.
    let activator_registry = Arc::new(crac_activator::registry::Registry::new(Arc::new(
        crac_activator::metrics::Metrics::new(),
    )));
    let watches = [
        tokio::spawn(crac_activator::kube::watch_apps(
            activator_client.clone(),
            activator_registry.clone(),
            Duration::from_secs(30),
        )),
        tokio::spawn(crac_activator::kube::watch_pods(
            activator_client.clone(),
            activator_registry,
        )),
    ];

    // An app naming a StorageClass (the operator checks it exists) goes to Ready.
    let apps: Api<CracApp> = ns.api();
    let mut app = example_app("demo", "demo:1");
    app.spec.checkpoint.storage.storage_class_name = Some("standard".into());
    // Scale to zero on (it will not fall asleep during the test): the policy's cap applies.
    app.spec.scale_to_zero = Some(
        serde_json::from_value(serde_json::json!({ "enabled": true, "idleAfter": "1h" })).unwrap(),
    );
    // On the node whose pods get addresses an EndpointSlice accepts (see tests/cluster/up).
    let pod_spec = app.spec.template.spec.as_mut().unwrap();
    pod_spec.node_selector = Some(
        [(
            "crac.dev/pod-addresses".to_string(),
            "unroutable".to_string(),
        )]
        .into(),
    );
    pod_spec.tolerations = Some(vec![
        serde_json::from_value(serde_json::json!({
            "key": "crac.dev/unroutable-pod-addresses", "operator": "Exists", "effect": "NoSchedule"
        }))
        .unwrap(),
    ]);
    apps.create(&PostParams::default(), &app).await.unwrap();
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();
    let (job, pod) = wait_for("a running checkpoint pod", DEADLINE, || async {
        let list = jobs
            .list(&ListParams::default().labels(&format!("{}=checkpoint", labels::COMPONENT)))
            .await
            .ok()?;
        let job = list.items.into_iter().next()?;
        let pod = running_job_pods(&pods, job.metadata.name.as_deref()?)
            .await
            .into_iter()
            .next()?;
        Some((job, pod))
    })
    .await;
    let id = job.metadata.annotations.unwrap()[labels::CHECKPOINT_ID_ANNOTATION].clone();
    end_checkpoint_pod(&pods, &pod, &success(&id)).await;
    wait_for("demo Ready", DEADLINE, || async {
        let phase = apps.get("demo").await.ok()?.status?.phase?;
        (phase == crac_api::cracapp::Phase::Ready).then_some(())
    })
    .await;
    wait_for(
        "the controller's watches synced (/readyz)",
        DEADLINE,
        || async {
            synced
                .load(std::sync::atomic::Ordering::Relaxed)
                .then_some(())
        },
    )
    .await;

    // The activator asks for a wake the way it does for a held request.
    use crac_activator::wake::WakeClient;
    crac_activator::wake::KubeWaker::new(activator_client.clone())
        .request_wake(&crac_activator::routes::AppKey::new(
            ns.name.clone(),
            "demo",
        ))
        .await
        .unwrap();

    // An app naming a claim that does not exist is reported, not created.
    let mut missing = example_app("missing-claim", "demo:1");
    missing.spec.checkpoint.storage.existing_claim = Some("nope".into());
    apps.create(&PostParams::default(), &missing).await.unwrap();
    wait_for("ClaimNotFound reported", DEADLINE, || async {
        let status = apps.get("missing-claim").await.ok()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.reason == "ClaimNotFound")
            .then_some(())
    })
    .await;

    // Deletion: the operator releases its finalizer and the app goes.
    apps.delete("demo", &DeleteParams::default()).await.unwrap();
    wait_for("demo deleted", DEADLINE, || async {
        apps.get_opt("demo").await.ok()?.is_none().then_some(())
    })
    .await;

    operator.abort();
    policy_status.abort();
    for w in watches {
        w.abort();
    }

    // The audit log, read back: each rule of the chart was needed, and it was enough.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (used, refused) = accesses_since(offset, "system:serviceaccount:crac-system:crac-operator");
    let cluster_roles = Api::<ClusterRole>::all(admin.clone());
    let roles = Api::<Role>::namespaced(admin.clone(), SYSTEM_NS);
    let mut operator_rules = cluster_roles
        .get("crac-operator")
        .await
        .unwrap()
        .rules
        .unwrap();
    operator_rules.extend(
        roles
            .get("crac-operator-leader-election")
            .await
            .unwrap()
            .rules
            .unwrap(),
    );
    assert_minimal(
        "the operator",
        &granted(&operator_rules),
        &used,
        &refused,
        &[
            // The Event recorder patches an Event only when the same Event repeats; this
            // flow publishes each transition once.
            ("patch events.k8s.io/events", "series of a repeated Event"),
        ],
    );

    let (used, refused) =
        accesses_since(offset, "system:serviceaccount:crac-system:crac-activator");
    let activator_rules = cluster_roles
        .get("crac-activator")
        .await
        .unwrap()
        .rules
        .unwrap();
    assert_minimal(
        "the activator",
        &granted(&activator_rules),
        &used,
        &refused,
        &[],
    );
}
