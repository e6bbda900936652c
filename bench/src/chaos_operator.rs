//! `crac-chaos-operator`: the release `crac-operator` process killed with SIGKILL at each phase
//! of an app's life (issue 15), on the control plane `KUBECONFIG` points at, with the release
//! `crac-activator` running beside it. After each kill the operator is started again with the
//! same flags, the driver waits until the app converges, and checks that
//!
//! - exactly one checkpoint Job was made per checkpoint id and attempt (no attempt fails here,
//!   so: one Job per id, counted by label over every Job the driver's watch saw);
//! - the app's `status.checkpoint` is the image its (ended) checkpoint pod reported, and no
//!   restore pod was given an image other than one a checkpoint pod reported in full;
//! - every request callers sent meanwhile was answered.
//!
//! Scenarios, each `--rounds` times, each printing one line on stdout
//! (`SCENARIO: sent N, answered N, lost L, key value, ..., result pass|FAIL`):
//!
//! 1. `kill-checkpoint-job-created`: a fresh checkpoint of a serving app is asked for; the kill
//!    lands as soon as its Job appears;
//! 2. `kill-checkpoint-done-unrecorded`: the same, the kill as soon as the Job's completion is
//!    seen (the driver ends its pod as the agent would), before `status.checkpoint` shows the
//!    image (`window` counts the rounds whose kill landed before it did);
//! 3. `kill-deployment-applied`: a new app; the kill on its Deployment's first appearance;
//! 4. `kill-drain-start`: an app asked to sleep; the kill when its EndpointSlice moves to the
//!    activator; it must fall asleep, and wake for the requests sent after;
//! 5. `kill-scaled-to-zero`: the kill when the Deployment's replicas reach 0 (`slept_recorded`
//!    counts the rounds whose `status.sleptAt` was already written); requests are sent while the
//!    operator is down (the activator holds them and asks for a wake) and must all be answered
//!    once the restarted operator has woken the app;
//! 6. `kill-cleanup-running`: an app on a shared `existingClaim` is deleted; the kill while its
//!    cleanup pod runs (that pod ended while the operator is down in odd rounds, after the
//!    restart in even ones); the app must go, its finalizer released, one cleanup Job made and
//!    none left.
//!
//! Callers: a few GETs in parallel, sent "as kube-proxy would": to the endpoints of the app's
//! EndpointSlice. While the slice lists the activator (the tests' stand-in pod, whose address
//! is never dialled) they go to the real activator process at the slice's port; while it is on
//! the pods (whose loopback addresses the API server keeps out of a slice), to the app's ready
//! restore pods at the app's port; with neither, the request is lost (kube-proxy rejects it).
//! "The app" answers on every address of the driver's node's /24 (`--node-cidr`), so a pod
//! that is going still answers, as one shutting down gracefully would.
//!
//! ```text
//! crac-chaos-operator --operator BIN --activator BIN [--logs DIR] [--namespace chaos-operator]
//!     [--rounds 3] [--activator-address 127.0.0.91] [--node-cidr 127.153.0.0/24] [--app-port 18181]
//! ```

use anyhow::{Context as _, Result, bail};
use crac_api::CracApp;
use crac_api::cracapp::{CracAppStatus, Phase, ServingMode};
use crac_api::labels;
use crac_bench::{
    Child, FakeNode, activator_args, catch_panic, create_namespace, loopback_24, operator_args,
    serve_pod_addresses, spawn, tear_down, until, wait_answers,
};
use crac_operator::build::cleanup::cleanup_job_name;
use crac_operator::build::service::endpoint_slice_name;
use crac_operator::checkpoint_id::short;
use crac_tests::checkpoint_id_of;
use crac_tests::operator::{end_checkpoint_pod, stand_in_activator, success};
use crac_tests::real_node::http_get_waiting;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Client, Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The app that serves throughout (re-checkpointed, put to sleep and woken).
const MAIN: &str = "web";
/// The claim apps of scenario 6 keep their images on.
const SHARED_CLAIM: &str = "shared";
/// Ports of the operator's metrics and the activator's admin server, on `--activator-address`.
const OPERATOR_METRICS_PORT: u16 = 18191;
const ACTIVATOR_ADMIN_PORT: u16 = 19191;
/// How often waits poll.
const POLL: Duration = Duration::from_millis(50);
/// How long an app may take to converge after the operator's restart, and a kill to land.
const CONVERGE: Duration = Duration::from_secs(90);
/// One request's limit (the activator holds one for up to the app's wakeTimeout, 30 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Callers sending at once, the pause between one caller's requests, and its cap per stream.
const CALLERS: usize = 3;
const PACE: Duration = Duration::from_millis(100);
const MAX_REQUESTS_PER_CALLER: usize = 1500;
/// How long callers keep sending once the app has converged.
const AFTER: Duration = Duration::from_secs(1);

struct Args {
    operator: PathBuf,
    activator: PathBuf,
    logs: PathBuf,
    namespace: String,
    rounds: usize,
    activator_address: IpAddr,
    node_cidr: [u8; 3],
    app_port: u16,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        operator: PathBuf::new(),
        activator: PathBuf::new(),
        logs: std::env::temp_dir(),
        namespace: "chaos-operator".into(),
        rounds: 3,
        activator_address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 91)),
        node_cidr: [127, 153, 0],
        app_port: 18181,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--operator" => args.operator = value.into(),
            "--activator" => args.activator = value.into(),
            "--logs" => args.logs = value.into(),
            "--namespace" => args.namespace = value,
            "--rounds" => args.rounds = value.parse()?,
            "--activator-address" => args.activator_address = value.parse()?,
            "--node-cidr" => args.node_cidr = loopback_24(&value)?,
            "--app-port" => args.app_port = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    if args.operator.as_os_str().is_empty() || args.activator.as_os_str().is_empty() {
        bail!("--operator and --activator (the binaries to run) are required");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(args)
}

