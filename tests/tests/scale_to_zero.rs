//! Scale to zero on the real control plane: drain, sleep, wake; the idle timer; a policy's
//! cap on awake apps; and the whole path with the real activator binary and real HTTP.
//! Restore pods have loopback addresses, so the tests serve the agent's activity endpoint
//! (and the app itself) on them.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use crac_api::CracApp;
use crac_api::cracapp::{Phase, ServingMode};
use crac_api::labels;
use crac_tests::activity::{ActivityServer, report};
use crac_tests::operator::{
    ACTIVATOR_NAMESPACE, create_and_make_ready, example_app, stand_in_activator,
    stand_in_activator_named, start_operator, status_of,
};
use crac_tests::{TestNamespace, install_crds, kubeconfig_path, repo_root, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// These tests serve on pod addresses, and kwok hands a deleted pod's address to the next
/// pod at once: run them one at a time so one test's stand-in never answers for another's pod.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn sleepy_app(name: &str, idle_after: &str) -> CracApp {
    let mut app = example_app(name, &format!("{name}:1"));
    app.spec.replicas = 1;
    app.spec.scale_to_zero = Some(crac_api::cracapp::ScaleToZeroSpec {
        enabled: Some(true),
        caller_namespaces: Vec::new(),
        idle_after: Some(idle_after.into()),
        wake_timeout: Some("30s".into()),
        mode: None,
    });
    app
}

/// Addresses of the app's ready restore pods.
async fn restore_pod_ips(ns: &TestNamespace, app: &str) -> Vec<String> {
    let pods: Api<Pod> = ns.api();
    let selector = format!("{}={app},{}=restore", labels::APP, labels::COMPONENT);
    pods.list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| crac_api::serving::serving_address(p).map(String::from))
        .collect()
}

async fn annotate(apps: &Api<CracApp>, name: &str, key: &str) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({ "metadata": { "annotations": { key: now } } });
    apps.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

async fn replicas(ns: &TestNamespace, name: &str) -> i32 {
    let d = ns.api::<Deployment>().get(name).await.unwrap();
    d.spec.unwrap().replicas.unwrap_or(0)
}

#[tokio::test]
async fn asked_to_sleep_it_drains_then_scales_to_zero_and_a_wake_request_brings_it_back() {
    let _serial = SERIAL.lock().await;
    let ns = TestNamespace::new("stz-cycle").await;
    install_crds(&ns.client).await;
    let activator_ip = stand_in_activator(&ns.client, &ns.name).await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    create_and_make_ready(&ns, &sleepy_app("nap", "30m")).await;
    let ip = restore_pod_ips(&ns, "nap").await.pop().unwrap();
    // A caller is still connected.
    let agent = ActivityServer::start(&ip, report(1, 0)).await;

    annotate(&apps, "nap", labels::SLEEP_REQUESTED_AT).await;
    let s = wait_for("the drain to start", DEADLINE, || async {
        let s = status_of(&apps, "nap").await;
        (s.serving_mode? == ServingMode::Activator).then_some(s)
    })
    .await;
    let port = s.activator_ports[0].activator_port;
    // The Service now sends new requests to the activator, at the app's activator port.
    let slices: Api<EndpointSlice> = ns.api();
    let slice = wait_for("the slice on the activator", DEADLINE, || async {
        let slice = slices.get("nap-crac").await.ok()?;
        let ports = slice.ports.clone()?;
        (ports[0].port == Some(port)).then_some(slice)
    })
    .await;
    let endpoints = slice.endpoints.clone().unwrap_or_default();
    assert_eq!(endpoints.len(), 1, "{slice:?}");
    assert_eq!(endpoints[0].addresses, [activator_ip]);
    // The open connection holds the pods up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        replicas(&ns, "nap").await,
        1,
        "draining waits for open connections"
    );

    agent.set(0, None);
    wait_for("scaled to zero", DEADLINE, || async {
        let s = status_of(&apps, "nap").await;
        (s.phase? == Phase::ScaledToZero && s.slept_at.is_some()).then_some(())
    })
    .await;
    assert_eq!(replicas(&ns, "nap").await, 0);
    let app = apps.get("nap").await.unwrap();
    assert_eq!(app.spec.replicas, 1, "the user's spec is never rewritten");
    let cond = app
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "ScaledToZero")
        .unwrap();
    assert_eq!(cond.status, "True");
    drop(agent);

    // The activator asks for a wake the way it does: status.wakeRequestedAt, its own manager.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({ "status": { "wakeRequestedAt": now } });
    apps.patch_status(
        "nap",
        &PatchParams {
            field_manager: Some("crac-activator".into()),
            ..Default::default()
        },
        &Patch::Merge(patch),
    )
    .await
    .unwrap();
    let s = wait_for("awake again", DEADLINE, || async {
        let s = status_of(&apps, "nap").await;
        (s.phase? == Phase::Ready && s.serving_mode? == ServingMode::Pods).then_some(s)
    })
    .await;
    let wake = s.last_wake.unwrap();
    assert!(wake.latency_ms.unwrap() >= 0);
    assert!(s.slept_at.is_none());
    assert_eq!(replicas(&ns, "nap").await, 1);
    let reasons = ns.event_reasons().await;
    for r in ["Draining", "Sleeping", "Waking", "Woken"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} Event in {reasons:?}"
        );
    }
}

