//! Reading the agent's report back from a checkpoint pod: the one-line JSON summary it
//! writes to the termination message (see `crac_api::agent`), or what Kubernetes knows when
//! the agent could not write one (killed, out of memory, image pull failure).
//!
//! The termination message is written from inside the app's container, so the app can write
//! anything there: every field is bounded before it reaches a condition, an Event, the status
//! or a metric label.

use crac_api::agent::{AgentSummary, Outcome};
use crac_api::cracapp::APP_CONTAINER;
use k8s_openapi::api::core::v1::Pod;

/// Longest message copied into a condition (they are read in `kubectl describe`).
const MAX_MESSAGE: usize = 512;

/// The app container's summary, once it has terminated.
pub fn summary_of(pod: &Pod) -> Option<AgentSummary> {
    let status = pod.status.as_ref()?;
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == APP_CONTAINER)
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let Some(terminated) = terminated else {
        // The pod failed without the app container ending: evicted, deadline exceeded.
        if status.phase.as_deref() == Some("Failed") {
            return Some(AgentSummary {
                outcome: Some(Outcome::Failed),
                reason: Some(status.reason.clone().unwrap_or_else(|| "PodFailed".into())),
                message: Some(truncate(
                    status
                        .message
                        .as_deref()
                        .unwrap_or("the checkpoint pod failed"),
                )),
                ..Default::default()
            });
        }
        return None;
    };
    let raw = terminated.message.as_deref().unwrap_or("").trim();
    if let Ok(summary) = serde_json::from_str::<AgentSummary>(raw) {
        return Some(bounded(summary));
    }
    let ok = terminated.exit_code == 0;
    let reason = match terminated.reason.as_deref() {
        Some("OOMKilled") => "OutOfMemory".to_string(),
        _ if ok => "Completed".to_string(),
        _ => "AgentFailed".to_string(),
    };
    let message = if raw.is_empty() {
        format!(
            "the app container exited with code {} ({}) without a report from the agent",
            terminated.exit_code,
            terminated.reason.as_deref().unwrap_or("no reason")
        )
    } else {
        truncate(raw)
    };
    Some(AgentSummary {
        outcome: Some(if ok {
            Outcome::Checkpointed
        } else {
            Outcome::Failed
        }),
        reason: Some(reason),
        message: Some(message),
        exit_code: Some(terminated.exit_code),
        ..Default::default()
    })
}

/// What the kubelet reports as the app container's image (`imageID`): a repository digest,
/// a config digest, or whatever someone with `pods/status` rights wrote. Read only through
/// [`crate::image_ref`]; empty when there is none.
pub fn app_image_id(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == APP_CONTAINER))
        .map_or("", |c| c.image_id.as_str())
}

/// `(reason, message)` of a failed attempt, for conditions and Events.
pub fn failure_of(summary: &AgentSummary) -> (String, String) {
    (
        summary
            .reason
            .clone()
            .unwrap_or_else(|| "CheckpointFailed".into()),
        truncate(
            summary
                .message
                .as_deref()
                .unwrap_or("the checkpoint failed without a reason"),
        ),
    )
}

/// Longest reason kept; also the limit of a condition's reason in Kubernetes' own types.
const MAX_REASON: usize = 64;
/// Longest JDK version string kept.
const MAX_JDK: usize = 64;

/// A reason as conditions need it: CamelCase, letters and digits, at most 64 characters.
/// Anything else becomes `AgentFailed`.
pub fn sanitize_reason(raw: &str) -> String {
    let mut chars = raw.chars();
    let camel = chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
        && raw.len() <= MAX_REASON;
    if camel {
        raw.to_string()
    } else {
        "AgentFailed".to_string()
    }
}

/// The reason of a completed checkpoint whose summary has no valid image digest.
pub const DIGEST_MISSING: &str = "ImageDigestMissing";

