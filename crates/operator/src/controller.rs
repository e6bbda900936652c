//! The reconciler: fetch what exists, validate, build what should exist, apply it in order
//! (claim, checkpoint Job, Deployment, Service and slice), then write status from what was
//! observed. One field manager, server-side apply with force, owner references on everything.

use crate::build::deployment::{restore_deployment_for, restored_id};
use crate::build::job::{checkpoint_job_for, checkpoint_job_name};
use crate::build::pvc::images_claim_for;
use crate::build::service::{Backends, app_ports, endpoint_slice_for, service_for};
use crate::build::{BuildConfig, app_name};
use crate::cache::{self, Caches, Live, cached};
use crate::checkpoint_id::checkpoint_id;
use crate::checkpoint_pod::{failure_of, summary_of};
use crate::error::{Error, Result};
use crate::events::{Events, Note};
use crate::metrics::{Metrics, ReasonLabel, ResultLabel};
use crate::scale::{Cycle, Step};
use crate::sleep;
use crate::status::{
    CheckpointProgress, Observed, Rollout, conditions_for, phase_for, retry_backoff, transitions,
};
use crate::validate::{ValidatedApp, validate};
use crac_api::agent::AgentSummary;
use crac_api::cracapp::{CheckpointStatus, CracAppStatus, PendingCheckpoint, ServingMode};
use crac_api::policy::CracScalePolicy;
use crac_api::{CracApp, labels};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{Instrument, field, info, info_span, warn};

/// Removes the app's images from a shared claim before the CracApp goes.
pub const FINALIZER: &str = "crac.dev/cleanup-images";
/// Periodic resync of a healthy app (catches drift nobody told us about).
const RESYNC: Duration = Duration::from_secs(300);
/// How soon to look again at an app skipped because the cache still held a version whose
/// status the operator has since replaced.
const SUPERSEDED_RETRY: Duration = Duration::from_secs(2);
/// How soon to look again at a storage problem the operator cannot fix itself.
const STORAGE_RETRY: Duration = Duration::from_secs(300);

pub struct Context {
    pub client: Client,
    pub events: Events,
    pub config: BuildConfig,
    pub metrics: Arc<Metrics>,
    /// First wait before retrying a failed checkpoint; doubles with each failure.
    pub retry_base: Duration,
    /// Where the activator pods are.
    pub activator: ActivatorRef,
    /// Activator ports handed out. Seeded from the apps' status.
    pub activator_ports: PortTable,
    /// Pods and policies as the watches saw them.
    pub caches: Caches,
}

/// Activator ports handed out, by port: `(namespace, app)`; `None` until seeded.
pub type PortTable =
    Arc<tokio::sync::Mutex<Option<std::collections::BTreeMap<i32, (String, String)>>>>;

/// How the operator finds the activator pods it points sleeping apps' Services at.
#[derive(Clone, Debug)]
pub struct ActivatorRef {
    pub namespace: String,
    /// Label selector of the activator pods.
    pub selector: String,
}

impl Default for ActivatorRef {
    fn default() -> Self {
        ActivatorRef {
            namespace: "crac-system".into(),
            selector: "app.kubernetes.io/name=crac-activator".into(),
        }
    }
}

impl Context {
    pub fn new(
        client: Client,
        config: BuildConfig,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        Context {
            events: Events::new(client.clone(), labels::MANAGER, &instance),
            client,
            config,
            metrics,
            retry_base: Duration::from_secs(30),
            activator: ActivatorRef::default(),
            activator_ports: PortTable::default(),
            caches: Caches::default(),
        }
    }
}