/// A sleeping app's Service follows the activator pods: when one is replaced (a rolling
/// update, a node drain), the app's slice moves to the new address promptly, not at the next
/// periodic look (minutes for a sleeping app).
#[tokio::test]
async fn a_sleeping_apps_endpoints_follow_the_activator_pods() {
    let _serial = SERIAL.lock().await;
    let ns = TestNamespace::new("stz-follow").await;
    install_crds(&ns.client).await;
    let old = stand_in_activator(&ns.client, &ns.name).await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    create_and_make_ready(&ns, &sleepy_app("follow", "30m")).await;
    let ip = restore_pod_ips(&ns, "follow").await.pop().unwrap();
    let agent = ActivityServer::start(&ip, report(0, 0)).await;
    annotate(&apps, "follow", labels::SLEEP_REQUESTED_AT).await;
    wait_for("asleep", DEADLINE, || async {
        (status_of(&apps, "follow").await.phase? == Phase::ScaledToZero).then_some(())
    })
    .await;
    drop(agent);
    let slices: Api<EndpointSlice> = ns.api();
    let addresses = || async {
        let slice = slices.get("follow-crac").await.unwrap();
        let mut all: Vec<String> = slice
            .endpoints
            .into_iter()
            .flatten()
            .flat_map(|e| e.addresses)
            .collect();
        all.sort();
        all
    };
    assert_eq!(addresses().await, std::slice::from_ref(&old));

    let second = format!("activator-{}-2", ns.name);
    let new = stand_in_activator_named(&ns.client, &ns.name, &second).await;
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    wait_for(
        "the new activator in the slice",
        Duration::from_secs(10),
        || async { (addresses().await == both).then_some(()) },
    )
    .await;
    let activators: Api<Pod> = Api::namespaced(ns.client.clone(), ACTIVATOR_NAMESPACE);
    activators
        .delete(&format!("activator-{}", ns.name), &Default::default())
        .await
        .unwrap();
    // Far below the 300 s a sleeping app waits between periodic looks.
    wait_for(
        "the old activator out of the slice",
        Duration::from_secs(10),
        || async { (addresses().await == [new.clone()]).then_some(()) },
    )
    .await;
    let _ = activators.delete(&second, &Default::default()).await;
}

#[tokio::test]
async fn an_app_idle_for_idle_after_goes_to_sleep_by_itself() {
    let _serial = SERIAL.lock().await;
    let ns = TestNamespace::new("stz-idle").await;
    install_crds(&ns.client).await;
    stand_in_activator(&ns.client, &ns.name).await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    create_and_make_ready(&ns, &sleepy_app("quiet", "30s")).await;
    let ip = restore_pod_ips(&ns, "quiet").await.pop().unwrap();
    let agent = ActivityServer::start(&ip, report(0, 120)).await;
    // 30 s is the shortest idleAfter the API accepts; the clock runs from the app's Ready.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        status_of(&apps, "quiet").await.phase,
        Some(Phase::Ready),
        "not idle long enough yet"
    );
    wait_for(
        "asleep after idleAfter",
        Duration::from_secs(90),
        || async { (status_of(&apps, "quiet").await.phase? == Phase::ScaledToZero).then_some(()) },
    )
    .await;
    drop(agent);
}

