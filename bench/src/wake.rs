//! `crac-bench-wake`: the time from a request arriving at an app at zero to its first response
//! byte, split into its parts (issue 6's Measure). On the control plane `KUBECONFIG` points
//! at, it runs the real `crac-operator` and `crac-activator` binaries, makes one CracApp
//! ready (ending its checkpoint pod as the agent would), then, `--cycles` times: asks the app
//! to sleep, waits until it is at zero, sends one HTTP request to the activator at the app's
//! activator port and times each step of the wake from watch events started beforehand.
//!
//! What plays the parts no process plays here: a fake kwok node of the driver's own, whose
//! pods get addresses from `--node-cidr` (a loopback /24 no test uses); on every address of
//! it the driver serves the app's port (the "app": answers at once, it does not restore
//! anything) and the agent's activity endpoint (no open connections), so the operator's
//! drain and the activator's forward reach real sockets. The activator pod the operator
//! points the Service at is the tests' stand-in pod on the cluster's unroutable node
//! (`crac_tests::operator::stand_in_activator`); the requests go to the real activator
//! process on `--activator-address`, as kube-proxy would send them.
//! Prints a Markdown block on stdout and one line per cycle on stderr.
//!
//! ```text
//! crac-bench-wake --operator BIN --activator BIN --activator-address 127.0.0.72 \
//!     [--cycles 20] [--node-cidr 127.151.0.0/24] [--app-port 18181] [--logs DIR] \
//!     [--restore NAME=MS ...] [--namespace bench-wake]
//! ```

use anyhow::{Context as _, Result, bail};
use crac_api::CracApp;
use crac_api::cracapp::{Phase, ServingMode};
use crac_api::labels;
use crac_bench::{
    FakeNode, Hits, activator_args, catch_panic, create_namespace, create_ready_app, loopback_24,
    operator_args, percentile, scrape, serve_pod_addresses, spawn, tear_down, wait_answers,
};
use crac_tests::operator::stand_in_activator;
use crac_tests::real_node::{read_response, send_get};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const APP: &str = "wake";
/// The driver's node: its pods (the app's, and only them) get addresses of `--node-cidr`.
fn node(net: [u8; 3]) -> FakeNode {
    FakeNode {
        name: "crac-bench-wake",
        label_value: "bench-wake",
        taint: "crac.dev/bench-wake",
        net,
    }
}
const DEADLINE: Duration = Duration::from_secs(60);
/// How often a wait polls (none of these waits is what a wake's parts are timed by: the
/// watches are).
const POLL: Duration = Duration::from_millis(20);
/// Ports of the activator's admin server and the operator's metrics, on `--activator-address`.
const ACTIVATOR_ADMIN_PORT: u16 = 19190;
const OPERATOR_METRICS_PORT: u16 = 18190;

struct Args {
    cycles: usize,
    namespace: String,
    node_cidr: [u8; 3],
    app_port: u16,
    activator_address: IpAddr,
    operator: PathBuf,
    activator: PathBuf,
    logs: PathBuf,
    /// Restore times measured elsewhere (name, ms), for the estimated end to end.
    restore: Vec<(String, f64)>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        cycles: 20,
        namespace: "bench-wake".into(),
        node_cidr: [127, 151, 0],
        app_port: 18181,
        activator_address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 72)),
        operator: PathBuf::new(),
        activator: PathBuf::new(),
        logs: std::env::temp_dir(),
        restore: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--cycles" => args.cycles = value.parse()?,
            "--namespace" => args.namespace = value,
            "--node-cidr" => args.node_cidr = loopback_24(&value)?,
            "--app-port" => args.app_port = value.parse()?,
            "--activator-address" => args.activator_address = value.parse()?,
            "--operator" => args.operator = value.into(),
            "--activator" => args.activator = value.into(),
            "--logs" => args.logs = value.into(),
            "--restore" => {
                let (name, ms) = value.split_once('=').context("--restore NAME=MS")?;
                args.restore.push((name.to_string(), ms.parse()?));
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    if args.operator.as_os_str().is_empty() || args.activator.as_os_str().is_empty() {
        bail!("--operator and --activator (the binaries to run) are required");
    }
    if args.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    Ok(args)
}

/// [`crac_bench::until`] at this driver's pace.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    crac_bench::until(what, POLL, limit, check).await
}

// ------------------------------------------------------------------------------ backends

