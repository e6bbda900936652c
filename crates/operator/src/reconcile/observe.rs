//! Every read a reconcile makes, once, into one [`Observed`] value: the caches the watches
//! fill, the agents' activity (HTTP, only while the app may fall asleep) and the activator
//! ports reserved for the app. No step after this one reads anything.

use super::checkpoint::pending_for;
use super::cycle::{self, AppKey, Cap, CycleSeen};
use super::fallbacks::RestoreStart;
use crate::build::app_name;
use crate::build::job::checkpoint_job_name;
use crate::build::service::{AppPort, app_ports};
use crate::cache::cached;
use crate::checkpoint_id::{checkpoint_id, short};
use crate::context::Context;
use crate::error::Error;
use crate::error::Result;
use crate::in_place::PodView;
use crate::ports::{ports_held, reserve};
use crate::restore_starts::{StartMode, StartSeen};
use crate::scale::{Activity, governing_policy, settings_for, sleep_mode};
use crate::validate::{SpecError, ValidatedApp, validate};
use crac_api::agent::{ACTIVITY_PATH, ActivityReport, DEFAULT_ACTIVITY_PORT};
use crac_api::cracapp::{APP_CONTAINER, ActivatorPort, CracAppStatus, SleepMode};
use crac_api::{CracApp, labels};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Everything one reconcile knows about its app and the world around it.
pub struct Observed {
    pub now: Timestamp,
    pub key: AppKey,
    /// The status as last written (default when none).
    pub previous: CracAppStatus,
    /// The spec as the builders need it, or why it cannot be acted on.
    pub spec: Result<Spec, SpecError>,
    /// A problem with the images volume the user must fix: (reason, message).
    pub storage_problem: Option<(String, String)>,
    /// The objects as the caches hold them.
    pub claim: Option<Arc<PersistentVolumeClaim>>,
    /// The checkpoint Job of the current attempt, and its pods.
    pub job: Option<Arc<Job>>,
    pub job_pods: Vec<Pod>,
    /// Every checkpoint Job labelled as the app's, whatever its id and attempt (those of an
    /// earlier spec still running are deleted).
    pub checkpoint_jobs: Vec<Arc<Job>>,
    pub deployment: Option<Arc<Deployment>>,
    pub service: Option<Arc<PartialObjectMeta<Service>>>,
    pub slice: Option<Arc<PartialObjectMeta<EndpointSlice>>>,
    /// Addresses of the app's ready restore pods, and of the ready activator pods.
    pub ready_ips: Vec<String>,
    pub activator_ips: Vec<String>,
    pub cycle: CycleSeen,
    /// The app's activator ports (kept, or reserved now for the app's current ports).
    pub activator_ports: Vec<ActivatorPort>,
    /// How the ready restore pods of the published image started, as far as known, and
    /// whether some pod's agent is still to be asked (look again soon).
    pub restore_starts: Vec<RestoreStart>,
    pub starts_unsettled: bool,
    /// The restore pods, as sleeping in place sees them (only for an app that sleeps in place).
    pub in_place_pods: Vec<PodView>,
    /// The app's control token (only for an app that sleeps in place).
    pub control_token: Option<String>,
}

/// A valid spec, its checkpoint id and its ports.
pub struct Spec {
    pub validated: ValidatedApp,
    pub id: String,
    pub ports: Vec<AppPort>,
}

