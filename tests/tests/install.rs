//! The Helm chart and the plain manifests, on the real control plane: the chart lints clean,
//! refuses bad values, `deploy/` is what the chart renders, kube-score finds nothing beyond
//! its listed waivers, and after `helm install` the real operator, running under the chart's
//! ServiceAccount (not as admin), takes a CracApp to Ready. The API server's audit log then
//! proves the chart's RBAC is minimal, cluster-wide and with `operator.watchNamespace`: every
//! verb a rule grants was used, and no request was refused. The chart's admission policies are
//! checked on the same API server: pods in opted-in namespaces get PodSecurity baseline plus the
//! operator's exceptions, and the activator may only ask for wakes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use crac_api::CracApp;
use crac_api::labels;
use crac_api::policy::CracScalePolicy;
use crac_operator::context::{ActivatorRef, Context, Settings};
use crac_operator::leader::{self, Elector, LeaseSettings};
use crac_operator::metrics::Metrics;
use crac_operator::watches;
use crac_tests::operator::{end_checkpoint_pod, example_app, running_job_pods, success};
use crac_tests::{TestNamespace, client, kubeconfig_path, kubectl, repo_root, wait_for};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
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
        (
            "podSecurity.extraCapabilities={cap_sys_admin}",
            "/podSecurity/extraCapabilities/0",
        ),
        // Two replicas by default: a budget of two would block every drain.
        (
            "activator.minAvailable=2",
            "activator.minAvailable must be below activator.replicas",
        ),
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

