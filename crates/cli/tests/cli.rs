//! The built `kubectl-crac` against the real control plane (tests/cluster): a test writes the
//! app's status as the operator would, then reads it back through the plugin.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use crac_api::{CracApp, labels};
use crac_tests::operator::example_app;
use crac_tests::{TestNamespace, install_crds, kubeconfig_path};
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::process::{Command, Output};

fn plugin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-crac"))
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

async fn ready_app(ns: &TestNamespace) -> Api<CracApp> {
    install_crds(&ns.client).await;
    let apps: Api<CracApp> = ns.api();
    apps.create(&PostParams::default(), &example_app("demo", "demo:1"))
        .await
        .unwrap();
    let status = serde_json::json!({ "status": {
        "phase": "Ready", "replicas": 2, "readyReplicas": 2, "observedGeneration": 1,
        "checkpoint": { "id": "0123456789abcdef", "createdAt": "2026-01-01T00:00:00Z", "sizeBytes": 59000000 },
        "conditions": [{ "type": "Available", "status": "True", "reason": "Restored",
                         "message": "2 of 2 pods ready", "lastTransitionTime": "2026-01-01T00:00:00Z" }]
    }});
    apps.patch_status("demo", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    apps
}

#[tokio::test]
async fn status_and_explain_show_what_the_operator_wrote() {
    let ns = TestNamespace::new("cli-status").await;
    ready_app(&ns).await;

    let out = plugin(&["status", "-n", &ns.name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("NAME  PHASE  READY  CHECKPOINT  SIZE    LAST ACTIVITY  LAST WAKE\n"),
        "{text}"
    );
    assert!(text.contains("demo  Ready  2/2"), "{text}");
    assert!(text.contains("56.3Mi"), "{text}");

    let out = plugin(&["status", "-A"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Columns widen with the longest namespace: compare words, not spacing.
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with(&format!("{} ", ns.name)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    assert!(line.contains("demo Ready 2/2"), "{}", stdout(&out));

    let out = plugin(&["explain", "-n", &ns.name, "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("CracApp {}/demo: Ready\n", ns.name)),
        "{text}"
    );
    assert!(
        text.contains("✓ Available Restored: 2 of 2 pods ready"),
        "{text}"
    );
}

#[tokio::test]
async fn checkpoint_wake_and_sleep_set_their_annotations() {
    let ns = TestNamespace::new("cli-annotate").await;
    let apps = ready_app(&ns).await;
    for (command, key) in [
        ("checkpoint", labels::CHECKPOINT_REQUESTED_AT),
        ("wake", labels::WAKE_REQUESTED_AT),
        ("sleep", labels::SLEEP_REQUESTED_AT),
    ] {
        let out = plugin(&[command, "-n", &ns.name, "demo"]);
        assert!(out.status.success(), "{command}: {}", stderr(&out));
        let app = apps.get("demo").await.unwrap();
        let value = &app.metadata.annotations.unwrap()[key];
        assert!(
            value.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
            "{key} should be an RFC 3339 time, got {value:?}"
        );
    }
    let out = plugin(&["sleep", "-n", &ns.name, "demo"]);
    assert!(
        stdout(&out).contains("scaleToZero.enabled is not true"),
        "sleep should warn when scale to zero is off: {}",
        stdout(&out)
    );
}

#[tokio::test]
async fn errors_say_what_to_do() {
    let ns = TestNamespace::new("cli-errors").await;
    install_crds(&ns.client).await;
    let out = plugin(&["wake", "-n", &ns.name, "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not found") && stderr(&out).contains("kubectl crac status"),
        "{}",
        stderr(&out)
    );

    let out = plugin(&["status", "-n", &ns.name]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("No CracApps"), "{}", stdout(&out));

    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-crac"))
        .args(["status"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("set KUBECONFIG"), "{}", stderr(&out));
}
