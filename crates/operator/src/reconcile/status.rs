//! Status from observations: the phase, the conditions and the Events to publish, computed
//! without a cluster, from a [`StatusInput`] the decide step fills in.

use crac_api::cracapp::Phase;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub use crac_api::conditions::{AVAILABLE, CHECKPOINT_READY, DEGRADED, SCALED_TO_ZERO};

/// Where the checkpoint for the current spec stands.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckpointProgress {
    /// The pods' image was taken from the current spec.
    Current,
    /// The spec cannot be acted on; the message names the field.
    /// `reason` is `InvalidSpec`, or `Forbidden` for a template asking for more than restore
    /// needs.
    InvalidSpec { reason: String, message: String },
    /// The volume for images is not usable; retried slowly, not in a hot loop.
    StorageProblem { reason: String, message: String },
    /// A checkpoint Job runs. `last_failure` is the agent's reason from a failed pod of
    /// this Job, which the job controller is retrying.
    Running {
        attempt: i32,
        last_failure: Option<String>,
    },
    /// The last Job failed; another starts after a backoff.
    Failed {
        failures: i32,
        reason: String,
        message: String,
    },
}

/// The restore Deployment as observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    pub wanted: i32,
    pub replicas: i32,
    pub ready: i32,
    /// Pods running the current template.
    pub updated: i32,
}

/// Everything the status depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusInput {
    pub generation: Option<i64>,
    pub checkpoint: CheckpointProgress,
    /// Whether any image is published (the pods' one, possibly older than the spec).
    pub has_image: bool,
    pub rollout: Option<Rollout>,
    pub asleep: bool,
}

pub fn phase_for(o: &StatusInput) -> Phase {
    match (&o.checkpoint, o.has_image) {
        (CheckpointProgress::InvalidSpec { .. }, false) => Phase::Failed,
        (CheckpointProgress::StorageProblem { .. }, false) => Phase::Pending,
        (CheckpointProgress::Failed { .. }, false) => Phase::Failed,
        (_, false) => Phase::Checkpointing,
        (_, true) if o.asleep => Phase::ScaledToZero,
        (_, true) => match &o.rollout {
            Some(r) if r.ready >= r.wanted && r.updated >= r.wanted => Phase::Ready,
            _ => Phase::Restoring,
        },
    }
}