/// One GET on a fresh connection: (status, body, time of the first response byte).
async fn timed_get(address: (IpAddr, u16)) -> Result<(u16, String, Instant)> {
    let (ip, port) = (address.0.to_string(), address.1);
    let mut stream = send_get(&ip, port, "/")
        .await
        .with_context(|| format!("send a request to the activator at {address:?}"))?;
    // Waits for the first byte without taking it, so the whole response is read below.
    if stream.peek(&mut [0u8; 1]).await? == 0 {
        bail!("the activator at {address:?} closed the connection without answering");
    }
    let first_byte = Instant::now();
    let (code, body) = read_response(&mut stream)
        .await
        .with_context(|| format!("no HTTP response from the activator at {address:?}"))?;
    Ok((code, body, first_byte))
}

// ------------------------------------------------------------------------------ watches

/// What the watches saw, and when the driver saw it.
#[derive(Debug)]
enum Seen {
    App {
        at: Instant,
        wake_requested_at: Option<String>,
    },
    Deployment {
        at: Instant,
        replicas: i32,
    },
    Pod {
        at: Instant,
        name: String,
        scheduled: bool,
        ready: bool,
    },
}

fn spawn_watches(client: &Client, ns: &str, tx: mpsc::UnboundedSender<Seen>) {
    let apps: Api<CracApp> = Api::namespaced(client.clone(), ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={APP}"));
    let sender = tx.clone();
    tokio::spawn(async move {
        let mut stream = watcher(apps, config).default_backoff().boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            if let Event::Apply(app) | Event::InitApply(app) = event {
                let wake_requested_at = app
                    .status
                    .and_then(|s| s.wake_requested_at)
                    .map(|t| t.0.to_string());
                let _ = sender.send(Seen::App {
                    at: Instant::now(),
                    wake_requested_at,
                });
            }
        }
    });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={APP}"));
    let sender = tx.clone();
    tokio::spawn(async move {
        let mut stream = watcher(deployments, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Ok(Some(d)) = stream.try_next().await {
            let replicas = d.spec.and_then(|s| s.replicas).unwrap_or(0);
            let _ = sender.send(Seen::Deployment {
                at: Instant::now(),
                replicas,
            });
        }
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let config =
        watcher::Config::default().labels(&crac_api::serving::restore_pods_selector(Some(APP)));
    tokio::spawn(async move {
        let mut stream = watcher(pods, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Ok(Some(pod)) = stream.try_next().await {
            let scheduled = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some();
            let ready = crac_api::serving::serving_address(&pod).is_some();
            let _ = tx.send(Seen::Pod {
                at: Instant::now(),
                name: pod.name_any(),
                scheduled,
                ready,
            });
        }
    });
}

// ------------------------------------------------------------------------------ one wake

/// The moments of one wake, as seen by the driver.
#[derive(Debug, Default, Clone)]
struct Wake {
    /// t1: `status.wakeRequestedAt` changed (the activator's ask reached the API).
    asked: Option<Instant>,
    /// t2: the Deployment's `spec.replicas` back to ≥ 1 (the operator acted).
    scaled: Option<Instant>,
    /// t3: a new restore pod exists (Deployment and ReplicaSet controllers).
    created: Option<Instant>,
    /// t4: the pod is bound to a node (scheduler).
    scheduled: Option<Instant>,
    /// t5: the pod is Running and Ready with an address (kwok, playing the kubelet).
    ready: Option<Instant>,
    /// The request reached the app (the activator forwarded it).
    forwarded: Option<Instant>,
}

impl Wake {
    fn complete(&self) -> bool {
        self.asked.is_some()
            && self.scaled.is_some()
            && self.created.is_some()
            && self.scheduled.is_some()
            && self.ready.is_some()
    }

    fn take(&mut self, seen: Seen, previous_wake: &Option<String>, old_pods: &HashSet<String>) {
        match seen {
            Seen::App {
                at,
                wake_requested_at,
            } if wake_requested_at.is_some() && wake_requested_at != *previous_wake => {
                self.asked.get_or_insert(at);
            }
            Seen::Deployment { at, replicas } if replicas >= 1 => {
                self.scaled.get_or_insert(at);
            }
            Seen::Pod {
                at,
                name,
                scheduled,
                ready,
            } if !old_pods.contains(&name) => {
                self.created.get_or_insert(at);
                if scheduled {
                    self.scheduled.get_or_insert(at);
                }
                if ready {
                    self.ready.get_or_insert(at);
                }
            }
            _ => {}
        }
    }
}

/// One measured wake: milliseconds from the request for each moment, and the end.
struct Sample {
    asked: f64,
    scaled: f64,
    created: f64,
    scheduled: f64,
    ready: f64,
    forwarded: f64,
    first_byte: f64,
    /// `status.lastWake.latencyMs` the operator recorded for this wake.
    recorded_latency: Option<i64>,
}

fn ms(from: Instant, to: Option<Instant>) -> f64 {
    to.map_or(f64::NAN, |t| {
        t.saturating_duration_since(from).as_secs_f64() * 1e3
            - from.saturating_duration_since(t).as_secs_f64() * 1e3
    })
}

struct Bench {
    client: Client,
    ns: String,
    args: Args,
    hits: Hits,
    seen: mpsc::UnboundedReceiver<Seen>,
    activator_admin: String,
}

impl Bench {
    fn apps(&self) -> Api<CracApp> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn status(&self) -> crac_api::CracAppStatus {
        crac_bench::app_status(&self.apps(), APP).await
    }

    async fn restore_pods(&self) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let selector = crac_api::serving::restore_pods_selector(Some(APP));
        pods.list(&ListParams::default().labels(&selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    async fn woken_count(&self) -> f64 {
        let text = scrape(&self.activator_admin).await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("crac_activator_requests_total{"))
            .filter(|l| l.contains("outcome=\"woken\"") && l.contains(&format!("app=\"{APP}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Puts the app to sleep and waits until nothing of it serves any more.
    async fn put_to_sleep(&self) -> Result<()> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({ "metadata": { "annotations": { labels::SLEEP_REQUESTED_AT: now } } });
        self.apps()
            .patch(APP, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        wait_for("the app at zero", DEADLINE, || async {
            let s = self.status().await;
            (s.phase? == Phase::ScaledToZero && s.slept_at.is_some()).then_some(())
        })
        .await?;
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for(
            "the Deployment at 0 and its pods gone",
            DEADLINE,
            || async {
                let d = deployments.get(APP).await.ok()?;
                let zero = d.spec?.replicas == Some(0);
                (zero && self.restore_pods().await.is_empty()).then_some(())
            },
        )
        .await?;
        Ok(())
    }

    /// One wake, timed. `Ok(None)` when the request did not go through a wake.
    async fn wake_once(&mut self, cycle: usize) -> Result<Option<Sample>> {
        // No pause after the last wake: the cycle's times keep microseconds, so a sleep asked
        // for in the same second as the last wake must still be told apart from it.
        self.put_to_sleep().await?;
        // The activator learns of the deleted pods from its own watch; give it a moment so
        // the request is held, not forwarded to a pod that was just deleted.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while self.seen.try_recv().is_ok() {}
        let previous_wake = self
            .status()
            .await
            .wake_requested_at
            .map(|t| t.0.to_string());
        let old_pods: HashSet<String> = self
            .restore_pods()
            .await
            .iter()
            .map(|p| p.name_any())
            .collect();
        let port = self
            .status()
            .await
            .activator_ports
            .first()
            .map(|p| p.activator_port)
            .context("the app has no activator port")?;
        let woken_before = self.woken_count().await;
        let hits_before = self.hits.lock().expect("hits lock").len();

        let sent = Instant::now();
        let port = u16::try_from(port)?;
        let (code, body, first_byte) = timed_get((self.args.activator_address, port)).await?;
        if code != 200 || !body.starts_with("hello from ") {
            bail!("cycle {cycle}: the activator answered {code}: {body}");
        }
        let mut wake = Wake::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wake.complete() && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), self.seen.recv()).await {
                Ok(Some(seen)) => wake.take(seen, &previous_wake, &old_pods),
                Ok(None) => bail!("the watches ended"),
                Err(_) => {}
            }
        }
        wake.forwarded = self.hits.lock().expect("hits lock")[hits_before..]
            .first()
            .map(|(at, _)| *at);
        let woken = self.woken_count().await - woken_before;
        if woken < 1.0 {
            eprintln!(
                "bench: cycle {cycle}: the activator forwarded to {:?} without waking (a pod was listed ready); not counted",
                self.hits.lock().expect("hits lock").get(hits_before)
            );
            return Ok(None);
        }
        Ok(Some(Sample {
            asked: ms(sent, wake.asked),
            scaled: ms(sent, wake.scaled),
            created: ms(sent, wake.created),
            scheduled: ms(sent, wake.scheduled),
            ready: ms(sent, wake.ready),
            forwarded: ms(sent, wake.forwarded),
            first_byte: ms(sent, Some(first_byte)),
            recorded_latency: None,
        }))
    }

    /// The app is awake again: Ready, on its pods, and (operator's record) the wake done.
    async fn wait_awake(&self) -> Result<()> {
        wait_for("the app awake on its pods", DEADLINE, || async {
            let s = self.status().await;
            (s.phase? == Phase::Ready
                && s.serving_mode? == ServingMode::Pods
                && s.slept_at.is_none())
            .then_some(())
        })
        .await
    }
}

// ------------------------------------------------------------------------------ set-up

// ------------------------------------------------------------------------------ main

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG names the control plane")?;
    let client = Client::try_default()
        .await
        .context("a client from KUBECONFIG")?;
    let ns = args.namespace.clone();

    let result = run(&client, args, &kubeconfig, &ns).await;

    // Clean up whatever was made (the operator has gone with `run`).
    tear_down(&client, &ns, node([0; 3]).name).await;
    result
}

async fn run(client: &Client, args: Args, kubeconfig: &str, ns: &str) -> Result<()> {
    let (hits, _agents) = serve_pod_addresses(args.node_cidr, args.app_port).await?;
    let node = node(args.node_cidr);
    node.create(client).await?;
    create_namespace(client, ns).await?;
    let (c, n) = (client.clone(), ns.to_string());
    catch_panic("the stand-in activator pod", async move {
        stand_in_activator(&c, &n).await
    })
    .await?;

    let address = args.activator_address;
    let activator_admin = format!("{address}:{ACTIVATOR_ADMIN_PORT}");
    let operator_metrics = format!("{address}:{OPERATOR_METRICS_PORT}");
    let _activator = spawn(
        &args.activator,
        &activator_args(kubeconfig, address, &activator_admin),
        &args.logs.join("wake-activator.log"),
    )?;
    let _operator = spawn(
        &args.operator,
        &operator_args(&operator_metrics, ns),
        &args.logs.join("wake-operator.log"),
    )?;
    wait_answers("the activator", address, ACTIVATOR_ADMIN_PORT, "/readyz").await?;
    // Not /readyz: the operator's stays 503 ("watches not synced") even once it reconciles.
    // That it reconciles shows below, when the app's checkpoint pod appears.
    wait_answers("the operator", address, OPERATOR_METRICS_PORT, "/healthz").await?;

    let (tx, seen) = mpsc::unbounded_channel();
    spawn_watches(client, ns, tx);

    // The app, its checkpoint ended as the agent would.
    create_ready_app(client, ns, &node.app(APP, args.app_port)?).await?;

    let mut bench = Bench {
        client: client.clone(),
        ns: ns.into(),
        args,
        hits,
        seen,
        activator_admin,
    };
    bench.wait_awake().await?;

    let mut samples = Vec::new();
    let mut not_woken = 0;
    for cycle in 1..=bench.args.cycles {
        let Some(mut s) = bench.wake_once(cycle).await? else {
            not_woken += 1;
            continue;
        };
        bench.wait_awake().await?;
        // Read once awake: the operator records the wake when it sees the ready pod.
        s.recorded_latency = bench.status().await.last_wake.and_then(|w| w.latency_ms);
        {
            eprintln!(
                "bench: wake {cycle}/{}: asked {:.0} scaled {:.0} created {:.0} scheduled {:.0} ready {:.0} forwarded {:.0} first byte {:.0} ms (operator's lastWake {:?} ms)",
                bench.args.cycles,
                s.asked,
                s.scaled,
                s.created,
                s.scheduled,
                s.ready,
                s.forwarded,
                s.first_byte,
                s.recorded_latency
            );
            samples.push(s);
        }
    }
    report(&bench.args, &samples, not_woken);
    Ok(())
}

// ------------------------------------------------------------------------------ report

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    (
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

fn report(args: &Args, samples: &[Sample], not_woken: usize) {
    let n = samples.len();
    let col = |f: &dyn Fn(&Sample) -> f64| stats(samples.iter().map(f).collect());
    let row = |part: &str, span: &str, (p50, p99, max): (f64, f64, f64)| {
        println!("| {part} | {span} | {p50:.0} | {p99:.0} | {max:.0} |");
    };
    let net = args.node_cidr;
    println!("### Wake, split into its parts (crac-bench-wake, {n} wakes)");
    println!();
    println!(
        "The release crac-operator and crac-activator binaries on the bench control plane; one CracApp \
         (1 replica) put to sleep (`{}`) and woken by one HTTP request to the activator, {n} times. \
         Each moment is when the driver's watches (started before the request) saw it, so a part \
         can come out a millisecond below zero when another process saw the previous event first.",
        labels::SLEEP_REQUESTED_AT
    );
    println!();
    println!("| part | from → to | p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- |");
    row(
        "activator: hold, ask",
        "request sent → `status.wakeRequestedAt` seen",
        col(&|s| s.asked),
    );
    row(
        "operator",
        "`wakeRequestedAt` → Deployment `spec.replicas` 1",
        col(&|s| s.scaled - s.asked),
    );
    row(
        "controller-manager",
        "Deployment scaled → restore pod created (ReplicaSet)",
        col(&|s| s.created - s.scaled),
    );
    row(
        "scheduler",
        "pod created → pod bound to a node",
        col(&|s| s.scheduled - s.created),
    );
    row(
        "pod ready (kwok, simulated)",
        "pod bound → Running and Ready with an address",
        col(&|s| s.ready - s.scheduled),
    );
    row(
        "activator: forward",
        "pod Ready seen → request reaches the app",
        col(&|s| s.forwarded - s.ready),
    );
    row(
        "app answers",
        "request at the app → first response byte",
        col(&|s| s.first_byte - s.forwarded),
    );
    let overhead = col(&|s| s.first_byte);
    row(
        "**wake overhead excluding restore**",
        "request sent → first response byte",
        overhead,
    );
    println!();
    let (activator, control_plane, pod_ready) = (
        col(&|s| s.asked + (s.first_byte - s.ready)),
        col(&|s| s.scheduled - s.asked),
        col(&|s| s.ready - s.scheduled),
    );
    println!(
        "- by component, p50 / p99 ms: activator (hold and ask, then forward and answer) {:.0} / {:.0}; \
         control plane (operator, controller-manager, scheduler) {:.0} / {:.0}; pod ready (kwok) {:.0} / {:.0}; \
         restore: not on kwok (no process restores here), measured separately",
        activator.0, activator.1, control_plane.0, control_plane.1, pod_ready.0, pod_ready.1
    );
    println!(
        "- wake overhead excluding restore, p50: **{:.0} ms** (goal < 300 ms on the test control plane: {})",
        overhead.0,
        if overhead.0 < 300.0 { "met" } else { "NOT met" }
    );
    if not_woken > 0 {
        println!(
            "- {not_woken} of {} requests were not counted: the activator forwarded them without a wake (see the driver's stderr)",
            args.cycles
        );
    }
    if let Some(first) = samples.first() {
        println!(
            "- the first wake of the run (every component's first time on this app's wake path) took {:.0} ms; it is among the {n} above",
            first.first_byte
        );
    }
    let recorded: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.recorded_latency.map(|l| l as f64))
        .collect();
    if !recorded.is_empty() {
        let (p50, p99, _) = stats(recorded);
        println!(
            "- the operator's own `status.lastWake.latencyMs` for the same wakes: p50 {p50:.0}, p99 {p99:.0} ms \
             (from `wakeRequestedAt`, to the reconcile that saw a ready pod)"
        );
    }
    if args.restore.is_empty() {
        println!(
            "- restore: not measured in this run (section c measures it with a real JVM and CRIU); \
             estimated end to end = this overhead + that restore"
        );
    }
    for (name, restore) in &args.restore {
        println!(
            "- estimated end to end, {name}: overhead p50 {:.0} ms + restore median {restore:.0} ms = **{:.0} ms**",
            overhead.0,
            overhead.0 + restore
        );
    }
    println!(
        "- simulated here: no kubelet and no container runtime (kwok marks the pod Running and Ready as \
         soon as it is bound; nothing restores), so \"pod ready\" is kwok's reaction time, not a restore. \
         On a real node the restore runs in the pod, and the kubelet's readiness probe adds to it: the \
         operator probes restore pods every second unless the app's `readinessProbe` sets `periodSeconds` \
         (crates/operator/src/build/inject.rs, Mode::Restore), so a first probe that runs before the \
         restored JVM listens delays Ready by up to one period. App and activity endpoints: the \
         driver serves them on every address of its node's {}.{}.{}.0/24.",
        net[0], net[1], net[2]
    );
    println!();
}