/// A client that authenticates as ServiceAccount `sa` of `namespace` with a fresh TokenRequest
/// token, and that token's id: the audit log names it on each request (`credential-id`), which
/// tells this client's requests from those of another test, or of a pod, under the same
/// ServiceAccount (the control plane is shared).
async fn service_account_client(namespace: &str, sa: &str) -> (kube::Client, String) {
    let token = kubectl(&["create", "token", sa, "-n", namespace, "--duration", "2h"]);
    assert!(
        token.status.success(),
        "kubectl create token: {}",
        text(&token)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let claims = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value = serde_json::from_slice(&base64url(claims)).unwrap();
    let id = claims["jti"].as_str().expect("the token's jti").to_string();
    let view = kubectl(&["config", "view", "--raw", "--minify", "-o", "json"]);
    let mut config: serde_json::Value = serde_json::from_slice(&view.stdout).unwrap();
    config["users"] = serde_json::json!([{ "name": sa, "user": { "token": token } }]);
    config["contexts"][0]["context"]["user"] = sa.into();
    let kubeconfig: Kubeconfig = serde_json::from_value(config).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    (kube::Client::try_from(config).unwrap(), id)
}

/// Decodes unpadded base64url (a JWT's parts).
fn base64url(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = vec![];
    let (mut bits, mut count) = (0u32, 0);
    for byte in text.bytes().filter(|b| *b != b'=') {
        let value = ALPHABET.iter().position(|a| *a == byte).expect("base64url") as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
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

/// What the client holding token `token_id` asked for since `offset`: every request, and the
/// ones RBAC refused (a refusal by an admission policy is not about RBAC). An apply that
/// created its object (201) was also authorized as a `create`.
fn accesses_since(offset: u64, token_id: &str) -> (BTreeSet<Access>, Vec<String>) {
    let log = std::fs::read(audit_log()).unwrap();
    let log = String::from_utf8_lossy(&log[offset as usize..]).to_string();
    let mut used = BTreeSet::new();
    let mut refused = vec![];
    for line in log.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let credential = &event["user"]["extra"]["authentication.kubernetes.io/credential-id"][0];
        if credential.as_str() != Some(&format!("JTI={token_id}")) {
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
        let decision = &event["annotations"]["authorization.k8s.io/decision"];
        if decision == "forbid" || (code == 403 && decision != "allow") {
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

/// Values every install of these tests sets: kwok's nodes (tests/cluster) advertise no
/// ephemeral-storage, so pods that request it are never scheduled there. Everything else is the
/// chart's default (the real node, tests/tests/real_node.rs, runs the default requests).
const ON_KWOK: [&str; 4] = [
    "operator.resources.requests.ephemeral-storage=null",
    "operator.resources.limits.ephemeral-storage=null",
    "activator.resources.requests.ephemeral-storage=null",
    "activator.resources.limits.ephemeral-storage=null",
];

/// `helm upgrade --install` of the chart as release crac-operator in `namespace`, with `sets`
/// (`--set` values), waiting for its Deployments.
fn install(namespace: &str, sets: &[String]) -> Output {
    let kubeconfig = kubeconfig_path().display().to_string();
    let chart = chart();
    let mut args = vec![
        "upgrade",
        "--install",
        "crac-operator",
        &chart,
        "--namespace",
        namespace,
        "--create-namespace",
        "--kubeconfig",
        &kubeconfig,
        "--wait",
        "--timeout",
        "3m",
    ];
    for set in ON_KWOK
        .iter()
        .copied()
        .chain(sets.iter().map(String::as_str))
    {
        args.extend(["--set", set]);
    }
    let out = helm(&args);
    assert!(out.status.success(), "helm install failed:\n{}", text(&out));
    out
}

/// The release in crac-system is the default install for every test but one, which installs
/// it watching one namespace (the audit log records only crac-system's ServiceAccounts, so
/// that install cannot live elsewhere). Tests needing the default hold this for reading, that
/// one for writing.
static RELEASE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What the release was last installed with (`None`: not yet in this run).
static INSTALLED: Mutex<Option<Vec<String>>> = Mutex::new(None);

/// Installs the release with `sets` unless it already is (one `helm upgrade` at a time).
fn ensure_installed(sets: &[String]) -> Option<Output> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if installed.as_deref() == Some(sets) {
        return None;
    }
    *installed = None;
    let out = install(SYSTEM_NS, sets);
    *installed = Some(sets.to_vec());
    Some(out)
}

/// The chart installed in crac-system with its default values, held so until the guard drops.
async fn installed() -> (kube::Client, tokio::sync::RwLockReadGuard<'static, ()>) {
    let admin = client().await;
    let guard = RELEASE.read().await;
    let out = tokio::task::spawn_blocking(|| ensure_installed(&[]))
        .await
        .unwrap();
    if let Some(out) = out {
        assert!(
            text(&out).contains("kubectl crac status"),
            "NOTES.txt should tell the user what to do next:\n{}",
            text(&out)
        );
    }
    (admin, guard)
}

/// Runs the operator in-process as `operator` (the chart's ServiceAccount of `release_ns`),
/// reconciling `ns` only (the control plane is shared), through an app's life: a Lease taken
/// and renewed, a policy with a cap governing `ns`, an app whose spec changes while its first
/// checkpoint runs (that Job is deleted) checkpointed to Ready, a wake
/// requested by `activator` (when given), a claim that does not exist reported, the app
/// deleted.
async fn run_an_app_through_the_operator(
    admin: &kube::Client,
    operator: kube::Client,
    activator: Option<kube::Client>,
    ns: &TestNamespace,
    release_ns: &str,
) {
    // A fresh Lease, so this run takes it by creating it and then renews it.
    let leases = Api::<Lease>::namespaced(admin.clone(), release_ns);
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

    // No control key yet, so this run creates it (as the first app sleeping in place does).
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), release_ns);
    let _ = secrets
        .delete(crac_api::control::KEY_SECRET, &DeleteParams::default())
        .await;

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
    let lease_api = Api::<Lease>::namespaced(operator.clone(), release_ns);
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
        activator: ActivatorRef {
            namespace: release_ns.into(),
            ..ActivatorRef::default()
        },
        ..Settings::new("crac-agent:test", "install-test")
    };
    let ctx = Arc::new(Context::new(
        operator,
        settings,
        Arc::new(Metrics::register(&mut registry)),
    ));
    // What the binary's /readyz reports: set once the controller's watches have synced.
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_synced = synced.clone();
    // The binary also runs the policies' status loop; watching one namespace, it returns at
    // once and writes nothing (policies.rs).
    let policy_status = tokio::spawn(crac_operator::policies::keep_status(
        ctx.clone(),
        std::time::Duration::from_secs(1),
    ));
    let controller = tokio::spawn(watches::run(ctx, 4, move || {
        on_synced.store(true, std::sync::atomic::Ordering::Relaxed)
    }));

    // An app naming a StorageClass (the operator checks it exists) goes to Ready.
    let apps: Api<CracApp> = ns.api();
    let mut app = example_app("demo", "demo:1");
    app.spec.checkpoint.storage.storage_class_name = Some("standard".into());
    // Scale to zero on (it will not fall asleep during the test): the policy's cap applies.
    // Sleeping in place: the operator reads (here: creates) the cluster key and writes the
    // app's control-token Secret.
    app.spec.scale_to_zero = Some(
        serde_json::from_value(
            serde_json::json!({ "enabled": true, "idleAfter": "1h", "mode": "InPlace" }),
        )
        .unwrap(),
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
    // Nothing may dial those addresses: the operator asks no agent how its pod started.
    app.spec.restore.recheckpoint_after_cold_starts = 0;
    apps.create(&PostParams::default(), &app).await.unwrap();
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();
    let running_checkpoint = |other_than: Option<String>| {
        let (jobs, pods) = (&jobs, &pods);
        async move {
            wait_for("a running checkpoint pod", DEADLINE, || async {
                let list = jobs
                    .list(
                        &ListParams::default().labels(&format!("{}=checkpoint", labels::COMPONENT)),
                    )
                    .await
                    .ok()?;
                let job = list.items.into_iter().find(|j| {
                    let id =
                        &j.metadata.annotations.as_ref().unwrap()[labels::CHECKPOINT_ID_ANNOTATION];
                    other_than.as_ref() != Some(id)
                })?;
                let pod = running_job_pods(pods, job.metadata.name.as_deref()?)
                    .await
                    .into_iter()
                    .next()?;
                let id = job.metadata.annotations?[labels::CHECKPOINT_ID_ANNOTATION].clone();
                Some((job.metadata.name?, id, pod))
            })
            .await
        }
    };
    let (first_job, first_id, _) = running_checkpoint(None).await;
    // The spec changes before that checkpoint ends: the operator deletes its Job.
    let mut changed = app.clone();
    changed.spec.template.spec.as_mut().unwrap().containers[0].env = Some(vec![
        serde_json::from_value(serde_json::json!({ "name": "FEATURE", "value": "on" })).unwrap(),
    ]);
    apps.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "template": changed.spec.template } })),
    )
    .await
    .unwrap();
    let (_, id, pod) = running_checkpoint(Some(first_id)).await;
    wait_for("the superseded Job deleted", DEADLINE, || async {
        jobs.get_opt(&first_job).await.ok()?.is_none().then_some(())
    })
    .await;
    end_checkpoint_pod(&pods, &pod, &success(&id)).await;
    wait_for("demo Ready", DEADLINE, || async {
        let phase = apps.get("demo").await.ok()?.status?.phase?;
        (phase == crac_api::cracapp::Phase::Ready).then_some(())
    })
    .await;
    // Its pods mount the token the operator wrote, derived from the key it created.
    let key = secrets.get(crac_api::control::KEY_SECRET).await.unwrap();
    let key = key.data.unwrap()[crac_api::control::KEY_FIELD].0.clone();
    let token = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &ns.name)
        .get(&crac_api::control::token_secret_name("demo"))
        .await
        .unwrap();
    let uid = apps.get("demo").await.unwrap().metadata.uid.unwrap();
    assert_eq!(
        token.data.unwrap()[crac_api::control::TOKEN_FIELD].0,
        crac_api::control::app_token(&key, &uid).into_bytes()
    );
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
    if let Some(activator) = activator {
        use crac_activator::wake::WakeClient;
        crac_activator::wake::KubeWaker::new(activator)
            .request_wake(&crac_activator::routes::AppKey::new(
                ns.name.clone(),
                "demo",
            ))
            .await
            .unwrap();
    }

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

    controller.abort();
    policy_status.abort();
}

