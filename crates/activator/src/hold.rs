//! Per-app state on the request path: the ready backends (a `watch` channel, so held requests
//! wake the instant a pod turns ready, with no polling), the bounded count of held requests
//! with their deadline, and the single wake task that asks the operator to wake the app.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::early::{self, AppProbe};
use crate::metrics::{AppMetrics, SleepMode, WakeOutcome, WakePart};
use crate::routes::{AppKey, RoundRobin, Serving};
use crate::wake::WakeClient;

/// How long a request that found every listed pod refusing connections waits before trying
/// them again, when no watch event arrives first. Only this corner (a pod listed ready whose
/// process is already gone) retries on a timer; a wake always waits for watch events.
const REFUSED_RETRY: Duration = Duration::from_millis(200);

/// Settings for holding and waking, shared by every app.
#[derive(Clone)]
pub struct HoldContext {
    /// Requests held per app at most (`--max-queue`).
    pub max_queue: usize,
    /// Requests held across all apps at most (`--max-held`), counted in `held_total`.
    pub max_held: usize,
    pub held_total: Arc<AtomicUsize>,
    pub wake_resend_interval: Duration,
    pub wake_request_timeout: Duration,
    pub waker: Arc<dyn WakeClient>,
}

/// What the request path sees of an app's pods.
#[derive(Clone, Debug, Default)]
pub struct Backends {
    /// Ready pod IPs, first-ready first.
    pub ips: Arc<[IpAddr]>,
    /// Bumped every time a wake fails for good; held requests compare it with the value they
    /// started with.
    pub failures: u64,
    pub last_failure: Option<Arc<str>>,
    /// Bumped every time a pod is woken in place: requests that pod refused try it again at
    /// once.
    pub woken_in_place: u64,
    /// The CracApp is gone.
    pub removed: bool,
    /// Whether the activator still serves the app (its `servingMode` as seen here).
    pub serving: Option<Serving>,
}

/// Result of asking for a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// Send it here. `held` tells whether the request had to wait for a wake.
    Ready { ip: IpAddr, held: bool },
    /// The app's queue is full.
    QueueFull,
    /// The activator holds `max_held` requests across all apps already.
    HeldLimit,
    /// No pod became ready before the wake deadline.
    Timeout,
    /// The wake failed for good, or the app was deleted.
    Failed(Arc<str>),
}

pub struct AppState {
    pub key: AppKey,
    wake_timeout_ms: AtomicU64,
    backends: watch::Sender<Backends>,
    /// Where the backends come from: the pods the watch says are Ready, and those the
    /// activator found answering itself before that ([`crate::early`]).
    pods: Mutex<PodSets>,
    rr: RoundRobin,
    held: AtomicUsize,
    waking: AtomicBool,
    probing: AtomicBool,
    /// How each pod that answered a request at zero started, as its agent said.
    starts: Mutex<HashMap<IpAddr, PodStart>>,
    /// Pods sleeping in place whose `/wake` is under way (`None`), or failed at that instant
    /// (not asked again before [`WAKE_IN_PLACE_AGAIN`]).
    waking_in_place: Mutex<HashMap<IpAddr, Option<Instant>>>,
    pub metrics: AppMetrics,
}

/// How a pod's app started: restored or cold, and the agent's start → ready, in seconds.
#[derive(Clone, Copy, Debug)]
struct PodStart {
    outcome: WakeOutcome,
    restore: Option<f64>,
    /// Woken in place by this activator (else started as a new pod).
    in_place: bool,
}

#[derive(Default)]
struct PodSets {
    ready: Vec<IpAddr>,
    /// Running, not Ready yet.
    starting: Vec<IpAddr>,
    /// Starting pods whose app answered the activator's probe, or that it woke in place.
    answered: Vec<IpAddr>,
    /// Starting pods the operator marked asleep in place.
    asleep: Vec<IpAddr>,
    probe: Option<AppProbe>,
    /// The app's control token, when it sleeps in place and the cluster key is known.
    token: Option<Arc<str>>,
}

