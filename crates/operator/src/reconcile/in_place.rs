//! The apply step's part for an app that sleeps in place: the calls to the pods' agents, the
//! in-place resizes and the marks, as [`crate::in_place::work`] decided. A pod that cannot be
//! woken in place is deleted, and the Deployment replaces it with one that restores at start
//! (today's wake); a pod that cannot be put to sleep is tried again at the next look.

use super::cycle::AppKey;
use super::decide::{InPlaceRun, Note};
use super::patch_params;
use crate::agent_control::{self, CallFailure};
use crate::context::Context;
use crate::in_place::{Requests, Target};
use crac_api::agent::{SLEEP_PATH, WAKE_PATH};
use crac_api::cracapp::APP_CONTAINER;
use crac_api::labels;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch};
use std::time::Duration;
use tracing::{info, warn};

/// How long a `/sleep` may take: the agent may finish a wake first.
const SLEEP_LIMIT: Duration = Duration::from_secs(30);

/// Carries out `run` on the pods of the app `key`; returns Events for what went wrong.
pub async fn carry_out(ctx: &Context, key: &AppKey, run: &InPlaceRun) -> Vec<Note> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.0);
    let mut notes = Vec::new();
    let w = &run.work;

    let slept = futures::future::join_all(
        w.sleep
            .iter()
            .map(|(t, _)| agent_control::call(&t.ip, SLEEP_PATH, &run.token, SLEEP_LIMIT)),
    )
    .await;
    for ((target, shrink), answer) in w.sleep.iter().zip(slept) {
        match answer {
            Ok(a) => {
                info!(pod = %target.pod, ms = ?a.sleep_ms, "pod asleep in place");
                // How it starts next is for its agent to say again after the wake.
                ctx.restore_starts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(key);
                if let Some(small) = shrink
                    && let Err(e) = resize(&pods, &target.pod, small).await
                {
                    // Asleep but still holding its requests: said once, not retried (the mark
                    // below makes it a sleeping pod).
                    notes.push(warning(
                        "ResizeFailed",
                        format!(
                            "pod {} sleeps in place but keeps its requests: resizing it failed: {e}",
                            target.pod
                        ),
                    ));
                }
                if let Err(e) = mark(&pods, &target.pod, true).await {
                    warn!(pod = %target.pod, error = %e, "marking a sleeping pod failed");
                }
            }
            // Its agent is not up yet (a pod restoring at start), or an older pod: next look.
            Err(e) => info!(pod = %target.pod, error = %e, "pod not put to sleep yet"),
        }
    }

    for left in &w.grow {
        if let Err(e) = resize(&pods, &left.pod, &left.requests).await {
            warn!(pod = %left.pod, error = %e, "growing a woken pod back failed; will retry");
        }
    }
    // Grown first: the scheduler's account is right before the JVM is back.
    for (target, grow) in &w.wake {
        if let Some(requests) = grow
            && let Err(e) = resize(&pods, &target.pod, requests).await
        {
            warn!(pod = %target.pod, error = %e, "growing a pod back failed; will retry");
        }
    }
    let woken = futures::future::join_all(
        w.wake
            .iter()
            .map(|(t, _)| agent_control::call(&t.ip, WAKE_PATH, &run.token, run.wake_limit)),
    )
    .await;
    for ((target, _), answer) in w.wake.iter().zip(woken) {
        match answer {
            Ok(a) => {
                info!(pod = %target.pod, mode = %a.mode, ms = ?a.restore_ms, "pod awake in place");
                if let Err(e) = mark(&pods, &target.pod, false).await {
                    warn!(pod = %target.pod, error = %e, "unmarking a woken pod failed");
                }
            }
            // The agent is ending after a wake that could neither restore nor start cold: the
            // kubelet restarts the container, which restores at start.
            Err(CallFailure::Failed(503, body)) => notes.push(warning(
                "WakeInPlaceFailed",
                format!(
                    "pod {}: the wake in place failed ({body}); its container restarts",
                    target.pod
                ),
            )),
            // Still restoring, slower than the wake timeout: left to finish (held requests
            // got their 503 already); the next look asks again.
            Err(e @ CallFailure::TimedOut(_)) => {
                warn!(pod = %target.pod, error = %e, "a wake in place is slow");
            }
            Err(e) => notes.push(replace(&pods, target, &e).await),
        }
    }
    notes
}

/// Deletes a pod that cannot be woken in place (its node gone, its agent dead, no token): the
/// Deployment replaces it with a pod that restores at start.
async fn replace(pods: &Api<Pod>, target: &Target, why: &CallFailure) -> Note {
    let outcome = match pods.delete(&target.pod, &DeleteParams::default()).await {
        Ok(_) => "deleted; its replacement restores at start".to_string(),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            "deleted; its replacement restores at start".to_string()
        }
        Err(e) => format!("deleting it failed too: {e}"),
    };
    warning(
        "WakeInPlaceFellBack",
        format!(
            "pod {} could not be woken in place: {why}; {outcome}",
            target.pod
        ),
    )
}

fn warning(reason: &str, message: String) -> Note {
    Note {
        warning: true,
        reason: reason.into(),
        message,
    }
}

/// Sets the app container's requests in place (the `resize` subresource; limits unchanged).
async fn resize(pods: &Api<Pod>, pod: &str, requests: &Requests) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "spec": { "containers": [
        { "name": APP_CONTAINER, "resources": { "requests": requests } }
    ] } });
    pods.patch_subresource("resize", pod, &patch_params(), &Patch::Strategic(patch))
        .await
        .map(|_| ())
}

/// Marks a pod asleep in place (now), or removes the mark.
async fn mark(pods: &Api<Pod>, pod: &str, asleep: bool) -> Result<(), kube::Error> {
    let value = asleep.then(|| k8s_openapi::jiff::Timestamp::now().to_string());
    let patch = serde_json::json!({ "metadata": { "annotations": {
        labels::ASLEEP_IN_PLACE_SINCE: value
    } } });
    pods.patch(pod, &patch_params(), &Patch::Merge(patch))
        .await
        .map(|_| ())
}