/// Where the controller looks: the whole cluster, or one namespace.
fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until the stream ends (or the future is dropped). `namespace`
/// limits it to one namespace (for a namespaced install, and for tests).
pub async fn run(
    ctx: Arc<Context>,
    concurrency: u16,
    namespace: Option<String>,
    on_ready: impl Fn() + Send + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let owned =
        watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    let Some(writers) = ctx.caches.take_writers() else {
        warn!("the controller already runs for this context");
        return;
    };
    // The streams that trigger reconciles also fill the caches reconciles read from, so a
    // reconcile triggered by a change always sees it.
    let pods = cached_stream(api_in(&client, ns), &owned, cache::slim_pod, writers.pods);
    let policies = watcher(
        Api::<CracScalePolicy>::all(client.clone()),
        Default::default(),
    )
    .default_backoff()
    .reflect(writers.policies);
    let jobs = cached_stream(api_in(&client, ns), &owned, cache::slim_job, writers.jobs);
    let deployments = cached_stream(
        api_in(&client, ns),
        &owned,
        cache::slim,
        writers.deployments,
    );
    let services = cached_stream(api_in(&client, ns), &owned, cache::slim, writers.services);
    let claims = cached_stream(api_in(&client, ns), &owned, cache::slim, writers.claims);
    let slices = cached_stream(api_in(&client, ns), &owned, cache::slim, writers.slices);
    // The apps themselves, without their managedFields: parsed, those were the largest part
    // of a cached app (about 13 KiB each), and the operator never reads them.
    let (apps, apps_writer) = kube::runtime::reflector::store();
    let app_changes = watcher(api_in::<CracApp>(&client, ns), watcher::Config::default())
        .default_backoff()
        .modify(cache::slim)
        .reflect(apps_writer)
        .applied_objects();
    let controller = Controller::for_stream(app_changes, apps)
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .owns_stream(jobs)
        .owns_stream(deployments)
        .owns_stream(services)
        .owns_stream(claims)
        .owns_stream(slices)
        // Pods carry no owner reference to the app; map them by their label. Checkpoint pod
        // failures and restore pods' readiness both change what the app's status says.
        .watches_stream(pods, |pod| {
            let app = pod.labels().get(labels::APP)?.clone();
            Some(kube::runtime::reflector::ObjectRef::new(&app).within(&pod.namespace()?))
        })
        // A policy's new spec may change every app's settings; its status writes do not.
        .reconcile_all_on(policy_spec_changes(policies));
    let store = controller.store();
    tokio::spawn(async move {
        if cache::until_ready(&store).await.is_ok() {
            on_ready();
        }
    });
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile ended with an error");
            }
        })
        .await;
}

/// The objects the operator owns of one kind, as a trigger stream that also fills the cache
/// `writer` (slimmed by `slim` first).
fn cached_stream<K>(
    api: Api<K>,
    config: &watcher::Config,
    slim: fn(&mut K),
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, config.clone())
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .touched_objects()
}

/// One trigger per change of a policy's spec (a new generation) or deletion; the status
/// writes `policies::keep_status` makes every few seconds trigger nothing.
fn policy_spec_changes(
    events: impl Stream<Item = Result<watcher::Event<CracScalePolicy>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = ()> + Send + 'static {
    let mut generations: HashMap<String, Option<i64>> = HashMap::new();
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                let generation = p.metadata.generation;
                generations.insert(p.name_any(), generation) != Some(generation)
            }
            Ok(watcher::Event::Delete(p)) => generations.remove(&p.name_any()).is_some(),
            _ => false,
        };
        std::future::ready(changed.then_some(()))
    })
}