/// The rules `subject` holds through the ClusterRole and the Roles the chart installed (`roles`:
/// `(namespace, name)`).
async fn rules_of(
    admin: &kube::Client,
    cluster_role: &str,
    roles: &[(&str, &str)],
) -> Vec<PolicyRule> {
    let mut rules = Api::<ClusterRole>::all(admin.clone())
        .get(cluster_role)
        .await
        .unwrap()
        .rules
        .unwrap();
    for (namespace, name) in roles {
        rules.extend(
            Api::<Role>::namespaced(admin.clone(), namespace)
                .get(name)
                .await
                .unwrap()
                .rules
                .unwrap(),
        );
    }
    rules
}

/// The Event recorder patches an Event only when the same Event repeats; these flows publish
/// each transition once.
const EVENT_SERIES: (&str, &str) = ("patch events.k8s.io/events", "series of a repeated Event");
/// Rights used only while an app sleeps and wakes in place, which needs pods that run an agent
/// (kwok's run nothing, and their addresses must not be dialled): tests/tests/real_node.rs
/// exercises them under the chart's ServiceAccount, where a refusal fails the test.
const SLEEPING_IN_PLACE: [(&str, &str); 3] = [
    ("patch core/pods", "marking a pod asleep in place"),
    (
        "delete core/pods",
        "replacing a pod that cannot wake in place",
    ),
    (
        "patch core/pods/resize",
        "shrinking a sleeping pod's requests",
    ),
];