impl PodSets {
    /// Ready pods first (first-ready first), then those that answered early.
    fn backends(&self) -> Vec<IpAddr> {
        let early = self.answered.iter().filter(|ip| !self.ready.contains(ip));
        self.ready.iter().chain(early).copied().collect()
    }
}

/// Whether an agent's answer was had (an agent that did not answer is asked again next time).
fn report_known(start: PodStart) -> bool {
    start.outcome != WakeOutcome::unknown
}

/// How long the agent of a pod that answered a request at zero is given to say how it started.
const AGENT_ASK_LIMIT: Duration = Duration::from_secs(2);

/// How often a starting pod is probed while requests are held, and how long one probe may take.
const PROBE_EVERY: Duration = Duration::from_millis(20);
const PROBE_LIMIT: Duration = Duration::from_millis(300);

/// How soon a pod whose wake in place failed is asked again.
const WAKE_IN_PLACE_AGAIN: Duration = Duration::from_secs(1);

impl AppState {
    pub fn new(
        key: AppKey,
        wake_timeout: Duration,
        ips: Vec<IpAddr>,
        serving: Serving,
        metrics: AppMetrics,
    ) -> Self {
        let (backends, _) = watch::channel(Backends {
            ips: ips.clone().into(),
            serving: Some(serving),
            ..Default::default()
        });
        Self {
            key,
            wake_timeout_ms: AtomicU64::new(duration_ms(wake_timeout)),
            backends,
            pods: Mutex::new(PodSets {
                ready: ips,
                ..Default::default()
            }),
            rr: RoundRobin::default(),
            held: AtomicUsize::new(0),
            waking: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            starts: Mutex::default(),
            waking_in_place: Mutex::default(),
            metrics,
        }
    }

