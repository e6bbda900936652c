//! `crac-bench-scale`: the operator at scale (issue 4's Measure). Creates N CracApps at once
//! in a fresh namespace of the control plane `KUBECONFIG` points at, plays the agent's part in
//! every checkpoint pod as soon as it runs (no kubelet runs containers here: the tests'
//! `crac_tests::operator::end_checkpoint_pod` sets the pod's status to Succeeded with the
//! agent's JSON summary as the app container's termination message), and measures the time
//! until every app is `Ready`, the operator's peak memory, one reconcile's p50/p99 (from the
//! operator's `/metrics` histogram), and where the CPU went. Then deletes the namespace while the
//! operator still runs (the apps' finalizer needs it). Prints a Markdown block on stdout and
//! progress on stderr.
//!
//! ```text
//! crac-bench-scale --apps 1000 --operator-pid PID --metrics 127.0.0.1:18090 \
//!     [--namespace bench-scale] [--pid etcd=PID ...] [--timeout 600] [--idle 10]
//! ```

use anyhow::{Context as _, Result, bail};
use crac_api::CracApp;
use crac_api::agent::ENV_CHECKPOINT_ID;
use crac_api::cracapp::Phase;
use crac_bench::{catch_panic, create_namespace, percentile, scrape};
use crac_tests::checkpoint_id_of;
use crac_tests::operator::{end_checkpoint_pod, example_app, success};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Linux's USER_HZ on every architecture this runs on: /proc/<pid>/stat counts in 1/100 s.
const CLK_TCK: f64 = 100.0;

struct Args {
    apps: usize,
    namespace: String,
    operator_pid: u32,
    metrics: String,
    pids: Vec<(String, u32)>,
    timeout: Duration,
    idle: Duration,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        apps: 1000,
        namespace: "bench-scale".into(),
        operator_pid: 0,
        metrics: String::new(),
        pids: Vec::new(),
        timeout: Duration::from_secs(600),
        idle: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--apps" => args.apps = value.parse()?,
            "--namespace" => args.namespace = value,
            "--operator-pid" => args.operator_pid = value.parse()?,
            "--metrics" => args.metrics = value,
            "--pid" => {
                let (name, pid) = value.split_once('=').context("--pid NAME=PID")?;
                args.pids.push((name.to_string(), pid.parse()?));
            }
            "--timeout" => args.timeout = Duration::from_secs(value.parse()?),
            "--idle" => args.idle = Duration::from_secs(value.parse()?),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if args.operator_pid == 0 || args.metrics.is_empty() {
        bail!("--operator-pid and --metrics are required");
    }
    Ok(args)
}

/// (VmRSS, VmHWM) in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3; utime and
    // stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLK_TCK)
}

/// Sums of a histogram's cumulative buckets by upper bound, over every label set.
fn buckets(text: &str, name: &str) -> BTreeMap<u64, f64> {
    // Keyed by the bound in nanoseconds so the map sorts numerically; +Inf is u64::MAX.
    let mut out = BTreeMap::new();
    let prefix = format!("{name}_bucket{{");
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else {
            continue;
        };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        let bound = if le == "+Inf" {
            u64::MAX
        } else {
            le.parse::<f64>().map_or(u64::MAX, |s| (s * 1e9) as u64)
        };
        *out.entry(bound).or_insert(0.0) += count;
    }
    out
}

/// Counter values by their label set, summed over `_total` lines of `name`.
fn counters(text: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(name)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let labels = series
            .split_once('{')
            .map_or("", |(_, l)| l.trim_end_matches('}'));
        if let Ok(v) = value.parse::<f64>() {
            *out.entry(labels.to_string()).or_insert(0.0) += v;
        }
    }
    out
}

/// The API server's request counts by resource, subresource and verb (WATCH and the API
/// server's own health checks left out), from its `/metrics`.
async fn api_requests(client: &Client) -> Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut out = BTreeMap::new();
    for (labels, count) in counters(&text, "apiserver_request_total{") {
        // `name="value",...`; none of these values holds a quote or a comma.
        let label = |name: &str| {
            labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| *k == name)
                .map_or(String::new(), |(_, v)| v.trim_matches('"').to_string())
        };
        let (resource, subresource, verb) =
            (label("resource"), label("subresource"), label("verb"));
        if verb == "WATCH" || resource.is_empty() {
            continue;
        }
        let key = if subresource.is_empty() {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource}/{subresource}")
        };
        *out.entry(key).or_insert(0.0) += count;
    }
    Ok(out)
}

