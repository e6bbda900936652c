//! What the benchmark drivers share: playing the agent's part in a checkpoint pod (no kubelet
//! runs containers on the bench control plane), reading a component's `/metrics`, and
//! percentiles.

use anyhow::{Context as _, Result};
use crac_api::agent::{AgentSummary, ENV_CHECKPOINT_ID, Outcome};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `q`-quantile of sorted samples (nearest rank: with 20 samples, p99 is the largest).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A `/metrics` text (HTTP/1.0, so the body ends when the connection closes).
pub async fn scrape(addr: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to the metrics at {addr}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .context("no HTTP body from /metrics")?;
    Ok(body)
}

/// Ends a checkpoint pod as the agent (and the kubelet) would on success, as
/// `tests/src/operator.rs` does: Succeeded, the agent's summary as the termination message.
pub async fn end_checkpoint_pod(pods: &Api<Pod>, pod: &str, id: &str) -> Result<()> {
    let summary = AgentSummary {
        outcome: Some(Outcome::Checkpointed),
        checkpoint_id: Some(id.into()),
        engine: Some("criu".into()),
        jdk: Some("17.0.15".into()),
        image_bytes: Some(59_000_000),
        checkpoint_ms: Some(900),
        ..Default::default()
    };
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = serde_json::json!({
        "status": {
            "phase": "Succeeded",
            "conditions": [{ "type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now }],
            "containerStatuses": [{
                "name": "app", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": { "terminated": {
                    "exitCode": 0, "reason": "Completed",
                    "message": serde_json::to_string(&summary)?,
                    "startedAt": now, "finishedAt": now
                }}
            }]
        }
    });
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

/// The checkpoint id the operator gave a checkpoint pod's app container.
pub fn checkpoint_id_of(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let app = spec.containers.iter().find(|c| c.name == "app")?;
    app.env
        .as_ref()?
        .iter()
        .find(|e| e.name == ENV_CHECKPOINT_ID)?
        .value
        .clone()
}