/// One condition as it should be, before transition times are settled.
fn cond(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: None,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

pub fn conditions_for(o: &StatusInput, previous: &[Condition], now: Timestamp) -> Vec<Condition> {
    let checkpoint = match &o.checkpoint {
        CheckpointProgress::Current => cond(
            CHECKPOINT_READY,
            true,
            "CheckpointPublished",
            "the pods restore from an image of the current spec",
        ),
        CheckpointProgress::InvalidSpec { reason, message } => {
            cond(CHECKPOINT_READY, false, reason, message.clone())
        }
        CheckpointProgress::StorageProblem { reason, message } => {
            cond(CHECKPOINT_READY, false, reason, message.clone())
        }
        CheckpointProgress::Running {
            attempt,
            last_failure: None,
        } => cond(
            CHECKPOINT_READY,
            false,
            "Checkpointing",
            format!("checkpoint Job running (attempt {})", attempt + 1),
        ),
        CheckpointProgress::Running {
            attempt,
            last_failure: Some(why),
        } => cond(
            CHECKPOINT_READY,
            false,
            "CheckpointRetrying",
            format!("attempt {} is retrying a failed pod: {why}", attempt + 1),
        ),
        CheckpointProgress::Failed {
            reason, message, ..
        } => cond(CHECKPOINT_READY, false, reason, message.clone()),
    };
    let available = match (&o.rollout, o.asleep) {
        (_, true) => cond(
            AVAILABLE,
            true,
            "ScaledToZero",
            "asleep; the first request wakes the app",
        ),
        (Some(r), _) if r.ready > 0 => cond(
            AVAILABLE,
            true,
            "PodsReady",
            format!("{} of {} pods ready", r.ready, r.wanted),
        ),
        (Some(r), _) if r.wanted == 0 => cond(AVAILABLE, false, "ScaledDown", "replicas is 0"),
        (Some(_), _) => cond(AVAILABLE, false, "Restoring", "no pod is ready yet"),
        (None, _) => cond(
            AVAILABLE,
            false,
            "NoImage",
            "waiting for the first checkpoint image",
        ),
    };
    let degraded = match (&o.checkpoint, o.has_image) {
        (
            CheckpointProgress::Failed {
                reason, message, ..
            },
            true,
        ) => cond(
            DEGRADED,
            true,
            reason,
            format!("still serving the previous image: {message}"),
        ),
        (CheckpointProgress::InvalidSpec { reason, message }, true) => cond(
            DEGRADED,
            true,
            reason,
            format!("still serving the previous image: {message}"),
        ),
        _ => cond(DEGRADED, false, "AsExpected", ""),
    };
    let asleep = if o.asleep {
        cond(SCALED_TO_ZERO, true, "Idle", "no traffic; scaled to zero")
    } else {
        cond(SCALED_TO_ZERO, false, "Awake", "")
    };
    [checkpoint, available, degraded, asleep]
        .into_iter()
        .map(|mut c| {
            c.observed_generation = o.generation;
            c.last_transition_time = match previous.iter().find(|p| p.type_ == c.type_) {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => Time(now),
            };
            c
        })
        .collect()
}

/// An Event to publish for a condition that changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// Events for every condition whose status changed, and for a bad condition whose reason or
/// message changed (a second failed attempt is news too). A healthy condition's new wording
/// is not news (`PodsReady` "1 of 2" then "2 of 2", `NoImage` then `Restoring`): it is in the
/// status, and an Event each would cost a request per app for nothing.
pub fn transitions(previous: &[Condition], next: &[Condition]) -> Vec<Transition> {
    next.iter()
        .filter(|c| match previous.iter().find(|p| p.type_ == c.type_) {
            None => c.status == "True" || c.type_ == CHECKPOINT_READY,
            Some(p) if p.status != c.status => true,
            Some(p) => is_bad(c) && (p.reason != c.reason || p.message != c.message),
        })
        .filter(|c| !(c.type_ == DEGRADED && c.status == "False" && previous.is_empty()))
        .filter(|c| !(c.type_ == SCALED_TO_ZERO && c.status == "False" && previous.is_empty()))
        .map(|c| Transition {
            warning: is_bad(c),
            reason: c.reason.clone(),
            note: if c.message.is_empty() {
                format!("{} is {}", c.type_, c.status)
            } else {
                c.message.clone()
            },
        })
        .collect()
}

fn is_bad(c: &Condition) -> bool {
    match c.type_.as_str() {
        DEGRADED => c.status == "True",
        CHECKPOINT_READY => !matches!(c.reason.as_str(), "CheckpointPublished" | "Checkpointing"),
        _ => false,
    }
}

/// Wait before checkpoint attempt number `failures + 1`: `base` doubling with each failure,
/// at most 60 times `base` (30 s to 30 min by default).
pub fn retry_backoff(failures: i32, base: std::time::Duration) -> std::time::Duration {
    let exp = u32::try_from(failures.clamp(1, 7) - 1).unwrap_or(0);
    (base * (1u32 << exp)).min(base * 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(
        checkpoint: CheckpointProgress,
        has_image: bool,
        rollout: Option<Rollout>,
    ) -> StatusInput {
        StatusInput {
            generation: Some(3),
            checkpoint,
            has_image,
            rollout,
            asleep: false,
        }
    }

    fn rollout(wanted: i32, ready: i32, updated: i32) -> Option<Rollout> {
        Some(Rollout {
            wanted,
            replicas: wanted,
            ready,
            updated,
        })
    }

    #[test]
    fn phases_follow_the_flow() {
        let running = CheckpointProgress::Running {
            attempt: 0,
            last_failure: None,
        };
        assert_eq!(
            phase_for(&observed(running.clone(), false, None)),
            Phase::Checkpointing
        );
        assert_eq!(
            phase_for(&observed(
                CheckpointProgress::Current,
                true,
                rollout(2, 1, 2)
            )),
            Phase::Restoring
        );
        assert_eq!(
            phase_for(&observed(
                CheckpointProgress::Current,
                true,
                rollout(2, 2, 2)
            )),
            Phase::Ready
        );
        // A new checkpoint in progress while old pods serve: still Ready.
        assert_eq!(
            phase_for(&observed(running, true, rollout(2, 2, 2))),
            Phase::Ready
        );
        let failed = CheckpointProgress::Failed {
            failures: 1,
            reason: "ReadinessTimeout".into(),
            message: "m".into(),
        };
        assert_eq!(phase_for(&observed(failed, false, None)), Phase::Failed);
        let storage = CheckpointProgress::StorageProblem {
            reason: "StorageClassNotFound".into(),
            message: "m".into(),
        };
        assert_eq!(phase_for(&observed(storage, false, None)), Phase::Pending);
        let mut asleep = observed(CheckpointProgress::Current, true, rollout(0, 0, 0));
        asleep.asleep = true;
        assert_eq!(phase_for(&asleep), Phase::ScaledToZero);
    }

    #[test]
    fn failure_reason_and_message_reach_the_condition_and_degrade_a_serving_app() {
        let failed = CheckpointProgress::Failed {
            failures: 2,
            reason: "OpenFiles".into(),
            message: "the JVM held /tmp/x open".into(),
        };
        let conds = conditions_for(
            &observed(failed, true, rollout(1, 1, 1)),
            &[],
            Timestamp::now(),
        );
        let ckpt = conds.iter().find(|c| c.type_ == CHECKPOINT_READY).unwrap();
        assert_eq!(
            (ckpt.status.as_str(), ckpt.reason.as_str()),
            ("False", "OpenFiles")
        );
        assert!(ckpt.message.contains("/tmp/x"));
        let degraded = conds.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(degraded.status, "True");
        assert!(conds.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let running = observed(
            CheckpointProgress::Running {
                attempt: 0,
                last_failure: None,
            },
            false,
            None,
        );
        let first = conditions_for(&running, &[], t0);
        let again = conditions_for(&running, &first, t1);
        assert_eq!(first, again, "an unchanged status is written identically");
        let done = conditions_for(
            &observed(CheckpointProgress::Current, true, rollout(1, 1, 1)),
            &first,
            t1,
        );
        let ckpt = done.iter().find(|c| c.type_ == CHECKPOINT_READY).unwrap();
        assert_eq!(ckpt.last_transition_time.0, t1);
    }

    #[test]
    fn events_only_for_changes() {
        let t = Timestamp::now();
        let running = observed(
            CheckpointProgress::Running {
                attempt: 0,
                last_failure: None,
            },
            false,
            None,
        );
        let first = conditions_for(&running, &[], t);
        let events = transitions(&[], &first);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].reason, "Checkpointing");
        assert!(!events[0].warning);
        assert!(transitions(&first, &first).is_empty());
        let failed = observed(
            CheckpointProgress::Failed {
                failures: 1,
                reason: "ReadinessTimeout".into(),
                message: "no answer".into(),
            },
            false,
            None,
        );
        let next = conditions_for(&failed, &first, t);
        let events = transitions(&first, &next);
        assert!(
            events
                .iter()
                .any(|e| e.warning && e.reason == "ReadinessTimeout" && e.note == "no answer")
        );
    }

    #[test]
    fn a_healthy_conditions_new_wording_is_no_event_but_a_new_failure_is() {
        let t = Timestamp::now();
        let at = |ready, failure: Option<&str>| {
            let checkpoint = match failure {
                None => CheckpointProgress::Current,
                Some(m) => CheckpointProgress::Failed {
                    failures: 1,
                    reason: "OpenSockets".into(),
                    message: m.into(),
                },
            };
            conditions_for(&observed(checkpoint, true, rollout(2, ready, 2)), &[], t)
        };
        let reasons = |from: Vec<Condition>, to: Vec<Condition>| -> Vec<String> {
            transitions(&from, &to)
                .into_iter()
                .map(|e| e.reason)
                .collect()
        };
        assert!(
            reasons(at(1, None), at(2, None)).is_empty(),
            "1 of 2 then 2 of 2"
        );
        assert_eq!(
            reasons(at(2, None), at(0, None)),
            ["Restoring"],
            "no pod ready: news"
        );
        assert_eq!(
            reasons(at(2, Some("a")), at(2, Some("b"))),
            ["OpenSockets", "OpenSockets"],
            "a new failure message, on CheckpointReady and Degraded"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = std::time::Duration::from_secs(30);
        assert_eq!(retry_backoff(1, base).as_secs(), 30);
        assert_eq!(retry_backoff(2, base).as_secs(), 60);
        assert_eq!(retry_backoff(3, base).as_secs(), 120);
        assert_eq!(retry_backoff(50, base).as_secs(), 1800);
    }
}