fn node(net: [u8; 3]) -> FakeNode {
    FakeNode {
        name: "crac-chaos-operator",
        label_value: "chaos-operator",
        taint: "crac.dev/chaos-operator",
        net,
    }
}

async fn wait<T, F, Fut>(what: &str, limit: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    until(what, POLL, limit, check).await
}

fn label<'a, K: Resource>(object: &'a K, key: &str) -> Option<&'a str> {
    object.meta().labels.as_ref()?.get(key).map(String::as_str)
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

// ------------------------------------------------------------------------------ the operator

/// The operator's process, started again after each kill with the same flags.
struct Operator {
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    address: IpAddr,
    child: Arc<Mutex<Option<Child>>>,
    starts: usize,
}

/// Kills the operator from a watch task, the moment the watch sees its trigger.
#[derive(Clone)]
struct Killer(Arc<Mutex<Option<Child>>>);

impl Killer {
    /// SIGKILL, at once; false when no operator runs.
    fn kill_now(&self) -> bool {
        let Ok(mut child) = self.0.lock() else {
            return false;
        };
        child.as_mut().is_some_and(|c| c.0.start_kill().is_ok())
    }
}

impl Operator {
    async fn start(&mut self) -> Result<()> {
        self.starts += 1;
        let child = spawn(&self.bin, &self.args, &self.log)?;
        *self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("operator lock"))? = Some(child);
        // Not /readyz: the operator's stays 503 until its watches have synced and it reconciled.
        wait_answers(
            "the operator",
            self.address,
            OPERATOR_METRICS_PORT,
            "/healthz",
        )
        .await
    }

    fn killer(&self) -> Killer {
        Killer(self.child.clone())
    }

    /// Waits until the killed process is gone.
    async fn reap(&mut self) -> Result<()> {
        let child = self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("operator lock"))?
            .take();
        if let Some(mut child) = child {
            let _ = child.0.start_kill();
            let status = child.0.wait().await?;
            eprintln!("chaos: operator (start {}) ended: {status}", self.starts);
        }
        Ok(())
    }

    async fn restart(&mut self) -> Result<()> {
        self.reap().await?;
        self.start().await
    }
}

// ------------------------------------------------------------------------------ what was seen

/// Everything the driver's watches saw that a check needs, over the whole run.
#[derive(Default)]
struct History {
    /// Checkpoint Jobs: (app, short checkpoint id) → the name of each attempt's Job → the UIDs
    /// of every Job seen by that name.
    checkpoint_jobs: BTreeMap<(String, String), BTreeMap<String, BTreeSet<String>>>,
    /// Cleanup Jobs: app → UIDs.
    cleanup_jobs: BTreeMap<String, BTreeSet<String>>,
    /// What the ended checkpoint pods reported: checkpoint id → image digest.
    reported: BTreeMap<String, String>,
    /// Restore pods: UID → (app, short checkpoint id, the digest they were told to restore).
    restore_pods: BTreeMap<String, (String, String, Option<String>)>,
    /// Checkpoint pods the driver ended (or is ending), by UID.
    ended: HashSet<String>,
}

impl History {
    /// Checkpoint Jobs made again for an id and attempt that already had one.
    fn duplicate_jobs(&self) -> usize {
        self.checkpoint_jobs
            .values()
            .flat_map(BTreeMap::values)
            .map(|uids| uids.len().saturating_sub(1))
            .sum()
    }

    /// Attempts beyond the first for one id (no checkpoint fails here: each is a problem).
    fn extra_attempts(&self) -> usize {
        self.checkpoint_jobs
            .values()
            .map(|attempts| attempts.len().saturating_sub(1))
            .sum()
    }

    /// Every Job of `app`'s checkpoints, duplicates and attempts included.
    fn checkpoint_jobs_of(&self, app: &str) -> usize {
        self.checkpoint_jobs
            .iter()
            .filter(|((a, _), _)| a == app)
            .flat_map(|(_, attempts)| attempts.values())
            .map(BTreeSet::len)
            .sum()
    }

    /// Restore pods given an image no checkpoint pod reported in full (no digest, or another).
    fn half_written(&self) -> Vec<String> {
        self.restore_pods
            .iter()
            .filter(|(_, (_, id, digest))| {
                !self
                    .reported
                    .iter()
                    .any(|(full, d)| short(full) == id && digest.as_ref() == Some(d))
            })
            .map(|(uid, (app, id, digest))| format!("{app} pod {uid} id {id} digest {digest:?}"))
            .collect()
    }
}

type Shared = Arc<Mutex<History>>;

fn record<R>(history: &Shared, f: impl FnOnce(&mut History) -> R) -> Option<R> {
    history.lock().ok().map(|mut h| f(&mut h))
}

/// The digest a stand-in checkpoint of `id` reports: one of its own, so an image of another
/// checkpoint cannot pass for it.
fn digest_of(id: &str) -> String {
    format!("sha256:{id}")
}

fn image_digest_env(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == crac_api::agent::ENV_IMAGE_DIGEST)?
        .value
        .clone()
}