pub async fn observe(app: &CracApp, ctx: &Context) -> Result<Observed> {
    ctx.caches.ready().await?;
    let now = Timestamp::now();
    let ns = app.namespace().unwrap_or_default();
    let name = app_name(app).to_string();
    let key = (ns.clone(), name.clone());
    let previous = app.status.clone().unwrap_or_default();
    let caches = &ctx.caches;

    let spec = validate(app, &ctx.pod_allowance).map(|validated| {
        let id = checkpoint_id(
            &validated,
            app.spec.checkpoint.engine,
            &ctx.config.agent_image,
            app.annotations(),
        );
        let ports = app_ports(&validated);
        Spec {
            validated,
            id,
            ports,
        }
    });
    let job = spec.as_ref().ok().and_then(|s| {
        let pending = pending_for(previous.pending_checkpoint.as_ref(), &s.id);
        cached(
            &caches.jobs,
            &ns,
            &checkpoint_job_name(&name, &s.id, pending.failures),
        )
    });
    let checkpoint_jobs = caches.checkpoint_jobs(&ns, &name);
    let job_pods = match &job {
        Some(j) => caches
            .job_pods(&ns, &j.name_any())
            .iter()
            .map(|p| Pod::clone(p))
            .collect(),
        None => Vec::new(),
    };
    let restore_pods = caches.restore_pods(&ns, &name);
    let mut ready_ips: Vec<String> = restore_pods
        .iter()
        .filter_map(|p| crac_api::serving::serving_address(p).map(String::from))
        .collect();
    let (restore_starts, starts_unsettled) = match &previous.checkpoint {
        Some(image) if app.spec.restore.recheckpoint_after_cold_starts > 0 => {
            starts_of(ctx, &key, &restore_pods, &image.id).await
        }
        _ => {
            forget_starts(ctx, &key);
            (Vec::new(), false)
        }
    };

    // Scale to zero: the settings in force, and what the agents say while they matter.
    let policies = caches.policies();
    let namespace_labels = caches.namespace_labels(&policies);
    let no_labels = BTreeMap::new();
    let labels_of = |ns: &str| namespace_labels.get(ns).unwrap_or(&no_labels);
    let policy = governing_policy(app, labels_of(&ns), &policies);
    let mut settings = settings_for(app.spec.scale_to_zero.as_ref(), policy, now);
    settings.mode = sleep_mode(
        app.spec.scale_to_zero.as_ref(),
        policy,
        has_liveness_probe(app),
    );
    let in_place = settings.enabled && settings.mode == SleepMode::InPlace;
    let control_token = match (in_place, app.metadata.uid.as_deref()) {
        (true, Some(uid)) => {
            let key = ctx
                .control_key
                .get(&ctx.client, &ctx.activator.namespace)
                .await
                .map_err(Error::ControlKey)?;
            Some(crac_api::control::app_token(&key, uid))
        }
        _ => None,
    };
    let in_place_pods: Vec<PodView> = if in_place {
        restore_pods.iter().filter_map(|p| PodView::of(p)).collect()
    } else {
        Vec::new()
    };
    // A pod asleep in place is no ready pod, whatever the kubelet's last probe said.
    ready_ips.retain(|ip| {
        !in_place_pods
            .iter()
            .any(|p| p.marked && p.ip.as_deref() == Some(ip.as_str()))
    });
    let requests = cycle::requests_of(app, &previous);
    let watching = cycle::watching(&settings, requests.cycle);
    let activity = if watching {
        poll_activity(&ready_ips).await
    } else {
        Activity::default()
    };
    let capped = match (settings.max_awake, &settings.policy) {
        (Some(max), Some(policy)) if watching => {
            let awake = caches
                .apps
                .state()
                .iter()
                .filter(|a| {
                    let a_ns = a.namespace().unwrap_or_default();
                    governing_policy(a, labels_of(&a_ns), &policies)
                        .is_some_and(|p| &p.name_any() == policy)
                })
                .filter(|a| {
                    a.status
                        .as_ref()
                        .is_none_or(|s| s.slept_at.is_none() && s.checkpoint.is_some())
                })
                .map(|a| {
                    let k = (a.namespace().unwrap_or_default(), a.name_any());
                    // This app's own activity is fresh; the others' comes from their status.
                    let last = if k == key {
                        activity.last_activity
                    } else {
                        a.status
                            .as_ref()
                            .and_then(|s| s.last_activity_time.as_ref())
                            .map(|t| t.0)
                    };
                    (last, k)
                })
                .collect();
            Some(Cap {
                max: usize::try_from(max).unwrap_or(0),
                awake,
            })
        }
        _ => None,
    };

    // Every port in the status is checked against the table, forged or not.
    let targets: Option<Vec<i32>> = match &spec {
        Ok(s) if settings.enabled || !previous.activator_ports.is_empty() => {
            Some(s.ports.iter().map(|p| p.port).collect())
        }
        Err(_) if !previous.activator_ports.is_empty() => Some(
            previous
                .activator_ports
                .iter()
                .map(|p| p.target_port)
                .collect(),
        ),
        _ => None,
    };
    let activator_ports = match targets {
        Some(targets) => {
            // One reservation at a time, from a table seeded from every app's status once.
            let mut table = ctx.activator_ports.lock().await;
            let table =
                table.get_or_insert_with(|| ports_held(caches.apps.state().iter().map(|a| &**a)));
            reserve(table, &key, &previous.activator_ports, &targets)
        }
        None => Vec::new(),
    };

    let activator_ips = caches.activator_ips();
    Ok(Observed {
        now,
        storage_problem: storage_problem(app, ctx, &ns),
        claim: cached(&caches.claims, &ns, &crate::build::claim_name(app)),
        job,
        job_pods,
        checkpoint_jobs,
        deployment: cached(&caches.deployments, &ns, &name),
        service: cached(&caches.services, &ns, &name),
        slice: cached(
            &caches.slices,
            &ns,
            &crate::build::service::endpoint_slice_name(&name),
        ),
        ready_ips,
        cycle: CycleSeen {
            settings,
            requests,
            activity,
            capped,
            activator_ready: !activator_ips.is_empty(),
        },
        activator_ips,
        activator_ports,
        restore_starts,
        starts_unsettled,
        in_place_pods,
        control_token,
        spec,
        key,
        previous,
    })
}

