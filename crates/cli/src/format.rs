//! Formatting for `kubectl crac`: no I/O, everything takes `now` so tests are exact.

use crac_api::CracApp;
use crac_api::agent::AgentSummary;
use crac_api::cracapp::{Phase, SleepMode};
use k8s_openapi::jiff::Timestamp;
use std::fmt::Write;

/// `kubectl`-style age: `45s`, `12m`, `3h20m`, `5d`; `<unknown>` in the future or unset.
pub fn age(since: Option<Timestamp>, now: Timestamp) -> String {
    let Some(since) = since else {
        return "-".into();
    };
    let secs = now.duration_since(since).as_secs();
    if secs < 0 {
        return "<future>".into();
    }
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 10 * 3600 => match (s % 3600) / 60 {
            0 => format!("{}h", s / 3600),
            m => format!("{}h{m}m", s / 3600),
        },
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A byte count in binary units with one decimal: `512B`, `56.3Mi`, `1.5Gi`.
pub fn size(bytes: Option<u64>) -> String {
    let Some(bytes) = bytes else {
        return "-".into();
    };
    const UNITS: [&str; 4] = ["Ki", "Mi", "Gi", "Ti"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Columns aligned like kubectl's tables: two spaces between columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// The `kubectl crac status` table.
pub fn status_table(apps: &[CracApp], all_namespaces: bool, now: Timestamp) -> String {
    let mut header = vec![];
    if all_namespaces {
        header.push("NAMESPACE");
    }
    header.extend([
        "NAME",
        "PHASE",
        "READY",
        "CHECKPOINT",
        "SIZE",
        "LAST ACTIVITY",
        "LAST WAKE",
    ]);
    let rows: Vec<Vec<String>> = apps
        .iter()
        .map(|app| {
            let status = app.status.clone().unwrap_or_default();
            let mut row = vec![];
            if all_namespaces {
                row.push(app.metadata.namespace.clone().unwrap_or_default());
            }
            let checkpoint = status.checkpoint.as_ref();
            row.extend([
                app.metadata.name.clone().unwrap_or_default(),
                match (status.phase, status.sleep_mode) {
                    // Its pods are there, each with only its agent: say so.
                    (Some(Phase::ScaledToZero), Some(SleepMode::InPlace)) => {
                        "ScaledToZero (in place)".into()
                    }
                    (Some(p), _) => p.as_str().to_string(),
                    (None, _) => "Pending".into(),
                },
                format!("{}/{}", status.ready_replicas, app.spec.replicas),
                checkpoint
                    .map(|c| age(c.created_at.as_ref().map(|t| t.0), now))
                    .unwrap_or_else(|| "-".into()),
                size(checkpoint.and_then(|c| c.size_bytes)),
                age(status.last_activity_time.as_ref().map(|t| t.0), now),
                status
                    .last_wake
                    .as_ref()
                    .map(|w| {
                        let split = match (w.outcome.as_deref(), w.restore_ms) {
                            (Some("coldStarted"), Some(ms)) => format!(", cold start {ms}ms"),
                            (Some(_), Some(ms)) => format!(", restore {ms}ms"),
                            _ => String::new(),
                        };
                        match w.latency_ms {
                            Some(ms) => format!("{} ago ({ms}ms{split})", age(Some(w.at.0), now)),
                            None => format!("{} ago", age(Some(w.at.0), now)),
                        }
                    })
                    .unwrap_or_else(|| "-".into()),
            ]);
            row
        })
        .collect();
    table(&header, &rows)
}

/// An Event as `explain` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct EventLine {
    pub time: Option<Timestamp>,
    pub type_: String,
    pub reason: String,
    pub message: String,
}

/// A checkpoint pod's end, as the agent reported it in its termination message.
#[derive(Clone, Debug, PartialEq)]
pub struct PodReport {
    pub pod: String,
    pub phase: String,
    /// The raw termination message (JSON [`AgentSummary`] from the agent, or plain text).
    pub message: Option<String>,
}

/// The agent's one-line reason out of a termination message.
pub fn agent_reason(message: &str) -> String {
    match serde_json::from_str::<AgentSummary>(message) {
        Ok(summary) => match (summary.reason, summary.message) {
            (Some(r), Some(m)) => format!("{r}: {m}"),
            (Some(r), None) => r,
            (None, Some(m)) => m,
            (None, None) => message.trim().to_string(),
        },
        Err(_) => message.trim().to_string(),
    }
}

/// Why an app is (not) Ready: phase, conditions, recent Events, the checkpoint pods' reports,
/// and what to look at next.
pub fn explain(app: &CracApp, events: &[EventLine], pods: &[PodReport], now: Timestamp) -> String {
    let name = app.metadata.name.clone().unwrap_or_default();
    let ns = app.metadata.namespace.clone().unwrap_or_default();
    let status = app.status.clone().unwrap_or_default();
    let mut out = String::new();
    let phase = status.phase.map(|p| p.as_str()).unwrap_or("Pending");
    let _ = writeln!(out, "CracApp {ns}/{name}: {phase}");
    if status.phase.is_none() {
        let _ = writeln!(
            out,
            "  The operator has not written a status yet. Is it running? \
             kubectl -n crac-system get deploy crac-operator"
        );
    }
    if status.observed_generation.is_some() && status.observed_generation != app.metadata.generation
    {
        let _ = writeln!(
            out,
            "  The status describes an older spec (generation {:?}, now {:?}); the operator has not caught up yet.",
            status.observed_generation, app.metadata.generation
        );
    }
    let _ = writeln!(
        out,
        "  ready {}/{} pods",
        status.ready_replicas, app.spec.replicas
    );
    if let Some(c) = &status.checkpoint {
        let trial = c
            .trial_restore_ms
            .map(|ms| format!(", trial restore {ms} ms"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  checkpoint {} ({}, {} old{trial})",
            c.id.chars().take(12).collect::<String>(),
            size(c.size_bytes),
            age(c.created_at.as_ref().map(|t| t.0), now)
        );
        let _ = match &c.app_image {
            Some(image) => writeln!(out, "  restore pods run {image}, the image it checkpointed"),
            None => writeln!(
                out,
                "  restore pods run the spec's image tag: no repository digest was reported for it"
            ),
        };
    }
    if let Some(p) = &status.pending_checkpoint {
        let _ = writeln!(
            out,
            "  checkpoint {} in progress ({} failed attempts)",
            p.id.chars().take(12).collect::<String>(),
            p.failures
        );
    }

    out.push_str("\nConditions:\n");
    if status.conditions.is_empty() {
        out.push_str("  (none)\n");
    }
    for c in &status.conditions {
        let mark = if condition_healthy(&c.type_, &c.status) {
            "✓"
        } else {
            "✗"
        };
        let _ = writeln!(out, "  {mark} {} {}: {}", c.type_, c.reason, c.message);
    }

    out.push_str("\nRecent events:\n");
    if events.is_empty() {
        out.push_str("  (none)\n");
    }
    let mut sorted = events.to_vec();
    sorted.sort_by_key(|e| e.time);
    for e in sorted.iter().rev().take(10).rev() {
        let _ = writeln!(
            out,
            "  {:>6} ago  {:<7}  {}: {}",
            age(e.time, now),
            e.type_,
            e.reason,
            e.message
        );
    }

    let failed: Vec<&PodReport> = pods.iter().filter(|p| p.phase == "Failed").collect();
    if !failed.is_empty() {
        out.push_str("\nCheckpoint pods that failed (the agent's reason):\n");
        for p in failed {
            let reason = p
                .message
                .as_deref()
                .map(agent_reason)
                .unwrap_or_else(|| "no termination message (the container was killed: out of memory, or the node went away?)".into());
            let _ = writeln!(out, "  {}: {reason}", p.pod);
        }
    }
    let running: Vec<&PodReport> = pods
        .iter()
        .filter(|p| p.phase == "Running" || p.phase == "Pending")
        .collect();
    if !running.is_empty() {
        let _ = writeln!(
            out,
            "\nA checkpoint is being taken: kubectl -n {ns} logs -f {}",
            running[0].pod
        );
    }
    let _ = writeln!(
        out,
        "\nEach reason and its remedy: docs/troubleshooting.md. More detail: kubectl -n {ns} describe cracapp {name}"
    );
    out
}

/// Whether a condition's status is the healthy one: `Degraded` is healthy when False, and
/// `ScaledToZero` either way (asleep is a state, not a fault); the others when True.
fn condition_healthy(type_: &str, status: &str) -> bool {
    match type_ {
        crac_api::conditions::DEGRADED => status == "False",
        crac_api::conditions::SCALED_TO_ZERO => status == "True" || status == "False",
        _ => status == "True",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn t(secs_ago: i64, now: Timestamp) -> Option<Timestamp> {
        Some(now - SignedDuration::from_secs(secs_ago))
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = Timestamp::now();
        assert_eq!(age(t(45, now), now), "45s");
        assert_eq!(age(t(600, now), now), "10m");
        assert_eq!(age(t(3 * 3600 + 20 * 60, now), now), "3h20m");
        assert_eq!(age(t(3 * 3600, now), now), "3h");
        assert_eq!(age(t(30 * 3600, now), now), "30h");
        assert_eq!(age(t(5 * 86400, now), now), "5d");
        assert_eq!(age(None, now), "-");
        assert_eq!(age(t(-60, now), now), "<future>");
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(size(Some(512)), "512B");
        assert_eq!(size(Some(59_000_000)), "56.3Mi");
        assert_eq!(size(Some(3 * 1024 * 1024 * 1024 / 2)), "1.5Gi");
        assert_eq!(size(None), "-");
    }

    fn app(name: &str, status: serde_json::Value) -> CracApp {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "crac.dev/v1alpha1", "kind": "CracApp",
            "metadata": { "name": name, "namespace": "shop", "generation": 1 },
            "spec": { "replicas": 2, "template": { "spec": { "containers": [{ "name": "app", "image": "x" }] } } },
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn the_status_table_has_one_aligned_row_per_app() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let apps = [
            app(
                "demo",
                serde_json::json!({
                    "phase": "Ready", "readyReplicas": 2, "replicas": 2,
                    "checkpoint": { "id": "abc", "createdAt": "2026-11-24T11:00:00Z", "sizeBytes": 59000000 },
                    "lastActivityTime": "2026-11-24T11:59:30Z",
                    "lastWake": { "at": "2026-11-24T11:50:00Z", "latencyMs": 180 }
                }),
            ),
            app("new", serde_json::json!({})),
        ];
        let out = status_table(&apps, false, now);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "NAME  PHASE    READY  CHECKPOINT  SIZE    LAST ACTIVITY  LAST WAKE"
        );
        assert_eq!(
            lines[1],
            "demo  Ready    2/2    1h          56.3Mi  30s            10m ago (180ms)"
        );
        assert_eq!(
            lines[2],
            "new   Pending  0/2    -           -       -              -"
        );
        assert!(status_table(&apps, true, now).starts_with("NAMESPACE  NAME"));
        // With the woken pod's split.
        let split = app(
            "web",
            serde_json::json!({
                "lastWake": { "at": "2026-11-24T11:50:00Z", "latencyMs": 900,
                              "outcome": "restored", "restoreMs": 140 }
            }),
        );
        assert!(
            status_table(&[split], false, now).contains("10m ago (900ms, restore 140ms)"),
            "{}",
            status_table(&[], false, now)
        );
        // Asleep in place.
        let dozing = app(
            "doze",
            serde_json::json!({ "phase": "ScaledToZero", "sleepMode": "InPlace" }),
        );
        let recreated = app("nap", serde_json::json!({ "phase": "ScaledToZero" }));
        let out = status_table(&[dozing, recreated], false, now);
        assert!(out.contains("doze  ScaledToZero (in place)"), "{out}");
        assert!(out.contains("nap   ScaledToZero  "), "{out}");
    }

    #[test]
    fn the_agents_reason_is_read_from_its_json_report_or_taken_as_text() {
        assert_eq!(
            agent_reason(
                r#"{"outcome":"failed","reason":"OutOfMemory","message":"the JVM was killed"}"#
            ),
            "OutOfMemory: the JVM was killed"
        );
        assert_eq!(agent_reason("plain words\n"), "plain words");
    }

    #[test]
    fn negative_conditions_are_healthy_when_false() {
        assert!(condition_healthy("CheckpointReady", "True"));
        assert!(!condition_healthy("CheckpointReady", "False"));
        assert!(condition_healthy("Degraded", "False"));
        assert!(!condition_healthy("Degraded", "True"));
        assert!(condition_healthy("ScaledToZero", "False"));
        assert!(condition_healthy("ScaledToZero", "True"));
        assert!(!condition_healthy("Available", "Unknown"));
    }

    #[test]
    fn explain_says_which_image_restore_pods_run() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let with = |checkpoint: serde_json::Value| {
            let a = app("demo", serde_json::json!({ "checkpoint": checkpoint }));
            explain(&a, &[], &[], now)
        };
        let pinned = format!("x@sha256:{}", "a".repeat(64));
        let out = with(serde_json::json!({ "id": "0123456789abcdef", "appImage": pinned }));
        assert!(
            out.contains(&format!(
                "restore pods run {pinned}, the image it checkpointed"
            )),
            "{out}"
        );
        let out = with(serde_json::json!({ "id": "0123456789abcdef" }));
        assert!(
            out.contains("restore pods run the spec's image tag"),
            "{out}"
        );
    }

    #[test]
    fn explain_shows_conditions_events_and_the_failed_pods_reason() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let a = app(
            "demo",
            serde_json::json!({
                "phase": "Failed", "observedGeneration": 1,
                "conditions": [{ "type": "CheckpointReady", "status": "False", "reason": "AgentFailed",
                                 "message": "the JVM exited", "lastTransitionTime": "2026-11-24T11:00:00Z" }],
                "pendingCheckpoint": { "id": "0123456789abcdef", "failures": 2 }
            }),
        );
        let events = [EventLine {
            time: t(120, now),
            type_: "Warning".into(),
            reason: "AgentFailed".into(),
            message: "attempt 3 starts in 120s".into(),
        }];
        let pods = [PodReport {
            pod: "demo-ckpt-1".into(),
            phase: "Failed".into(),
            message: Some(
                r#"{"outcome":"failed","reason":"JvmExited","message":"exit code 1"}"#.into(),
            ),
        }];
        let out = explain(&a, &events, &pods, now);
        assert!(out.starts_with("CracApp shop/demo: Failed\n"), "{out}");
        assert!(
            out.contains("✗ CheckpointReady AgentFailed: the JVM exited"),
            "{out}"
        );
        assert!(
            out.contains("0123456789ab in progress (2 failed attempts)"),
            "{out}"
        );
        assert!(
            out.contains("2m ago  Warning  AgentFailed: attempt 3 starts in 120s"),
            "{out}"
        );
        assert!(out.contains("demo-ckpt-1: JvmExited: exit code 1"), "{out}");
        assert!(out.contains("docs/troubleshooting.md"), "{out}");
    }

    #[test]
    fn explain_shows_the_images_trial_restore() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let a = app(
            "demo",
            serde_json::json!({
                "phase": "Ready", "observedGeneration": 1,
                "checkpoint": { "id": "0123456789abcdef", "sizeBytes": 104857600,
                                "createdAt": "2026-11-24T11:00:00Z", "trialRestoreMs": 212 }
            }),
        );
        let out = explain(&a, &[], &[], now);
        assert!(
            out.contains("checkpoint 0123456789ab (") && out.contains("trial restore 212 ms)"),
            "{out}"
        );
    }
}
