//! `crac-chaos`: the wake path under failure (issue 15's `make chaos`, scripts/chaos). On the
//! control plane `KUBECONFIG` points at, it runs the real `crac-operator` and two
//! `crac-activator` replicas (processes on loopback addresses of their own, each with a
//! stand-in pod whose readiness follows the process's `/readyz`), makes one CracApp Ready and
//! runs the scenarios against it:
//!
//! - `callers`: 200 callers (GETs, 10 MB uploads, uploads the app answers with 413 before
//!   reading them) while the app sleeps and wakes `--cycles` times; lost 0 required.
//! - `activator-restart`: a rolling restart of both replicas (SIGTERM, replacement ready, the
//!   other) while callers wake the sleeping app; lost 0 required.
//! - `activator-kill`: SIGKILL of one replica while requests are held for a wake; ≥ 99 %
//!   answered, the rest a clean error (an error status or a closed connection) and none past
//!   the app's wakeTimeout plus a margin.
//! - `hostile`: slow heads, oversized heads, silent sockets and a connection flood at one
//!   activator while normal callers sleep and wake the app; every normal caller answered and
//!   the activators' peak RSS under `--activator-memory-limit-mib`.
//! - `in-place`: the app switched to `scaleToZero.mode: InPlace`, then 100 callers while it
//!   sleeps and wakes in place `--cycles` times (the pods' agents played with the app's real
//!   control token); lost 0, the same pods throughout, and the wakes done in place.
//!
//! The driver plays what no process plays here: the app's pods (see `pods`), kube-proxy
//! (`service`), and the kubelet's readiness probe of the activators (`activators`).
//! Each scenario prints one line `NAME: sent N, answered N, lost L, …, result pass|FAIL` on
//! stdout; the exit status is non-zero when one failed.
//!
//! ```text
//! crac-chaos --operator BIN --activator BIN [--logs DIR] [--namespace chaos]
//!     [--only "callers activator-restart activator-kill hostile in-place"] [--cycles 4] [--callers 200]
//!     [--node-cidr 127.152.0.0/24] [--addresses 127.0.0.81,127.0.0.82,127.0.0.83,127.0.0.84]
//!     [--app-port 18182] [--activator-memory-limit-mib 256]
//! ```

mod activators;
mod calls;
mod hostile;
mod pods;
mod service;

use activators::{Launcher, Replica};
use anyhow::{Context as _, Result, bail};
use calls::{Callers, Load, Tally};
use crac_api::CracApp;
use crac_api::cracapp::{Phase, ServingMode};
use crac_api::labels;
use crac_bench::{
    Child, FakeNode, create_namespace, create_ready_app, operator_args, spawn, tear_down,
    wait_answers,
};
use futures::TryStreamExt;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use pods::Pods;
use service::Service;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const APP: &str = "chaos";
/// The app's wakeTimeout; a request the activator holds longer gets 503.
const WAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// How much longer than the wake timeout a caller waits before it counts a request as hung.
const HANG_MARGIN: Duration = Duration::from_secs(10);
const DEADLINE: Duration = Duration::from_secs(90);
const OPERATOR_METRICS_PORT: u16 = 18190;

fn node(net: [u8; 3]) -> FakeNode {
    FakeNode {
        name: "crac-chaos",
        label_value: "chaos",
        taint: "crac.dev/chaos",
        net,
    }
}

struct Args {
    only: Vec<String>,
    cycles: usize,
    callers: usize,
    namespace: String,
    node_cidr: [u8; 3],
    addresses: Vec<IpAddr>,
    app_port: u16,
    memory_limit_mib: u64,
    operator: PathBuf,
    activator: PathBuf,
    logs: PathBuf,
}

const SCENARIOS: [&str; 5] = [
    "callers",
    "activator-restart",
    "activator-kill",
    "hostile",
    "in-place",
];