/// The whole install: helm, then the real operator under the chart's ServiceAccount takes an
/// app to Ready and deletes it, and the activator's watches and wake request run under its
/// own; the audit log shows each chart rule used and nothing refused.
#[tokio::test]
async fn helm_install_runs_the_operator_with_minimal_rbac() {
    let (admin, _release) = installed().await;

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

    let (operator_client, operator_token) =
        service_account_client(SYSTEM_NS, "crac-operator").await;
    let (activator_client, activator_token) =
        service_account_client(SYSTEM_NS, "crac-activator").await;
    let ns = TestNamespace::new("install").await;
    let offset = audit_offset();

    // The activator's watches, as its ServiceAccount, beside the operator.
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
            activator_registry.clone(),
        )),
        tokio::spawn(crac_activator::kube::load_control_key(
            activator_client.clone(),
            SYSTEM_NS.into(),
            activator_registry,
        )),
    ];
    run_an_app_through_the_operator(
        &admin,
        operator_client,
        Some(activator_client),
        &ns,
        SYSTEM_NS,
    )
    .await;
    for w in watches {
        w.abort();
    }

    // The audit log, read back: each rule of the chart was needed, and it was enough.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (used, refused) = accesses_since(offset, &operator_token);
    let operator_rules = rules_of(
        &admin,
        "crac-operator.crac-system",
        &[
            (SYSTEM_NS, "crac-operator-leader-election"),
            (SYSTEM_NS, "crac-operator-control-key"),
        ],
    )
    .await;
    assert_minimal(
        "the operator",
        &granted(&operator_rules),
        &used,
        &refused,
        &[
            EVENT_SERIES,
            SLEEPING_IN_PLACE[0],
            SLEEPING_IN_PLACE[1],
            SLEEPING_IN_PLACE[2],
            // Reconciling every namespace, the binary keeps the policies' status; this
            // operator watches only the test's namespace (the control plane is shared), and
            // watching one namespace it leaves that status alone (policies.rs).
            (
                "patch crac.dev/cracscalepolicies/status",
                "written only when watching every namespace",
            ),
        ],
    );

    let (used, refused) = accesses_since(offset, &activator_token);
    let activator_rules = rules_of(
        &admin,
        "crac-activator.crac-system",
        &[(SYSTEM_NS, "crac-activator-control-key")],
    )
    .await;
    assert_minimal(
        "the activator",
        &granted(&activator_rules),
        &used,
        &refused,
        &[],
    );
}

/// Puts the default install back however the test that changed it ends.
struct DefaultInstallOnDrop;

impl Drop for DefaultInstallOnDrop {
    fn drop(&mut self) {
        ensure_installed(&[]);
    }
}

