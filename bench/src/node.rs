//! `crac-bench-node`: the product on the test cluster's real node (kubelet, containerd, runc;
//! tests/cluster/node-up), measured from the client's clock with watches, for one app image:
//!
//! - checkpoint: the checkpoint Job's pod created → the image published (`status.checkpoint`);
//! - pod start, side by side in one run: a restore pod (the operator's own pod template) and a
//!   cold-start pod (same image, the plain command, same probe), alternating: created → pod
//!   address (scheduling, sandbox and network), → first HTTP 200 (polled every 5 ms), → Ready;
//! - a wake end to end: a request at zero sent to the activator pod → first byte, split into
//!   wake request and scale-up (→ pod created), scheduling, sandbox and network (→ address),
//!   container start and restore (→ Ready; the agent's own restore time from its log), address
//!   → first byte, and how long before Ready the first byte came (the activator forwards once
//!   the app answers its own probe);
//! - the two sleep modes side by side: the same app twice, `Recreate` and `InPlace`, put to
//!   sleep and woken by one request at zero in turn (`--mode-wakes` each): p50 and p99 of
//!   request → first byte, their ratio, and what a pod sleeping in place holds (the resident
//!   memory of its processes, read from this machine's /proc, and its requests).
//!
//! The operator and the activator must already run (scripts/bench installs the chart onto the
//! real node, watching `--namespace`). Prints a Markdown block on stdout, progress on stderr.
//!
//! ```text
//! crac-bench-node --namespace bench-node --name hello --image crac.dev/test/hello-app:1 \
//!     --command 'java -XX:-UsePerfData -Xmx64m -cp /app Hello 8080' --ready-path /ready \
//!     [--runs 5] [--wakes 5] [--mode-wakes 20] [--warmup 200]
//! ```

use anyhow::{Context as _, Result, bail};
use crac_api::CracApp;
use crac_api::cracapp::Phase;
use crac_bench::percentile;
use crac_tests::real_node::{STORAGE_CLASS, http_get_waiting, logs, placement, send_get};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

struct Args {
    namespace: String,
    name: String,
    image: String,
    command: Vec<String>,
    ready_path: String,
    runs: usize,
    wakes: usize,
    mode_wakes: usize,
    warmup: u32,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        namespace: "bench-node".into(),
        name: "hello".into(),
        image: "crac.dev/test/hello-app:1".into(),
        command: [
            "java",
            "-XX:-UsePerfData",
            "-Xmx64m",
            "-cp",
            "/app",
            "Hello",
            "8080",
        ]
        .map(String::from)
        .to_vec(),
        ready_path: "/ready".into(),
        runs: 5,
        wakes: 5,
        mode_wakes: 20,
        warmup: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--namespace" => args.namespace = value,
            "--name" => args.name = value,
            "--image" => args.image = value,
            "--command" => args.command = value.split_whitespace().map(String::from).collect(),
            "--ready-path" => args.ready_path = value,
            "--runs" => args.runs = value.parse()?,
            "--wakes" => args.wakes = value.parse()?,
            "--mode-wakes" => args.mode_wakes = value.parse()?,
            "--warmup" => args.warmup = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

const PORT: u16 = 8080;
const DEADLINE: Duration = Duration::from_secs(300);
/// How often a wait polls: the times below are taken when a poll succeeds.
const POLL: Duration = Duration::from_millis(5);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn app(args: &Args, name: &str, mode: &str) -> Result<CracApp> {
    let mut pod = placement();
    pod["containers"] = serde_json::json!([{
        "name": "app", "image": args.image, "imagePullPolicy": "Never",
        "command": args.command,
        "env": [{ "name": "HELLO_HOST", "value": "0.0.0.0" }],
        "ports": [{ "containerPort": PORT, "name": "http" }],
        "readinessProbe": { "httpGet": { "path": args.ready_path, "port": PORT } },
        "resources": { "limits": { "memory": "512Mi" } }
    }]);
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "crac.dev/v1alpha1", "kind": "CracApp",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "template": { "spec": pod },
            "checkpoint": {
                "engine": "criu",
                "warmup": { "requests": [{ "path": "/", "count": args.warmup }] },
                "storage": { "size": "2Gi", "storageClassName": STORAGE_CLASS },
                "timeout": "5m"
            },
            "scaleToZero": { "enabled": true, "idleAfter": "6h", "wakeTimeout": "120s", "mode": mode }
        }
    }))?)
}

