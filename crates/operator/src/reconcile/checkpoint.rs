//! The checkpoint decision, without a cluster: given the published image, the pending
//! checkpoint (with its last failure, as data), the Job of the current attempt and its pods,
//! what the status says and whether a Job is to be created.

use super::status::{CheckpointProgress, retry_backoff};
use crate::build::job::CHECKPOINT_COMPONENT;
use crate::checkpoint_pod::{DIGEST_MISSING, app_image_id, failure_of, summary_of};
use crate::image_ref;
use crac_api::agent::AgentSummary;
use crac_api::cracapp::{CheckpointStatus, Engine, PendingCheckpoint};
use crac_api::labels;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{RoundMode, Timestamp, TimestampRound, Unit};
use std::time::Duration;

/// What the checkpoint step found, and what it wants.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointDecision {
    pub progress: CheckpointProgress,
    /// The image the pods restore from, after this step.
    pub checkpoint: Option<CheckpointStatus>,
    pub pending: Option<PendingCheckpoint>,
    /// Create the Job of this attempt (its name is [`attempt_of`]'s).
    pub start_job: bool,
    /// Look again then (a retry's backoff ends).
    pub requeue: Option<Duration>,
    /// What happened, for metrics and logs.
    pub outcome: Option<Outcome>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Published { seconds: Option<f64> },
    Failed { reason: String },
}

/// The pending checkpoint of `id`: the one recorded, or a fresh one.
pub fn pending_for(recorded: Option<&PendingCheckpoint>, id: &str) -> PendingCheckpoint {
    recorded
        .filter(|p| p.id == id)
        .cloned()
        .unwrap_or_else(|| PendingCheckpoint {
            id: id.to_string(),
            ..Default::default()
        })
}

/// What the checkpoint Job of the current attempt is doing, as far as the caches know.
pub struct AttemptSeen<'a> {
    pub job: Option<&'a Job>,
    pub pods: &'a [Pod],
}

/// The checkpoint the spec asks for.
pub struct Wanted<'a> {
    /// Its checkpoint id.
    pub id: &'a str,
    pub engine: Engine,
    /// The app container's image, as the spec names it.
    pub app_image: &'a str,
}