async fn reconcile(app: Arc<CracApp>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!("reconcile", app = %app.name_any(), namespace = field::Empty);
    span.record("namespace", app.namespace().unwrap_or_default().as_str());
    let started = Instant::now();
    let api = Api::<CracApp>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, app, |event| async {
        match event {
            Finalizer::Apply(app) => apply(&app, &ctx).await,
            Finalizer::Cleanup(app) => cleanup(&app, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.metric_label(),
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel {
            result: label.into(),
        })
        .inc();
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

fn error_policy(app: Arc<CracApp>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::Finalizer(inner)
            if matches!(
                **inner,
                kube::runtime::finalizer::Error::CleanupFailed(Error::CleanupPending { .. })
            ) =>
        {
            Action::requeue(Duration::from_secs(2))
        }
        // The namespace is being deleted: its objects go with it, nothing to retry hot.
        _ if error.namespace_terminating() => {
            tracing::debug!(app = %app.name_any(), "namespace terminating");
            Action::requeue(Duration::from_secs(60))
        }
        _ => {
            warn!(app = %app.name_any(), reason = error.metric_label(), error = %error, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(labels::MANAGER).force()
}

async fn apply_object<K>(client: &Client, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(obj).expect("Kubernetes objects serialize");
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    Ok(api
        .patch(&name, &apply_params(), &Patch::Apply(body))
        .await?)
}

/// Applies `obj` unless that would change nothing: the same object was applied last and the
/// object `live` (from the caches) still holds it. Returns what the API server answered, or
/// `None` when nothing was sent.
async fn apply_changed<K>(
    ctx: &Context,
    app: &CracApp,
    obj: &K,
    live: Option<Live>,
) -> Result<Option<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let ns = app.namespace().unwrap_or_default();
    let owner = (ns.clone(), app_name(app).to_string());
    let key = (
        K::kind(&()).to_string(),
        obj.meta().name.clone().unwrap_or_default(),
    );
    let body = serde_json::to_value(obj).expect("Kubernetes objects serialize");
    let hash = cache::body_hash(&body);
    if let Some(live) = &live
        && ctx
            .caches
            .applied
            .unchanged(&owner, &key, hash, &body, live)
    {
        return Ok(None);
    }
    let answer = apply_object(&ctx.client, &ns, obj).await?;
    let version = answer.meta().resource_version.clone().unwrap_or_default();
    let over = live.map(|l| l.version);
    ctx.caches.applied.record(owner, key, hash, over, version);
    Ok(Some(answer))
}

/// Applies the restore Deployment when it changed; the Deployment as it now is.
async fn apply_deployment(
    ctx: &Context,
    app: &CracApp,
    desired: &Deployment,
) -> Result<Option<Deployment>> {
    let ns = app.namespace().unwrap_or_default();
    let live = cached(&ctx.caches.deployments, &ns, app_name(app));
    let answer = apply_changed(ctx, app, desired, live.clone().map(Live::of)).await?;
    Ok(answer.or_else(|| live.map(|d| Deployment::clone(&d))))
}

/// The reconcile proper, for an app that is not being deleted.
async fn apply(app: &CracApp, ctx: &Context) -> Result<Action> {
    let ns = app.namespace().unwrap_or_default();
    ctx.caches.ready().await?;
    let key = (ns.clone(), app_name(app).to_string());
    let version = app.metadata.resource_version.clone().unwrap_or_default();
    if ctx.caches.superseded.is_superseded(&key, &version) {
        // The status was written since; that write's watch event reconciles again. The
        // requeue is only a safety net.
        return Ok(Action::requeue(SUPERSEDED_RETRY));
    }
    let previous = app.status.clone().unwrap_or_default();
    // Carried over unless this reconcile changes them.
    let mut next = CracAppStatus {
        checkpoint: previous.checkpoint.clone(),
        pending_checkpoint: previous.pending_checkpoint.clone(),
        selector: Some(format!("{}={}", labels::APP, app_name(app))),
        serving_mode: previous.serving_mode.or(Some(ServingMode::Pods)),
        activator_ports: previous.activator_ports.clone(),
        last_activity_time: previous.last_activity_time.clone(),
        last_wake: previous.last_wake.clone(),
        slept_at: previous.slept_at.clone(),
        sleep_started_at: previous.sleep_started_at.clone(),
        ..Default::default()
    };

    // Validate. A spec the operator cannot act on is reported; nothing is torn down, so an
    // app that was serving keeps serving its previous image.
    let validated = match validate(app) {
        Ok(v) => v,
        Err(e) => {
            let progress = CheckpointProgress::InvalidSpec {
                message: e.to_string(),
            };
            let rollout = observe_rollout(ctx, &ns, app_name(app));
            finish(app, ctx, next, progress, rollout, false).await?;
            return Ok(Action::await_change());
        }
    };
    let refresh = app
        .annotations()
        .get(labels::CHECKPOINT_REQUESTED_AT)
        .map(String::as_str);
    let id = checkpoint_id(
        &validated,
        app.spec.checkpoint.engine,
        &ctx.config.agent_image,
        refresh,
    );

    // Storage.
    if let Some(problem) = storage_problem(app, ctx, &ns).await? {
        let rollout = observe_rollout(ctx, &ns, app_name(app));
        finish(app, ctx, next, problem, rollout, false).await?;
        return Ok(Action::requeue(STORAGE_RETRY));
    }
    if let Some(claim) = images_claim_for(app) {
        let live = cached(&ctx.caches.claims, &ns, &claim.name_any());
        apply_changed(ctx, app, &claim, live.map(Live::of)).await?;
    }

    // Checkpoint.
    let (progress, requeue) = checkpoint(app, ctx, &validated, &id, &mut next).await?;

    // Scale to zero: where the app is in its sleep/wake cycle, and the next step.
    let now = Timestamp::now();
    let ready_ips = ready_pod_ips(ctx, &ns, app_name(app));
    let plan = sleep::plan(app, ctx, &previous, &ready_ips, now).await?;
    let cycle_event = sleep::record(&plan, &previous, &mut next, now);
    let ports = app_ports(&validated);
    if plan.settings.enabled || !next.activator_ports.is_empty() {
        let targets: Vec<i32> = ports.iter().map(|p| p.port).collect();
        next.activator_ports = sleep::activator_ports(app, ctx, &previous, &targets).await?;
    }

    // Restore rollout, from the newest published image.
    let wanted = plan.replicas(app.spec.replicas);
    let rollout = match next.checkpoint.clone() {
        None => None,
        Some(image) if image.id == id => {
            let desired = restore_deployment_for(app, &validated, &id, wanted, &ctx.config);
            apply_deployment(ctx, app, &desired)
                .await?
                .map(|d| rollout_of(&d, wanted))
        }
        Some(image) => {
            // The spec moved on but its image is not ready: keep the pods on the template
            // that matches the published image, so they never restore it with another JAR.
            match cached(&ctx.caches.deployments, &ns, app_name(app)) {
                Some(old) if restored_id(&old) == Some(image.id.as_str()) => {
                    let mut kept =
                        restore_deployment_for(app, &validated, &image.id, wanted, &ctx.config);
                    if let (Some(spec), Some(old)) = (kept.spec.as_mut(), old.spec.as_ref()) {
                        spec.template = old.template.clone();
                    }
                    apply_deployment(ctx, app, &kept)
                        .await?
                        .map(|d| rollout_of(&d, wanted))
                }
                other => other.map(|d| rollout_of(&d, wanted)),
            }
        }
    };

    // Service and its endpoints: the ready pods, or the activator while the app sleeps.
    if let Some(service) = service_for(app, &ports) {
        let live = cached(&ctx.caches.services, &ns, &service.name_any());
        apply_changed(ctx, app, &service, live.as_deref().map(Live::version_of)).await?;
        let backends = match plan.serving_mode() {
            ServingMode::Pods => Backends {
                addresses: ready_ips,
                ports: ports.iter().map(|p| (p.clone(), p.port)).collect(),
            },
            ServingMode::Activator => Backends {
                addresses: sleep::activator_ips(ctx).await?,
                ports: ports
                    .iter()
                    .zip(&next.activator_ports)
                    .map(|(p, a)| (p.clone(), a.activator_port))
                    .collect(),
            },
        };
        let slice = endpoint_slice_for(app, &backends);
        let live = cached(&ctx.caches.slices, &ns, &slice.name_any());
        apply_changed(ctx, app, &slice, live.as_deref().map(Live::version_of)).await?;
    }

    if let Some((reason, note)) = cycle_event {
        publish(ctx, app, false, &reason, note).await;
    }
    let asleep = plan.cycle == Cycle::Asleep;
    finish(app, ctx, next, progress, rollout, asleep).await?;
    let cycle_requeue = match plan.step {
        Step::Stay(after) => after,
        _ => Duration::from_secs(1),
    };
    // The soonest of: a checkpoint retry's backoff, the sleep cycle's next look, a resync.
    let after = requeue.unwrap_or(RESYNC).min(cycle_requeue).min(RESYNC);
    Ok(Action::requeue(after))
}

async fn publish(ctx: &Context, app: &CracApp, warning: bool, reason: &str, message: String) {
    let note = Note {
        warning,
        reason,
        action: "Reconcile",
        message,
    };
    if let Err(e) = ctx.events.publish(&note, &app.object_ref(&())).await {
        warn!(error = %e, "could not publish an Event");
    }
}

/// Ensures a checkpoint Job for `id` exists while no image of `id` is published, and adopts
/// the image when the Job succeeds. Updates `next.checkpoint` / `next.pending_checkpoint`.
async fn checkpoint(
    app: &CracApp,
    ctx: &Context,
    validated: &ValidatedApp,
    id: &str,
    next: &mut CracAppStatus,
) -> Result<(CheckpointProgress, Option<Duration>)> {
    if next.checkpoint.as_ref().is_some_and(|c| c.id == id) {
        next.pending_checkpoint = None;
        return Ok((CheckpointProgress::Current, None));
    }
    let ns = app.namespace().unwrap_or_default();
    let name = app_name(app);
    let mut pending = next
        .pending_checkpoint
        .clone()
        .filter(|p| p.id == id)
        .unwrap_or_else(|| PendingCheckpoint {
            id: id.to_string(),
            ..Default::default()
        });
    let job_name = checkpoint_job_name(name, id, pending.failures);
    let job = cached(&ctx.caches.jobs, &ns, &job_name);

    let result = match job {
        None => {
            if let Some(wait) = backoff_remaining(&pending, ctx.retry_base) {
                let (reason, message) = last_checkpoint_failure(&pending);
                let message = retry_message(&message, &pending, ctx.retry_base);
                next.pending_checkpoint = Some(pending.clone());
                let progress = CheckpointProgress::Failed {
                    failures: pending.failures,
                    reason,
                    message,
                };
                return Ok((progress, Some(wait)));
            }
            let job = checkpoint_job_for(app, validated, id, pending.failures, &ctx.config);
            // Until the watch delivers the new Job, a reconcile finds none and applies the same
            // Job again (a no-op for the API server); only the first apply is counted.
            let owner = (ns.clone(), name.to_string());
            let first = !ctx
                .caches
                .applied
                .knows(&owner, &("Job".into(), job_name.clone()));
            apply_changed(ctx, app, &job, None).await?;
            if first {
                ctx.metrics.checkpoints_started.inc();
                info!(job = %job_name, "checkpoint Job created");
            }
            (
                CheckpointProgress::Running {
                    attempt: pending.failures,
                    last_failure: None,
                },
                None,
            )
        }
        Some(job) if job_finished(&job, "Complete") => {
            let pods = job_pods(ctx, &ns, &job_name);
            let summary = pods
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
                .find_map(summary_of)
                .unwrap_or_default();
            let image = published_image(&job, &summary, app, id);
            if let Some(secs) = image.duration_seconds {
                ctx.metrics.checkpoint_seconds.observe(secs);
            }
            next.checkpoint = Some(image);
            next.pending_checkpoint = None;
            info!(job = %job_name, "checkpoint image published");
            return Ok((CheckpointProgress::Current, None));
        }
        Some(job) if job_finished(&job, "Failed") => {
            let pods = job_pods(ctx, &ns, &job_name);
            let summary = newest_failure(&pods).unwrap_or_else(|| AgentSummary {
                reason: job_condition_reason(&job, "Failed"),
                message: Some("the checkpoint Job failed".into()),
                ..Default::default()
            });
            let (reason, message) = failure_of(&summary);
            ctx.metrics
                .checkpoint_failures
                .get_or_create(&ReasonLabel {
                    reason: reason.clone(),
                })
                .inc();
            pending.failures += 1;
            pending.last_failure_time = Some(Time(Timestamp::now()));
            pending.last_failure_reason = Some(reason.clone());
            pending.last_failure_message = Some(message.clone());
            let wait = retry_backoff(pending.failures, ctx.retry_base);
            let message = retry_message(&message, &pending, ctx.retry_base);
            next.pending_checkpoint = Some(pending.clone());
            return Ok((
                CheckpointProgress::Failed {
                    failures: pending.failures,
                    reason,
                    message,
                },
                Some(wait),
            ));
        }
        Some(_) => {
            let pods = job_pods(ctx, &ns, &job_name);
            let last_failure = newest_failure(&pods).map(|s| {
                let (reason, message) = failure_of(&s);
                format!("{reason}: {message}")
            });
            (
                CheckpointProgress::Running {
                    attempt: pending.failures,
                    last_failure,
                },
                None,
            )
        }
    };
    next.pending_checkpoint = Some(pending);
    Ok(result)
}

/// When the next checkpoint attempt is due: the last failure plus its backoff.
fn retry_due(pending: &PendingCheckpoint, base: Duration) -> Option<Timestamp> {
    Some(pending.last_failure_time.as_ref()?.0 + retry_backoff(pending.failures, base))
}

fn backoff_remaining(pending: &PendingCheckpoint, base: Duration) -> Option<Duration> {
    let due = retry_due(pending, base)?;
    let now = Timestamp::now();
    (due > now).then(|| Duration::try_from(due.duration_since(now)).unwrap_or(Duration::ZERO))
}

/// The reason and message of the last failure, as recorded in the pending checkpoint.
fn last_checkpoint_failure(pending: &PendingCheckpoint) -> (String, String) {
    (
        pending
            .last_failure_reason
            .clone()
            .unwrap_or_else(|| "CheckpointFailed".into()),
        pending
            .last_failure_message
            .clone()
            .unwrap_or_else(|| "the last checkpoint failed".into()),
    )
}

/// A failure's message with when the next attempt starts, as a time rather than a countdown:
/// the text stays the same through the backoff, so reconciles during it publish no new Event.
fn retry_message(message: &str, pending: &PendingCheckpoint, base: Duration) -> String {
    let due = retry_due(pending, base).unwrap_or_else(Timestamp::now);
    // Truncated, not rounded: the status keeps the failure time in whole seconds, so a
    // reconcile that reads it back must name the same second as the one that wrote it.
    use k8s_openapi::jiff::{RoundMode, TimestampRound, Unit};
    let whole_seconds = TimestampRound::new()
        .smallest(Unit::Second)
        .mode(RoundMode::Trunc);
    let due = due.round(whole_seconds).unwrap_or(due);
    format!("{message} (attempt {} at {due})", pending.failures + 1)
}

fn job_finished(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn job_condition_reason(job: &Job, type_: &str) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)?
        .reason
        .clone()
}

fn job_pods(ctx: &Context, ns: &str, job: &str) -> Vec<Pod> {
    let pods = ctx.caches.job_pods(ns, job);
    pods.iter().map(|p| Pod::clone(p)).collect()
}

/// The report of the most recently created failed pod.
fn newest_failure(pods: &[Pod]) -> Option<AgentSummary> {
    let mut failed: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
        .collect();
    failed.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    failed.last().and_then(|p| summary_of(p))
}

fn published_image(job: &Job, summary: &AgentSummary, app: &CracApp, id: &str) -> CheckpointStatus {
    let status = job.status.as_ref();
    let started = status.and_then(|s| s.start_time.as_ref()).map(|t| t.0);
    let finished = status.and_then(|s| s.completion_time.as_ref()).map(|t| t.0);
    let duration_seconds = match (started, finished) {
        (Some(s), Some(f)) => Some(f.duration_since(s).as_secs_f64()),
        _ => None,
    };
    CheckpointStatus {
        id: id.to_string(),
        created_at: Some(Time(finished.unwrap_or_else(Timestamp::now))),
        size_bytes: summary.image_bytes,
        duration_seconds,
        jdk: summary.jdk.clone(),
        engine: Some(app.spec.checkpoint.engine),
    }
}

/// A problem with the images volume that the user must fix, if any.
async fn storage_problem(
    app: &CracApp,
    ctx: &Context,
    ns: &str,
) -> Result<Option<CheckpointProgress>> {
    let storage = &app.spec.checkpoint.storage;
    if let Some(claim) = &storage.existing_claim {
        let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns);
        if claims.get_opt(claim).await?.is_none() {
            return Ok(Some(CheckpointProgress::StorageProblem {
                reason: "ClaimNotFound".into(),
                message: format!(
                    "spec.checkpoint.storage.existingClaim: PersistentVolumeClaim {claim:?} does not exist in namespace {ns:?}"
                ),
            }));
        }
    } else if let Some(class) = &storage.storage_class_name {
        let classes = Api::<StorageClass>::all(ctx.client.clone());
        if classes.get_opt(class).await?.is_none() {
            return Ok(Some(CheckpointProgress::StorageProblem {
                reason: "StorageClassNotFound".into(),
                message: format!(
                    "spec.checkpoint.storage.storageClassName: StorageClass {class:?} does not exist; \
                     create it or name one of `kubectl get storageclass`"
                ),
            }));
        }
    }
    Ok(None)
}

fn rollout_of(d: &Deployment, wanted: i32) -> Rollout {
    let s = d.status.clone().unwrap_or_default();
    Rollout {
        wanted,
        replicas: s.replicas.unwrap_or(0),
        ready: s.ready_replicas.unwrap_or(0),
        updated: s.updated_replicas.unwrap_or(0),
    }
}

fn observe_rollout(ctx: &Context, ns: &str, name: &str) -> Option<Rollout> {
    cached(&ctx.caches.deployments, ns, name).map(|d| {
        let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        rollout_of(&d, wanted)
    })
}

/// Addresses of the app's restore pods that are ready and not terminating.
fn ready_pod_ips(ctx: &Context, ns: &str, app: &str) -> Vec<String> {
    let pods = ctx.caches.restore_pods(ns, app);
    pods.iter().filter_map(|p| sleep::ready_ip(p)).collect()
}

/// Computes phase and conditions, publishes an Event per transition, and writes the status
/// when it changed (an unchanged status is not written: no self-triggered reconciles).
async fn finish(
    app: &CracApp,
    ctx: &Context,
    mut next: CracAppStatus,
    progress: CheckpointProgress,
    rollout: Option<Rollout>,
    asleep: bool,
) -> Result<()> {
    let previous = app.status.clone().unwrap_or_default();
    let observed = Observed {
        generation: app.metadata.generation,
        checkpoint: progress,
        has_image: next.checkpoint.is_some(),
        rollout: rollout.clone(),
        asleep,
    };
    next.phase = Some(phase_for(&observed));
    next.observed_generation = app.metadata.generation;
    next.conditions = conditions_for(&observed, &previous.conditions, Timestamp::now());
    if let Some(r) = &rollout {
        next.replicas = r.replicas;
        next.ready_replicas = r.ready;
    }
    for t in transitions(&previous.conditions, &next.conditions) {
        publish(ctx, app, t.warning, &t.reason, t.note).await;
    }

    let mut comparable = previous.clone();
    comparable.wake_requested_at = None;
    if comparable == next {
        return Ok(());
    }
    let api = Api::<CracApp>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": CracApp::api_version(&()),
        "kind": CracApp::kind(&()),
        "status": next,
    });
    api.patch_status(app_name(app), &apply_params(), &Patch::Apply(patch))
        .await?;
    if let Some(version) = app.metadata.resource_version.clone() {
        let key = (
            app.namespace().unwrap_or_default(),
            app_name(app).to_string(),
        );
        ctx.caches.superseded.record(key, version);
    }
    Ok(())
}

