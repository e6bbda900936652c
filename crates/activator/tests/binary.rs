//! The built `crac-activator` binary against a small fake API server on 127.0.0.1 that serves
//! list and watch for CracApps and pods and accepts the wake patch: when the activator patches
//! `status.wakeRequestedAt`, the fake turns the app's pod ready (IP 127.0.0.1) on the pod
//! watch, as the operator and kubelet would. Exercises the real watches (the caller check's
//! cluster-wide pod watch included: callers come from 127.0.0.2 and up, pods in the fake API),
//! the real status patch, the admin port and SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

struct FakeApi {
    app: Mutex<Value>,
    pods: Mutex<Vec<Value>>,
    rv: AtomicU64,
    app_events: broadcast::Sender<String>,
    pod_events: broadcast::Sender<String>,
    patches: Mutex<Vec<(String, String, Value)>>,
}

impl FakeApi {
    fn next_rv(&self) -> String {
        (self.rv.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }
}

fn json_response(status: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

async fn handle(api: Arc<FakeApi>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let watching = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/apis/crac.dev/v1alpha1/cracapps") if watching => {
            watch_stream(api.app_events.subscribe())
        }
        (Method::GET, "/apis/crac.dev/v1alpha1/cracapps") => {
            let items = vec![api.app.lock().unwrap().clone()];
            json_response(
                200,
                &json!({"apiVersion": "crac.dev/v1alpha1", "kind": "CracAppList",
                        "metadata": {"resourceVersion": api.rv.load(Ordering::SeqCst).to_string()}, "items": items}),
            )
        }
        (Method::GET, "/api/v1/pods") if watching => watch_stream(api.pod_events.subscribe()),
        (Method::GET, "/api/v1/pods") => {
            let items = api.pods.lock().unwrap().clone();
            json_response(
                200,
                &json!({"apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": api.rv.load(Ordering::SeqCst).to_string()}, "items": items}),
            )
        }
        (Method::PATCH, "/apis/crac.dev/v1alpha1/namespaces/shop/cracapps/demo/status") => {
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            api.patches
                .lock()
                .unwrap()
                .push((query.clone(), content_type, patch));
            // The operator wakes the app and its pod turns ready.
            let pod = pod_json(&api.next_rv(), true);
            {
                let mut pods = api.pods.lock().unwrap();
                pods.retain(|p| p["metadata"]["name"] != pod["metadata"]["name"]);
                pods.push(pod.clone());
            }
            let _ = api
                .pod_events
                .send(json!({"type": "ADDED", "object": pod}).to_string());
            let app = api.app.lock().unwrap().clone();
            json_response(200, &app)
        }
        _ => json_response(
            404,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": format!("fake api: no {path}")}),
        ),
    }
}