/// [`crac_bench::until`] every [`POLL`], failing after [`DEADLINE`].
async fn until<T, F, Fut>(what: &str, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    crac_bench::until(what, POLL, DEADLINE, check).await
}

/// The status of a GET to the app's port, or `None` without an answer in 500 ms.
async fn http_status(ip: &str, path: &str) -> Option<u16> {
    tokio::time::timeout(Duration::from_millis(500), http_get_waiting(ip, PORT, path))
        .await
        .ok()
        .flatten()
        .map(|(status, _)| status)
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

/// created → address, → first 200, → Ready, in ms, for one bare pod.
async fn time_pod(pods: &Api<Pod>, pod: &Pod, ready_path: &str) -> Result<[f64; 3]> {
    let name = pod.metadata.name.clone().context("pod name")?;
    let t0 = Instant::now();
    pods.create(&PostParams::default(), pod).await?;
    let ip = until("a pod address", || async {
        pod_ip(&pods.get(&name).await.ok()?)
    })
    .await?;
    let t_ip = t0.elapsed();
    until("a first 200", || async {
        (http_status(&ip, ready_path).await == Some(200)).then_some(())
    })
    .await?;
    let t_answer = t0.elapsed();
    until("Ready", || async {
        is_ready(&pods.get(&name).await.ok()?).then_some(())
    })
    .await?;
    let t_ready = t0.elapsed();
    pods.delete(&name, &DeleteParams::default().grace_period(0))
        .await?;
    until("the pod gone", || async {
        pods.get_opt(&name).await.ok()?.is_none().then_some(())
    })
    .await?;
    Ok([ms(t_ip), ms(t_answer), ms(t_ready)])
}

fn row(label: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "| {label} | {:.0} | {:.0} | {:.0} |",
        percentile(&v, 0.5),
        v.first().copied().unwrap_or(0.0),
        v.last().copied().unwrap_or(0.0)
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let client = Client::try_default().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({ "metadata": { "name": args.namespace } }))?,
        )
        .await;
    let apps: Api<CracApp> = Api::namespaced(client.clone(), &args.namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &args.namespace);
    let name = args.name.clone();
    let mut out = vec![format!(
        "### {} (`{}`) on the real node\n",
        args.name, args.image
    )];

    // --- checkpoint
    eprintln!("node bench: {name}: checkpoint");
    let checkpoint_pods = ListParams::default().labels(&format!(
        "{}={name},{}=checkpoint",
        crac_api::labels::APP,
        crac_api::labels::COMPONENT
    ));
    apps.create(&PostParams::default(), &app(&args, &name, "Recreate")?)
        .await?;
    until("the checkpoint pod", || async {
        let l = pods.list(&checkpoint_pods).await.ok()?;
        (!l.items.is_empty()).then_some(())
    })
    .await?;
    let t_pod = Instant::now();
    // The pod's end (phase Succeeded, with the agent's summary) and the image's publication
    // (the operator, once the Job controller marked the Job complete).
    let ended = std::cell::Cell::new(None);
    until("the image published", || async {
        if ended.get().is_none() {
            let l = pods.list(&checkpoint_pods).await.ok()?;
            if l.items
                .iter()
                .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
            {
                ended.set(Some(t_pod.elapsed()));
            }
        }
        apps.get(&name).await.ok()?.status?.checkpoint.map(|_| ())
    })
    .await?;
    let published = t_pod.elapsed();
    let ended = ended.get().unwrap_or(published);
    let status = apps.get(&name).await?.status.unwrap_or_default();
    let image = status.checkpoint.unwrap_or_default();
    let summary: serde_json::Value = pods
        .list(&checkpoint_pods)
        .await?
        .items
        .iter()
        .find_map(|p| {
            let c = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
            serde_json::from_str(c.state.as_ref()?.terminated.as_ref()?.message.as_ref()?).ok()
        })
        .unwrap_or_default();
    let part = |k: &str| summary[k].as_f64().unwrap_or(f64::NAN);
    out.push(format!(
        "- checkpoint Job's pod created → image published: **{:.0} ms** (image {:.0} MB): pod created → pod Succeeded {:.0} ms, of which the agent's JVM start to ready {:.0} ms, warm-up {:.0} ms, dump and verify {:.0} ms; pod Succeeded → published (Job controller, operator) {:.0} ms\n",
        ms(published),
        image.size_bytes.unwrap_or(0) as f64 / 1e6,
        ms(ended),
        part("readyMs"),
        part("warmupMs"),
        part("checkpointMs"),
        ms(published.saturating_sub(ended)),
    ));
    until("the app Ready", || async {
        (apps.get(&name).await.ok()?.status?.phase? == Phase::Ready).then_some(())
    })
    .await?;

    // --- restore pod vs cold-start pod, alternating
    let template = deployments
        .get(&name)
        .await?
        .spec
        .context("deployment spec")?
        .template
        .spec
        .context("pod spec")?;
    let mut restore: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": format!("{name}-bench-restore") }
    }))?;
    restore.spec = Some(template.clone());
    let mut cold = restore.clone();
    cold.metadata.name = Some(format!("{name}-bench-cold"));
    let mut cold_spec = template;
    cold_spec.init_containers = None;
    cold_spec.volumes = None;
    let c = &mut cold_spec.containers[0];
    c.command = Some(args.command.clone());
    c.volume_mounts = None;
    c.security_context = None;
    c.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
        name: "HELLO_HOST".into(),
        value: Some("0.0.0.0".into()),
        ..Default::default()
    }]);
    cold.spec = Some(cold_spec);
    let (mut r, mut k) = (vec![[0.0; 3]; 0], vec![[0.0; 3]; 0]);
    for i in 0..args.runs {
        eprintln!("node bench: {name}: pod start {}/{}", i + 1, args.runs);
        r.push(time_pod(&pods, &restore, &args.ready_path).await?);
        k.push(time_pod(&pods, &cold, &args.ready_path).await?);
    }
    out.push(format!(
        "Pod created → …, ms over {} runs each, interleaved (median, min, max):\n",
        args.runs
    ));
    out.push("| | median | min | max |\n| --- | --- | --- | --- |".into());
    let col = |v: &[[f64; 3]], i: usize| v.iter().map(|x| x[i]).collect::<Vec<_>>();
    for (label, i) in [("address", 0), ("first 200", 1), ("Ready", 2)] {
        out.push(row(&format!("restore pod: {label}"), col(&r, i)));
        out.push(row(&format!("cold-start pod: {label}"), col(&k, i)));
    }
    let med = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let ratio_answer = med(col(&r, 1)) / med(col(&k, 1));
    let ratio_ready = med(col(&r, 2)) / med(col(&k, 2));
    out.push(format!(
        "\nrestore / cold, median: first 200 **{ratio_answer:.2}**, Ready **{ratio_ready:.2}**\n"
    ));

    // --- wakes
    let restore_pods = ListParams::default().labels(&format!(
        "{}={name},{}=restore",
        crac_api::labels::APP,
        crac_api::labels::COMPONENT
    ));
    let mut parts: Vec<[f64; 7]> = Vec::new();
    for i in 0..args.wakes {
        eprintln!("node bench: {name}: wake {}/{}", i + 1, args.wakes);
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let sleep = serde_json::json!({ "metadata": { "annotations": {
            crac_api::labels::SLEEP_REQUESTED_AT: now } } });
        apps.patch(&name, &PatchParams::default(), &Patch::Merge(sleep))
            .await?;
        until("asleep with no pods", || async {
            let s = apps.get(&name).await.ok()?.status?;
            let none = pods.list(&restore_pods).await.ok()?.items.is_empty();
            (s.phase? == Phase::ScaledToZero && none).then_some(())
        })
        .await?;
        let (ip, port) = activator_endpoint(&client, &args.namespace, &name).await?;
        let t0 = Instant::now();
        let caller = tokio::spawn(async move {
            let mut s = send_get(&ip, port, "/").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.ok()?;
            Some(t0.elapsed())
        });
        let pod = until("the woken pod", || async {
            pods.list(&restore_pods)
                .await
                .ok()?
                .items
                .into_iter()
                .next()
        })
        .await?;
        let t_created = t0.elapsed();
        let pod_name = pod.metadata.name.clone().context("pod name")?;
        until("its address", || async {
            pod_ip(&pods.get(&pod_name).await.ok()?)
        })
        .await?;
        let t_ip = t0.elapsed();
        until("Ready", || async {
            is_ready(&pods.get(&pod_name).await.ok()?).then_some(())
        })
        .await?;
        let t_ready = t0.elapsed();
        let first_byte = caller.await?.context("the request at zero got no answer")?;
        let log = logs(&pods, &pod_name, "app").await;
        // "restored (pid N) and ready M ms after the agent started"
        let restored_ms = log
            .lines()
            .find_map(|l| {
                l.split("and ready ")
                    .nth(1)?
                    .split(" ms")
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(f64::NAN);
        parts.push([
            ms(t_created),
            ms(t_ip - t_created),
            ms(t_ready - t_ip),
            restored_ms,
            ms(first_byte.saturating_sub(t_ip)),
            // Signed: the activator forwards once the app answers its own probe, which is
            // usually before the kubelet's Ready reaches the API server.
            ms(t_ready) - ms(first_byte),
            ms(first_byte),
        ]);
        until("awake on its pods", || async {
            let s = apps.get(&name).await.ok()?.status?;
            (s.phase? == Phase::Ready).then_some(())
        })
        .await?;
    }
    out.push(format!(
        "A request at zero → first byte, through the activator pod, {} wakes (ms):\n",
        args.wakes
    ));
    out.push("| part | median | min | max |\n| --- | --- | --- | --- |".into());
    let labels = [
        "request → pod created (wake request, operator, Deployment and ReplicaSet controllers)",
        "pod created → address (scheduling, sandbox, network)",
        "address → Ready (container start, agent, restore, probe)",
        "… of which the agent: start → restored and ready (its log)",
        "address → first byte (the activator's probe finds the app answering, forwards)",
        "first byte came this much before Ready (saved by probing, not waiting for Ready)",
        "**request at zero → first byte**",
    ];
    for (i, label) in labels.iter().enumerate() {
        out.push(row(label, parts.iter().map(|p| p[i]).collect()));
    }

    // --- the two sleep modes, side by side
    let dozing = format!("{name}-inplace");
    eprintln!("node bench: {dozing}: checkpoint (sleeps in place)");
    apps.create(&PostParams::default(), &app(&args, &dozing, "InPlace")?)
        .await?;
    until("the in-place app Ready", || async {
        (apps.get(&dozing).await.ok()?.status?.phase? == Phase::Ready).then_some(())
    })
    .await?;
    let waker = Waker {
        client: client.clone(),
        apps: apps.clone(),
        pods: pods.clone(),
        namespace: args.namespace.clone(),
    };
    let (mut recreate, mut in_place) = (Vec::new(), Vec::new());
    let mut held = Vec::new();
    for i in 0..args.mode_wakes {
        eprintln!(
            "node bench: {name}: wake {}/{} in each mode",
            i + 1,
            args.mode_wakes
        );
        recreate.push(waker.wake(&name, false).await?);
        let (first_byte, asleep) = waker.wake_in_place(&dozing).await?;
        in_place.push(first_byte);
        held.push(asleep);
    }
    out.push(format!(
        "\nThe two sleep modes side by side: request at zero → first byte through the activator pod, {} wakes each, interleaved (ms):\n",
        args.mode_wakes
    ));
    out.push("| mode | p50 | p99 | min | max |\n| --- | --- | --- | --- | --- |".into());
    for (label, v) in [("`Recreate`", &mut recreate), ("`InPlace`", &mut in_place)] {
        v.sort_by(f64::total_cmp);
        out.push(format!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} |",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0)
        ));
    }
    out.push(format!(
        "\nRecreate / InPlace, p50: **{:.1}×**\n",
        percentile(&recreate, 0.5) / percentile(&in_place, 0.5)
    ));
    held.sort_by_key(|h| h.rss_kib);
    if let Some(h) = held.get(held.len() / 2) {
        out.push(format!(
            "- a pod sleeping in place holds **{:.1} MiB** resident ({} process(es) in its cgroup, median of {} sleeps; from /proc on this machine) and requests {}\n",
            h.rss_kib as f64 / 1024.0,
            h.processes,
            held.len(),
            h.requests
        ));
    }
    for app in [&name, &dozing] {
        apps.delete(app, &DeleteParams::default()).await?;
        until("the app deleted", || async {
            apps.get_opt(app).await.ok()?.is_none().then_some(())
        })
        .await?;
    }
    println!("{}\n", out.join("\n"));
    Ok(())
}

