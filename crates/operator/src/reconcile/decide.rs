//! What should exist and what the status should say, decided from an [`Observed`] without a
//! cluster: the claim, the checkpoint Job, the restore Deployment (on the template of the
//! published image), the Service and its endpoints, the next status and its Events, and when
//! to look again.

use super::checkpoint::{self, AttemptSeen, CheckpointDecision, SupersededJob};
use super::cycle::{self, Plan};
use super::fallbacks;
use super::observe::{Observed, Spec};
use super::status::{
    CheckpointProgress, Rollout, StatusInput, conditions_for, phase_for, transitions,
};
use crate::build::BuildConfig;
use crate::build::deployment::{control_secret_for, restore_deployment_for, restored_id};
use crate::build::job::checkpoint_job_for;
use crate::build::pvc::images_claim_for;
use crate::build::service::{Backends, endpoint_slice_for, service_for};
use crate::scale::{Cycle, Step};
use crac_api::cracapp::{CracAppStatus, ServingMode};
use crac_api::{CracApp, labels};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::time::Duration;

/// Periodic resync of a healthy app (catches drift nobody told us about).
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon to look again at a storage problem the operator cannot fix itself (a claim
/// appearing triggers a reconcile sooner; a StorageClass appearing does not).
pub const STORAGE_RETRY: Duration = Duration::from_secs(300);

/// Everything the apply and status steps carry out.
#[derive(Debug, Default)]
pub struct Decision {
    /// The objects that should exist, in the order they are applied.
    pub claim: Option<PersistentVolumeClaim>,
    /// Checkpoint Jobs of an earlier spec still running, to delete (before anything is applied).
    pub superseded_jobs: Vec<SupersededJob>,
    pub job: Option<Job>,
    pub deployment: Option<Deployment>,
    /// Set only the Deployment's replicas (it keeps the published image's template while a
    /// new checkpoint is taken: the cache does not hold that template to apply it again).
    pub scale: Option<i32>,
    pub service: Option<Service>,
    pub slice: Option<EndpointSlice>,
    /// What the checkpoint step saw happen (for metrics and logs).
    pub outcome: Option<checkpoint::Outcome>,
    pub status: CracAppStatus,
    /// Events to publish, in order.
    pub events: Vec<Note>,
    /// Look again after this long; `None` waits for a change.
    pub requeue: Option<Duration>,
    /// Set the app's stale-image annotation to this time: its image is stale, take another.
    pub stale_image_at: Option<Timestamp>,
    /// Restore pods counted as cold-started for the first time (for the metric).
    pub cold_starts_counted: usize,
    /// The Secret with the control token of an app that sleeps in place (applied before the
    /// Deployment whose pods mount it).
    pub control_secret: Option<k8s_openapi::api::core::v1::Secret>,
    /// What to do to the pods of an app that sleeps in place.
    pub in_place: Option<InPlaceRun>,
}

/// The pods' part of sleeping in place, for the apply step.
pub struct InPlaceRun {
    pub token: String,
    pub work: crate::in_place::Work,
    /// How long a `/wake` may take (the app's wake timeout).
    pub wake_limit: Duration,
}

/// Without the token: a decision printed in a log or a failed test says nothing of it.
impl std::fmt::Debug for InPlaceRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPlaceRun")
            .field("work", &self.work)
            .field("wake_limit", &self.wake_limit)
            .finish_non_exhaustive()
    }
}

/// One Event.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