/// The value of a metric's `reason` label: one of the known reasons, else `Other`, so an
/// app cannot grow the label's values without bound.
pub fn reason_label(reason: &str) -> &str {
    const OPERATOR_REASONS: [&str; 8] = [
        "AgentFailed",
        "CheckpointFailed",
        "Completed",
        "OutOfMemory",
        "PodFailed",
        "BackoffLimitExceeded",
        "DeadlineExceeded",
        DIGEST_MISSING,
    ];
    if crac_api::agent::reason::ALL.contains(&reason) || OPERATOR_REASONS.contains(&reason) {
        reason
    } else {
        "Other"
    }
}

/// A digest as restore pods are given it: `sha256:` and 64 lower-case hex digits.
pub fn valid_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `summary` with every text field bounded: the reason sanitised, messages cut to one short
/// line, a malformed digest dropped.
fn bounded(mut summary: AgentSummary) -> AgentSummary {
    summary.reason = summary.reason.as_deref().map(sanitize_reason);
    summary.message = summary.message.as_deref().map(truncate);
    summary.image_digest = summary.image_digest.filter(|d| valid_digest(d));
    summary.jdk = summary
        .jdk
        .filter(|j| j.len() <= MAX_JDK && j.chars().all(|c| c.is_ascii_graphic() || c == ' '));
    summary.engine = summary.engine.filter(|e| e.len() <= 16);
    summary.checkpoint_id = summary.checkpoint_id.filter(|i| i.len() <= 64);
    summary
}

fn truncate(text: &str) -> String {
    let line = text.lines().last().unwrap_or_default();
    match line.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(exit_code: i32, reason: &str, message: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "status": { "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
              "containerStatuses": [{ "name": "app", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": { "terminated": { "exitCode": exit_code, "reason": reason, "message": message } } }] }
        }))
        .unwrap()
    }

    #[test]
    fn agent_summary_is_read_from_the_termination_message() {
        let json = r#"{"outcome":"failed","reason":"ReadinessTimeout","message":"no answer on :8080 within 600s","checkpointId":"ab"}"#;
        let s = summary_of(&pod(1, "Error", json)).unwrap();
        assert_eq!(s.outcome, Some(Outcome::Failed));
        assert_eq!(
            failure_of(&s),
            (
                "ReadinessTimeout".into(),
                "no answer on :8080 within 600s".into()
            )
        );
    }

    #[test]
    fn whatever_the_app_writes_there_is_bounded() {
        let long = "x".repeat(5000);
        let json = serde_json::json!({
            "outcome": "failed",
            "reason": "Not a reason\nwith=label\"chars",
            "message": long,
            "jdk": "17\u{7}",
            "imageDigest": "sha256:../../etc",
        })
        .to_string();
        let s = summary_of(&pod(1, "Error", &json)).unwrap();
        assert_eq!(s.reason.as_deref(), Some("AgentFailed"));
        assert!(s.message.unwrap().chars().count() <= MAX_MESSAGE + 1);
        assert_eq!(s.jdk, None);
        assert_eq!(s.image_digest, None);
        assert_eq!(
            sanitize_reason(&format!("A{}", "b".repeat(64))),
            "AgentFailed"
        );
        assert_eq!(sanitize_reason("OpenSockets"), "OpenSockets");
        assert_eq!(reason_label("OpenSockets"), "OpenSockets");
        assert_eq!(reason_label("MadeUpButCamelCase"), "Other");
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!valid_digest(&format!("sha256:{}", "A".repeat(64))));
    }

    #[test]
    fn no_report_still_says_why() {
        let s = summary_of(&pod(137, "OOMKilled", "")).unwrap();
        let (reason, message) = failure_of(&s);
        assert_eq!(reason, "OutOfMemory");
        assert!(message.contains("137"), "{message}");
        let s = summary_of(&pod(
            1,
            "Error",
            "Exception in thread main\njava.lang.IllegalStateException: boom",
        ))
        .unwrap();
        assert_eq!(
            failure_of(&s).1,
            "java.lang.IllegalStateException: boom",
            "last log line kept"
        );
    }

    #[test]
    fn running_pod_has_no_summary() {
        let running: Pod =
            serde_json::from_value(serde_json::json!({"status": {"phase": "Running"}})).unwrap();
        assert!(summary_of(&running).is_none());
    }
}