/// Asks of a pod's agent how it started, at most this many times (a pod whose agent never
/// answers, behind a NetworkPolicy say, is not counted).
const START_ASKS: u8 = 5;
/// Between two asks of one pod.
const START_ASK_AGAIN: Duration = Duration::from_secs(5);

/// How the app's ready restore pods of `image` started: each pod's agent is asked once (its
/// answer kept in memory for the pod's life), concurrently, only for pods not asked yet.
async fn starts_of(
    ctx: &Context,
    key: &AppKey,
    pods: &[Arc<Pod>],
    image: &str,
) -> (Vec<RestoreStart>, bool) {
    let of_image: Vec<(String, String, String)> = pods
        .iter()
        .filter(|p| p.labels().get(labels::CHECKPOINT_ID).map(String::as_str) == Some(short(image)))
        .filter_map(|p| {
            let ip = crac_api::serving::serving_address(p)?;
            Some((p.uid()?, p.name_any(), ip.to_string()))
        })
        .collect();
    let now = std::time::Instant::now();
    let to_ask: Vec<(String, String)> = {
        let mut all = ctx.restore_starts.lock().unwrap_or_else(|e| e.into_inner());
        let known = all.entry(key.clone()).or_default();
        // Only the pods that still exist are remembered.
        known.retain(|uid, _| of_image.iter().any(|(u, _, _)| u == uid));
        of_image
            .iter()
            .filter(|(uid, _, _)| match known.get(uid) {
                None => true,
                Some(StartSeen::Unknown { asked, next }) => *asked < START_ASKS && *next <= now,
                Some(StartSeen::Known(_)) => false,
            })
            .map(|(uid, _, ip)| (uid.clone(), ip.clone()))
            .collect()
    };
    let answers = futures::future::join_all(to_ask.iter().map(|(_, ip)| fetch_activity(ip))).await;
    let mut all = ctx.restore_starts.lock().unwrap_or_else(|e| e.into_inner());
    let known = all.entry(key.clone()).or_default();
    for ((uid, _), answer) in to_ask.into_iter().zip(answers) {
        let seen = match answer {
            Some(report) => StartSeen::Known(StartMode {
                cold: report.mode == "coldStarted",
                start_ms: report.start_ms,
                reason: report
                    .reason
                    .filter(|r| crac_api::agent::reason::ALL.contains(&r.as_str())),
            }),
            None => {
                let asked = match known.get(&uid) {
                    Some(StartSeen::Unknown { asked, .. }) => asked + 1,
                    _ => 1,
                };
                StartSeen::Unknown {
                    asked,
                    next: now + START_ASK_AGAIN,
                }
            }
        };
        known.insert(uid, seen);
    }
    let mut unsettled = false;
    let starts = of_image
        .iter()
        .filter_map(|(uid, name, _)| match known.get(uid)? {
            StartSeen::Known(m) => Some(RestoreStart {
                pod: name.clone(),
                cold: m.cold,
                reason: m.reason.clone(),
                start_ms: m.start_ms,
            }),
            StartSeen::Unknown { asked, .. } => {
                unsettled |= *asked < START_ASKS;
                None
            }
        })
        .collect();
    (starts, unsettled)
}

