//! What the benchmark drivers share beyond the tests' support (`crac_tests`, which plays the
//! agent's part in checkpoint pods, stands in for the activator's pod and the agent's activity
//! endpoint, and polls): the tests' helpers with their failures as errors, a namespace of
//! their own, reading a component's `/metrics`, and percentiles.

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};
use std::time::Duration;
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

/// [`crac_tests::poll`]: `check` every `every` until it returns `Some`; an error naming `what`
/// after `limit`.
pub async fn until<T, F, Fut>(what: &str, every: Duration, limit: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    crac_tests::poll(every, limit, check)
        .await
        .with_context(|| format!("timed out after {limit:?} waiting for {what}"))
}

/// Runs `helper` (one of the tests', which fail by panicking) as a task of its own, so that a
/// failure comes back as an error naming `what` and the driver can still clean up or go on.
pub async fn catch_panic<T, F>(what: &str, helper: F) -> Result<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(helper)
        .await
        .with_context(|| format!("{what} failed"))
}

/// Creates the namespace `name` (labelled `crac.dev/bench`) and waits until it admits pods
/// (its default ServiceAccount exists).
pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { "crac.dev/bench": "true" } }
    }))?;
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("create namespace {name} (left over from a run?)"))?;
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    until(
        &format!("the default ServiceAccount of {name}"),
        Duration::from_millis(100),
        Duration::from_secs(60),
        || async { sa.get_opt("default").await.ok().flatten() },
    )
    .await?;
    Ok(())
}