pub fn decide(
    app: &CracApp,
    seen: &Observed,
    config: &BuildConfig,
    retry_base: Duration,
) -> Decision {
    let spec = match &seen.spec {
        Ok(spec) => spec,
        // A spec the operator cannot act on is reported; nothing is torn down, so an app that
        // was serving keeps serving its previous image.
        Err(error) => {
            let progress = CheckpointProgress::InvalidSpec {
                reason: error.reason().to_string(),
                message: error.to_string(),
            };
            return reported_only(app, seen, carried_over(app, seen), progress, None);
        }
    };
    if let Some((reason, message)) = &seen.storage_problem {
        let progress = CheckpointProgress::StorageProblem {
            reason: reason.clone(),
            message: message.clone(),
        };
        return reported_only(
            app,
            seen,
            carried_over(app, seen),
            progress,
            Some(STORAGE_RETRY),
        );
    }

    let mut next = carried_over(app, seen);
    let checkpoint = checkpoint::decide(
        seen.previous.checkpoint.as_ref(),
        seen.previous.pending_checkpoint.as_ref(),
        &checkpoint::Wanted {
            id: &spec.id,
            engine: app.spec.checkpoint.engine,
            app_image: spec
                .validated
                .container
                .image
                .as_deref()
                .unwrap_or_default(),
        },
        &AttemptSeen {
            job: seen.job.as_deref(),
            pods: &seen.job_pods,
        },
        retry_base,
        seen.now,
    );
    next.checkpoint = checkpoint.checkpoint.clone();
    next.pending_checkpoint = checkpoint.pending.clone();
    let stale = stale_image(app, seen, spec, &mut next);
    let superseded_jobs = checkpoint::superseded_jobs(
        seen.checkpoint_jobs.iter().map(|j| &**j),
        crate::build::app_name(app),
        app.metadata.uid.as_deref(),
        &spec.id,
    );
    let job = checkpoint.start_job.then(|| {
        let attempt = checkpoint.pending.as_ref().map_or(0, |p| p.failures);
        checkpoint_job_for(app, &spec.validated, &spec.id, attempt, config)
    });

    // Scale to zero: where the app is in its sleep/wake cycle, and the next step.
    let plan = cycle::plan(
        &seen.key,
        &seen.cycle,
        &seen.previous,
        seen.ready_ips.len(),
        seen.now,
    );
    let cycle_event = cycle::record(&plan, &seen.previous, &mut next, seen.now);
    split_wake(seen, &mut next);
    next.caller_namespaces = plan.settings.caller_namespaces.clone();
    next.sleep_mode = plan.settings.enabled.then_some(plan.settings.mode);
    let in_place = seen.control_token.clone().map(|token| InPlaceRun {
        token,
        work: crate::in_place::work(
            plan.cycle == Cycle::Asleep,
            &seen.in_place_pods,
            &crate::in_place::template_requests(&spec.validated.container),
        ),
        wake_limit: plan.settings.wake_timeout,
    });

    let (deployment, scale, rollout) = restore(app, seen, spec, &next, &plan, config);
    let service = service_for(app, &spec.ports);
    let slice = service.as_ref().map(|_| {
        let backends = match plan.serving_mode() {
            ServingMode::Pods => Backends {
                addresses: seen.ready_ips.clone(),
                ports: spec.ports.iter().map(|p| (p.clone(), p.port)).collect(),
            },
            ServingMode::Activator => Backends {
                addresses: seen.activator_ips.clone(),
                ports: spec
                    .ports
                    .iter()
                    .zip(&next.activator_ports)
                    .map(|(p, a)| (p.clone(), a.activator_port))
                    .collect(),
            },
        };
        endpoint_slice_for(app, &backends)
    });

    let mut events: Vec<Note> = cycle_event
        .into_iter()
        .map(|(reason, message)| Note {
            warning: false,
            reason,
            message,
        })
        .collect();
    events.extend(stale.events);
    let asleep = plan.cycle == Cycle::Asleep;
    let CheckpointDecision {
        progress,
        requeue,
        outcome,
        ..
    } = checkpoint;
    let status = complete(app, seen, next, progress, rollout, asleep, &mut events);
    let cycle_requeue = match plan.step {
        // Pods to put to sleep, wake or grow that did not take it: look again soon.
        Step::Stay(after) if in_place.as_ref().is_some_and(|r| !r.work.is_empty()) => {
            after.min(IN_PLACE_RETRY)
        }
        Step::Stay(after) => after,
        _ => Duration::from_secs(1),
    };
    // A pod's agent still to be asked how it started, or a stale image's next checkpoint.
    let stale_requeue = match stale.next_allowed {
        _ if seen.starts_unsettled => STARTS_RETRY,
        Some(at) => Duration::try_from(at.duration_since(seen.now))
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
        None => RESYNC,
    };
    Decision {
        claim: images_claim_for(app),
        superseded_jobs,
        job,
        deployment,
        scale,
        service,
        slice,
        outcome,
        status,
        events,
        stale_image_at: stale.recheckpoint_at,
        cold_starts_counted: stale.newly_counted,
        control_secret: seen
            .control_token
            .as_deref()
            .map(|token| control_secret_for(app, token)),
        in_place,
        // The soonest of: a checkpoint retry's backoff, the sleep cycle's next look, a pod's
        // start still unknown or a stale image's next checkpoint, a resync.
        requeue: Some(
            requeue
                .unwrap_or(RESYNC)
                .min(cycle_requeue)
                .min(stale_requeue)
                .min(RESYNC),
        ),
    }
}