#[tokio::test]
async fn a_policy_caps_awake_apps_and_the_longest_idle_sleeps_first() {
    let _serial = SERIAL.lock().await;
    let ns = TestNamespace::new("stz-policy").await;
    install_crds(&ns.client).await;
    stand_in_activator(&ns.client, &ns.name).await;
    let _operator = start_operator(&ns.client, &ns.name);
    let policies: Api<crac_api::CracScalePolicy> = Api::all(ns.client.clone());
    let policy: crac_api::CracScalePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "crac.dev/v1alpha1", "kind": "CracScalePolicy",
        "metadata": { "name": ns.name },
        "spec": {
            "selector": { "matchLabels": { "policy-test": ns.name } },
            "scaleToZero": { "enabled": true, "idleAfter": "1h" },
            "maxAwake": 1
        }
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();

    let labelled = |name: &str| {
        let mut app = example_app(name, &format!("{name}:1"));
        app.spec.replicas = 1;
        app.metadata.labels = Some([("policy-test".to_string(), ns.name.clone())].into());
        app
    };
    create_and_make_ready(&ns, &labelled("older")).await;
    create_and_make_ready(&ns, &labelled("newer")).await;
    let older_ip = restore_pod_ips(&ns, "older").await.pop().unwrap();
    let newer_ip = restore_pod_ips(&ns, "newer").await.pop().unwrap();
    let older_agent = ActivityServer::start(&older_ip, report(0, 600)).await;
    let _b = ActivityServer::start(&newer_ip, report(0, 5)).await;

    let apps: Api<CracApp> = ns.api();
    wait_for("the longest-idle app to sleep", DEADLINE, || async {
        (status_of(&apps, "older").await.phase? == Phase::ScaledToZero).then_some(())
    })
    .await;
    assert_eq!(
        status_of(&apps, "newer").await.phase,
        Some(Phase::Ready),
        "one may stay awake"
    );
    drop(older_agent);
    let _ = policies.delete(&ns.name, &Default::default()).await;
}

#[tokio::test]
async fn a_request_to_a_sleeping_app_wakes_it_through_the_real_activator() {
    let _serial = SERIAL.lock().await;
    let ns = TestNamespace::new("stz-e2e").await;
    install_crds(&ns.client).await;
    stand_in_activator(&ns.client, &ns.name).await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    create_and_make_ready(&ns, &sleepy_app("web", "30m")).await;
    let ip = restore_pod_ips(&ns, "web").await.pop().unwrap();
    let agent = ActivityServer::start(&ip, report(0, 0)).await;
    annotate(&apps, "web", labels::SLEEP_REQUESTED_AT).await;
    let asleep = wait_for("asleep", DEADLINE, || async {
        let s = status_of(&apps, "web").await;
        (s.phase? == Phase::ScaledToZero).then_some(s)
    })
    .await;
    drop(agent);
    let port = asleep.activator_ports[0].activator_port;

    // The real activator, on its own loopback address (others may run beside it).
    let activator = Activator::start("127.0.0.3").await;
    // As kube-proxy would route the Service's ClusterIP to the activator's port for this app.
    let caller = tokio::spawn(get(format!("127.0.0.3:{port}"), "/hello"));

    // The operator wakes the app; as soon as its pod has an address, the app answers on it.
    let pod_ip = wait_for("a woken pod", DEADLINE, || async {
        restore_pod_ips(&ns, "web").await.pop()
    })
    .await;
    let app = tokio::spawn(serve_app(pod_ip.clone()));
    let (code, body) = tokio::time::timeout(Duration::from_secs(45), caller)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, format!("hello from {pod_ip}"));
    let s = wait_for("Ready on the pods again", DEADLINE, || async {
        let s = status_of(&apps, "web").await;
        (s.serving_mode? == ServingMode::Pods && s.phase? == Phase::Ready).then_some(s)
    })
    .await;
    assert!(s.last_wake.unwrap().latency_ms.is_some());
    app.abort();
    drop(activator);
}

/// The activator binary, stopped when dropped.
struct Activator(std::process::Child);