/// The chart installed watching one namespace: every namespaced right is a Role in that
/// namespace, the operator's only ClusterRole reads (list, watch) the three cluster-scoped kinds
/// it must, and the audit log shows each right used and nothing refused.
#[tokio::test]
async fn watching_one_namespace_the_operator_needs_no_cluster_wide_write() {
    let admin = client().await;
    let ns = TestNamespace::new("install-one").await;
    let _release = RELEASE.write().await;
    let sets = vec![format!("operator.watchNamespace={}", ns.name)];
    let _restore = DefaultInstallOnDrop;
    tokio::task::spawn_blocking(move || ensure_installed(&sets))
        .await
        .unwrap();

    let cluster_role = "crac-operator.crac-system";
    let cluster_rules = rules_of(&admin, cluster_role, &[]).await;
    let cluster_wide: BTreeSet<String> = granted(&cluster_rules)
        .iter()
        .map(ToString::to_string)
        .collect();
    let read_only: BTreeSet<String> = [
        "crac.dev/cracscalepolicies",
        "core/namespaces",
        "storage.k8s.io/storageclasses",
    ]
    .iter()
    .flat_map(|r| [format!("list {r}"), format!("watch {r}")])
    .collect();
    assert_eq!(
        cluster_wide, read_only,
        "watching one namespace, the operator's ClusterRole only reads the cluster-scoped kinds"
    );

    let (operator_client, token) = service_account_client(SYSTEM_NS, "crac-operator").await;
    let offset = audit_offset();
    run_an_app_through_the_operator(&admin, operator_client, None, &ns, SYSTEM_NS).await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (used, refused) = accesses_since(offset, &token);
    let rules = rules_of(
        &admin,
        cluster_role,
        &[
            (&ns.name, "crac-operator"),
            (SYSTEM_NS, "crac-operator-leader-election"),
            (SYSTEM_NS, "crac-operator-activator-pods"),
            (SYSTEM_NS, "crac-operator-control-key"),
        ],
    )
    .await;
    let mut exceptions = vec![EVENT_SERIES];
    exceptions.extend(SLEEPING_IN_PLACE);
    assert_minimal(
        "the operator watching one namespace",
        &granted(&rules),
        &used,
        &refused,
        &exceptions,
    );
}

/// A pod, from its JSON.
fn pod(spec: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" }, "spec": spec
    }))
    .unwrap()
}

/// The refusal's message when `pod` is refused in `ns` (a dry run: nothing is created), or
/// `None` when it is admitted.
async fn refusal(admin: &kube::Client, ns: &str, pod: &Pod) -> Option<String> {
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match Api::<Pod>::namespaced(admin.clone(), ns)
        .create(&dry_run, pod)
        .await
    {
        Ok(_) => None,
        Err(kube::Error::Api(e)) => Some(e.message),
        Err(e) => panic!("create pod: {e}"),
    }
}

/// The pods the operator really builds for `app`: checkpoint, restore and cleanup.
fn operator_pods(app: &CracApp) -> Vec<(&'static str, Pod)> {
    use crac_operator::build::{BuildConfig, cleanup, deployment, job};
    let validated = crac_operator::validate::validate(app, &Default::default()).unwrap();
    let config = BuildConfig {
        agent_image: "crac-agent:test".into(),
    };
    let id = "0".repeat(64);
    let image = crac_api::cracapp::CheckpointStatus {
        id: id.clone(),
        digest: Some(format!("sha256:{id}")),
        ..Default::default()
    };
    let as_pod = |t: k8s_openapi::api::core::v1::PodTemplateSpec| Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("p".into()),
            labels: t.metadata.and_then(|m| m.labels),
            ..Default::default()
        },
        spec: t.spec,
        ..Default::default()
    };
    let job_pod = |j: Job| as_pod(j.spec.unwrap().template);
    vec![
        (
            "checkpoint",
            job_pod(job::checkpoint_job_for(app, &validated, &id, 0, &config)),
        ),
        (
            "restore",
            as_pod(
                deployment::restore_deployment_for(app, &validated, &image, 1, false, &config)
                    .spec
                    .unwrap()
                    .template,
            ),
        ),
        (
            // Sleeping in place adds only a Secret volume and an env var: no privilege.
            "restore, sleeping in place",
            as_pod(
                deployment::restore_deployment_for(app, &validated, &image, 1, true, &config)
                    .spec
                    .unwrap()
                    .template,
            ),
        ),
        (
            "cleanup",
            job_pod(cleanup::cleanup_job_for(app, "c", "claim", &config)),
        ),
    ]
}