/// A watch: one JSON event per line, open until the test ends.
fn watch_stream(events: broadcast::Receiver<String>) -> Response<Body> {
    let stream = futures::stream::unfold(events, |mut events| async move {
        loop {
            match events.recv().await {
                Ok(line) => {
                    return Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from(line + "\n"))),
                        events,
                    ));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

fn pod_json(rv: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "demo-0", "namespace": "shop", "resourceVersion": rv,
                     "labels": {"crac.dev/app": "demo", "app.kubernetes.io/component": "restore"}},
        "spec": {"containers": [{"name": "app", "image": "demo"}]},
        "status": {"podIP": "127.0.0.1", "phase": "Running",
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

/// A pod that only calls (no `crac.dev/app` label): what the caller check's watch indexes.
fn caller_pod_json(namespace: &str, name: &str, ip: &str, host_network: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "3",
                     "labels": {"app": name}, "managedFields": [{"manager": "kubelet", "fieldsV1": {}}]},
        "spec": {"hostNetwork": host_network, "containers": [{"name": "c", "image": "client"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

async fn start_fake_api(app: Value, pods: Vec<Value>) -> (u16, Arc<FakeApi>) {
    let api = Arc::new(FakeApi {
        app: Mutex::new(app),
        pods: Mutex::new(pods),
        rv: AtomicU64::new(10),
        app_events: broadcast::channel(64).0,
        pod_events: broadcast::channel(64).0,
        patches: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shared = Arc::clone(&api);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let api = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let api = Arc::clone(&api);
                    async move { Ok::<_, Infallible>(handle(api, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, api)
}

async fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    let answer = get(port, path).await.ok()?;
    Some((
        answer.status.as_u16(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}

/// The app the tests serve: asleep, its one port forwarded to `target_port`.
fn demo_app(target_port: u16, activator_port: u16) -> Value {
    json!({
        "apiVersion": "crac.dev/v1alpha1", "kind": "CracApp",
        "metadata": {"name": "demo", "namespace": "shop", "resourceVersion": "5", "generation": 1},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "demo", "command": ["java"]}]}},
                 "replicas": 1, "scaleToZero": {"enabled": true, "wakeTimeout": "20s"}},
        "status": {"phase": "ScaledToZero", "servingMode": "Activator",
                   "activatorPorts": [{"name": "http", "targetPort": target_port, "activatorPort": activator_port}]}
    })
}

/// The callers: a pod of the app's namespace on 127.0.0.2, one of another namespace on
/// 127.0.0.3, and a host-network pod of the app's namespace on 127.0.0.4 (its IP is its
/// node's, shared with everything on the node, so it names no caller).
fn caller_pods() -> Vec<Value> {
    vec![
        caller_pod_json("shop", "client", "127.0.0.2", false),
        caller_pod_json("evil", "intruder", "127.0.0.3", false),
        caller_pod_json("shop", "node-agent", "127.0.0.4", true),
    ]
}

/// A kubeconfig for the fake API server, in a directory of its own (removed by the caller).
fn kubeconfig_for(api_port: u16, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("crac-activator-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{api_port}\n\
             users:\n- name: fake\n  user:\n    token: test\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    (dir, kubeconfig)
}

/// The built binary on 127.0.0.1 against the fake API server.
fn spawn_activator(kubeconfig: &std::path::Path, admin_port: u16, extra: &[&str]) -> Child {
    Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_crac-activator"))
            .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
            .args(["--listen-address", "127.0.0.1"])
            .args(["--admin-address", &format!("127.0.0.1:{admin_port}")])
            .args(extra)
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap(),
    )
}

async fn wait_ready(admin_port: u16) {
    within(Duration::from_secs(30), "readyz", async {
        loop {
            if let Some((200, _)) = admin_get(admin_port, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_watches_the_api_wakes_through_a_status_patch_and_drains_on_sigterm() {
    let backend = start_backend(None).await;
    let activator_port = free_port();
    let admin_port = free_port();
    let (api_port, api) =
        start_fake_api(demo_app(backend.port, activator_port), caller_pods()).await;
    let (dir, kubeconfig) = kubeconfig_for(api_port, "wake");
    let mut child = spawn_activator(&kubeconfig, admin_port, &["--drain-timeout", "10s"]);
    wait_ready(admin_port).await;
    assert_eq!(admin_get(admin_port, "/healthz").await.unwrap().0, 200);

    // No --trusted-callers: only the pod watch decides who may call.
    for source in ["127.0.0.3", "127.0.0.4", "127.0.0.1"] {
        let answer = get_from(source.parse().unwrap(), activator_port, "/echo/no")
            .await
            .unwrap();
        assert_eq!(answer.status, 403, "from {source}: {:?}", answer.body);
    }
    assert!(
        api.patches.lock().unwrap().is_empty(),
        "a refused caller woke the app"
    );

    let client: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(async move {
                (
                    i,
                    get_from(client, activator_port, format!("/echo/{i}")).await,
                )
            })
        })
        .collect();
    for call in calls {
        let (i, answer) = within(Duration::from_secs(30), "request through the binary", call)
            .await
            .unwrap();
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200, "request {i}: {:?}", answer.body);
        assert_eq!(answer.body, format!("id:{i}"));
    }
    assert!(started.elapsed() < Duration::from_secs(20));

    {
        let patches = api.patches.lock().unwrap();
        assert!(!patches.is_empty(), "no wake patch reached the API server");
        assert!(
            patches.len() <= 2,
            "one wake, not one patch per request: {}",
            patches.len()
        );
        let (query, content_type, body) = &patches[0];
        assert!(query.contains("fieldManager=crac-activator"), "{query}");
        assert_eq!(content_type, "application/merge-patch+json");
        let at = body["status"]["wakeRequestedAt"].as_str().unwrap();
        assert!(at.ends_with('Z') && at.contains('T'), "not RFC 3339: {at}");
    }

    let (status, metrics) = admin_get(admin_port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("crac_activator_wakes_total{namespace=\"shop\",app=\"demo\"} 1"),
        "{metrics}"
    );
    // Every request was held for the wake, except any that arrived once the (fake, instant)
    // wake was over, which were simply forwarded: on a loaded machine the last of the ten
    // concurrent callers can be that late.
    let count = |outcome: &str| -> u64 {
        let key = format!(
            "crac_activator_requests_total{{namespace=\"shop\",app=\"demo\",outcome=\"{outcome}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str())?.trim().parse().ok())
            .unwrap_or(0)
    };
    let (woken, forwarded) = (count("woken"), count("forwarded"));
    assert!(woken >= 1, "no request was held for the wake:\n{metrics}");
    assert_eq!(woken + forwarded, 10, "{metrics}");
    assert!(
        metrics
            .contains("crac_activator_requests_refused_total{reason=\"namespace_not_allowed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("crac_activator_requests_refused_total{reason=\"unknown_caller\"} 2"),
        "{metrics}"
    );

    let exit = child.terminate().await;
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// VmRSS and VmHWM (its peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn metric_value(metrics: &str, line_prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Hostile callers against the real binary with its default limits: 200 silent connections,
/// 300 that send a head just under the size cap and then stop, and 200 that send 768 KiB of
/// head (under the 1 MiB a connection could once buffer, far over the cap). The activator's
/// memory stays small, the oversized heads get 431, a caller that means well is held through a
/// wake and answered meanwhile, and the header timeout closes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callers_leave_the_binary_small_and_a_held_request_still_gets_its_answer() {
    use tokio::io::AsyncWriteExt;
    const MAX_PEAK_KIB: u64 = 128 * 1024;
    let backend = start_backend(None).await;
    let activator_port = free_port();
    let admin_port = free_port();
    let (api_port, _api) =
        start_fake_api(demo_app(backend.port, activator_port), caller_pods()).await;
    let (dir, kubeconfig) = kubeconfig_for(api_port, "hostile");
    let mut child = spawn_activator(&kubeconfig, admin_port, &["--shutdown-delay", "0s"]);
    let pid = child.0.id();
    wait_ready(admin_port).await;
    let (rss_idle, _) = memory_kib(pid);

    let hostile: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let opened = Instant::now();
    let mut waiting = Vec::new();
    for _ in 0..200 {
        waiting.push(connect_from(hostile, activator_port).await.unwrap());
    }
    let mut slow_head = b"GET /echo/slow HTTP/1.1\r\nHost: demo\r\nX-Pad: ".to_vec();
    slow_head.extend(std::iter::repeat_n(b'a', 30 * 1024));
    for _ in 0..300 {
        let mut stream = connect_from(hostile, activator_port).await.unwrap();
        stream.write_all(&slow_head).await.unwrap();
        waiting.push(stream);
    }
    let mut fat_head = b"GET /echo/fat HTTP/1.1\r\nHost: demo\r\nX-Pad: ".to_vec();
    fat_head.extend(std::iter::repeat_n(b'a', 768 * 1024));
    let fat_head = Bytes::from(fat_head);
    let fat: Vec<_> = (0..200)
        .map(|_| {
            let head = fat_head.clone();
            tokio::spawn(async move {
                let mut stream = connect_from(hostile, activator_port).await.unwrap();
                // Fails part way once the activator has answered 431 and closed.
                let _ = stream.write_all(&head).await;
                stream
            })
        })
        .collect();
    let mut fat_streams = Vec::new();
    for f in fat {
        fat_streams.push(
            within(Duration::from_secs(20), "fat head sent", f)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_loaded, _) = memory_kib(pid);

    // A caller that means well, held through a wake while all that is open.
    let client: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let answer = within(
        Duration::from_secs(20),
        "held request under hostile load",
        get_from(client, activator_port, "/echo/ok"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body, "id:ok");

    let (_, peak) = memory_kib(pid);
    eprintln!(
        "activator RSS: idle {rss_idle} KiB, under hostile load {rss_loaded} KiB, peak {peak} KiB"
    );
    assert!(
        peak < MAX_PEAK_KIB,
        "activator peak RSS {peak} KiB under hostile load"
    );

    let mut answered_431 = 0;
    for mut stream in fat_streams {
        let answer = closed_within(&mut stream, Duration::from_secs(5))
            .await
            .expect("an oversized head's connection was kept open");
        if answer.starts_with(b"HTTP/1.1 431") {
            answered_431 += 1;
        }
    }
    eprintln!("oversized heads answered 431 (the rest were reset): {answered_431}/200");
    assert!(answered_431 > 0, "no oversized head got a 431");

    // The default header timeout (10 s) closes the silent and the slow.
    let closes = waiting.into_iter().map(|mut stream| async move {
        let limit = Duration::from_secs(16).saturating_sub(opened.elapsed());
        closed_within(&mut stream, limit).await.is_some()
    });
    let closed = futures::future::join_all(closes).await;
    assert!(
        closed.iter().all(|c| *c),
        "{} of 500 silent or slow connections outlived the header timeout",
        closed.iter().filter(|c| !**c).count()
    );
    assert!(opened.elapsed() >= Duration::from_secs(9));
    let (_, metrics) = admin_get(admin_port, "/metrics").await.unwrap();
    assert!(
        metric_value(
            &metrics,
            "crac_activator_connection_timeouts_total{kind=\"header\"}"
        ) >= 500.0,
        "{metrics}"
    );

    let exit = child.terminate().await;
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM: /readyz fails at once, yet connections that arrive during --shutdown-delay (sent by
/// endpoints that have not caught up) are accepted and served; then the listeners close, the
/// drain runs, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_the_binary_turns_unready_and_serves_new_connections_through_the_shutdown_delay()
 {
    let backend = start_backend(None).await;
    let activator_port = free_port();
    let admin_port = free_port();
    let (api_port, _api) =
        start_fake_api(demo_app(backend.port, activator_port), caller_pods()).await;
    let (dir, kubeconfig) = kubeconfig_for(api_port, "sigterm");
    let delay = Duration::from_secs(3);
    let mut child = spawn_activator(
        &kubeconfig,
        admin_port,
        &["--shutdown-delay", "3s", "--drain-timeout", "5s"],
    );
    wait_ready(admin_port).await;

    let signalled = Instant::now();
    child.sigterm();
    within(Duration::from_secs(2), "readyz to fail", async {
        loop {
            if let Some((503, _)) = admin_get(admin_port, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let client: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let answer = within(
        Duration::from_secs(10),
        "request during the shutdown delay",
        get_from(client, activator_port, "/echo/late"),
    )
    .await
    .expect("a connection during the shutdown delay was refused");
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body, "id:late");
    assert!(
        signalled.elapsed() < delay,
        "the test was too slow to tell: {:?}",
        signalled.elapsed()
    );

    let exit = child.wait_exit(Duration::from_secs(15)).await;
    let exited = signalled.elapsed();
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    assert!(
        exited >= delay,
        "exited {exited:?} after SIGTERM, before the delay"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