/// The last wake's split, once known: how the woken pod started and its agent's part of the
/// latency, from the first ready pod whose agent said (the pods that ended the wake are the
/// ready ones; an agent not asked yet is asked at a later look).
fn split_wake(seen: &Observed, next: &mut CracAppStatus) {
    let Some(wake) = next.last_wake.as_mut().filter(|w| w.outcome.is_none()) else {
        return;
    };
    if let Some(start) = seen.restore_starts.iter().find(|s| s.start_ms.is_some()) {
        wake.outcome = Some(
            if start.cold {
                "coldStarted"
            } else {
                "restored"
            }
            .into(),
        );
        wake.restore_ms = start.start_ms.and_then(|ms| i64::try_from(ms).ok());
    }
}

/// How soon to look again at pods of an app sleeping in place that are not where they should be.
const IN_PLACE_RETRY: Duration = Duration::from_secs(3);

/// How soon to look again while a restore pod's agent is still to be asked how it started.
const STARTS_RETRY: Duration = Duration::from_secs(5);

/// Counts the published image's restore pods that started cold (into `next.checkpoint`), and
/// whether that makes the image stale. Only for an image that was already the pods' before
/// this reconcile: the pods' reports are about it.
fn stale_image(
    app: &CracApp,
    seen: &Observed,
    spec: &Spec,
    next: &mut CracAppStatus,
) -> fallbacks::Tally {
    let Some(image) = next.checkpoint.as_mut() else {
        return fallbacks::Tally::default();
    };
    if seen.previous.checkpoint.as_ref().map(|p| &p.id) != Some(&image.id) {
        return fallbacks::Tally::default();
    }
    let counted = image.cold_started_pods.clone();
    let last_stale_at = app
        .annotations()
        .get(labels::STALE_IMAGE_AT)
        .and_then(|t| t.parse().ok());
    let tally = fallbacks::tally(
        &fallbacks::Image {
            id: &image.id,
            counted: &counted,
            current: image.id == spec.id,
        },
        &seen.restore_starts,
        app.spec.restore.recheckpoint_after_cold_starts,
        last_stale_at,
        seen.now,
    );
    image.cold_started_pods = tally.cold_started_pods.clone();
    tally
}

/// The restore Deployment, from the newest published image (or only its replicas, while a
/// new image is being taken), and its rollout as observed.
fn restore(
    app: &CracApp,
    seen: &Observed,
    spec: &Spec,
    next: &CracAppStatus,
    plan: &Plan,
    config: &BuildConfig,
) -> (Option<Deployment>, Option<i32>, Option<Rollout>) {
    let wanted = plan.replicas(app.spec.replicas);
    let live = seen.deployment.as_deref();
    let rollout = |d: Option<&Deployment>| rollout_of(d.and_then(|d| d.status.clone()), wanted);
    match &next.checkpoint {
        None => (None, None, None),
        Some(image) if image.id == spec.id => {
            let in_place = seen.control_token.is_some();
            let desired =
                restore_deployment_for(app, &spec.validated, image, wanted, in_place, config);
            (Some(desired), None, Some(rollout(live)))
        }
        // The spec moved on but its image is not ready: the pods stay on the template that
        // matches the published image, so they never restore it with another JAR; only their
        // number follows (a sleep or a wake meanwhile).
        Some(image) => match live {
            Some(old) if restored_id(old) == Some(image.id.as_str()) => {
                let replicas = old.spec.as_ref().and_then(|s| s.replicas);
                let scale = (replicas != Some(wanted)).then_some(wanted);
                (None, scale, Some(rollout(live)))
            }
            Some(other) => (None, None, Some(rollout(Some(other)))),
            None => (None, None, None),
        },
    }
}