/// Ends a running checkpoint pod as the agent would, reporting a digest of its own.
fn end_checkpoint(pods: Api<Pod>, history: Shared, pod: &Pod) {
    let (Some(uid), Some(id)) = (pod.metadata.uid.clone(), checkpoint_id_of(pod)) else {
        return;
    };
    if record(&history, |h| !h.ended.insert(uid.clone())).unwrap_or(true) {
        return;
    }
    let name = pod.name_any();
    let summary = crac_api::agent::AgentSummary {
        image_digest: Some(digest_of(&id)),
        ..success(&id)
    };
    record(&history, |h| h.reported.insert(id.clone(), digest_of(&id)));
    tokio::spawn(async move {
        for _ in 0..10 {
            let (p, s, n) = (pods.clone(), summary.clone(), name.clone());
            let ended = catch_panic("ending a checkpoint pod", async move {
                end_checkpoint_pod(&p, &n, &s).await;
            })
            .await;
            match ended {
                Ok(()) => return,
                Err(e) => eprintln!("chaos: {name}: {e:#}; trying again"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        record(&history, |h| h.ended.remove(&uid));
    });
}

/// The driver's watches: the pods and slices of the namespace (for the callers' "kube-proxy"
/// and the checks), every Job, and the agent's part in checkpoint pods.
struct Watches {
    pods: Store<Pod>,
    slices: Store<EndpointSlice>,
    history: Shared,
}

impl Watches {
    async fn start(client: &Client, ns: &str) -> Result<Self> {
        let history: Shared = Arc::default();
        let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let (pods, writer) = reflector::store();
        let (h, api) = (history.clone(), pods_api.clone());
        tokio::spawn(async move {
            let stream = watch(api.clone(), watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(pod)) = stream.try_next().await {
                observe_pod(&api, &h, &pod);
            }
        });
        let (slices, writer) = reflector::store();
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        tokio::spawn(async move {
            let stream = watch(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .touched_objects();
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(_)) = stream.try_next().await {}
        });
        let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
        let h = history.clone();
        tokio::spawn(async move {
            let mut stream = watch(jobs, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Ok(Some(job)) = stream.try_next().await {
                observe_job(&h, &job);
            }
        });
        let watches = Watches {
            pods,
            slices,
            history,
        };
        tokio::time::timeout(Duration::from_secs(60), async {
            watches.pods.wait_until_ready().await?;
            watches.slices.wait_until_ready().await
        })
        .await
        .context("the driver's watches did not sync")??;
        Ok(watches)
    }

    fn restore_pods(&self, app: &str) -> Vec<Arc<Pod>> {
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                label(p.as_ref(), labels::APP) == Some(app)
                    && label(p.as_ref(), labels::COMPONENT) == Some("restore")
            })
            .collect()
    }

    fn slice(&self, app: &str, ns: &str) -> Option<Arc<EndpointSlice>> {
        self.slices
            .get(&ObjectRef::new(&endpoint_slice_name(app)).within(ns))
    }

    fn history<R>(&self, f: impl FnOnce(&History) -> R) -> Result<R> {
        let h = self
            .history
            .lock()
            .map_err(|_| anyhow::anyhow!("history lock"))?;
        Ok(f(&h))
    }
}

fn observe_pod(api: &Api<Pod>, history: &Shared, pod: &Pod) {
    match label(pod, labels::COMPONENT) {
        Some("restore") => {
            let entry = (
                label(pod, labels::APP).unwrap_or_default().to_string(),
                label(pod, labels::CHECKPOINT_ID)
                    .unwrap_or_default()
                    .to_string(),
                image_digest_env(pod),
            );
            if let Some(uid) = pod.metadata.uid.clone() {
                record(history, |h| h.restore_pods.insert(uid, entry));
            }
        }
        Some("checkpoint") => {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if running && pod.metadata.deletion_timestamp.is_none() {
                end_checkpoint(api.clone(), history.clone(), pod);
            }
        }
        _ => {}
    }
}

fn observe_job(history: &Shared, job: &Job) {
    let (Some(uid), Some(app)) = (job.metadata.uid.clone(), label(job, labels::APP)) else {
        return;
    };
    let app = app.to_string();
    match label(job, labels::COMPONENT) {
        Some("checkpoint") => {
            let id = label(job, labels::CHECKPOINT_ID)
                .unwrap_or_default()
                .to_string();
            let name = job.name_any();
            record(history, |h| {
                h.checkpoint_jobs
                    .entry((app, id))
                    .or_default()
                    .entry(name)
                    .or_default()
                    .insert(uid)
            });
        }
        Some("cleanup") => {
            record(history, |h| {
                h.cleanup_jobs.entry(app).or_default().insert(uid)
            });
        }
        _ => {}
    }
}

/// Watches `api` and kills the operator the moment an object matching `trigger` is seen (only
/// after the watch's first list: objects that matched before it armed do not count). Returns
/// once armed; the handle yields the matching object.
async fn arm<K>(
    api: Api<K>,
    killer: Killer,
    trigger: impl Fn(&K) -> bool + Send + 'static,
) -> Result<tokio::task::JoinHandle<Option<K>>>
where
    K: Resource<DynamicType = ()> + Clone + Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let (armed_tx, armed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut armed_tx = Some(armed_tx);
        let mut stream = watch(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            match event {
                Event::InitDone => {
                    if let Some(tx) = armed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Apply(object) | Event::InitApply(object)
                    if armed_tx.is_none() && trigger(&object) =>
                {
                    killer.kill_now();
                    return Some(object);
                }
                _ => {}
            }
        }
        None
    });
    tokio::time::timeout(Duration::from_secs(30), armed)
        .await
        .context("the trigger's watch did not sync")?
        .context("the trigger's watch ended")?;
    Ok(task)
}

async fn fired<K>(task: tokio::task::JoinHandle<Option<K>>, what: &str) -> Result<K> {
    let abort = task.abort_handle();
    match tokio::time::timeout(CONVERGE, task).await {
        Ok(Ok(Some(object))) => Ok(object),
        Ok(_) => bail!("the watch for {what} ended"),
        Err(_) => {
            abort.abort();
            bail!("timed out after {CONVERGE:?} waiting for {what}")
        }
    }
}

// ------------------------------------------------------------------------------ callers

/// What callers sent and how it went, for one scenario.
#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    answered: AtomicUsize,
    lost: Mutex<BTreeMap<String, usize>>,
}