fn parse_args() -> Result<Args> {
    let mut args = Args {
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        cycles: 4,
        callers: 200,
        namespace: "chaos".into(),
        node_cidr: [127, 152, 0],
        addresses: (81..=84)
            .map(|h| IpAddr::V4(Ipv4Addr::new(127, 0, 0, h)))
            .collect(),
        app_port: 18182,
        memory_limit_mib: 256,
        operator: PathBuf::new(),
        activator: PathBuf::new(),
        logs: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--only" => args.only = value.split_whitespace().map(String::from).collect(),
            "--cycles" => args.cycles = value.parse()?,
            "--callers" => args.callers = value.parse()?,
            "--namespace" => args.namespace = value,
            "--node-cidr" => {
                let net = value
                    .strip_suffix(".0/24")
                    .context("--node-cidr must be a loopback /24 such as 127.152.0.0/24")?;
                let octets: Vec<u8> = net.split('.').map(str::parse).collect::<Result<_, _>>()?;
                match octets[..] {
                    [127, b, c] => args.node_cidr = [127, b, c],
                    _ => bail!("--node-cidr must be a loopback /24 such as 127.152.0.0/24"),
                }
            }
            "--addresses" => {
                args.addresses = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--app-port" => args.app_port = value.parse()?,
            "--activator-memory-limit-mib" => args.memory_limit_mib = value.parse()?,
            "--operator" => args.operator = value.into(),
            "--activator" => args.activator = value.into(),
            "--logs" => args.logs = value.into(),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if args.operator.as_os_str().is_empty() || args.activator.as_os_str().is_empty() {
        bail!("--operator and --activator (the binaries to run) are required");
    }
    if args.addresses.len() < 4 {
        bail!("--addresses needs four loopback addresses (two replicas and their replacements)");
    }
    if let Some(s) = args.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        bail!("unknown scenario {s} (known: {})", SCENARIOS.join(" "));
    }
    Ok(args)
}

/// One scenario's result.
struct Verdict {
    name: &'static str,
    tally: Tally,
    /// More `key value` fields.
    extra: Vec<(String, String)>,
    /// Why it failed (empty: passed).
    failures: Vec<String>,
}

impl Verdict {
    fn print(&self) {
        let mut line = format!("{}: {}", self.name, self.tally.fields());
        for (k, v) in &self.extra {
            line.push_str(&format!(", {k} {v}"));
        }
        let result = if self.failures.is_empty() {
            "pass"
        } else {
            "FAIL"
        };
        line.push_str(&format!(", result {result}"));
        println!("{line}");
        for f in &self.failures {
            eprintln!("chaos: {}: FAIL: {f}", self.name);
        }
        self.tally.log_examples(self.name);
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG names the control plane")?;
    let client = Client::try_default()
        .await
        .context("a client from KUBECONFIG")?;
    let ns = args.namespace.clone();
    let net = args.node_cidr;
    let names: Arc<Mutex<Vec<String>>> = Arc::default();

    let result = run(&client, args, &kubeconfig, names.clone()).await;

    let stand_ins = names.lock().expect("names lock").clone();
    delete_stand_ins(&client, &stand_ins).await;
    tear_down(&client, &ns, node(net).name).await;
    match result {
        Ok(true) => Ok(()),
        Ok(false) => bail!("a scenario failed"),
        Err(e) => Err(e),
    }
}

/// Runs the set-up and the scenarios; `Ok(false)` when a scenario failed.
async fn run(
    client: &Client,
    args: Args,
    kubeconfig: &str,
    names: Arc<Mutex<Vec<String>>>,
) -> Result<bool> {
    let ns = args.namespace.clone();
    let pods = Pods::start(args.node_cidr, args.app_port).await;
    node(args.node_cidr).create(client).await?;
    create_namespace(client, &ns).await?;
    let service = Service::new(pods.clone());
    let _watches = (
        pods.follow(client, &ns, APP),
        service.follow(client, &ns, APP),
    );
    let launcher = Launcher {
        client: client.clone(),
        ns: ns.clone(),
        binary: args.activator.clone(),
        kubeconfig: kubeconfig.into(),
        logs: args.logs.clone(),
        service: service.clone(),
    };
    let mut chaos = Chaos {
        client: client.clone(),
        ns: ns.clone(),
        launcher,
        pods: pods.clone(),
        service,
        replicas: Vec::new(),
        started: 0,
        names,
        sleeps: Arc::default(),
        args,
    };
    chaos.sleeps_watch();
    for _ in 0..2 {
        chaos.add_replica().await?;
    }
    let metrics = chaos.args.addresses[0];
    let _operator: Child = spawn(
        &chaos.args.operator,
        &operator_args(&format!("{metrics}:{OPERATOR_METRICS_PORT}"), &ns),
        &chaos.args.logs.join("chaos-operator.log"),
    )?;
    wait_answers("the operator", metrics, OPERATOR_METRICS_PORT, "/healthz").await?;
    let mut app = node(chaos.args.node_cidr).app(APP, chaos.args.app_port)?;
    if let Some(stz) = app.spec.scale_to_zero.as_mut() {
        stz.wake_timeout = Some(format!("{}s", WAKE_TIMEOUT.as_secs()));
    }
    create_ready_app(client, &ns, &app).await?;
    chaos.wait_awake().await?;

    let mut all_passed = true;
    for name in chaos.args.only.clone() {
        let started = Instant::now();
        eprintln!("chaos: {name}: starting");
        let verdict = match name.as_str() {
            "callers" => chaos.callers().await,
            "activator-restart" => chaos.activator_restart().await,
            "activator-kill" => chaos.activator_kill().await,
            "hostile" => chaos.hostile().await,
            "in-place" => chaos.in_place().await,
            _ => unreachable!("checked in parse_args"),
        };
        let mut verdict = match verdict {
            Ok(v) => v,
            Err(e) => Verdict {
                name: SCENARIOS
                    .iter()
                    .copied()
                    .find(|s| *s == name)
                    .expect("checked in parse_args"),
                tally: Tally::default(),
                extra: Vec::new(),
                failures: vec![format!("{e:#}")],
            },
        };
        verdict.extra.push((
            "seconds".into(),
            format!("{:.0}", started.elapsed().as_secs_f64()),
        ));
        verdict.print();
        all_passed &= verdict.failures.is_empty();
        // The next scenario starts from an awake app with two ready replicas.
        if let Err(e) = chaos.settle().await {
            eprintln!("chaos: after {name}: {e:#}; the remaining scenarios are skipped");
            return Ok(false);
        }
    }
    Ok(all_passed)
}

struct Chaos {
    client: Client,
    ns: String,
    args: Args,
    launcher: Launcher,
    pods: Pods,
    service: Service,
    replicas: Vec<Replica>,
    /// Replicas started so far (for their names).
    started: usize,
    /// Every stand-in pod name used (to clean up).
    names: Arc<Mutex<Vec<String>>>,
    /// Every distinct `status.sleptAt` the app has had.
    sleeps: Arc<Mutex<Vec<String>>>,
}

impl Chaos {
    fn apps(&self) -> Api<CracApp> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn status(&self) -> crac_api::CracAppStatus {
        crac_bench::app_status(&self.apps(), APP).await
    }

    fn deadline(&self) -> Duration {
        WAKE_TIMEOUT + HANG_MARGIN
    }

    /// Records every distinct `status.sleptAt` (a sleep may last a moment only when callers
    /// wake the app at once: polling could miss it, the watch does not).
    fn sleeps_watch(&self) {
        let config = watcher::Config::default().fields(&format!("metadata.name={APP}"));
        let (apps, sleeps) = (self.apps(), self.sleeps.clone());
        tokio::spawn(async move {
            let mut stream = Box::pin(watcher(apps, config).default_backoff().applied_objects());
            while let Ok(Some(app)) = stream.try_next().await {
                if let Some(at) = app.status.and_then(|s| s.slept_at) {
                    let at = at.0.to_string();
                    let mut sleeps = sleeps.lock().expect("sleeps lock");
                    if !sleeps.contains(&at) {
                        sleeps.push(at);
                    }
                }
            }
        });
    }

    fn sleep_count(&self) -> usize {
        self.sleeps.lock().expect("sleeps lock").len()
    }

    /// A replica on an address no live replica has.
    async fn add_replica(&mut self) -> Result<()> {
        let address = *self
            .args
            .addresses
            .iter()
            .find(|a| !self.replicas.iter().any(|r| r.address == **a))
            .context("no free activator address")?;
        self.started += 1;
        let name = format!("{}-activator-{}", self.ns, self.started);
        self.names.lock().expect("names lock").push(name.clone());
        let replica = self.launcher.start(&name, address).await?;
        self.replicas.push(replica);
        Ok(())
    }

    /// Asks the app to sleep (it sleeps once its open connections have ended).
    async fn request_sleep(&self) -> Result<()> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({ "metadata": { "annotations": { labels::SLEEP_REQUESTED_AT: now } } });
        self.apps()
            .patch(APP, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// Waits until the app has slept once more than `before` times.
    async fn wait_slept(&self, before: usize) -> Result<()> {
        crac_bench::until(
            "the app asleep",
            Duration::from_millis(20),
            DEADLINE,
            || async { (self.sleep_count() > before).then_some(()) },
        )
        .await
    }

    /// Puts the app to sleep with no traffic and waits until no pod of it is left.
    async fn put_to_sleep(&self) -> Result<()> {
        let before = self.sleep_count();
        self.request_sleep().await?;
        self.wait_slept(before).await?;
        crac_bench::until(
            "the app at zero",
            Duration::from_millis(20),
            DEADLINE,
            || async {
                let s = self.status().await;
                let asleep = s.phase? == Phase::ScaledToZero && s.slept_at.is_some();
                let on_pods = matches!(self.service.route(), Some(service::Route::Pod(_)));
                (asleep && !on_pods).then_some(())
            },
        )
        .await
    }

    async fn wait_awake(&self) -> Result<()> {
        crac_bench::until(
            "the app awake on its pods",
            Duration::from_millis(20),
            DEADLINE,
            || async {
                let s = self.status().await;
                (s.phase? == Phase::Ready
                    && s.serving_mode? == ServingMode::Pods
                    && s.slept_at.is_none())
                .then_some(())
            },
        )
        .await
    }

    /// Waits until the wake asked after the last sleep reached the API (the activator holds
    /// requests meanwhile).
    async fn wait_wake_asked(&self) -> Result<()> {
        crac_bench::until(
            "the activator's wake request",
            Duration::from_millis(10),
            DEADLINE,
            || async {
                let s = self.status().await;
                (s.wake_requested_at?.0 > s.slept_at?.0).then_some(())
            },
        )
        .await
    }

    /// Sleep and wake cycles while callers keep coming: (cycles done, the first failure).
    async fn cycles(&self, n: usize) -> (usize, Option<String>) {
        for done in 0..n {
            let before = self.sleep_count();
            let step = async {
                // A sleep asked while the app still wakes is older than the wake it ends
                // with, and the operator drops it (it acts on a request newer than the last
                // wake): ask once awake.
                self.wait_awake().await?;
                self.request_sleep().await?;
                self.wait_slept(before).await?;
                self.wait_awake().await
            };
            if let Err(e) = step.await {
                return (done, Some(format!("cycle {}: {e:#}", done + 1)));
            }
            eprintln!("chaos: cycle {}/{n}: slept and woke", done + 1);
        }
        (n, None)
    }

    /// Back to two ready replicas and an awake app.
    async fn settle(&mut self) -> Result<()> {
        self.replicas.retain(|r| r.pid().is_some());
        while self.replicas.len() < 2 {
            self.add_replica().await?;
        }
        if self.status().await.serving_mode != Some(ServingMode::Pods) {
            // A sleeping app wakes at its next request.
            let _ = calls::call(&self.service, calls::Kind::Get, 0, self.deadline()).await;
        }
        self.wait_awake().await
    }

    fn bursty(&self, callers: usize) -> Load {
        Load {
            callers,
            uploads: 10,
            early: 5,
            period: Duration::from_secs(3),
            burst: Duration::from_millis(1500),
            deadline: self.deadline(),
        }
    }

    // -------------------------------------------------------------------------- scenarios

    async fn callers(&mut self) -> Result<Verdict> {
        let callers = Callers::start(&self.service, self.bursty(self.args.callers), 1);
        let (done, failure) = self.cycles(self.args.cycles).await;
        let tally = callers.stop().await;
        let mut failures: Vec<String> = failure.into_iter().collect();
        if tally.lost() > 0 {
            failures.push(format!("{} requests lost", tally.lost()));
        }
        Ok(Verdict {
            name: "callers",
            extra: vec![
                ("callers".into(), self.args.callers.to_string()),
                ("cycles".into(), format!("{done}/{}", self.args.cycles)),
            ],
            tally,
            failures,
        })
    }

    async fn activator_restart(&mut self) -> Result<Verdict> {
        self.put_to_sleep().await?;
        let callers = Callers::start(&self.service, self.bursty(100), 2);
        let mut failures = Vec::new();
        let restart = async {
            self.wait_wake_asked().await?;
            let mut drained = Vec::new();
            for _ in 0..2 {
                let asked = Instant::now();
                self.replicas[0].terminate()?;
                // Its replacement on another address (the old one still drains on its own).
                self.add_replica().await?;
                let mut old = self.replicas.remove(0);
                let status = old.wait_exit(Duration::from_secs(60)).await?;
                eprintln!(
                    "chaos: activator {} exited {status} {:.1}s after SIGTERM",
                    old.name,
                    asked.elapsed().as_secs_f64()
                );
                drained.push(status.success());
            }
            anyhow::Ok(drained)
        };
        let drained = match restart.await {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("the restart: {e:#}"));
                Vec::new()
            }
        };
        if drained.iter().any(|ok| !ok) {
            failures.push("an activator did not exit 0 (drain timeout)".into());
        }
        // One more sleep and wake through the new replicas.
        let (done, failure) = self.cycles(1).await;
        failures.extend(failure);
        let tally = callers.stop().await;
        if tally.lost() > 0 {
            failures.push(format!("{} requests lost", tally.lost()));
        }
        Ok(Verdict {
            name: "activator-restart",
            extra: vec![
                ("callers".into(), "100".into()),
                (
                    "drained".into(),
                    format!("{}/2", drained.iter().filter(|ok| **ok).count()),
                ),
                ("cycles-after".into(), format!("{done}/1")),
            ],
            tally,
            failures,
        })
    }

    async fn activator_kill(&mut self) -> Result<Verdict> {
        self.put_to_sleep().await?;
        let load = Load {
            callers: 30,
            uploads: 5,
            early: 0,
            period: Duration::from_millis(100),
            burst: Duration::from_millis(100),
            deadline: self.deadline(),
        };
        let callers = Callers::start(&self.service, load, 3);
        let mut failures = Vec::new();
        let mut held_on_killed = String::from("?");
        let kill = async {
            // Mid-wake: the first replica seen holding requests for the wake, at once.
            let (i, held) = crac_bench::until(
                "requests held for the wake",
                Duration::from_millis(5),
                DEADLINE,
                || async {
                    for (i, r) in self.replicas.iter().enumerate() {
                        let admin = format!("{}:{}", r.address, activators::ADMIN_PORT);
                        let Ok(metrics) = crac_bench::scrape(&admin).await else {
                            continue;
                        };
                        let held =
                            metric_sum(&metrics, "crac_activator_held_requests").unwrap_or(0.0);
                        if held > 0.0 {
                            return Some((i, held));
                        }
                    }
                    None
                },
            )
            .await?;
            held_on_killed = format!("{held:.0}");
            let mut killed = self.replicas.remove(i);
            killed.kill().await?;
            eprintln!(
                "chaos: SIGKILL activator {} with {held_on_killed} requests held",
                killed.name
            );
            let _ = killed.wait_exit(Duration::from_secs(10)).await;
            // Its Deployment would start another.
            self.add_replica().await?;
            self.wait_awake().await
        };
        if let Err(e) = kill.await {
            failures.push(format!("the kill: {e:#}"));
        }
        // Callers go on a while after the wake, through the pods and the new replica.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let tally = callers.stop().await;
        let ratio = tally.answered as f64 / tally.sent.max(1) as f64;
        if ratio < 0.99 {
            failures.push(format!("{:.2} % answered (≥ 99 % required)", ratio * 100.0));
        }
        if tally.wrong > 0 || tally.hung > 0 || tally.not_sent > 0 {
            failures.push(format!(
                "not a clean error: wrong {}, hung {}, not sent {}",
                tally.wrong, tally.hung, tally.not_sent
            ));
        }
        if tally.slowest > self.deadline() {
            failures.push(format!("slowest request {:?}", tally.slowest));
        }
        Ok(Verdict {
            name: "activator-kill",
            extra: vec![
                ("answered-pct".into(), format!("{:.2}", ratio * 100.0)),
                ("held-on-killed".into(), held_on_killed),
                ("wake-timeout-s".into(), WAKE_TIMEOUT.as_secs().to_string()),
            ],
            tally,
            failures,
        })
    }

    async fn hostile(&mut self) -> Result<Verdict> {
        self.put_to_sleep().await?;
        let port = self
            .status()
            .await
            .activator_ports
            .first()
            .map(|p| p.activator_port)
            .context("the app has no activator port")?;
        let target = std::net::SocketAddr::new(self.replicas[0].address, u16::try_from(port)?);
        let pids: Vec<u32> = self.replicas.iter().filter_map(Replica::pid).collect();
        let attack = hostile::Attack::start(target, pids);
        let callers = Callers::start(&self.service, self.bursty(50), 4);
        let (done, failure) = self.cycles(2).await;
        let tally = callers.stop().await;
        let report = attack.stop().await;
        let mut failures: Vec<String> = failure.into_iter().collect();
        if tally.lost() > 0 {
            failures.push(format!("{} normal requests lost", tally.lost()));
        }
        let limit_kib = self.args.memory_limit_mib * 1024;
        if report.peak_rss_kib > limit_kib {
            failures.push(format!(
                "activator peak RSS {} MiB over the chart's limit {} MiB",
                report.peak_rss_kib / 1024,
                self.args.memory_limit_mib
            ));
        }
        let mut extra = vec![("cycles".into(), format!("{done}/2"))];
        extra.extend(report.fields());
        extra.push(("limit-mib".into(), self.args.memory_limit_mib.to_string()));
        Ok(Verdict {
            name: "hostile",
            extra,
            tally,
            failures,
        })
    }
}

impl Chaos {
    /// The app's restore pods' names, sorted.
    async fn pod_names(&self) -> Result<Vec<String>> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), &self.ns);
        let selector = crac_api::serving::restore_pods_selector(Some(APP));
        let mut names: Vec<String> = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Sleeping in place: the app switched to `mode: InPlace` (its pods replaced once, to
    /// mount the token), then callers while it sleeps and wakes in place.
    async fn in_place(&mut self) -> Result<Verdict> {
        let patch = serde_json::json!({ "spec": { "scaleToZero": { "mode": "InPlace" } } });
        self.apps()
            .patch(APP, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        // The token the operator gives the pods: the app's UID under the cluster key it keeps
        // in the activators' namespace.
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(
            self.client.clone(),
            crac_tests::operator::ACTIVATOR_NAMESPACE,
        );
        let key = crac_bench::until(
            "the control key",
            Duration::from_millis(50),
            DEADLINE,
            || async {
                let s = secrets
                    .get_opt(crac_api::control::KEY_SECRET)
                    .await
                    .ok()??;
                Some(s.data?.remove(crac_api::control::KEY_FIELD)?.0)
            },
        )
        .await?;
        let uid = self
            .apps()
            .get(APP)
            .await?
            .metadata
            .uid
            .context("app uid")?;
        let wakes = self
            .pods
            .sleep_in_place(&crac_api::control::app_token(&key, &uid));
        // Rolled out on the template with the token, and awake.
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(self.client.clone(), &self.ns);
        crac_bench::until(
            "the pods of the in-place template",
            Duration::from_millis(50),
            DEADLINE,
            || async {
                let s = self.status().await;
                (s.sleep_mode? == crac_api::cracapp::SleepMode::InPlace).then_some(())?;
                let d = deployments.get(APP).await.ok()?;
                let generation = d.metadata.generation?;
                let st = d.status?;
                let want = d.spec?.replicas?;
                (st.observed_generation? == generation
                    && st.updated_replicas? == want
                    && st.replicas? == want
                    && st.ready_replicas? == want)
                    .then_some(())
            },
        )
        .await?;
        self.wait_awake().await?;
        let before = self.pod_names().await?;

        let callers = Callers::start(&self.service, self.bursty(100), 5);
        let (done, failure) = self.cycles(self.args.cycles).await;
        let tally = callers.stop().await;
        let after = self.pod_names().await?;
        let woken = wakes.load(std::sync::atomic::Ordering::Acquire);
        let mut failures: Vec<String> = failure.into_iter().collect();
        if tally.lost() > 0 {
            failures.push(format!("{} requests lost", tally.lost()));
        }
        if before != after {
            failures.push(format!("pods replaced: {before:?} then {after:?}"));
        }
        if (woken as usize) < done {
            failures.push(format!("{woken} wakes in place for {done} sleeps"));
        }
        Ok(Verdict {
            name: "in-place",
            extra: vec![
                ("callers".into(), "100".into()),
                ("cycles".into(), format!("{done}/{}", self.args.cycles)),
                ("pod wakes in place".into(), woken.to_string()),
            ],
            tally,
            failures,
        })
    }
}

/// The sum of a metric's samples in a `/metrics` text.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Deletes the driver's stand-in activator pods (their namespace is shared with the tests, so
/// it stays).
async fn delete_stand_ins(client: &Client, names: &[String]) {
    let activators: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), crac_tests::operator::ACTIVATOR_NAMESPACE);
    for name in names {
        let _ = activators
            .delete(name, &kube::api::DeleteParams::background())
            .await;
    }
}