fn rollout_of(
    status: Option<k8s_openapi::api::apps::v1::DeploymentStatus>,
    wanted: i32,
) -> Rollout {
    let s = status.unwrap_or_default();
    Rollout {
        wanted,
        replicas: s.replicas.unwrap_or(0),
        ready: s.ready_replicas.unwrap_or(0),
        updated: s.updated_replicas.unwrap_or(0),
    }
}

/// The status fields kept from the previous status unless this reconcile changes them, and
/// the activator ports as the operator's table checked them.
fn carried_over(app: &CracApp, seen: &Observed) -> CracAppStatus {
    let previous = &seen.previous;
    CracAppStatus {
        checkpoint: previous.checkpoint.clone(),
        pending_checkpoint: previous.pending_checkpoint.clone(),
        selector: Some(format!("{}={}", labels::APP, crate::build::app_name(app))),
        serving_mode: previous.serving_mode.or(Some(ServingMode::Pods)),
        activator_ports: seen.activator_ports.clone(),
        caller_namespaces: previous.caller_namespaces.clone(),
        last_activity_time: previous.last_activity_time.clone(),
        last_wake: previous.last_wake.clone(),
        slept_at: previous.slept_at.clone(),
        sleep_started_at: previous.sleep_started_at.clone(),
        ..Default::default()
    }
}

/// How soon an app blocked by an object someone else owns is looked at again (a change to
/// that object reaches no watch of the operator's).
pub const NAME_TAKEN_RETRY: Duration = Duration::from_secs(60);

/// The apply step found an object the app needs owned by someone else: what `decided` would
/// have recorded (a checkpoint just published, say) is kept, the conditions say what is in the
/// way, nothing more is applied, and the app is looked at again later.
pub fn name_taken(app: &CracApp, seen: &Observed, decided: &Decision, message: String) -> Decision {
    let progress = CheckpointProgress::InvalidSpec {
        reason: "NameTaken".into(),
        message,
    };
    reported_only(
        app,
        seen,
        decided.status.clone(),
        progress,
        Some(NAME_TAKEN_RETRY),
    )
}

/// A reconcile that only reports (an invalid spec, a storage problem, an object in the way):
/// `next` with its phase and conditions, and no object changes.
fn reported_only(
    app: &CracApp,
    seen: &Observed,
    next: CracAppStatus,
    progress: CheckpointProgress,
    requeue: Option<Duration>,
) -> Decision {
    let rollout = seen.deployment.as_deref().map(|d| {
        let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        rollout_of(d.status.clone(), wanted)
    });
    let mut events = Vec::new();
    let status = complete(app, seen, next, progress, rollout, false, &mut events);
    Decision {
        status,
        events,
        requeue,
        ..Default::default()
    }
}

/// Phase, conditions and replica counts; an Event per condition that changed.
fn complete(
    app: &CracApp,
    seen: &Observed,
    mut next: CracAppStatus,
    progress: CheckpointProgress,
    rollout: Option<Rollout>,
    asleep: bool,
    events: &mut Vec<Note>,
) -> CracAppStatus {
    let input = StatusInput {
        generation: app.metadata.generation,
        checkpoint: progress,
        has_image: next.checkpoint.is_some(),
        rollout: rollout.clone(),
        asleep,
    };
    next.phase = Some(phase_for(&input));
    next.observed_generation = app.metadata.generation;
    next.conditions = conditions_for(&input, &seen.previous.conditions, seen.now);
    if let Some(r) = &rollout {
        next.replicas = r.replicas;
        next.ready_replicas = r.ready;
    }
    events.extend(
        transitions(&seen.previous.conditions, &next.conditions)
            .into_iter()
            .map(|t| Note {
                warning: t.warning,
                reason: t.reason,
                message: t.note,
            }),
    );
    next
}