    fn pod_sets(&self) -> std::sync::MutexGuard<'_, PodSets> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn wake_timeout(&self) -> Duration {
        Duration::from_millis(self.wake_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn set_wake_timeout(&self, timeout: Duration) {
        self.wake_timeout_ms
            .store(duration_ms(timeout), Ordering::Relaxed);
    }

    /// Replaces the ready pods; held requests see the change at once.
    pub fn set_backends(&self, ips: Vec<IpAddr>) {
        let mut pods = self.pod_sets();
        pods.ready = ips;
        self.publish(&pods);
    }

    /// Replaces the pods that run but are not Ready yet. One that answered early and is no
    /// longer starting (gone, or Ready now and listed as such) stops being an early backend.
    pub fn set_starting(&self, ips: Vec<IpAddr>, asleep: Vec<IpAddr>) {
        let mut pods = self.pod_sets();
        pods.answered.retain(|ip| ips.contains(ip));
        pods.starting = ips;
        pods.asleep = asleep;
        self.publish(&pods);
    }

    /// How to probe a starting pod of this app (`None`: wait for the kubelet's Ready).
    pub fn set_probe(&self, probe: Option<AppProbe>) {
        self.pod_sets().probe = probe;
    }

    /// The app's control token (`None`: it does not sleep in place, or the key is unknown).
    pub fn set_control_token(&self, token: Option<String>) {
        self.pod_sets().token = token.map(Into::into);
    }

    fn publish(&self, pods: &PodSets) {
        let ips = pods.backends();
        self.backends.send_if_modified(|b| {
            if *b.ips == *ips {
                return false;
            }
            b.ips = ips.into();
            true
        });
    }

    /// The app's `servingMode` was seen (again) at `now`.
    pub fn observe_serving_mode(
        &self,
        mode: Option<crac_api::cracapp::ServingMode>,
        now: std::time::Instant,
    ) {
        self.backends.send_if_modified(|b| {
            let next = match b.serving {
                Some(serving) => serving.observe(mode, now),
                None => Serving::first_seen(mode),
            };
            let changed = b.serving != Some(next);
            b.serving = Some(next);
            changed
        });
    }

    /// Whether a request arriving at `now` is served (see [`Serving`]).
    pub fn serves(&self, now: std::time::Instant, grace: Duration) -> bool {
        self.backends
            .borrow()
            .serving
            .is_some_and(|s| s.serves(now, grace))
    }

    /// Waits up to `limit` for the app to be served again (its mode turning `Activator`).
    /// For a request that may have raced the switch to sleep: the operator points the
    /// Service at the activator a moment before the status saying so reaches this activator.
    pub async fn wait_served(&self, grace: Duration, limit: Duration) -> bool {
        let mut rx = self.backends.subscribe();
        let served = rx.wait_for(|b| {
            b.removed
                || b.serving
                    .is_some_and(|s| s.serves(std::time::Instant::now(), grace))
        });
        matches!(tokio::time::timeout(limit, served).await, Ok(Ok(b)) if !b.removed)
    }

    pub fn ready_ips(&self) -> Arc<[IpAddr]> {
        self.backends.borrow().ips.clone()
    }

    /// Requests currently held for this app.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The app was deleted: every held request fails now.
    pub fn set_removed(&self) {
        self.backends.send_modify(|b| b.removed = true);
    }

    /// The wake failed for good: every request held now gets 503.
    pub fn fail_wake(&self, reason: &str) {
        self.backends.send_modify(|b| {
            b.failures += 1;
            b.last_failure = Some(reason.into());
        });
    }

    /// Chooses a backend for one request, holding it (and waking the app) when none is ready.
    /// `exclude` lists pods that refused this request's connection already. The wait ends at
    /// `arrived + wakeTimeout`.
    pub async fn pick(
        self: &Arc<Self>,
        ctx: &HoldContext,
        exclude: &[IpAddr],
        arrived: Instant,
    ) -> Pick {
        if let Some(pick) = self.pick_ready(exclude) {
            return pick;
        }
        // Boxed: holding is the rare path, and its state would otherwise enlarge every
        // request's future.
        Box::pin(self.hold(ctx, exclude, arrived)).await
    }

    /// A ready pod not in `exclude`, round-robin, or the app's removal; `None` when the request
    /// has to be held.
    fn pick_ready(&self, exclude: &[IpAddr]) -> Option<Pick> {
        let b = self.backends.borrow();
        if b.removed {
            return Some(Pick::Failed("the app was deleted".into()));
        }
        let ip = if exclude.is_empty() {
            self.rr.pick(&b.ips)
        } else {
            let usable: Vec<IpAddr> = b
                .ips
                .iter()
                .copied()
                .filter(|ip| !exclude.contains(ip))
                .collect();
            self.rr.pick(&usable)
        };
        ip.map(|ip| Pick::Ready { ip, held: false })
    }

    /// Holds a request until a pod is ready, the wake fails, or the deadline passes.
    async fn hold(
        self: &Arc<Self>,
        ctx: &HoldContext,
        exclude: &[IpAddr],
        arrived: Instant,
    ) -> Pick {
        let _slot = match HeldSlot::acquire(self, ctx) {
            Ok(slot) => slot,
            Err(full) => return full,
        };
        let mut rx = self.backends.subscribe();
        let start_failures = rx.borrow().failures;
        let mut woken_seen = rx.borrow().woken_in_place;
        let deadline = arrived + self.wake_timeout();
        let mut honour_exclude = !exclude.is_empty();
        let wait = async {
            loop {
                let no_pods = {
                    let b = rx.borrow_and_update();
                    if b.removed {
                        return Pick::Failed("the app was deleted".into());
                    }
                    // A pod that refused this request may be one just woken in place.
                    if b.woken_in_place != woken_seen {
                        woken_seen = b.woken_in_place;
                        honour_exclude = false;
                    }
                    if b.failures != start_failures {
                        let reason = b
                            .last_failure
                            .clone()
                            .unwrap_or_else(|| "wake failed".into());
                        return Pick::Failed(reason);
                    }
                    // Held requests go to the first ready pod: it is the one the wake brought up.
                    let first = b
                        .ips
                        .iter()
                        .copied()
                        .find(|ip| !honour_exclude || !exclude.contains(ip));
                    if let Some(ip) = first {
                        return Pick::Ready { ip, held: true };
                    }
                    b.ips.is_empty()
                };
                if no_pods {
                    // Also when the pods this request was refused by have gone since.
                    self.ensure_waking(ctx);
                    self.ensure_probing();
                } else if honour_exclude {
                    // Listed ready but refusing: pods that may have just gone to sleep in
                    // place, before the kubelet noticed, woken where they are. The operator is
                    // told of a pod that really slept (not of one that refused for another
                    // reason: a wake request then would end the app's next drain).
                    self.wake_in_place(exclude, Some(ctx));
                }
                if honour_exclude {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() {
                            return Pick::Failed("the app was deleted".into());
                        },
                        () = tokio::time::sleep(REFUSED_RETRY) => honour_exclude = false,
                    }
                } else if rx.changed().await.is_err() {
                    return Pick::Failed("the app was deleted".into());
                }
            }
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(pick) => pick,
            Err(_) => Pick::Timeout,
        }
    }