/// Where the app's Service sends callers while it sleeps: the activator pod's address and the
/// app's activator port, from its EndpointSlice.
async fn activator_endpoint(client: &Client, namespace: &str, name: &str) -> Result<(String, u16)> {
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), namespace);
    until("the slice at the activator", || async {
        let l = slices
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
            .await
            .ok()?;
        let s = l.items.into_iter().next()?;
        let ip = s.endpoints.as_ref()?.first()?.addresses.first()?.clone();
        let port = s.ports.as_ref()?.first()?.port?;
        Some((ip, port as u16))
    })
    .await
}

/// What a pod sleeping in place holds.
struct Held {
    rss_kib: u64,
    processes: usize,
    requests: String,
}

/// Puts an app to sleep and wakes it with one request at zero, timing the first byte.
struct Waker {
    client: Client,
    apps: Api<CracApp>,
    pods: Api<Pod>,
    namespace: String,
}

impl Waker {
    fn restore_pods(name: &str) -> ListParams {
        ListParams::default().labels(&format!(
            "{}={name},{}=restore",
            crac_api::labels::APP,
            crac_api::labels::COMPONENT
        ))
    }

    /// Asks the app to sleep and waits until it does (`in_place`: its pod marked asleep;
    /// else: its pods gone).
    async fn put_to_sleep(&self, name: &str, in_place: bool) -> Result<Option<Pod>> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let sleep = serde_json::json!({ "metadata": { "annotations": {
            crac_api::labels::SLEEP_REQUESTED_AT: now } } });
        self.apps
            .patch(name, &PatchParams::default(), &Patch::Merge(sleep))
            .await?;
        until("asleep", || async {
            let s = self.apps.get(name).await.ok()?.status?;
            (s.phase? == Phase::ScaledToZero).then_some(())?;
            let pods = self.pods.list(&Self::restore_pods(name)).await.ok()?.items;
            if !in_place {
                return pods.is_empty().then_some(None);
            }
            let pod = pods.into_iter().find(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(crac_api::labels::ASLEEP_IN_PLACE_SINCE))
            })?;
            Some(Some(pod))
        })
        .await
    }

    /// One request at zero through the activator pod: ms to its first byte; then waits until
    /// the app is awake on its pods again.
    async fn request_at_zero(&self, name: &str) -> Result<f64> {
        let (ip, port) = activator_endpoint(&self.client, &self.namespace, name).await?;
        let t0 = Instant::now();
        let mut stream = send_get(&ip, port, "/")
            .await
            .context("connecting to the activator")?;
        let mut b = [0u8; 1];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut b))
            .await
            .context("no first byte")??;
        let first_byte = ms(t0.elapsed());
        until("awake on its pods", || async {
            let s = self.apps.get(name).await.ok()?.status?;
            (s.phase? == Phase::Ready && s.serving_mode? == crac_api::cracapp::ServingMode::Pods)
                .then_some(())
        })
        .await?;
        Ok(first_byte)
    }

    async fn wake(&self, name: &str, in_place: bool) -> Result<f64> {
        self.put_to_sleep(name, in_place).await?;
        self.request_at_zero(name).await
    }

    /// A wake in place, with what the sleeping pod held just before it.
    async fn wake_in_place(&self, name: &str) -> Result<(f64, Held)> {
        let pod = self
            .put_to_sleep(name, true)
            .await?
            .context("the sleeping pod")?;
        let uid = pod.metadata.uid.clone().context("pod uid")?;
        let name_of_pod = pod.metadata.name.clone().context("pod name")?;
        // Its requests once shrunk (the resize follows the sleep).
        let requests = until("the sleeping pod's requests shrunk", || async {
            let p = self.pods.get(&name_of_pod).await.ok()?;
            let c = p.spec?.containers.into_iter().find(|c| c.name == "app")?;
            let r = c.resources?.requests?;
            let memory = r.get("memory")?.0.clone();
            (memory == "16Mi").then(|| {
                r.iter()
                    .map(|(k, v)| format!("{k} {}", v.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        })
        .await?;
        let (rss_kib, processes) = pod_rss(&uid);
        let first_byte = self.request_at_zero(name).await?;
        Ok((
            first_byte,
            Held {
                rss_kib,
                processes,
                requests,
            },
        ))
    }
}

/// The resident memory (KiB) of every process on this machine in the pod's cgroup (the pod
/// sandbox's pause process included), and how many there are: the pod's UID appears in each
/// one's cgroup path (`pod<uid>`, with dashes or underscores by cgroup driver).
fn pod_rss(uid: &str) -> (u64, usize) {
    let marks = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    let mut total = 0;
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(cgroup) = std::fs::read_to_string(path.join("cgroup")) else {
            continue;
        };
        if !marks.iter().any(|m| cgroup.contains(m.as_str())) {
            continue;
        }
        let rss = std::fs::read_to_string(path.join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            });
        if let Some(kib) = rss {
            total += kib;
            count += 1;
        }
    }
    (total, count)
}