/// Whether `next` differs from what the app's status says (a wake request the activator
/// wrote is not the operator's to keep: it is read, never written back).
pub fn status_changed(previous: &CracAppStatus, next: &CracAppStatus) -> bool {
    let mut comparable = previous.clone();
    comparable.wake_requested_at = None;
    &comparable != next
}

/// Whether the status is written before the objects are applied: when the app moves to the
/// activator. The activator serves an app only while its status says `Activator` (past a
/// short wait): a slice moved first by an operator that then died would send callers to an
/// activator that turns them away until a new operator writes the status. Written first, the
/// status only makes the activator ready for traffic still going to the pods. The way back is
/// the other order (slice to the pods, then the status), for the same reason.
pub fn status_before_objects(previous: &CracAppStatus, next: &CracAppStatus) -> bool {
    next.serving_mode == Some(ServingMode::Activator)
        && previous.serving_mode != Some(ServingMode::Activator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::job::checkpoint_job_name;
    use crate::build::service::app_ports;
    use crate::checkpoint_id::checkpoint_id;
    use crate::reconcile::cycle::{CycleSeen, Requests};
    use crate::scale::{Activity, Settings};
    use crate::validate::{tests::app, validate};
    use crac_api::cracapp::{ActivatorPort, CheckpointStatus, Phase, WakeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;
    use std::sync::Arc;

    const BASE: Duration = Duration::from_secs(30);

    fn config() -> BuildConfig {
        BuildConfig {
            agent_image: "agent:1".into(),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    /// What a reconcile of `app` observes with nothing created yet and scale to zero off.
    fn observed(app: &CracApp, previous: CracAppStatus) -> Observed {
        let spec = validate(app, &Default::default()).map(|validated| Spec {
            id: checkpoint_id(
                &validated,
                app.spec.checkpoint.engine,
                "agent:1",
                &Default::default(),
            ),
            ports: app_ports(&validated),
            validated,
        });
        let requests = cycle::requests_of(app, &previous);
        Observed {
            now: now(),
            key: ("shop".into(), "demo".into()),
            previous,
            spec,
            storage_problem: None,
            claim: None,
            job: None,
            job_pods: Vec::new(),
            checkpoint_jobs: Vec::new(),
            deployment: None,
            service: None,
            slice: None,
            ready_ips: Vec::new(),
            activator_ips: vec!["10.9.0.1".into()],
            cycle: CycleSeen {
                settings: Settings {
                    enabled: false,
                    idle_after: Duration::from_secs(900),
                    wake_timeout: Duration::from_secs(30),
                    quiet: false,
                    policy: None,
                    max_awake: None,
                    caller_namespaces: Vec::new(),
                    mode: crac_api::cracapp::SleepMode::Recreate,
                },
                requests,
                activity: Activity::default(),
                capped: None,
                activator_ready: true,
            },
            activator_ports: Vec::new(),
            restore_starts: Vec::new(),
            starts_unsettled: false,
            in_place_pods: Vec::new(),
            control_token: None,
        }
    }

    fn id_of(seen: &Observed) -> String {
        seen.spec.as_ref().map(|s| s.id.clone()).unwrap()
    }

    #[test]
    fn a_new_app_gets_its_claim_and_first_checkpoint_job_and_nothing_else() {
        let app = app();
        let seen = observed(&app, CracAppStatus::default());
        let d = decide(&app, &seen, &config(), BASE);
        assert!(d.claim.is_some());
        let job = d.job.expect("a checkpoint Job");
        assert_eq!(
            job.metadata.name,
            Some(checkpoint_job_name("demo", &id_of(&seen), 0))
        );
        assert!(d.deployment.is_none(), "no image to restore yet");
        assert_eq!(d.status.phase, Some(Phase::Checkpointing));
        assert_eq!(d.events.len(), 1, "{:?}", d.events);
        assert_eq!(d.events[0].reason, "Checkpointing");
        assert_eq!(d.requeue, Some(RESYNC));
    }

    #[test]
    fn while_a_new_checkpoint_is_taken_the_pods_keep_the_published_images_template() {
        let mut app = app();
        let old = observed(&app, CracAppStatus::default());
        let old_id = id_of(&old);
        let old_deployment = restore_deployment_for(
            &app,
            &old.spec.as_ref().unwrap().validated,
            &CheckpointStatus {
                id: old_id.clone(),
                ..Default::default()
            },
            2,
            false,
            &config(),
        );
        // The user changes the image: a new id, whose checkpoint has not run yet.
        app.spec.template.spec.as_mut().unwrap().containers[0].image = Some("demo:2".into());
        let previous = CracAppStatus {
            checkpoint: Some(CheckpointStatus {
                id: old_id.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut seen = observed(&app, previous);
        seen.deployment = Some(Arc::new(old_deployment.clone()));
        assert_ne!(id_of(&seen), old_id);
        let d = decide(&app, &seen, &config(), BASE);
        assert!(d.job.is_some(), "the new checkpoint starts");
        assert!(
            d.deployment.is_none(),
            "the template is left alone: never the new JAR with the old image"
        );
        assert_eq!(d.scale, None, "already at the app's 2 replicas");
        // Asked to sleep meanwhile: only the replicas move.
        seen.cycle.requests.cycle = Cycle::Asleep;
        seen.cycle.settings.enabled = true;
        assert_eq!(decide(&app, &seen, &config(), BASE).scale, Some(0));
        // Another image's Deployment (not the published one): nothing to keep.
        let mut other = old_deployment;
        other.spec.as_mut().unwrap().template.metadata = None;
        seen.deployment = Some(Arc::new(other));
        assert_eq!(decide(&app, &seen, &config(), BASE).scale, None);
    }

    #[test]
    fn restore_pods_that_start_cold_are_counted_and_make_the_image_stale() {
        let app = app();
        let mut seen = observed(&app, CracAppStatus::default());
        let id = id_of(&seen);
        seen.previous.checkpoint = Some(CheckpointStatus {
            id: id.clone(),
            cold_started_pods: vec!["demo-1".into()],
            ..Default::default()
        });
        let cold = |pod: &str| fallbacks::RestoreStart {
            pod: pod.into(),
            cold: true,
            reason: Some("CpuFeaturesMissing".into()),
            start_ms: None,
        };
        seen.restore_starts = vec![cold("demo-1"), cold("demo-2")];
        let d = decide(&app, &seen, &config(), BASE);
        let image = d.status.checkpoint.clone().unwrap();
        assert_eq!(image.cold_started_pods, ["demo-1", "demo-2"]);
        assert_eq!(d.cold_starts_counted, 1);
        assert_eq!(d.stale_image_at, None, "2 of 3");
        assert!(d.events.iter().any(|e| e.reason == "RestoreFellBack"));

        seen.previous.checkpoint = Some(image);
        seen.restore_starts.push(cold("demo-3"));
        let d = decide(&app, &seen, &config(), BASE);
        assert_eq!(d.stale_image_at, Some(now()));
        assert!(d.events.iter().any(|e| e.reason == "ImageStale"));
        assert!(
            d.job.is_none(),
            "the new checkpoint follows the annotation's id"
        );

        // A pod's agent not asked yet: look again soon.
        seen.starts_unsettled = true;
        assert_eq!(
            decide(&app, &seen, &config(), BASE).requeue,
            Some(STARTS_RETRY)
        );
    }

    #[test]
    fn the_last_wake_is_split_once_the_woken_pods_agent_said_how_it_started() {
        let app = app();
        let mut seen = observed(&app, CracAppStatus::default());
        let wake = WakeStatus {
            at: MicroTime(now()),
            latency_ms: Some(900),
            outcome: None,
            restore_ms: None,
        };
        let mut next = CracAppStatus {
            last_wake: Some(wake.clone()),
            ..Default::default()
        };
        // Its agent not asked yet: nothing to add.
        split_wake(&seen, &mut next);
        assert_eq!(next.last_wake.as_ref(), Some(&wake));
        seen.restore_starts = vec![fallbacks::RestoreStart {
            pod: "demo-1".into(),
            cold: false,
            reason: None,
            start_ms: Some(140),
        }];
        split_wake(&seen, &mut next);
        let split = next.last_wake.clone().unwrap();
        assert_eq!(split.outcome.as_deref(), Some("restored"));
        assert_eq!(split.restore_ms, Some(140));
        // Once said, it stays: a later pod does not rewrite the wake.
        seen.restore_starts[0].cold = true;
        split_wake(&seen, &mut next);
        assert_eq!(next.last_wake, Some(split));
    }

    #[test]
    fn an_asleep_app_runs_no_pods_and_its_endpoints_are_the_activator() {
        let mut app = app();
        app.spec.scale_to_zero =
            Some(serde_json::from_value(serde_json::json!({ "enabled": true })).unwrap());
        let mut seen = observed(&app, CracAppStatus::default());
        let id = id_of(&seen);
        seen.previous = CracAppStatus {
            checkpoint: Some(CheckpointStatus {
                id,
                ..Default::default()
            }),
            slept_at: Some(MicroTime(now())),
            serving_mode: Some(ServingMode::Activator),
            activator_ports: vec![ActivatorPort {
                name: None,
                target_port: 8080,
                activator_port: 20007,
            }],
            ..Default::default()
        };
        seen.cycle.settings.enabled = true;
        seen.cycle.requests = Requests {
            wake: None,
            sleep_requested: false,
            cycle: Cycle::Asleep,
        };
        seen.activator_ports = seen.previous.activator_ports.clone();
        let d = decide(&app, &seen, &config(), BASE);
        let replicas = d.deployment.and_then(|d| d.spec).and_then(|s| s.replicas);
        assert_eq!(replicas, Some(0));
        let slice = d.slice.expect("a slice");
        let addresses: Vec<&String> = slice
            .endpoints
            .iter()
            .flatten()
            .flat_map(|e| &e.addresses)
            .collect();
        assert_eq!(addresses, ["10.9.0.1"]);
        let ports: Vec<Option<i32>> = slice.ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(ports, [Some(20007)]);
        assert_eq!(d.status.phase, Some(Phase::ScaledToZero));
    }

    /// The operator died after scaling to zero and before recording the sleep: the status says
    /// draining, no pod is left, and a wake arrives. The app scales up while its endpoints stay
    /// on the activator (which holds the request); pointing them at no pods would refuse it.
    #[test]
    fn a_wake_after_an_unrecorded_sleep_scales_up_behind_the_activator() {
        let mut app = app();
        app.spec.scale_to_zero =
            Some(serde_json::from_value(serde_json::json!({ "enabled": true })).unwrap());
        let mut seen = observed(&app, CracAppStatus::default());
        let id = id_of(&seen);
        let started = now() - std::time::Duration::from_secs(10);
        seen.previous = CracAppStatus {
            checkpoint: Some(CheckpointStatus {
                id,
                ..Default::default()
            }),
            sleep_started_at: Some(MicroTime(started)),
            serving_mode: Some(ServingMode::Activator),
            activator_ports: vec![ActivatorPort {
                name: None,
                target_port: 8080,
                activator_port: 20007,
            }],
            ..Default::default()
        };
        seen.cycle.settings.enabled = true;
        seen.cycle.requests = Requests {
            wake: Some(now()),
            sleep_requested: false,
            cycle: Cycle::Draining,
        };
        seen.activator_ports = seen.previous.activator_ports.clone();
        let addresses = |d: &Decision| -> Vec<String> {
            let slice = d.slice.as_ref().expect("a slice");
            slice
                .endpoints
                .iter()
                .flatten()
                .flat_map(|e| e.addresses.clone())
                .collect()
        };
        let d = decide(&app, &seen, &config(), BASE);
        let replicas = d
            .deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref()?.replicas);
        assert_eq!(replicas, Some(app.spec.replicas), "scaled back up");
        assert_eq!(addresses(&d), ["10.9.0.1"], "still the activator");
        assert_eq!(d.status.serving_mode, Some(ServingMode::Activator));
        // Once a pod is ready, the endpoints move to it.
        seen.ready_ips = vec!["10.1.0.5".into()];
        let d = decide(&app, &seen, &config(), BASE);
        assert_eq!(addresses(&d), ["10.1.0.5"]);
        assert_eq!(d.status.serving_mode, Some(ServingMode::Pods));
    }

    #[test]
    fn a_drain_is_recorded_before_its_slice_moves_and_a_wake_after() {
        let mode = |m| CracAppStatus {
            serving_mode: Some(m),
            ..Default::default()
        };
        let (pods, activator) = (mode(ServingMode::Pods), mode(ServingMode::Activator));
        assert!(status_before_objects(&pods, &activator), "drain starts");
        assert!(status_before_objects(&CracAppStatus::default(), &activator));
        assert!(!status_before_objects(&activator, &activator), "asleep");
        assert!(!status_before_objects(&activator, &pods), "woken");
        assert!(!status_before_objects(&pods, &pods), "awake");
    }

    #[test]
    fn an_invalid_spec_is_reported_and_nothing_is_applied() {
        let mut app = app();
        app.spec.template.spec.as_mut().unwrap().containers[0].command = None;
        let seen = observed(&app, CracAppStatus::default());
        assert!(seen.spec.is_err());
        let d = decide(&app, &seen, &config(), BASE);
        assert!(d.claim.is_none() && d.job.is_none() && d.deployment.is_none());
        assert!(d.service.is_none() && d.slice.is_none());
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(d.requeue, None, "waits for a change of the spec");
        assert!(
            d.events
                .iter()
                .any(|e| e.warning && e.reason == "InvalidSpec")
        );
    }

    #[test]
    fn a_checkpoint_job_of_an_earlier_spec_still_running_is_deleted() {
        let app = app();
        let mut seen = observed(&app, CracAppStatus::default());
        let id = id_of(&seen);
        let job = |name: &str, of: &str| -> Arc<Job> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {
                        "name": name, "uid": format!("{name}-uid"),
                        "labels": { labels::APP: "demo", labels::COMPONENT: "checkpoint" },
                        "annotations": { labels::CHECKPOINT_ID_ANNOTATION: of },
                        "ownerReferences": [{ "apiVersion": "crac.dev/v1alpha1",
                            "kind": "CracApp", "name": "demo", "uid": "uid-1", "controller": true }]
                    }
                }))
                .unwrap(),
            )
        };
        seen.checkpoint_jobs = vec![job("demo-ckpt-old-0", "old"), job("demo-ckpt-now-0", &id)];
        let d = decide(&app, &seen, &config(), BASE);
        assert_eq!(
            d.superseded_jobs,
            [SupersededJob {
                name: "demo-ckpt-old-0".into(),
                uid: "demo-ckpt-old-0-uid".into()
            }]
        );
        // A spec the operator cannot act on has no current id: nothing is deleted.
        let mut invalid = app.clone();
        invalid.spec.template.spec.as_mut().unwrap().containers[0].command = None;
        let mut seen_invalid = observed(&invalid, CracAppStatus::default());
        seen_invalid.checkpoint_jobs = seen.checkpoint_jobs.clone();
        assert!(
            decide(&invalid, &seen_invalid, &config(), BASE)
                .superseded_jobs
                .is_empty()
        );
    }

    #[test]
    fn an_unchanged_status_is_not_written_but_a_wake_request_is_not_kept() {
        let app = app();
        let seen = observed(&app, CracAppStatus::default());
        let d = decide(&app, &seen, &config(), BASE);
        assert!(status_changed(&seen.previous, &d.status));
        let mut written = d.status.clone();
        assert!(!status_changed(&written, &d.status));
        written.wake_requested_at = Some(MicroTime(now()));
        assert!(!status_changed(&written, &d.status));
    }
}