/// Before a CracApp goes: its own claim goes with it (owner reference); images on a shared
/// `existingClaim` are removed by a short Job running the agent's `clean` command.
async fn cleanup(app: &CracApp, ctx: &Context) -> Result<Action> {
    let ns = app.namespace().unwrap_or_default();
    let key = (ns.clone(), app_name(app).to_string());
    ctx.caches.applied.forget(&key);
    ctx.caches.superseded.forget(&key);
    let Some(claim) = app.spec.checkpoint.storage.existing_claim.clone() else {
        return Ok(Action::await_change());
    };
    let name = format!("{}-crac-cleanup", app_name(app));
    ctx.caches.ready().await?;
    match cached(&ctx.caches.jobs, &ns, &name) {
        None => {
            apply_object(
                &ctx.client,
                &ns,
                &crate::build::cleanup::cleanup_job_for(app, &name, &claim, &ctx.config),
            )
            .await?;
            Err(Error::CleanupPending { claim })
        }
        Some(job) if job_finished(&job, "Complete") => Ok(Action::await_change()),
        Some(job) if job_finished(&job, "Failed") => {
            let note = Note {
                warning: true,
                reason: "CleanupFailed",
                action: "Cleanup",
                message: format!(
                    "could not remove the app's images from claim {claim:?}; remove {}/{} by hand",
                    crac_api::agent::IMAGE_MOUNT,
                    app_name(app)
                ),
            };
            if let Err(e) = ctx.events.publish(&note, &app.object_ref(&())).await {
                warn!(error = %e, "could not publish an Event");
            }
            Ok(Action::await_change())
        }
        Some(_) => Err(Error::CleanupPending { claim }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_at(secs: i64, failures: i32) -> PendingCheckpoint {
        PendingCheckpoint {
            id: "abc".into(),
            failures,
            last_failure_time: Some(Time(Timestamp::from_second(secs).unwrap())),
            last_failure_reason: Some("OpenSockets".into()),
            last_failure_message: Some("the JVM holds a connection".into()),
        }
    }

    #[test]
    fn a_failure_during_the_backoff_is_reported_from_data_with_a_stable_message() {
        let pending = failed_at(1_800_000_000, 1);
        let (reason, message) = last_checkpoint_failure(&pending);
        assert_eq!(reason, "OpenSockets");
        assert_eq!(message, "the JVM holds a connection");
        // The same text on every reconcile (no countdown), naming when attempt 2 starts:
        // 30 s after the failure at the production base.
        let base = Duration::from_secs(30);
        let first = retry_message(&message, &pending, base);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(first, retry_message(&message, &pending, base));
        assert_eq!(
            first,
            "the JVM holds a connection (attempt 2 at 2027-01-15T08:00:30Z)"
        );
        // The reconcile that records a failure has its sub-second time; later ones read it
        // back from the status in whole seconds: both name the same next attempt.
        let mut precise = pending.clone();
        precise.last_failure_time = Some(Time(
            Timestamp::from_second(1_800_000_000).unwrap() + Duration::from_millis(700),
        ));
        assert_eq!(retry_message(&message, &precise, base), first);
        // Rewording the message cannot lose the reason: it is not parsed from the text.
        let mut reworded = pending.clone();
        reworded.last_failure_message = Some("something else (attempt 9 starts in 1s)".into());
        assert_eq!(last_checkpoint_failure(&reworded).0, "OpenSockets");
    }
}