/// Decides the checkpoint step for the spec whose image is `wanted.id`.
pub fn decide(
    published: Option<&CheckpointStatus>,
    recorded: Option<&PendingCheckpoint>,
    wanted: &Wanted<'_>,
    seen: &AttemptSeen<'_>,
    retry_base: Duration,
    now: Timestamp,
) -> CheckpointDecision {
    let id = wanted.id;
    if published.is_some_and(|c| c.id == id) {
        return CheckpointDecision {
            progress: CheckpointProgress::Current,
            checkpoint: published.cloned(),
            pending: None,
            start_job: false,
            requeue: None,
            outcome: None,
        };
    }
    let pending = pending_for(recorded, id);
    let unchanged = |progress, pending, start_job, requeue| CheckpointDecision {
        progress,
        checkpoint: published.cloned(),
        pending: Some(pending),
        start_job,
        requeue,
        outcome: None,
    };
    // A failed attempt: counted, recorded with its reason, retried after a backoff.
    let failed = |mut pending: PendingCheckpoint, summary: &AgentSummary| {
        let (reason, message) = failure_of(summary);
        pending.failures += 1;
        pending.last_failure_time = Some(Time(now));
        pending.last_failure_reason = Some(reason.clone());
        pending.last_failure_message = Some(message.clone());
        let wait = retry_backoff(pending.failures, retry_base);
        let progress = CheckpointProgress::Failed {
            failures: pending.failures,
            reason: reason.clone(),
            message: retry_message(&message, &pending, retry_base),
        };
        CheckpointDecision {
            outcome: Some(Outcome::Failed { reason }),
            ..unchanged(progress, pending, false, Some(wait))
        }
    };
    match seen.job {
        None => match backoff_remaining(&pending, retry_base, now) {
            Some(wait) => {
                let (reason, message) = last_failure(&pending);
                let message = retry_message(&message, &pending, retry_base);
                let progress = CheckpointProgress::Failed {
                    failures: pending.failures,
                    reason,
                    message,
                };
                unchanged(progress, pending, false, Some(wait))
            }
            None => {
                let progress = CheckpointProgress::Running {
                    attempt: pending.failures,
                    last_failure: None,
                };
                unchanged(progress, pending, true, None)
            }
        },
        Some(job) if job_finished(job, "Complete") => {
            let (summary, image_id) = seen
                .pods
                .iter()
                .filter(|p| phase(p) == Some("Succeeded"))
                .find_map(|p| Some((summary_of(p)?, app_image_id(p))))
                .unwrap_or_default();
            // Restore pods trust only the digest the status records: no digest, no image.
            if summary.image_digest.is_none() {
                let missing = AgentSummary {
                    reason: Some(DIGEST_MISSING.into()),
                    message: Some(
                        "the checkpoint Job completed without reporting a valid image digest, \
                         so restore pods could not verify the image; it is not published"
                            .into(),
                    ),
                    ..Default::default()
                };
                return failed(pending, &missing);
            }
            let mut image = published_image(job, &summary, wanted.engine, id, now);
            // What the pod ran, pinned by digest, so restore pods run the same bytes.
            image.app_image = image_ref::pinned(wanted.app_image, image_id);
            CheckpointDecision {
                progress: CheckpointProgress::Current,
                outcome: Some(Outcome::Published {
                    seconds: image.duration_seconds,
                }),
                checkpoint: Some(image),
                pending: None,
                start_job: false,
                requeue: None,
            }
        }
        Some(job) if job_finished(job, "Failed") => {
            let summary = newest_failure(seen.pods).unwrap_or_else(|| AgentSummary {
                reason: job_condition_reason(job, "Failed"),
                message: Some("the checkpoint Job failed".into()),
                ..Default::default()
            });
            failed(pending, &summary)
        }
        Some(_) => {
            let last_failure = newest_failure(seen.pods).map(|s| {
                let (reason, message) = failure_of(&s);
                format!("{reason}: {message}")
            });
            let progress = CheckpointProgress::Running {
                attempt: pending.failures,
                last_failure,
            };
            unchanged(progress, pending, false, None)
        }
    }
}

/// A checkpoint Job to delete, by name and uid (the delete's precondition: a Job made since
/// under the same name is never the one deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupersededJob {
    pub name: String,
    pub uid: String,
}

/// The checkpoint Jobs of the app (named `app`, with uid `app_uid`) that still run for an id
/// other than `id`, the current one: the spec moved on before they ended. Left running, such a
/// Job could publish after the current spec's image and prune it (issue 15), so they are
/// deleted. Only Jobs labelled as the app's checkpoint Jobs and controlled by it are: never a
/// Job of the current id (earlier attempts of it ended, and are kept for `kubectl logs` like
/// every finished Job), never one that ended, never one already being deleted.
pub fn superseded_jobs<'a>(
    jobs: impl IntoIterator<Item = &'a Job>,
    app: &str,
    app_uid: Option<&str>,
    id: &str,
) -> Vec<SupersededJob> {
    let Some(app_uid) = app_uid else {
        return Vec::new();
    };
    let mut superseded: Vec<SupersededJob> = jobs
        .into_iter()
        .filter(|job| {
            let meta = &job.metadata;
            let label = |key: &str| meta.labels.as_ref()?.get(key).map(String::as_str);
            let controlled = meta
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.uid == app_uid);
            let other_id = match meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(labels::CHECKPOINT_ID_ANNOTATION))
            {
                Some(full) => full != id,
                // Without the full id, by its label (the short id); with neither, not one
                // the operator can tell apart: left alone.
                None => label(labels::CHECKPOINT_ID)
                    .is_some_and(|short| short != crate::checkpoint_id::short(id)),
            };
            label(labels::APP) == Some(app)
                && label(labels::COMPONENT) == Some(CHECKPOINT_COMPONENT)
                && controlled
                && other_id
                && meta.deletion_timestamp.is_none()
                && !job_finished(job, "Complete")
                && !job_finished(job, "Failed")
        })
        .filter_map(|job| {
            Some(SupersededJob {
                name: job.metadata.name.clone()?,
                uid: job.metadata.uid.clone()?,
            })
        })
        .collect();
    superseded.sort_by(|a, b| a.name.cmp(&b.name));
    superseded
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// When the next checkpoint attempt is due: the last failure plus its backoff.
fn retry_due(pending: &PendingCheckpoint, base: Duration) -> Option<Timestamp> {
    Some(pending.last_failure_time.as_ref()?.0 + retry_backoff(pending.failures, base))
}