impl Activator {
    async fn start(address: &str) -> Self {
        let bin = workspace_binary("crac-activator", "crac-activator");
        let admin = format!("{address}:19090");
        let child = std::process::Command::new(bin)
            .args(["--kubeconfig", kubeconfig_path().to_str().unwrap()])
            .args(["--listen-address", address, "--admin-address", &admin])
            // The test calls from this machine, not from a pod.
            .args(["--trusted-callers", "127.0.0.0/8"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let handle = Activator(child);
        wait_for("the activator's /readyz", DEADLINE, || async {
            let (code, _) = get(admin.clone(), "/readyz").await;
            (code == 200).then_some(())
        })
        .await;
        handle
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds (when needed) and locates a binary of another workspace crate.
fn workspace_binary(package: &str, bin: &str) -> std::path::PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(repo_root())
        .status()
        .unwrap();
    assert!(status.success(), "cargo build -p {package}");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), Into::into);
    target.join("debug").join(bin)
}

/// One HTTP/1.0 GET; `(0, error)` when the connection fails.
async fn get(address: String, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(&address).await else {
        return (0, "connect failed".into());
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: web\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, "write failed".into());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The "app": answers every request with its address, on `ip:8080`.
async fn serve_app(ip: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((ip.as_str(), 8080))
        .await
        .unwrap();
    loop {
        let (mut stream, _) = listener.accept().await.unwrap();
        let body = format!("hello from {ip}");
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Sleeping in place (`mode: InPlace`) with the operator's side real and the pod's agent a
/// stand-in on the pod's address: asked to sleep, the operator calls the agent's `POST /sleep`
/// with the app's control token (the HMAC of its UID under the key it created) and keeps the
/// pod, marked asleep; asked to wake after the agent is gone (its node lost, say), it cannot
/// wake the pod in place, so it replaces it, says so in an Event, and the app serves again
/// from the replacement.
#[tokio::test]
async fn a_pod_asleep_in_place_that_cannot_be_woken_is_replaced() {
    let _serial = SERIAL.lock().await;
    let ns = TestNamespace::new("stz-in-place").await;
    install_crds(&ns.client).await;
    stand_in_activator(&ns.client, &ns.name).await;
    let _operator = start_operator(&ns.client, &ns.name);
    let apps: Api<CracApp> = ns.api();
    let mut app = sleepy_app("doze", "30m");
    if let Some(s) = app.spec.scale_to_zero.as_mut() {
        s.mode = Some(crac_api::cracapp::SleepMode::InPlace);
    }
    create_and_make_ready(&ns, &app).await;
    let ip = restore_pod_ips(&ns, "doze").await.pop().unwrap();
    let agent = ActivityServer::start(&ip, report(0, 600)).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(ns.client.clone(), ACTIVATOR_NAMESPACE);
    let key = wait_for("the control key", DEADLINE, || async {
        let s = secrets
            .get_opt(crac_api::control::KEY_SECRET)
            .await
            .ok()??;
        Some(s.data?.remove(crac_api::control::KEY_FIELD)?.0)
    })
    .await;
    let uid = apps.get("doze").await.unwrap().metadata.uid.unwrap();
    let token = crac_api::control::app_token(&key, &uid);
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let seen = calls.clone();
    let expected = format!("Bearer {token}");
    agent.set_control(Some(std::sync::Arc::new(move |path, authorization| {
        let ok = authorization == Some(expected.as_str());
        seen.lock().unwrap().push((path.to_string(), ok));
        if ok {
            (200, r#"{"mode":"sleeping","sleepMs":1}"#.into())
        } else {
            (401, "{}".into())
        }
    })));

    annotate(&apps, "doze", labels::SLEEP_REQUESTED_AT).await;
    let pods: Api<Pod> = ns.api();
    let selector = format!("{}=doze,{}=restore", labels::APP, labels::COMPONENT);
    let asleep = wait_for("the pod marked asleep in place", DEADLINE, || async {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()?;
        list.items.into_iter().find(|p| {
            p.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(labels::ASLEEP_IN_PLACE_SINCE))
        })
    })
    .await;
    wait_for("the app asleep", DEADLINE, || async {
        (status_of(&apps, "doze").await.phase? == Phase::ScaledToZero).then_some(())
    })
    .await;
    assert_eq!(
        replicas(&ns, "doze").await,
        1,
        "asleep in place, the pod stays"
    );
    assert_eq!(
        calls.lock().unwrap().as_slice(),
        [("/sleep".to_string(), true)],
        "one sleep, with the app's token"
    );

    // The agent is gone; a wake cannot reach it.
    drop(agent);
    annotate(&apps, "doze", labels::WAKE_REQUESTED_AT).await;
    let old = asleep.metadata.uid.clone().unwrap();
    wait_for("the pod replaced", DEADLINE, || async {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()?;
        let live: Vec<&Pod> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        (live.len() == 1 && live[0].metadata.uid.as_deref() != Some(old.as_str())).then_some(())
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    wait_for("a WakeInPlaceFellBack Event", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("WakeInPlaceFellBack"))
            .then_some(())
    })
    .await;
    wait_for("the app serving from the replacement", DEADLINE, || async {
        let s = status_of(&apps, "doze").await;
        (s.phase? == Phase::Ready && s.serving_mode? == ServingMode::Pods).then_some(())
    })
    .await;
}