/// The chart's pod-security policy: in a namespace that opted in, pods get PodSecurity
/// baseline plus the app container's two capabilities and seccomp Unconfined, and the pods the
/// operator builds are admitted; a namespace that did not opt in sees no change.
#[tokio::test]
async fn pod_security_policy_admits_the_operators_pods_and_refuses_the_rest() {
    let (admin, _release) = installed().await;
    let enforced = TestNamespace::new("podsec").await;
    let untouched = TestNamespace::new("podsec-off").await;
    let label =
        serde_json::json!({ "metadata": { "labels": { "crac.dev/pod-security": "enforce" } } });
    Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .patch(
            &enforced.name,
            &PatchParams::default(),
            &Patch::Merge(&label),
        )
        .await
        .unwrap();

    let privileged = pod(serde_json::json!({ "containers": [
        { "name": "app", "image": "i", "securityContext": { "privileged": true } }
    ]}));
    let host_path = pod(serde_json::json!({
        "containers": [{ "name": "app", "image": "i" }],
        "volumes": [{ "name": "root", "hostPath": { "path": "/" } }]
    }));
    let sys_admin = pod(serde_json::json!({ "containers": [
        { "name": "app", "image": "i", "securityContext": { "capabilities": { "add": ["SYS_ADMIN"] } } }
    ]}));
    // The app container's exceptions are the app container's only.
    let sidecar_ptrace = pod(serde_json::json!({ "containers": [
        { "name": "app", "image": "i" },
        { "name": "sidecar", "image": "i", "securityContext": {
            "capabilities": { "add": ["SYS_PTRACE"] } } }
    ]}));
    let sidecar_unconfined = pod(serde_json::json!({ "containers": [
        { "name": "app", "image": "i" },
        { "name": "sidecar", "image": "i", "securityContext": {
            "seccompProfile": { "type": "Unconfined" } } }
    ]}));
    let init = pod(serde_json::json!({
        "initContainers": [{ "name": "setup", "image": "i", "securityContext": { "privileged": true } }],
        "containers": [{ "name": "app", "image": "i" }]
    }));

    // The policy takes effect once the API server has loaded it.
    let first = wait_for("the pod-security policy in force", DEADLINE, || async {
        refusal(&admin, &enforced.name, &privileged).await
    })
    .await;
    assert!(
        first.contains("spec.containers[].securityContext.privileged"),
        "{first}"
    );
    for (what, pod, field) in [
        ("hostPath", &host_path, "spec.volumes[].hostPath"),
        (
            "SYS_ADMIN",
            &sys_admin,
            "spec.containers[].securityContext.capabilities.add",
        ),
        (
            "a sidecar's SYS_PTRACE",
            &sidecar_ptrace,
            "spec.containers[].securityContext.capabilities.add",
        ),
        (
            "a sidecar's seccomp Unconfined",
            &sidecar_unconfined,
            "spec.containers[].securityContext.seccompProfile.type",
        ),
        (
            "a privileged init container",
            &init,
            "spec.initContainers[].securityContext.privileged",
        ),
    ] {
        let message = refusal(&admin, &enforced.name, pod)
            .await
            .unwrap_or_else(|| panic!("{what} was admitted"));
        assert!(
            message.contains(field),
            "refusing {what}, the message should name {field}: {message}"
        );
    }

    let mut app = example_app("demo", "demo:1");
    app.metadata.namespace = Some(enforced.name.clone());
    // As if read from the API server (the builders set it as the owner).
    app.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    for (component, pod) in operator_pods(&app) {
        assert_eq!(
            refusal(&admin, &enforced.name, &pod).await,
            None,
            "the operator's {component} pod"
        );
    }

    for pod in [
        &privileged,
        &host_path,
        &sys_admin,
        &sidecar_ptrace,
        &sidecar_unconfined,
        &init,
    ] {
        assert_eq!(
            refusal(&admin, &untouched.name, pod).await,
            None,
            "a namespace without the label sees no change"
        );
    }

    // Both policies compile without a type-checking warning.
    let policies = Api::<ValidatingAdmissionPolicy>::all(admin.clone());
    for name in ["crac-pod-security", "crac-activator-status"] {
        let name = format!("{name}.{SYSTEM_NS}");
        let status = policies.get(&name).await.unwrap().status.unwrap();
        let warnings = status
            .type_checking
            .and_then(|t| t.expression_warnings)
            .unwrap_or_default();
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
}

/// The chart's activator policy: the activator's ServiceAccount may set
/// `status.wakeRequestedAt` (its own code path, the first status write included), and any other
/// status change it tries is refused with a message naming the field.
#[tokio::test]
async fn the_activator_may_only_ask_for_wakes() {
    let (admin, _release) = installed().await;
    let (activator, _) = service_account_client(SYSTEM_NS, "crac-activator").await;
    let ns = TestNamespace::new("activator-status").await;
    let apps: Api<CracApp> = ns.api();
    apps.create(&PostParams::default(), &example_app("demo", "demo:1"))
        .await
        .unwrap();
    let as_activator: Api<CracApp> = Api::namespaced(activator.clone(), &ns.name);
    let patch_status = |status: serde_json::Value| {
        let api = as_activator.clone();
        async move {
            api.patch_status(
                "demo",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
        }
    };

    // The wake request, exactly as the activator makes it: allowed, as the first status write
    // (the CRD's status defaults appear with it) and as a later one.
    use crac_activator::wake::WakeClient;
    let waker = crac_activator::wake::KubeWaker::new(activator.clone());
    let key = crac_activator::routes::AppKey::new(ns.name.clone(), "demo");
    waker.request_wake(&key).await.unwrap();

    // The policy takes effect once the API server has loaded it: until it refuses, each try
    // sets a different observedGeneration (so each is a change), put back as admin after.
    let mut generation = 0;
    wait_for("the activator policy in force", DEADLINE, || {
        generation += 1;
        let attempt = patch_status(serde_json::json!({ "observedGeneration": generation }));
        async move {
            match attempt.await {
                Err(kube::Error::Api(e)) if e.code == 403 => Some(()),
                _ => None,
            }
        }
    })
    .await;
    Api::<CracApp>::namespaced(admin.clone(), &ns.name)
        .patch_status(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": { "observedGeneration": null } })),
        )
        .await
        .unwrap();

    match patch_status(serde_json::json!({ "phase": "Ready" })).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(
                e.message.contains("it changed status.phase"),
                "the refusal should name status.phase: {}",
                e.message
            );
        }
        other => panic!("the activator set status.phase: {other:?}"),
    }
    let ports = serde_json::json!({ "activatorPorts": [
        { "port": 80, "targetPort": 8080, "activatorPort": 20001 }
    ]});
    match patch_status(ports).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(
                e.message.contains("it changed status.activatorPorts"),
                "the refusal should name status.activatorPorts: {}",
                e.message
            );
        }
        other => panic!("the activator set status.activatorPorts: {other:?}"),
    }
    waker.request_wake(&key).await.unwrap();
    let status = apps.get("demo").await.unwrap().status.unwrap();
    assert!(status.activator_ports.is_empty() && status.phase.is_none());
    assert!(status.wake_requested_at.is_some());
}