fn backoff_remaining(
    pending: &PendingCheckpoint,
    base: Duration,
    now: Timestamp,
) -> Option<Duration> {
    let due = retry_due(pending, base)?;
    (due > now).then(|| Duration::try_from(due.duration_since(now)).unwrap_or(Duration::ZERO))
}

/// The reason and message of the last failure, as recorded in the pending checkpoint.
fn last_failure(pending: &PendingCheckpoint) -> (String, String) {
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
    let due = retry_due(pending, base).unwrap_or(Timestamp::UNIX_EPOCH);
    // Truncated, not rounded: the status keeps the failure time in whole seconds, so a
    // reconcile that reads it back must name the same second as the one that wrote it.
    let whole_seconds = TimestampRound::new()
        .smallest(Unit::Second)
        .mode(RoundMode::Trunc);
    let due = due.round(whole_seconds).unwrap_or(due);
    format!("{message} (attempt {} at {due})", pending.failures + 1)
}

pub fn job_finished(job: &Job, type_: &str) -> bool {
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

/// The report of the most recently created failed pod.
fn newest_failure(pods: &[Pod]) -> Option<AgentSummary> {
    pods.iter()
        .filter(|p| phase(p) == Some("Failed"))
        .max_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0))
        .and_then(summary_of)
}