fn forget_starts(ctx: &Context, key: &AppKey) {
    ctx.restore_starts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(key);
}

/// Whether the app container has a liveness probe (it cannot sleep in place).
fn has_liveness_probe(app: &CracApp) -> bool {
    app.spec
        .template
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .any(|c| c.name == APP_CONTAINER && c.liveness_probe.is_some())
}

/// A problem with the images volume that the user must fix, if any.
fn storage_problem(app: &CracApp, ctx: &Context, ns: &str) -> Option<(String, String)> {
    let storage = &app.spec.checkpoint.storage;
    if let Some(claim) = &storage.existing_claim {
        let Some(found) = cached(&ctx.caches.claims, ns, claim) else {
            return Some((
                "ClaimNotFound".into(),
                format!(
                    "spec.checkpoint.storage.existingClaim: PersistentVolumeClaim {claim:?} does not exist in namespace {ns:?}"
                ),
            ));
        };
        if let Some(owner) = owning_app(&found, app) {
            return Some((
                "ClaimOwnedByAnotherApp".into(),
                format!(
                    "spec.checkpoint.storage.existingClaim: PersistentVolumeClaim {claim:?} holds \
                     the images of CracApp {owner:?}; share only a claim no app owns"
                ),
            ));
        }
    } else if let Some(class) = &storage.storage_class_name
        && ctx
            .caches
            .storage_classes
            .get(&ObjectRef::new(class))
            .is_none()
    {
        return Some((
            "StorageClassNotFound".into(),
            format!(
                "spec.checkpoint.storage.storageClassName: StorageClass {class:?} does not exist; \
                 create it or name one of `kubectl get storageclass`"
            ),
        ));
    }
    None
}

/// The other CracApp that owns `claim` (the operator made it for that app's images), if any.
/// Sharing it would let this app's checkpoint pods, which mount it read-write, rewrite that
/// app's images.
fn owning_app(claim: &PersistentVolumeClaim, app: &CracApp) -> Option<String> {
    claim
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "CracApp" && Some(&o.uid) != app.metadata.uid.as_ref())
        .map(|o| o.name.clone())
}

/// Asks each ready pod's agent for its activity, 2 s each at most, all at once.
async fn poll_activity(ips: &[String]) -> Activity {
    let reports = futures::future::join_all(ips.iter().map(|ip| fetch_activity(ip))).await;
    let mut activity = Activity {
        asked: ips.len(),
        ..Default::default()
    };
    for report in reports.into_iter().flatten() {
        activity.reporting += 1;
        activity.open_connections += report.open_connections;
        let seen = report
            .last_activity_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        activity.last_activity = activity.last_activity.max(seen);
    }
    activity
}

/// One agent's activity report: a bounded HTTP/1.0 exchange (64 KiB, 2 s).
async fn fetch_activity(ip: &str) -> Option<ActivityReport> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((ip, DEFAULT_ACTIVITY_PORT))
            .await
            .ok()?;
        let request = format!("GET {ACTIVITY_PATH} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream
            .take(64 * 1024)
            .read_to_end(&mut response)
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.").then_some(())?;
        head.split(' ').nth(1).filter(|code| *code == "200")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}