    /// Starts the app's wake task unless it runs already: one wake request per wake, however
    /// many requests are held.
    fn ensure_waking(self: &Arc<Self>, ctx: &HoldContext) {
        if self
            .waking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let app = Arc::clone(self);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                let refused = app.run_wake(&ctx).await;
                app.waking.store(false, Ordering::Release);
                if refused {
                    // The held requests got their 503; the next request tries again.
                    break;
                }
                // A request may have started holding while the task was finishing: it saw
                // `waking` set and left the wake to us.
                let still_needed = {
                    let b = app.backends.borrow();
                    app.held() > 0 && b.ips.is_empty() && !b.removed
                };
                if !still_needed
                    || app
                        .waking
                        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                {
                    break;
                }
            }
        });
    }

    /// A request that arrived at zero was answered by the pod on `ip`: `first_byte` after it
    /// arrived, of which `held` waiting for a pod. Recorded with how that pod's app started,
    /// asked of its agent once per pod (in the background: the answer is on its way already).
    pub fn answered_at_zero(self: &Arc<Self>, ip: IpAddr, first_byte: Duration, held: Duration) {
        let app = Arc::clone(self);
        tokio::spawn(async move {
            let known = app.lock_starts().get(&ip).copied();
            let start = match known {
                Some(start) => start,
                None => {
                    let report = early::agent_report(ip, AGENT_ASK_LIMIT).await;
                    let start = PodStart {
                        outcome: match report.as_ref().map(|r| r.mode.as_str()) {
                            Some("restored") => WakeOutcome::restored,
                            Some("coldStarted") => WakeOutcome::cold_started,
                            _ => WakeOutcome::unknown,
                        },
                        restore: report.and_then(|r| r.start_ms).map(|ms| ms as f64 / 1e3),
                        in_place: false,
                    };
                    let backends = app.ready_ips();
                    let mut starts = app.lock_starts();
                    // Only pods that still serve are remembered.
                    starts.retain(|known, _| backends.contains(known));
                    if report_known(start) {
                        starts.insert(ip, start);
                    }
                    start
                }
            };
            let m = &app.metrics;
            let mode = if start.in_place {
                SleepMode::in_place
            } else {
                SleepMode::recreate
            };
            m.at_zero(
                mode,
                start.outcome,
                WakePart::first_byte,
                first_byte.as_secs_f64(),
            );
            m.at_zero(mode, start.outcome, WakePart::held, held.as_secs_f64());
            if let Some(restore) = start.restore {
                m.at_zero(mode, start.outcome, WakePart::restore, restore);
            }
        });
    }

    /// A request that arrived at zero got a 503 after `waited` (deadline, or the wake failed).
    pub fn failed_at_zero(&self, waited: Duration) {
        let secs = waited.as_secs_f64();
        let mode = if self.pod_sets().token.is_some() {
            SleepMode::in_place
        } else {
            SleepMode::recreate
        };
        self.metrics
            .at_zero(mode, WakeOutcome::failed, WakePart::first_byte, secs);
        self.metrics
            .at_zero(mode, WakeOutcome::failed, WakePart::held, secs);
    }

    fn lock_starts(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PodStart>> {
        self.starts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether requests wait for a pod: held, none listed, the app not deleted.
    fn needs_pods(&self) -> bool {
        let b = self.backends.borrow();
        self.held() > 0 && b.ips.is_empty() && !b.removed
    }

    /// Starts the app's prober unless it runs already: while requests are held and no pod is
    /// listed, every starting pod is probed every [`PROBE_EVERY`]; the first that answers
    /// becomes a backend, and the held requests go to it.
    fn ensure_probing(self: &Arc<Self>) {
        let can_probe = {
            let pods = self.pod_sets();
            pods.probe.is_some() || pods.token.is_some()
        };
        if !can_probe
            || self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let app = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                // Bounded by the held requests' own deadline: none outlives the wake timeout.
                let until = Instant::now() + app.wake_timeout();
                while app.needs_pods() && Instant::now() < until {
                    app.probe_starting().await;
                    tokio::time::sleep(PROBE_EVERY).await;
                }
                app.probing.store(false, Ordering::Release);
                // A request that started holding as this prober finished saw it running.
                if !app.needs_pods()
                    || app
                        .probing
                        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                {
                    break;
                }
            }
        });
    }

    /// Wakes the sleeping pods in place, probes every other starting pod that has not answered
    /// yet, at once.
    async fn probe_starting(self: &Arc<Self>) {
        let asleep = self.pod_sets().asleep.clone();
        self.wake_in_place(&asleep, None);
        let (probe, candidates) = {
            let pods = self.pod_sets();
            let candidates: Vec<IpAddr> = pods
                .starting
                .iter()
                .filter(|ip| !pods.answered.contains(ip))
                .copied()
                .collect();
            (pods.probe.clone(), candidates)
        };
        let Some(probe) = probe.filter(|_| !candidates.is_empty()) else {
            return;
        };
        let results = futures::future::join_all(
            candidates
                .iter()
                .map(|ip| early::answers(*ip, &probe, PROBE_LIMIT)),
        )
        .await;
        let mut pods = self.pod_sets();
        for (ip, answered) in candidates.into_iter().zip(results) {
            // Still starting (not gone meanwhile), and not counted twice.
            if answered && pods.starting.contains(&ip) && !pods.answered.contains(&ip) {
                pods.answered.push(ip);
                self.metrics.answered_early.inc();
                tracing::info!(app = %self.key, %ip, "pod answered before it was Ready; forwarding");
            }
        }
        self.publish(&pods);
    }

    /// Asks each of `ips` not being woken already to wake in place (`POST /wake` with the app's
    /// control token), in the background; a pod that woke takes the held requests at once.
    /// Nothing when the app does not sleep in place. A pod that cannot be woken is left to the
    /// operator, which replaces it. With `tell`, a pod that was asleep and woke also makes the
    /// app's wake request (the operator grows the pod back and serves from it again).
    fn wake_in_place(self: &Arc<Self>, ips: &[IpAddr], tell: Option<&HoldContext>) {
        let Some(token) = self.pod_sets().token.clone() else {
            return;
        };
        for &ip in ips {
            {
                let mut waking = self.lock_waking_in_place();
                // Old failures are forgotten (pods come and go; the map stays small).
                waking.retain(|_, failed| failed.is_none_or(|t| t.elapsed() < WAKE_IN_PLACE_AGAIN));
                let busy = match waking.get(&ip) {
                    Some(None) => true,
                    Some(Some(failed)) => failed.elapsed() < WAKE_IN_PLACE_AGAIN,
                    None => false,
                };
                if busy {
                    continue;
                }
                waking.insert(ip, None);
            }
            let app = Arc::clone(self);
            let token = token.clone();
            let tell = tell.cloned();
            tokio::spawn(async move {
                let answer = early::wake_in_place(ip, &token, app.wake_timeout()).await;
                let woke = answer.is_some();
                // `restoreMs` only when this call (or one it joined) woke a sleeping pod.
                let was_asleep = answer.as_ref().is_some_and(|a| a.restore_ms.is_some());
                if let (true, Some(ctx)) = (was_asleep, &tell) {
                    app.ensure_waking(ctx);
                }
                match answer {
                    Some(a) => {
                        let start = PodStart {
                            outcome: if a.mode == crac_api::agent::mode::RESTORED {
                                WakeOutcome::restored
                            } else {
                                WakeOutcome::cold_started
                            },
                            restore: a.restore_ms.map(|ms| ms as f64 / 1e3),
                            in_place: true,
                        };
                        app.lock_starts().insert(ip, start);
                        app.metrics.woken_in_place.inc();
                        tracing::info!(app = %app.key, %ip, mode = %a.mode, restore_ms = ?a.restore_ms, "pod woken in place");
                        let mut pods = app.pod_sets();
                        if pods.starting.contains(&ip) && !pods.answered.contains(&ip) {
                            pods.answered.push(ip);
                        }
                        app.publish(&pods);
                        drop(pods);
                        app.backends.send_modify(|b| b.woken_in_place += 1);
                    }
                    None => {
                        tracing::warn!(app = %app.key, %ip, "a pod asleep in place did not wake; the operator replaces it");
                    }
                }
                let mut waking = app.lock_waking_in_place();
                if woke {
                    waking.remove(&ip);
                } else {
                    waking.insert(ip, Some(Instant::now()));
                }
            });
        }
    }

    fn lock_waking_in_place(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Option<Instant>>> {
        self.waking_in_place
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for the wake, repeating every `wake_resend_interval` while requests are still
    /// held and no pod is ready (the operator may have missed the first request), until a pod
    /// is ready, nobody waits any more, or the request fails for good (then returns `true`).
    async fn run_wake(&self, ctx: &HoldContext) -> bool {
        let started = Instant::now();
        self.metrics.wakes.inc();
        tracing::info!(app = %self.key, "waking app");
        let mut rx = self.backends.subscribe();
        loop {
            match tokio::time::timeout(ctx.wake_request_timeout, ctx.waker.request_wake(&self.key))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    self.metrics.wake_requests_failed.inc();
                    if err.permanent {
                        tracing::warn!(app = %self.key, error = %err.message, "wake request refused");
                        self.fail_wake(&err.message);
                        return true;
                    }
                    tracing::warn!(app = %self.key, error = %err.message, "wake request failed; will repeat");
                }
                Err(_) => {
                    self.metrics.wake_requests_failed.inc();
                    tracing::warn!(app = %self.key, "wake request timed out; will repeat");
                }
            }
            let resend = tokio::time::sleep(ctx.wake_resend_interval);
            tokio::select! {
                ready = rx.wait_for(|b| !b.ips.is_empty() || b.removed) => {
                    let woke = ready.map(|b| !b.removed).unwrap_or(false);
                    if woke {
                        let elapsed = started.elapsed();
                        self.metrics.wake_seconds.observe(elapsed.as_secs_f64());
                        tracing::info!(app = %self.key, ms = elapsed.as_millis() as u64, "app woke");
                    }
                    return false;
                }
                () = resend => {
                    if self.held() == 0 {
                        return false;
                    }
                }
            }
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Takes one unit of `counter` unless it is at `max`.
fn take_one(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// One place in an app's bounded queue and in the activator's overall one, released on drop
/// (including when the caller goes away while held).
struct HeldSlot<'a> {
    app: &'a AppState,
    total: &'a AtomicUsize,
}

impl<'a> HeldSlot<'a> {
    /// The app's own queue is checked first, so a full app reads as `QueueFull` however busy
    /// the others are.
    fn acquire(app: &'a AppState, ctx: &'a HoldContext) -> Result<Self, Pick> {
        if !take_one(&app.held, ctx.max_queue) {
            return Err(Pick::QueueFull);
        }
        if !take_one(&ctx.held_total, ctx.max_held) {
            app.held.fetch_sub(1, Ordering::AcqRel);
            return Err(Pick::HeldLimit);
        }
        app.metrics.held.inc();
        Ok(Self {
            app,
            total: &ctx.held_total,
        })
    }
}

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        self.app.held.fetch_sub(1, Ordering::AcqRel);
        self.total.fetch_sub(1, Ordering::AcqRel);
        self.app.metrics.held.dec();
    }
}