/// The q-quantile of a cumulative histogram, interpolating linearly within its bucket.
fn quantile(hist: &BTreeMap<u64, f64>, q: f64) -> Option<String> {
    let total = *hist.get(&u64::MAX)?;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let (mut lower, mut below) = (0u64, 0.0);
    for (&bound, &cum) in hist {
        if cum >= want {
            if bound == u64::MAX {
                return Some(format!("> {:.3} s", lower as f64 / 1e9));
            }
            let share = if cum > below {
                (want - below) / (cum - below)
            } else {
                1.0
            };
            let secs = (lower as f64 + share * (bound - lower) as f64) / 1e9;
            return Some(format!(
                "{:.1} ms (bucket {}–{} ms)",
                secs * 1e3,
                lower as f64 / 1e6,
                bound as f64 / 1e6
            ));
        }
        lower = bound;
        below = cum;
    }
    None
}

fn difference(after: &BTreeMap<u64, f64>, before: &BTreeMap<u64, f64>) -> BTreeMap<u64, f64> {
    after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// A CracApp as a user would write it (the tests' example), one replica.
fn app(name: &str) -> CracApp {
    let mut app = example_app(name, "bench/app:1");
    app.spec.replicas = 1;
    app
}

#[derive(Default, Clone)]
struct Progress {
    created: usize,
    checkpoints_ended: usize,
    ready: usize,
    last_checkpoint_ended: Option<Duration>,
    create_done: Option<Duration>,
    /// Elapsed since the start when the first 10%, 50%, 90% and all were Ready.
    milestones: Vec<(usize, Duration)>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let client = Client::try_default()
        .await
        .context("a client from KUBECONFIG")?;
    let n = args.apps;
    let ns_name = args.namespace.clone();

    // A fresh namespace, ready to admit pods.
    create_namespace(&client, &ns_name).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());

    let op = args.operator_pid;
    let (rss_start, _) = memory_kib(op).context("the operator's /proc/<pid>/status")?;
    let metrics_before = scrape(&args.metrics).await?;
    let hist_name = "crac_operator_reconcile_duration_seconds";
    let hist_before = buckets(&metrics_before, hist_name);
    let mut tracked: Vec<(String, u32)> = vec![("crac-operator".into(), op)];
    tracked.extend(args.pids.iter().cloned());
    tracked.push(("bench driver (this)".into(), std::process::id()));
    let cpu_before: Vec<Option<f64>> = tracked.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let requests_before = api_requests(&client).await?;

    let start = Instant::now();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let peak_rss = Arc::new(Mutex::new(rss_start));
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);

    // Memory sampler: the operator's RSS every 100 ms.
    let sampler = {
        let peak = peak_rss.clone();
        tokio::spawn(async move {
            loop {
                if let Some((rss, _)) = memory_kib(op) {
                    let mut p = peak.lock().expect("peak lock");
                    *p = (*p).max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The agent's part: end each checkpoint pod as soon as it runs.
    let agent = {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
        let progress = progress.clone();
        tokio::spawn(async move {
            let config =
                watcher::Config::default().labels("app.kubernetes.io/component=checkpoint");
            let mut stream = watcher(pods.clone(), config)
                .default_backoff()
                .applied_objects()
                .boxed();
            let mut handled = HashSet::new();
            let limit = Arc::new(tokio::sync::Semaphore::new(32));
            while let Ok(Some(pod)) = stream.try_next().await {
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                let Some(name) = pod.metadata.name.clone() else {
                    continue;
                };
                if !running || handled.contains(&name) {
                    continue;
                }
                let Some(id) = checkpoint_id_of(&pod) else {
                    eprintln!("bench: checkpoint pod {name} has no {ENV_CHECKPOINT_ID}");
                    continue;
                };
                handled.insert(name.clone());
                let (pods, progress, limit) = (pods.clone(), progress.clone(), limit.clone());
                tokio::spawn(async move {
                    let _permit = limit.acquire().await;
                    let pod = name.clone();
                    let end = async move { end_checkpoint_pod(&pods, &pod, &success(&id)).await };
                    match catch_panic("the status patch", end).await {
                        Ok(()) => {
                            let mut p = progress.lock().expect("progress lock");
                            p.checkpoints_ended += 1;
                            p.last_checkpoint_ended = Some(start.elapsed());
                        }
                        Err(e) => eprintln!("bench: ending checkpoint pod {name}: {e:#}"),
                    }
                });
            }
        })
    };

    // Readiness: the first time each app reports phase Ready.
    let created_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let time_to_ready: Arc<Mutex<Vec<f64>>> = Arc::default();
    let phases: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let tracker = {
        let apps: Api<CracApp> = Api::namespaced(client.clone(), &ns_name);
        let (progress, created_at, time_to_ready, phases) = (
            progress.clone(),
            created_at.clone(),
            time_to_ready.clone(),
            phases.clone(),
        );
        tokio::spawn(async move {
            let mut stream = watcher(apps, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            let mut ready = HashSet::new();
            while let Ok(Some(app)) = stream.try_next().await {
                let Some(name) = app.metadata.name.clone() else {
                    continue;
                };
                let phase = app.status.as_ref().and_then(|s| s.phase);
                phases
                    .lock()
                    .expect("phases lock")
                    .insert(name.clone(), format!("{phase:?}"));
                if phase != Some(Phase::Ready) || !ready.insert(name.clone()) {
                    continue;
                }
                if let Some(t) = created_at.lock().expect("created lock").get(&name) {
                    time_to_ready
                        .lock()
                        .expect("ready lock")
                        .push(t.elapsed().as_secs_f64());
                }
                let mut p = progress.lock().expect("progress lock");
                p.ready = ready.len();
                let count = ready.len();
                if [n / 10, n / 2, n * 9 / 10, n].contains(&count)
                    && !p.milestones.iter().any(|(c, _)| *c == count)
                {
                    p.milestones.push((count, start.elapsed()));
                }
                if count >= n {
                    let _ = done_tx.send(true);
                }
            }
        })
    };

    // Progress on stderr every 5 s.
    let reporter = {
        let (progress, peak) = (progress.clone(), peak_rss.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let p = progress.lock().expect("progress lock");
                eprintln!(
                    "bench: {:>5.1}s created {} checkpoint pods ended {} ready {} operator RSS {} MiB (peak {})",
                    start.elapsed().as_secs_f64(),
                    p.created,
                    p.checkpoints_ended,
                    p.ready,
                    memory_kib(op).map_or(0, |m| m.0 / 1024),
                    *peak.lock().expect("peak lock") / 1024
                );
            }
        })
    };

    // All apps at once (64 requests in flight).
    let apps: Api<CracApp> = Api::namespaced(client.clone(), &ns_name);
    let mut creates = futures::stream::iter(0..n)
        .map(|i| {
            let apps = apps.clone();
            let created_at = created_at.clone();
            async move {
                let name = format!("app-{i:04}");
                let t = Instant::now();
                apps.create(&PostParams::default(), &app(&name))
                    .await
                    .with_context(|| format!("create CracApp {name}"))?;
                created_at.lock().expect("created lock").insert(name, t);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64);
    while let Some(r) = creates.next().await {
        r?;
        progress.lock().expect("progress lock").created += 1;
    }
    progress.lock().expect("progress lock").create_done = Some(start.elapsed());

    let finished = tokio::time::timeout(
        args.timeout.saturating_sub(start.elapsed()),
        done_rx.wait_for(|d| *d),
    )
    .await
    .is_ok();
    let elapsed = start.elapsed();
    let cpu_after: Vec<Option<f64>> = tracked.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let metrics_after = scrape(&args.metrics).await?;
    let requests_after = api_requests(&client).await?;
    let (_, hwm_ready) = memory_kib(op).unwrap_or_default();

    // Idle: does the operator settle once everything is Ready?
    let reconciles_after = counters(&metrics_after, "crac_operator_reconciles_total");
    let op_cpu_idle_start = cpu_seconds(op);
    tokio::time::sleep(args.idle).await;
    let metrics_idle = scrape(&args.metrics).await?;
    let op_cpu_idle = cpu_seconds(op)
        .zip(op_cpu_idle_start)
        .map_or(f64::NAN, |(a, b)| a - b);
    let reconciles_idle = counters(&metrics_idle, "crac_operator_reconciles_total");
    let idle_reconciles: f64 =
        reconciles_idle.values().sum::<f64>() - reconciles_after.values().sum::<f64>();

    reporter.abort();
    agent.abort();
    let peak = *peak_rss.lock().expect("peak lock");
    let (rss_end, hwm_end) = memory_kib(op).unwrap_or_default();

    // Results.
    let p = progress.lock().expect("progress lock").clone();
    let mut ttr = time_to_ready.lock().expect("ready lock").clone();
    ttr.sort_by(f64::total_cmp);
    let hist = difference(&buckets(&metrics_after, hist_name), &hist_before);
    let reconcile_count = hist.get(&u64::MAX).copied().unwrap_or(0.0);
    let sum_of = |text: &str| {
        counters(text, &format!("{hist_name}_sum"))
            .values()
            .sum::<f64>()
    };
    let reconcile_sum = sum_of(&metrics_after) - sum_of(&metrics_before);
    let mib = |kib: u64| kib as f64 / 1024.0;

    println!("### Operator at scale: {n} CracApps created at once");
    println!();
    if finished {
        println!(
            "- all {n} Ready after **{:.1} s** (goal < 60 s: {})",
            elapsed.as_secs_f64(),
            if elapsed < Duration::from_secs(60) {
                "met"
            } else {
                "NOT met"
            }
        );
    } else {
        let mut by_phase: BTreeMap<String, usize> = BTreeMap::new();
        for phase in phases.lock().expect("phases lock").values() {
            *by_phase.entry(phase.clone()).or_default() += 1;
        }
        println!(
            "- **timed out** after {:.0} s with {} of {n} Ready (goal < 60 s: NOT met); phases: {by_phase:?}",
            elapsed.as_secs_f64(),
            p.ready
        );
    }
    if let Some(t) = p.create_done {
        println!(
            "- creating the {n} CracApps (64 requests in flight) took {:.1} s",
            t.as_secs_f64()
        );
    }
    if let Some(t) = p.last_checkpoint_ended {
        println!(
            "- checkpoint pods ended by the driver: {} (last at {:.1} s)",
            p.checkpoints_ended,
            t.as_secs_f64()
        );
    }
    let marks: Vec<String> = p
        .milestones
        .iter()
        .map(|(c, t)| format!("{c} at {:.1} s", t.as_secs_f64()))
        .collect();
    println!("- Ready over time: {}", marks.join(", "));
    println!(
        "- per app, create → Ready: p50 {:.1} s, p99 {:.1} s, max {:.1} s",
        percentile(&ttr, 0.5),
        percentile(&ttr, 0.99),
        ttr.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "- operator memory: peak RSS **{:.1} MiB** (sampled every 100 ms; VmHWM {:.1} MiB at all-Ready, {:.1} MiB at the end), {:.1} MiB before the apps, {:.1} MiB after (goal < 100 MiB: {})",
        mib(peak),
        mib(hwm_ready),
        mib(hwm_end),
        mib(rss_start),
        mib(rss_end),
        if mib(peak.max(hwm_end)) < 100.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "- one reconcile ({reconcile_count:.0} reconciles, {:.1} per app; mean {:.1} ms): p50 {}, p99 {}",
        reconcile_count / n as f64,
        if reconcile_count > 0.0 {
            reconcile_sum / reconcile_count * 1e3
        } else {
            f64::NAN
        },
        quantile(&hist, 0.5).unwrap_or_else(|| "n/a".into()),
        quantile(&hist, 0.99).unwrap_or_else(|| "n/a".into())
    );
    println!("- reconciles by result: {reconciles_after:?}");
    println!(
        "- idle for {} s after all Ready: {idle_reconciles:.0} reconciles, operator CPU {op_cpu_idle:.2} s",
        args.idle.as_secs()
    );
    // The operator's own cost per app: memory over its start, its requests (it counts them
    // itself, by verb and resource), its CPU.
    let own = |text: &str| counters(text, "crac_operator_api_requests_total{");
    let (own_before, own_after) = (own(&metrics_before), own(&metrics_after));
    let mut own_requests: Vec<(String, f64)> = own_after
        .iter()
        .map(|(k, v)| (k.clone(), v - own_before.get(k).copied().unwrap_or(0.0)))
        .filter(|(k, v)| *v > 0.0 && !k.contains("verb=\"watch\""))
        .collect();
    own_requests.sort_by(|a, b| b.1.total_cmp(&a.1));
    let own_total: f64 = own_requests.iter().map(|(_, v)| v).sum();
    let op_cpu = cpu_after[0]
        .zip(cpu_before[0])
        .map_or(f64::NAN, |(a, b)| a - b);
    println!(
        "- **per app**: operator memory **{:.1} KiB** (peak RSS over the RSS before the apps, / {n}; goal ≤ 30 KiB: {}), operator API requests **{:.2}** from create to all Ready (WATCH excluded; goal ≤ 10: {}), operator CPU **{:.1} ms**",
        peak.saturating_sub(rss_start) as f64 / n as f64,
        if peak.saturating_sub(rss_start) as f64 / n as f64 <= 30.0 {
            "met"
        } else {
            "NOT met"
        },
        own_total / n as f64,
        if own_total / n as f64 <= 10.0 {
            "met"
        } else {
            "NOT met"
        },
        op_cpu / n as f64 * 1e3
    );
    println!("- the operator's requests per app, by kind:");
    for (key, count) in &own_requests {
        println!("  - {key}: {:.2}", count / n as f64);
    }
    let window = elapsed.as_secs_f64();
    println!(
        "- CPU seconds from the first create to all Ready ({window:.1} s wall, {:.1} core-seconds available on {} cores):",
        window * std::thread::available_parallelism().map_or(1.0, |c| c.get() as f64),
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    let mut total = 0.0;
    for ((name, _), (a, b)) in tracked.iter().zip(cpu_after.iter().zip(&cpu_before)) {
        if let (Some(a), Some(b)) = (a, b) {
            total += a - b;
            println!(
                "  - {name}: {:.1} s ({:.0}% of one core)",
                a - b,
                (a - b) / window * 100.0
            );
        }
    }
    println!("  - sum of the above: {total:.1} s");
    // What the API server was asked for, from every client (operator, controllers, kwok, this
    // driver): where its CPU went.
    let mut requests: Vec<(String, f64)> = requests_after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v - requests_before.get(k).copied().unwrap_or(0.0),
            )
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    requests.sort_by(|a, b| b.1.total_cmp(&a.1));
    let all: f64 = requests.iter().map(|(_, v)| v).sum();
    println!(
        "- API requests from the first create to all Ready (all clients, WATCH excluded): {all:.0}, {:.1} per app; the most frequent, per app:",
        all / n as f64
    );
    for (key, count) in requests.iter().take(14) {
        println!("  - {key}: {:.2}", count / n as f64);
    }

    // Clean up while the operator still runs: its finalizer removes each app's images.
    tracker.abort();
    let t = Instant::now();
    namespaces
        .delete(&ns_name, &DeleteParams::background())
        .await?;
    let gone = wait_gone(&namespaces, &ns_name, Duration::from_secs(300)).await;
    if gone {
        println!(
            "- cleanup: namespace deleted (operator running, finalizers honoured) in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    } else {
        // Release the finalizers so the namespace can go, and say so.
        let apps: Api<CracApp> = Api::namespaced(client.clone(), &ns_name);
        let left = apps.list(&ListParams::default()).await?;
        for a in &left {
            let _ = apps
                .patch(
                    &a.metadata.name.clone().unwrap_or_default(),
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "metadata": { "finalizers": null } })),
                )
                .await;
        }
        let gone = wait_gone(&namespaces, &ns_name, Duration::from_secs(120)).await;
        println!(
            "- cleanup: namespace NOT gone after 300 s with the operator running ({} CracApps left); finalizers stripped, {}",
            left.items.len(),
            if gone { "then gone" } else { "still not gone" }
        );
    }
    sampler.abort();
    Ok(())
}

async fn wait_gone(namespaces: &Api<Namespace>, name: &str, limit: Duration) -> bool {
    crac_tests::poll(Duration::from_millis(500), limit, || async {
        namespaces.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await
    .is_some()
}