impl Tally {
    fn lost(&self) -> usize {
        self.lost.lock().map(|l| l.values().sum()).unwrap_or(0)
    }

    fn lose(&self, app: &str, why: String) {
        let why = why.trim_end().to_string();
        eprintln!("chaos: a request to {app} was lost: {why}");
        if let Ok(mut lost) = self.lost.lock() {
            *lost.entry(why).or_default() += 1;
        }
    }
}

/// Sends requests as kube-proxy would route them (see the module's doc).
#[derive(Clone)]
struct Proxy {
    watches: Arc<Watches>,
    ns: String,
    /// The stand-in activator pod's address (never dialled) and the real activator's.
    stand_in: String,
    activator: IpAddr,
    next: Arc<AtomicUsize>,
}

impl Proxy {
    fn route(&self, app: &str) -> Result<(IpAddr, u16), String> {
        let slice = self
            .watches
            .slice(app, &self.ns)
            .ok_or("no EndpointSlice")?;
        let port = slice
            .ports
            .iter()
            .flatten()
            .find_map(|p| p.port)
            .ok_or("a slice without a port")?;
        let port = u16::try_from(port).map_err(|e| e.to_string())?;
        let addresses: Vec<&String> = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses.iter())
            .collect();
        if addresses.iter().any(|a| **a == self.stand_in) {
            return Ok((self.activator, port));
        }
        if !addresses.is_empty() {
            // Nothing but the activator and loopback pods is ever dialled.
            return Err(format!("the slice lists {addresses:?}"));
        }
        let ready: Vec<IpAddr> = self
            .watches
            .restore_pods(app)
            .iter()
            .filter_map(|p| crac_api::serving::serving_address(p)?.parse().ok())
            .filter(IpAddr::is_loopback)
            .collect();
        if ready.is_empty() {
            return Err("no endpoint: the slice is on the pods and none is ready".into());
        }
        Ok((
            ready[self.next.fetch_add(1, Ordering::Relaxed) % ready.len()],
            port,
        ))
    }

    async fn request(&self, app: &str, tally: &Tally) {
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let (ip, port) = match self.route(app) {
            Ok(route) => route,
            Err(why) => return tally.lose(app, why),
        };
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            http_get_waiting(&ip.to_string(), port, "/"),
        )
        .await;
        match answer {
            Ok(Some((200, body))) if body.starts_with("hello from ") => {
                tally.answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some((code, body))) => {
                tally.lose(app, format!("{ip}:{port} answered {code}: {body}"))
            }
            Ok(None) => tally.lose(app, format!("no HTTP answer from {ip}:{port}")),
            Err(_) => tally.lose(
                app,
                format!("no answer from {ip}:{port} in {REQUEST_TIMEOUT:?}"),
            ),
        }
    }

    /// `CALLERS` callers sending to `app` until [`Callers::finish`].
    fn callers(&self, app: &str, tally: &Arc<Tally>) -> Callers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..CALLERS)
            .map(|_| {
                let (proxy, app, tally, stop) =
                    (self.clone(), app.to_string(), tally.clone(), stop.clone());
                tokio::spawn(async move {
                    for _ in 0..MAX_REQUESTS_PER_CALLER {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        proxy.request(&app, &tally).await;
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        Callers { stop, tasks }
    }
}

struct Callers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Callers {
    /// Stops sending and waits for the requests in flight.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

// ------------------------------------------------------------------------------ scenarios

/// One scenario's outcome over its rounds.
struct Outcome {
    name: &'static str,
    tally: Arc<Tally>,
    rounds: usize,
    converged: usize,
    /// Checkpoint Jobs beyond the first for one id, and restore pods of an image no
    /// checkpoint pod reported in full, that appeared during the scenario's rounds.
    duplicate_jobs: usize,
    extra_attempts: usize,
    half_written: usize,
    problems: Vec<String>,
    /// Scenario-specific counts, printed as `key value`.
    counts: BTreeMap<&'static str, usize>,
}

impl Outcome {
    fn new(name: &'static str) -> Self {
        Outcome {
            name,
            tally: Arc::default(),
            rounds: 0,
            converged: 0,
            duplicate_jobs: 0,
            extra_attempts: 0,
            half_written: 0,
            problems: Vec::new(),
            counts: BTreeMap::new(),
        }
    }

    fn count(&mut self, key: &'static str, yes: bool) {
        *self.counts.entry(key).or_default() += usize::from(yes);
    }

    fn line(&self) -> String {
        let mut line = format!(
            "{}: sent {}, answered {}, lost {}, rounds {}, converged {}, duplicate_jobs {}, extra_attempts {}, half_written {}",
            self.name,
            self.tally.sent.load(Ordering::Relaxed),
            self.tally.answered.load(Ordering::Relaxed),
            self.tally.lost(),
            self.rounds,
            self.converged,
            self.duplicate_jobs,
            self.extra_attempts,
            self.half_written
        );
        for (key, n) in &self.counts {
            line.push_str(&format!(", {key} {n}"));
        }
        line.push_str(&format!(", problems {}", self.problems.len()));
        let result = if self.failed() { "FAIL" } else { "pass" };
        line.push_str(&format!(", result {result}"));
        line
    }

    fn failed(&self) -> bool {
        !self.problems.is_empty()
            || self.tally.lost() > 0
            || self.converged < self.rounds
            || self.duplicate_jobs > 0
            || self.extra_attempts > 0
            || self.half_written > 0
    }
}

struct Chaos {
    client: Client,
    ns: String,
    node: FakeNode,
    app_port: u16,
    operator: Operator,
    watches: Arc<Watches>,
    proxy: Proxy,
}

impl Chaos {
    fn apps(&self) -> Api<CracApp> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>>(
        &self,
    ) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn status(&self, app: &str) -> CracAppStatus {
        crac_bench::app_status(&self.apps(), app).await
    }

    async fn annotate(&self, app: &str, key: &str) -> Result<()> {
        let patch = serde_json::json!({ "metadata": { "annotations": { key: now() } } });
        self.apps()
            .patch(app, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// The app awake and serving from the image its checkpoint pod reported: Ready, on its
    /// pods, its restore pods all of that image and one of them ready; the image `want` when
    /// given. Returns the image's id.
    async fn awake(&self, app: &str, want: Option<&str>) -> Option<String> {
        let s = self.status(app).await;
        let image = s.checkpoint.as_ref()?;
        let settled = s.phase? == Phase::Ready
            && s.serving_mode? == ServingMode::Pods
            && s.slept_at.is_none()
            && s.pending_checkpoint.is_none()
            && want.is_none_or(|id| image.id == id);
        let pods = self.watches.restore_pods(app);
        let current = pods
            .iter()
            .all(|p| label(p.as_ref(), labels::CHECKPOINT_ID) == Some(short(&image.id)));
        let ready = pods
            .iter()
            .any(|p| crac_api::serving::serving_address(p).is_some());
        let routed = self
            .proxy
            .route(app)
            .is_ok_and(|(ip, _)| ip != self.proxy.activator);
        (settled && current && ready && routed).then(|| image.id.clone())
    }

    async fn wait_awake(&self, app: &str) -> Result<String> {
        wait(&format!("{app} awake on its pods"), CONVERGE, || {
            self.awake(app, None)
        })
        .await
    }

    /// Awake on the image of checkpoint `id`.
    async fn wait_awake_on(&self, app: &str, id: &str) -> Result<()> {
        wait(&format!("{app} awake on image {id}"), CONVERGE, || async {
            self.awake(app, Some(id)).await.map(|_| ())
        })
        .await
    }

    /// Asleep: at zero, the sleep recorded, no pod left, the slice on the activator.
    async fn wait_asleep(&self, app: &str) -> Result<()> {
        let deployments: Api<Deployment> = self.api();
        wait(&format!("{app} asleep"), CONVERGE, || async {
            let s = self.status(app).await;
            let d = deployments.get(app).await.ok()?;
            let asleep = s.phase? == Phase::ScaledToZero
                && s.slept_at.is_some()
                && d.spec?.replicas == Some(0)
                && self.watches.restore_pods(app).is_empty()
                && self
                    .proxy
                    .route(app)
                    .is_ok_and(|(ip, _)| ip == self.proxy.activator);
            asleep.then_some(())
        })
        .await
    }

    /// The image the app's status records is the one its checkpoint pod reported for `id`.
    async fn image_problem(&self, app: &str, id: &str) -> Result<Option<String>> {
        let image = self.status(app).await.checkpoint;
        let reported = self.watches.history(|h| h.reported.get(id).cloned())?;
        Ok(match image {
            Some(c) if c.id == id && c.digest.is_some() && c.digest == reported => None,
            other => Some(format!(
                "{app}: status.checkpoint {other:?}, but the checkpoint pod of {id} reported {reported:?}"
            )),
        })
    }

    /// Ports the activator would be told twice (two apps on one activator port).
    async fn port_conflicts(&self) -> Vec<String> {
        let apps = self.apps().list(&ListParams::default()).await;
        let mut owners: BTreeMap<i32, Vec<String>> = BTreeMap::new();
        for app in apps.map(|l| l.items).unwrap_or_default() {
            let name = app.name_any();
            for p in app.status.map(|s| s.activator_ports).unwrap_or_default() {
                owners
                    .entry(p.activator_port)
                    .or_default()
                    .push(name.clone());
            }
        }
        owners
            .into_iter()
            .filter(|(_, apps)| apps.len() > 1)
            .map(|(port, apps)| format!("activator port {port} given to {apps:?}"))
            .collect()
    }

    /// Runs `rounds` rounds of `kill`, each checked the same way after it.
    async fn run(&mut self, kill: Kill, rounds: usize) -> Outcome {
        let name = kill.name();
        let mut outcome = Outcome::new(name);
        for round in 1..=rounds {
            outcome.rounds += 1;
            let started = Instant::now();
            let before = self
                .watches
                .history(|h| {
                    (
                        h.duplicate_jobs(),
                        h.extra_attempts(),
                        h.half_written().len(),
                    )
                })
                .unwrap_or_default();
            let result = kill.round(self, round, &mut outcome).await;
            match &result {
                Ok(()) => outcome.converged += 1,
                Err(e) => outcome.problems.push(format!("round {round}: {e:#}")),
            }
            let after = self
                .watches
                .history(|h| (h.duplicate_jobs(), h.extra_attempts(), h.half_written()))
                .unwrap_or_default();
            outcome.duplicate_jobs += after.0.saturating_sub(before.0);
            outcome.extra_attempts += after.1.saturating_sub(before.1);
            if after.2.len() > before.2 {
                outcome.half_written += after.2.len() - before.2;
                eprintln!(
                    "chaos: restore pods of images no checkpoint pod reported: {:?}",
                    after.2
                );
            }
            for conflict in self.port_conflicts().await {
                outcome.problems.push(format!("round {round}: {conflict}"));
            }
            eprintln!(
                "chaos: {name} round {round}/{rounds}: {} in {:.1} s (sent {}, lost {} so far)",
                if result.is_ok() {
                    "converged"
                } else {
                    "FAILED"
                },
                started.elapsed().as_secs_f64(),
                outcome.tally.sent.load(Ordering::Relaxed),
                outcome.tally.lost()
            );
            if result.is_err() {
                self.recover().await;
            }
        }
        outcome
    }

    /// After a failed round: an operator running, and the main app awake, if it can be had.
    async fn recover(&mut self) {
        if let Err(e) = self.operator.restart().await {
            eprintln!("chaos: could not restart the operator: {e:#}");
        }
        if let Err(e) = self.wait_awake(MAIN).await {
            eprintln!("chaos: the main app did not come back: {e:#}");
        }
    }
}

/// Where in an app's life the operator is killed (the module's doc, scenarios 1 to 6).
#[derive(Clone, Copy)]
enum Kill {
    CheckpointJobCreated,
    CheckpointDoneUnrecorded,
    DeploymentApplied,
    DrainStart,
    ScaledToZero,
    CleanupRunning,
}

impl Kill {
    const ALL: [Kill; 6] = [
        Kill::CheckpointJobCreated,
        Kill::CheckpointDoneUnrecorded,
        Kill::DeploymentApplied,
        Kill::DrainStart,
        Kill::ScaledToZero,
        Kill::CleanupRunning,
    ];

    fn name(self) -> &'static str {
        match self {
            Kill::CheckpointJobCreated => "kill-checkpoint-job-created",
            Kill::CheckpointDoneUnrecorded => "kill-checkpoint-done-unrecorded",
            Kill::DeploymentApplied => "kill-deployment-applied",
            Kill::DrainStart => "kill-drain-start",
            Kill::ScaledToZero => "kill-scaled-to-zero",
            Kill::CleanupRunning => "kill-cleanup-running",
        }
    }

    async fn round(self, chaos: &mut Chaos, round: usize, outcome: &mut Outcome) -> Result<()> {
        match self {
            Kill::CheckpointJobCreated => fresh_checkpoint(chaos, outcome, false).await,
            Kill::CheckpointDoneUnrecorded => fresh_checkpoint(chaos, outcome, true).await,
            Kill::DeploymentApplied => deployment_applied(chaos, round, outcome).await,
            Kill::DrainStart => drain_start(chaos, outcome).await,
            Kill::ScaledToZero => scaled_to_zero(chaos, outcome).await,
            Kill::CleanupRunning => cleanup_running(chaos, round, outcome).await,
        }
    }
}

/// Scenarios 1 and 2: a fresh checkpoint of the serving app; the kill when its Job appears,
/// or when the Job's completion is seen.
async fn fresh_checkpoint(
    chaos: &mut Chaos,
    outcome: &mut Outcome,
    at_completion: bool,
) -> Result<()> {
    chaos.wait_awake(MAIN).await?;
    let jobs: Api<Job> = chaos.api();
    let known: HashSet<String> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|j| j.metadata.uid)
        .collect();
    let trigger = arm(jobs, chaos.operator.killer(), move |job: &Job| {
        let new = job
            .metadata
            .uid
            .as_ref()
            .is_some_and(|u| !known.contains(u))
            && label(job, labels::APP) == Some(MAIN)
            && label(job, labels::COMPONENT) == Some("checkpoint");
        let complete = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            });
        new && (complete || !at_completion)
    })
    .await?;
    let callers = chaos.proxy.callers(MAIN, &outcome.tally);
    chaos
        .annotate(MAIN, labels::CHECKPOINT_REQUESTED_AT)
        .await?;
    let what = if at_completion {
        "the new checkpoint Job complete"
    } else {
        "the new checkpoint Job"
    };
    let job = fired(trigger, what).await;
    let job = match job {
        Ok(job) => job,
        Err(e) => {
            callers.finish().await;
            return Err(e);
        }
    };
    chaos.operator.reap().await?;
    let id = job
        .annotations()
        .get(labels::CHECKPOINT_ID_ANNOTATION)
        .cloned()
        .context("a checkpoint Job without its id")?;
    if at_completion {
        let recorded = chaos
            .status(MAIN)
            .await
            .checkpoint
            .is_some_and(|c| c.id == id);
        outcome.count("window", !recorded);
    }
    chaos.operator.start().await?;
    let converged = chaos.wait_awake_on(MAIN, &id).await;
    tokio::time::sleep(AFTER).await;
    callers.finish().await;
    converged?;
    if let Some(problem) = chaos.image_problem(MAIN, &id).await? {
        bail!(problem);
    }
    Ok(())
}

/// Scenario 3: a new app; the kill on its Deployment's first appearance.
async fn deployment_applied(chaos: &mut Chaos, round: usize, outcome: &mut Outcome) -> Result<()> {
    chaos.wait_awake(MAIN).await?;
    let name = format!("fresh-{round}");
    let wanted = name.clone();
    let trigger = arm(
        chaos.api::<Deployment>(),
        chaos.operator.killer(),
        move |d: &Deployment| d.name_any() == wanted,
    )
    .await?;
    // The app serving meanwhile must not notice.
    let bystanders = chaos.proxy.callers(MAIN, &outcome.tally);
    let result = async {
        chaos
            .apps()
            .create(
                &PostParams::default(),
                &chaos.node.app(&name, chaos.app_port)?,
            )
            .await?;
        fired(trigger, &format!("{name}'s Deployment")).await?;
        chaos.operator.restart().await?;
        let id = chaos.wait_awake(&name).await?;
        let callers = chaos.proxy.callers(&name, &outcome.tally);
        tokio::time::sleep(AFTER).await;
        callers.finish().await;
        if let Some(problem) = chaos.image_problem(&name, &id).await? {
            bail!(problem);
        }
        let jobs = chaos.watches.history(|h| h.checkpoint_jobs_of(&name))?;
        if jobs != 1 {
            bail!("{name}: {jobs} checkpoint Jobs for one spec");
        }
        Ok(())
    }
    .await;
    bystanders.finish().await;
    result?;
    // Out of the way of the next rounds (its pods take addresses of the node's /24).
    chaos
        .apps()
        .delete(&name, &DeleteParams::background())
        .await?;
    Ok(())
}

/// Scenario 4: asked to sleep; the kill when the slice moves to the activator.
async fn drain_start(chaos: &mut Chaos, outcome: &mut Outcome) -> Result<()> {
    chaos.wait_awake(MAIN).await?;
    let (ns, stand_in) = (chaos.ns.clone(), chaos.proxy.stand_in.clone());
    let trigger = arm(
        chaos.api::<EndpointSlice>(),
        chaos.operator.killer(),
        move |s: &EndpointSlice| {
            s.name_any() == endpoint_slice_name(MAIN)
                && s.namespace().as_deref() == Some(ns.as_str())
                && s.endpoints
                    .iter()
                    .flatten()
                    .any(|e| e.addresses.contains(&stand_in))
        },
    )
    .await?;
    let during = chaos.proxy.callers(MAIN, &outcome.tally);
    chaos.annotate(MAIN, labels::SLEEP_REQUESTED_AT).await?;
    let fired = fired(trigger, "the slice on the activator").await;
    // Requests while the operator is down go through the activator to the pods still up.
    tokio::time::sleep(AFTER).await;
    during.finish().await;
    fired?;
    chaos.operator.reap().await?;
    let recorded = chaos.status(MAIN).await.sleep_started_at.is_some();
    outcome.count("drain_recorded", recorded);
    chaos.operator.start().await?;
    chaos.wait_asleep(MAIN).await?;
    // The activator learns of the deleted pods from its own watch: let it, so the requests
    // below are held for a wake rather than sent to a pod that just went.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = chaos.proxy.callers(MAIN, &outcome.tally);
    let woken = chaos.wait_awake(MAIN).await;
    tokio::time::sleep(AFTER).await;
    after.finish().await;
    woken?;
    Ok(())
}

/// Scenario 5: the kill when the Deployment reaches zero; a wake asked while the operator is
/// down, served once the restarted operator has woken the app.
async fn scaled_to_zero(chaos: &mut Chaos, outcome: &mut Outcome) -> Result<()> {
    chaos.wait_awake(MAIN).await?;
    let trigger = arm(
        chaos.api::<Deployment>(),
        chaos.operator.killer(),
        |d: &Deployment| {
            d.name_any() == MAIN && d.spec.as_ref().and_then(|s| s.replicas) == Some(0)
        },
    )
    .await?;
    chaos.annotate(MAIN, labels::SLEEP_REQUESTED_AT).await?;
    fired(trigger, "the Deployment at 0").await?;
    chaos.operator.reap().await?;
    let before = chaos.status(MAIN).await;
    outcome.count("slept_recorded", before.slept_at.is_some());
    wait("the app's pods gone", CONVERGE, || async {
        chaos.watches.restore_pods(MAIN).is_empty().then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let callers = chaos.proxy.callers(MAIN, &outcome.tally);
    let asked = wait(
        "the activator's wake request",
        Duration::from_secs(10),
        || async {
            let s = chaos.status(MAIN).await;
            (s.wake_requested_at.is_some() && s.wake_requested_at != before.wake_requested_at)
                .then_some(())
        },
    )
    .await;
    outcome.count("wake_asked_while_down", asked.is_ok());
    let restarted = Instant::now();
    let result = async {
        chaos.operator.start().await?;
        chaos.wait_awake(MAIN).await
    }
    .await;
    eprintln!(
        "chaos: sleptAt recorded at the kill: {}; awake {:.1} s after the operator's restart",
        before.slept_at.is_some(),
        restarted.elapsed().as_secs_f64()
    );
    tokio::time::sleep(AFTER).await;
    callers.finish().await;
    result?;
    Ok(())
}

/// Scenario 6: an app on a shared claim deleted; the kill while its cleanup pod runs.
async fn cleanup_running(chaos: &mut Chaos, round: usize, outcome: &mut Outcome) -> Result<()> {
    chaos.wait_awake(MAIN).await?;
    let name = format!("tenant-{round}");
    let mut app = chaos.node.app(&name, chaos.app_port)?;
    app.spec.checkpoint.storage.existing_claim = Some(SHARED_CLAIM.into());
    chaos.apps().create(&PostParams::default(), &app).await?;
    chaos.wait_awake(&name).await?;
    let wanted = name.clone();
    let trigger = arm(
        chaos.api::<Pod>(),
        chaos.operator.killer(),
        move |p: &Pod| {
            label(p, labels::APP) == Some(wanted.as_str())
                && label(p, labels::COMPONENT) == Some("cleanup")
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        },
    )
    .await?;
    let bystanders = chaos.proxy.callers(MAIN, &outcome.tally);
    let result = async {
        chaos
            .apps()
            .delete(&name, &DeleteParams::background())
            .await?;
        let pod = fired(trigger, &format!("{name}'s cleanup pod running")).await?;
        chaos.operator.reap().await?;
        let pods: Api<Pod> = chaos.api();
        let end = |pods: Api<Pod>, pod: String| {
            catch_panic("ending the cleanup pod", async move {
                end_checkpoint_pod(&pods, &pod, &success("cleanup")).await;
            })
        };
        let while_down = round % 2 == 1;
        outcome.count("ended_while_down", while_down);
        if while_down {
            end(pods.clone(), pod.name_any()).await?;
        }
        chaos.operator.start().await?;
        if !while_down {
            end(pods, pod.name_any()).await?;
        }
        let apps = chaos.apps();
        wait(&format!("{name} deleted"), CONVERGE, || async {
            apps.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await?;
        let made = chaos
            .watches
            .history(|h| h.cleanup_jobs.get(&name).map_or(0, BTreeSet::len))?;
        if made != 1 {
            bail!("{name}: {made} cleanup Jobs made");
        }
        // The cleanup Job goes with the app (owner reference): none is left over.
        let jobs: Api<Job> = chaos.api();
        let left = wait("no cleanup Job left", CONVERGE, || async {
            jobs.get_opt(&cleanup_job_name(&app))
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
        outcome.count("cleanup_left_over", left.is_err());
        left
    }
    .await;
    bystanders.finish().await;
    result
}

// ------------------------------------------------------------------------------ main

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG names the control plane")?;
    let client = Client::try_default()
        .await
        .context("a client from KUBECONFIG")?;
    let ns = args.namespace.clone();
    let started = Instant::now();
    let result = run(&client, args, &kubeconfig).await;
    tear_down(&client, &ns, node([0; 3]).name).await;
    eprintln!("chaos: done in {:.0} s", started.elapsed().as_secs_f64());
    let failed = result?;
    if failed > 0 {
        bail!("{failed} operator-kill scenarios failed");
    }
    Ok(())
}

/// Runs every scenario; returns how many failed.
async fn run(client: &Client, args: Args, kubeconfig: &str) -> Result<usize> {
    let ns = args.namespace.clone();
    let (_hits, _agents) = serve_pod_addresses(args.node_cidr, args.app_port).await?;
    let node = node(args.node_cidr);
    node.create(client).await?;
    create_namespace(client, &ns).await?;
    let (c, n) = (client.clone(), ns.clone());
    let stand_in = catch_panic("the stand-in activator pod", async move {
        stand_in_activator(&c, &n).await
    })
    .await?;
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": { "name": SHARED_CLAIM },
        "spec": { "accessModes": ["ReadWriteMany"], "resources": { "requests": { "storage": "1Gi" } } }
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &claim)
        .await?;

    let address = args.activator_address;
    let activator_admin = format!("{address}:{ACTIVATOR_ADMIN_PORT}");
    let _activator = spawn(
        &args.activator,
        &activator_args(kubeconfig, address, &activator_admin),
        &args.logs.join("chaos-operator-activator.log"),
    )?;
    wait_answers("the activator", address, ACTIVATOR_ADMIN_PORT, "/readyz").await?;
    let log = args.logs.join("chaos-operator-operator.log");
    let _ = std::fs::remove_file(&log);
    let mut operator = Operator {
        bin: args.operator.clone(),
        args: operator_args(&format!("{address}:{OPERATOR_METRICS_PORT}"), &ns),
        log,
        address,
        child: Arc::default(),
        starts: 0,
    };
    operator.start().await?;
    let watches = Arc::new(Watches::start(client, &ns).await?);
    let proxy = Proxy {
        watches: watches.clone(),
        ns: ns.clone(),
        stand_in,
        activator: address,
        next: Arc::default(),
    };
    let mut chaos = Chaos {
        client: client.clone(),
        ns: ns.clone(),
        node,
        app_port: args.app_port,
        operator,
        watches,
        proxy,
    };
    chaos
        .apps()
        .create(
            &PostParams::default(),
            &chaos.node.app(MAIN, args.app_port)?,
        )
        .await?;
    chaos.wait_awake(MAIN).await?;

    let mut outcomes = Vec::new();
    for kill in Kill::ALL {
        outcomes.push(chaos.run(kill, args.rounds).await);
    }
    chaos.operator.reap().await?;

    let (duplicates, attempts, half_written) = chaos.watches.history(|h| {
        (
            h.duplicate_jobs(),
            h.extra_attempts(),
            h.half_written().len(),
        )
    })?;
    let mut failed = 0;
    for outcome in &outcomes {
        for problem in &outcome.problems {
            eprintln!("chaos: {}: {problem}", outcome.name);
        }
        let lost = outcome
            .tally
            .lost
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        if !lost.is_empty() {
            eprintln!("chaos: {}: lost requests by cause: {lost:?}", outcome.name);
        }
        failed += usize::from(outcome.failed());
    }
    for outcome in &outcomes {
        println!("{}", outcome.line());
    }
    // The main app's first checkpoint is in no scenario: these totals include it.
    eprintln!(
        "chaos: whole run: {duplicates} duplicate checkpoint Jobs, {attempts} extra attempts, \
         {half_written} restore pods of unreported images"
    );
    Ok(failed + usize::from(duplicates + attempts + half_written > 0))
}