/// The activator policy's map of the CRD's status defaults is the CRD's: a default the map
/// lacked would make the activator's first wake request look like a change to that field.
#[test]
fn activator_policy_knows_the_crd_status_defaults() {
    let crds = std::fs::read_to_string(repo_root().join("crds/crds.yaml")).unwrap();
    let mut defaults = BTreeSet::new();
    for doc in crds.split("\n---") {
        let Ok(crd) = yaml_serde::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        if crd["spec"]["names"]["kind"] != "CracApp" {
            continue;
        }
        for version in crd["spec"]["versions"].as_array().unwrap() {
            let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"];
            for (field, schema) in status["properties"].as_object().unwrap() {
                if let Some(default) = schema.get("default") {
                    let cel = match default {
                        serde_json::Value::String(s) => format!("'{s}'"),
                        other => other.to_string(),
                    };
                    defaults.insert(format!("'{field}': {cel}"));
                }
            }
        }
    }
    let expected = format!(
        "{{{}}}",
        defaults.into_iter().collect::<Vec<_>>().join(", ")
    );
    let out = helm(&[
        "template",
        "x",
        &chart(),
        "-s",
        "templates/activator-policy.yaml",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        rendered.contains(&format!("expression: \"{expected}\"")),
        "the activator policy's `defaults` should be {expected} (crds/crds.yaml):\n{rendered}"
    );
}

/// kube-score findings waived, each with its reason; every other finding fails the test.
const KUBE_SCORE_WAIVERS: &[(&str, &str)] = &[
    (
        "--ignore-container-cpu-limit",
        "a CPU limit throttles (CFS quota) the activator's data path and the operator's \
         reconcile bursts; the CPU request reserves their share",
    ),
    (
        "--ignore-test=container-image-pull-policy",
        "the images are tagged with the chart's version, never re-pushed; Always would make \
         every restart of the activator (which holds traffic) depend on the registry \
         (image.pullPolicy sets it)",
    ),
    (
        "--ignore-test=deployment-replicas",
        "one operator replica by design: one reconciles (leader election), more only stand by \
         and apps keep serving while it restarts (operator.replicas adds standbys)",
    ),
];

/// kube-score (built from its pinned Go module by scripts/kube-score) finds nothing, critical
/// or warning, in the chart as `helm template` renders it, by default and watching one
/// namespace, beyond the waivers above.
#[test]
fn kube_score_finds_nothing_in_the_rendered_chart() {
    for sets in [vec![], vec!["--set", "operator.watchNamespace=shop"]] {
        let mut args = vec!["template", "crac-operator", &chart(), "-n", "crac-system"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        args.extend(sets.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rendered = helm(&args);
        assert!(rendered.status.success(), "{}", text(&rendered));
        let mut score = Command::new(repo_root().join("scripts/kube-score"));
        score.args(["score", "--output-format", "ci", "--exit-one-on-warning"]);
        score.args(KUBE_SCORE_WAIVERS.iter().map(|(flag, _)| flag));
        score.arg("-");
        let mut child = score
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run scripts/kube-score");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &rendered.stdout).unwrap();
        let out = child.wait_with_output().unwrap();
        let findings: Vec<&str> = std::str::from_utf8(&out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("[OK]") && !l.starts_with("[SKIPPED]"))
            .collect();
        assert!(
            out.status.success() && findings.is_empty(),
            "kube-score {sets:?}: fix these or waive them in KUBE_SCORE_WAIVERS with the reason:\n{}\n{}",
            findings.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `podSecurity.extraCapabilities` reaches both places that read it: the pod-security policy's
/// allowed list and the operator's CRAC_ALLOWED_CAPABILITIES, which is absent when the list is
/// empty (the default).
#[test]
fn extra_capabilities_reach_the_policy_and_the_operator() {
    let render = |sets: &[&str]| -> Vec<serde_json::Value> {
        let chart = chart();
        let mut args = vec!["template", "x", &chart, "-n", "crac-system"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = helm(&args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .split("\n---")
            .filter_map(|doc| yaml_serde::from_str::<serde_json::Value>(doc).ok())
            .filter(|doc| doc.is_object())
            .collect()
    };
    let find = |docs: &[serde_json::Value], kind: &str, name: &str| -> serde_json::Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let allowed_env = |docs: &[serde_json::Value]| -> Option<String> {
        let deployment = find(docs, "Deployment", "crac-operator");
        deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "CRAC_ALLOWED_CAPABILITIES")
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    let allowed_in_policy = |docs: &[serde_json::Value]| -> String {
        let policy = find(
            docs,
            "ValidatingAdmissionPolicy",
            "crac-pod-security.crac-system",
        );
        policy["spec"]["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "allowedCapabilities")
            .unwrap()["expression"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let defaults = render(&[]);
    assert_eq!(allowed_env(&defaults), None);
    assert!(!allowed_in_policy(&defaults).contains("NET_ADMIN"));

    let extra = render(&["podSecurity.extraCapabilities={NET_ADMIN,NET_RAW}"]);
    assert_eq!(allowed_env(&extra).as_deref(), Some("NET_ADMIN,NET_RAW"));
    let policy = allowed_in_policy(&extra);
    assert!(
        policy.contains("'NET_ADMIN'") && policy.contains("'NET_RAW'"),
        "{policy}"
    );
}