/// The image a completed Job published.
fn published_image(
    job: &Job,
    summary: &AgentSummary,
    engine: Engine,
    id: &str,
    now: Timestamp,
) -> CheckpointStatus {
    let status = job.status.as_ref();
    let started = status.and_then(|s| s.start_time.as_ref()).map(|t| t.0);
    let finished = status.and_then(|s| s.completion_time.as_ref()).map(|t| t.0);
    let duration_seconds = match (started, finished) {
        (Some(s), Some(f)) => Some(f.duration_since(s).as_secs_f64()),
        _ => None,
    };
    CheckpointStatus {
        id: id.to_string(),
        created_at: Some(Time(finished.unwrap_or(now))),
        size_bytes: summary.image_bytes,
        duration_seconds,
        trial_restore_ms: summary.trial_restore_ms,
        jdk: summary.jdk.clone(),
        digest: summary.image_digest.clone(),
        engine: Some(engine),
        cold_started_pods: Vec::new(),
        app_image: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crac_api::agent::Outcome as AgentOutcome;

    const BASE: Duration = Duration::from_secs(30);
    const WANTED: Wanted<'static> = Wanted {
        id: "abc",
        engine: Engine::Criu,
        app_image: "reg:5000/demo:1",
    };

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn failed_at(secs: i64, failures: i32) -> PendingCheckpoint {
        PendingCheckpoint {
            id: "abc".into(),
            failures,
            last_failure_time: Some(Time(t(secs))),
            last_failure_reason: Some("OpenSockets".into()),
            last_failure_message: Some("the JVM holds a connection".into()),
        }
    }

    fn job(condition: Option<&str>) -> Job {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "demo-ckpt-abc-0" },
            "status": {
                "startTime": "2027-01-15T08:00:00Z",
                "completionTime": "2027-01-15T08:00:04Z",
                "conditions": condition.map(|c| vec![serde_json::json!({ "type": c, "status": "True", "reason": "BackoffLimitExceeded" })]),
            }
        }))
        .unwrap()
    }

    fn ended_pod(name: &str, created: &str, summary: &AgentSummary) -> Pod {
        ended_pod_reporting(name, created, summary, "")
    }

    /// An ended pod whose app container's `imageID` is `image_id`.
    fn ended_pod_reporting(
        name: &str,
        created: &str,
        summary: &AgentSummary,
        image_id: &str,
    ) -> Pod {
        let ok = summary.outcome == Some(AgentOutcome::Checkpointed);
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "creationTimestamp": created },
            "status": {
                "phase": if ok { "Succeeded" } else { "Failed" },
                "containerStatuses": [{ "name": "app", "image": "x", "imageID": image_id, "ready": false,
                    "restartCount": 0, "state": { "terminated": {
                        "exitCode": if ok { 0 } else { 1 },
                        "message": serde_json::to_string(summary).unwrap() } } }]
            }
        }))
        .unwrap()
    }

    fn failure(reason: &str) -> AgentSummary {
        AgentSummary {
            outcome: Some(AgentOutcome::Failed),
            reason: Some(reason.into()),
            message: Some(format!("{reason} happened")),
            ..Default::default()
        }
    }

    fn decide_with(
        recorded: Option<&PendingCheckpoint>,
        job: Option<&Job>,
        pods: &[Pod],
        now: Timestamp,
    ) -> CheckpointDecision {
        let seen = AttemptSeen { job, pods };
        decide(None, recorded, &WANTED, &seen, BASE, now)
    }

    #[test]
    fn a_current_image_needs_no_job_and_clears_the_pending_checkpoint() {
        let image = CheckpointStatus {
            id: "abc".into(),
            ..Default::default()
        };
        let seen = AttemptSeen {
            job: None,
            pods: &[],
        };
        let d = decide(
            Some(&image),
            Some(&failed_at(0, 2)),
            &WANTED,
            &seen,
            BASE,
            t(10),
        );
        assert_eq!(d.progress, CheckpointProgress::Current);
        assert_eq!(d.pending, None);
        assert!(!d.start_job);
    }

    #[test]
    fn no_job_starts_one_unless_a_backoff_runs() {
        let d = decide_with(None, None, &[], t(1_800_000_000));
        assert!(d.start_job);
        assert_eq!(d.pending.as_ref().map(|p| p.failures), Some(0));

        let pending = failed_at(1_800_000_000, 1);
        let during = decide_with(Some(&pending), None, &[], t(1_800_000_010));
        assert!(!during.start_job);
        assert_eq!(during.requeue, Some(Duration::from_secs(20)));
        let after = decide_with(Some(&pending), None, &[], t(1_800_000_031));
        assert!(after.start_job, "the backoff is over");
        // A pending checkpoint of another id (the spec moved on) starts afresh.
        let mut other = pending.clone();
        other.id = "old".into();
        assert!(decide_with(Some(&other), None, &[], t(1_800_000_010)).start_job);
    }

    #[test]
    fn a_failure_during_the_backoff_is_reported_from_data_with_a_stable_message() {
        let pending = failed_at(1_800_000_000, 1);
        let at = |secs| decide_with(Some(&pending), None, &[], t(secs)).progress;
        let expected = CheckpointProgress::Failed {
            failures: 1,
            reason: "OpenSockets".into(),
            message: "the JVM holds a connection (attempt 2 at 2027-01-15T08:00:30Z)".into(),
        };
        // The same text on every reconcile (no countdown): no new Event each time.
        assert_eq!(at(1_800_000_001), expected);
        assert_eq!(at(1_800_000_020), expected);
        // The reconcile that records a failure has its sub-second time; later ones read it
        // back from the status in whole seconds: both name the same next attempt.
        let mut precise = pending.clone();
        precise.last_failure_time = Some(Time(t(1_800_000_000) + Duration::from_millis(700)));
        assert_eq!(
            retry_message("the JVM holds a connection", &precise, BASE),
            "the JVM holds a connection (attempt 2 at 2027-01-15T08:00:30Z)"
        );
        // Rewording the message cannot lose the reason: it is not parsed from the text.
        let mut reworded = pending.clone();
        reworded.last_failure_message = Some("something else (attempt 9 starts in 1s)".into());
        assert_eq!(last_failure(&reworded).0, "OpenSockets");
    }

    #[test]
    fn a_failed_job_records_the_newest_pods_reason_and_backs_off() {
        let pods = [
            ended_pod("a", "2027-01-15T08:00:00Z", &failure("Older")),
            ended_pod("b", "2027-01-15T08:00:02Z", &failure("OpenSockets")),
        ];
        let now = t(1_800_000_100);
        let d = decide_with(None, Some(&job(Some("Failed"))), &pods, now);
        let pending = d.pending.expect("still pending");
        assert_eq!(pending.failures, 1);
        assert_eq!(pending.last_failure_reason.as_deref(), Some("OpenSockets"));
        assert_eq!(pending.last_failure_time, Some(Time(now)));
        assert_eq!(d.requeue, Some(BASE));
        assert_eq!(
            d.outcome,
            Some(Outcome::Failed {
                reason: "OpenSockets".into()
            })
        );
        // Without any pod report, the Job's own reason.
        let bare = decide_with(None, Some(&job(Some("Failed"))), &[], now);
        assert_eq!(
            bare.pending.and_then(|p| p.last_failure_reason).as_deref(),
            Some("BackoffLimitExceeded")
        );
    }

    #[test]
    fn a_complete_job_publishes_the_image_the_agent_reported() {
        let report = AgentSummary {
            outcome: Some(AgentOutcome::Checkpointed),
            image_bytes: Some(59_000_000),
            jdk: Some("17.0.15".into()),
            image_digest: Some(format!("sha256:{}", "0f".repeat(32))),
            trial_restore_ms: Some(180),
            ..Default::default()
        };
        let pods = [ended_pod("a", "2027-01-15T08:00:00Z", &report)];
        let d = decide_with(
            Some(&failed_at(0, 1)),
            Some(&job(Some("Complete"))),
            &pods,
            t(5),
        );
        let image = d.checkpoint.expect("published");
        assert_eq!(image.id, "abc");
        assert_eq!(image.size_bytes, Some(59_000_000));
        assert_eq!(image.duration_seconds, Some(4.0));
        assert_eq!(image.digest, report.image_digest);
        assert_eq!(image.trial_restore_ms, Some(180));
        assert_eq!(image.app_image, None, "the pod reported no image digest");
        assert_eq!(d.pending, None);
        assert_eq!(d.progress, CheckpointProgress::Current);
    }

    #[test]
    fn a_complete_job_records_the_image_its_pod_ran_pinned_to_the_specs_repository() {
        let report = AgentSummary {
            outcome: Some(AgentOutcome::Checkpointed),
            image_digest: Some(format!("sha256:{}", "0f".repeat(32))),
            ..Default::default()
        };
        let repo_digest = format!("sha256:{}", "9a".repeat(32));
        let published = |image_id: &str| {
            let pods = [ended_pod_reporting(
                "a",
                "2027-01-15T08:00:00Z",
                &report,
                image_id,
            )];
            let d = decide_with(None, Some(&job(Some("Complete"))), &pods, t(5));
            d.checkpoint.expect("published either way").app_image
        };
        let pinned = Some(format!("reg:5000/demo@{repo_digest}"));
        assert_eq!(published(&format!("reg:5000/demo@{repo_digest}")), pinned);
        assert_eq!(
            published(&format!("docker-pullable://reg:5000/demo@{repo_digest}")),
            pinned
        );
        // A config digest (an image with no repository digest) or anything malformed: the
        // image is still published, and the pods keep the tag.
        assert_eq!(published(&repo_digest), None);
        assert_eq!(published("reg:5000/demo@sha256:forged; rm -rf /"), None);
    }

    #[test]
    fn a_complete_job_without_a_valid_digest_publishes_nothing_and_is_retried() {
        for digest in [None, Some("sha256:forged".to_string())] {
            let report = AgentSummary {
                outcome: Some(AgentOutcome::Checkpointed),
                image_digest: digest,
                ..Default::default()
            };
            let pods = [ended_pod("a", "2027-01-15T08:00:00Z", &report)];
            let d = decide_with(None, Some(&job(Some("Complete"))), &pods, t(5));
            assert_eq!(d.checkpoint, None, "nothing published");
            let pending = d.pending.unwrap();
            assert_eq!(pending.failures, 1);
            assert_eq!(pending.last_failure_reason.as_deref(), Some(DIGEST_MISSING));
            assert!(d.requeue.is_some(), "retried after a backoff");
        }
    }

    const CURRENT: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    const OLD: &str = "0000000000111111111122222222223333333333444444444455555555556666";

    /// A checkpoint Job of app "demo" (uid "uid-1") for `id`, as the caches hold it.
    fn app_job(name: &str, id: &str, condition: Option<&str>) -> Job {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "uid": format!("uid-of-{name}"),
                "labels": { labels::APP: "demo", labels::COMPONENT: "checkpoint",
                            labels::CHECKPOINT_ID: crate::checkpoint_id::short(id) },
                "annotations": { labels::CHECKPOINT_ID_ANNOTATION: id },
                "ownerReferences": [{ "apiVersion": "crac.dev/v1alpha1", "kind": "CracApp",
                    "name": "demo", "uid": "uid-1", "controller": true }]
            },
            "status": {
                "conditions": condition.map(|c| vec![serde_json::json!({ "type": c, "status": "True" })]),
            }
        }))
        .unwrap()
    }

    fn superseded_names(jobs: &[Job]) -> Vec<String> {
        superseded_jobs(jobs, "demo", Some("uid-1"), CURRENT)
            .into_iter()
            .map(|j| {
                assert_eq!(j.uid, format!("uid-of-{}", j.name), "deleted by its uid");
                j.name
            })
            .collect()
    }

    #[test]
    fn only_the_apps_own_running_jobs_of_another_id_are_superseded() {
        let mut jobs = vec![
            app_job("old-running", OLD, None),
            // The current id's Job, and an earlier failed attempt of it: not superseded.
            app_job("current-1", CURRENT, None),
            app_job("current-0", CURRENT, Some("Failed")),
            // Jobs of another id that ended: they can publish nothing more.
            app_job("old-complete", OLD, Some("Complete")),
            app_job("old-failed", OLD, Some("Failed")),
        ];
        assert_eq!(superseded_names(&jobs), ["old-running"]);

        let mut not_ours = |edit: &dyn Fn(&mut Job)| {
            let mut job = app_job("x", OLD, None);
            edit(&mut job);
            jobs.push(job);
        };
        // Another app's, by label; a cleanup Job; controlled by someone else (an app of the
        // same name deleted and made again); owned but not controlled; already being deleted.
        not_ours(&|j| {
            j.metadata
                .labels
                .as_mut()
                .unwrap()
                .insert(labels::APP.into(), "other".into());
        });
        not_ours(&|j| {
            j.metadata
                .labels
                .as_mut()
                .unwrap()
                .insert(labels::COMPONENT.into(), "cleanup".into());
        });
        not_ours(&|j| j.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-0".into());
        not_ours(&|j| j.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false));
        not_ours(&|j| j.metadata.owner_references = None);
        not_ours(&|j| {
            j.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
        });
        assert_eq!(superseded_names(&jobs), ["old-running"]);
        // An app without a uid (never read from the API server) deletes nothing.
        assert!(superseded_jobs(&jobs, "demo", None, CURRENT).is_empty());
    }

    #[test]
    fn a_job_without_the_full_id_is_judged_by_its_label_and_without_either_left_alone() {
        let bare = |name: &str, short: Option<&str>| {
            let mut job = app_job(name, OLD, None);
            job.metadata.annotations = None;
            let labels = job.metadata.labels.as_mut().unwrap();
            match short {
                Some(s) => labels.insert(labels::CHECKPOINT_ID.into(), s.into()),
                None => labels.remove(labels::CHECKPOINT_ID),
            };
            job
        };
        let jobs = [
            bare("by-label-old", Some(crate::checkpoint_id::short(OLD))),
            bare(
                "by-label-current",
                Some(crate::checkpoint_id::short(CURRENT)),
            ),
            bare("no-id", None),
        ];
        assert_eq!(superseded_names(&jobs), ["by-label-old"]);
    }

    #[test]
    fn a_running_job_names_a_failed_pod_it_retries() {
        let pods = [ended_pod(
            "a",
            "2027-01-15T08:00:00Z",
            &failure("OutOfMemory"),
        )];
        let d = decide_with(None, Some(&job(None)), &pods, t(5));
        assert_eq!(
            d.progress,
            CheckpointProgress::Running {
                attempt: 0,
                last_failure: Some("OutOfMemory: OutOfMemory happened".into())
            }
        );
        assert!(!d.start_job);
    }
}
