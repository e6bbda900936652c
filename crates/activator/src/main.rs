//! `crac-activator`: parse flags, connect to the API server, run the watches, the listeners
//! and the admin port, and drain on SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use crac_activator::access::{Cidr, parse_cidrs};
use crac_activator::kube::{load_control_key, watch_apps, watch_callers, watch_pods};
use crac_activator::wake::KubeWaker;
use crac_activator::{Activator, Config, ConnectionLimits};

fn duration(text: &str) -> Result<Duration, String> {
    crac_api::duration::parse(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 30s, 500ms or 1m"))
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// `--trusted-callers`: one comma-separated value (so an empty one means none).
#[derive(Clone, Debug)]
struct Ranges(Vec<Cidr>);

fn ranges(text: &str) -> Result<Ranges, String> {
    parse_cidrs(text).map(Ranges)
}

/// Holds requests for CracApps scaled to zero, wakes them and forwards to their pods.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Kubeconfig to use; without it, the in-cluster service account (or $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG_PATH")]
    kubeconfig: Option<PathBuf>,
    /// Address the app ports are bound on.
    #[arg(long, default_value = "0.0.0.0", env = "CRAC_ACTIVATOR_LISTEN_ADDRESS")]
    listen_address: IpAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        default_value = "0.0.0.0:9090",
        env = "CRAC_ACTIVATOR_ADMIN_ADDRESS"
    )]
    admin_address: SocketAddr,
    /// Requests held per app at most; beyond it callers get 503 at once.
    #[arg(long, default_value_t = 1000)]
    max_queue: usize,
    /// Requests held across all apps at most; beyond it callers get 503 (with Retry-After) at
    /// once. Ten apps' full queues: per-app queues alone grow with the number of apps. The
    /// per-app --max-queue still applies.
    #[arg(long, default_value_t = 10_000)]
    max_held: usize,
    /// Caller connections open at once across all ports; beyond it new connections are closed
    /// at once (counted in crac_activator_connections_refused_total). A connection holding a
    /// head just under the default --max-header-bytes costs about 33 KiB (measured), so 4096 of
    /// them fit the chart's 256Mi limit; and far under a pod's file descriptor limit.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Deadline for a connection's first request (protocol detection included) and for each
    /// later HTTP/1.1 request head, idle keep-alive time included: a silent or trickling caller
    /// is closed after it.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    header_timeout: Duration,
    /// Largest HTTP/1.1 request head (larger: 431) and HTTP/2 header list, in bytes (at least
    /// 8192). JVM servers refuse heads over 8 KiB by default; this leaves room for apps that
    /// raised it.
    #[arg(long, default_value_t = 32 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    max_header_bytes: u32,
    /// A connection with no request open for this long is closed (HTTP/2: GOAWAY; idle
    /// HTTP/1.1 connections meet --header-timeout first). 0s: never.
    #[arg(long, default_value = "60s", value_parser = duration)]
    idle_timeout: Duration,
    /// HTTP/2 streams open at once on one connection (RFC 9113 advises at least 100).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    h2_max_concurrent_streams: u32,
    /// HTTP/2: ping a connection that sent nothing for this long. 0s: never.
    #[arg(long, default_value = "20s", value_parser = duration)]
    h2_keepalive_interval: Duration,
    /// HTTP/2: close a connection whose ping is not answered within this.
    #[arg(long, default_value = "20s", value_parser = positive_duration)]
    h2_keepalive_timeout: Duration,
    /// Wake deadline for apps that leave scaleToZero.wakeTimeout unset.
    #[arg(long, default_value = "30s", value_parser = duration)]
    default_wake_timeout: Duration,
    /// Retry-After sent with 503 responses.
    #[arg(long, default_value = "5s", value_parser = duration)]
    retry_after: Duration,
    /// Repeat a wake request still pending after this long.
    #[arg(long, default_value = "3s", value_parser = duration)]
    wake_resend_interval: Duration,
    /// Deadline for connecting to a pod.
    #[arg(long, default_value = "2s", value_parser = duration)]
    connect_timeout: Duration,
    /// After SIGTERM, how long to go on accepting and serving (with /readyz failing) before the
    /// listeners close: endpoints take a few seconds to stop sending traffic here, and a
    /// connection refused meanwhile is a request lost.
    #[arg(long, default_value = "5s", value_parser = duration)]
    shutdown_delay: Duration,
    /// After the shutdown delay, how long to wait for held and in-flight requests.
    #[arg(long, default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,
    /// Comma-separated source ranges (CIDRs, e.g. 10.0.0.0/8,127.0.0.1/32) whose requests skip
    /// the caller check. Everyone else must be a pod in the app's namespace or in its
    /// scaleToZero.callerNamespaces, or gets 403. Empty: no one is trusted.
    #[arg(
        long,
        default_value = "",
        value_parser = ranges,
        env = "CRAC_ACTIVATOR_TRUSTED_CALLERS"
    )]
    trusted_callers: Ranges,
    /// How long after an app's servingMode turns Pods its requests are still forwarded (endpoint
    /// propagation, requests held during the wake); later ones get 503 and are told to reconnect.
    #[arg(long, default_value = "30s", value_parser = duration)]
    awake_grace: Duration,
    /// Namespace of the Secret holding the cluster key apps' control tokens derive from
    /// (sleeping in place; the operator creates it there, in the activator's namespace).
    #[arg(
        long,
        default_value = "crac-system",
        env = "CRAC_CONTROL_KEY_NAMESPACE"
    )]
    control_key_namespace: String,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .context("loading kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("finding the cluster (in-cluster or KUBECONFIG)")?,
    };
    kube::Client::try_from(config).context("building the API client")
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube_client(args.kubeconfig.as_ref()).await?;
    let config = Config {
        listen_ip: args.listen_address,
        max_queue: args.max_queue,
        default_wake_timeout: args.default_wake_timeout,
        retry_after: args.retry_after,
        wake_resend_interval: args.wake_resend_interval,
        connect_timeout: args.connect_timeout,
        drain_timeout: args.drain_timeout,
        trusted_callers: args.trusted_callers.0.clone(),
        awake_grace: args.awake_grace,
        max_held: args.max_held,
        shutdown_delay: args.shutdown_delay,
        connections: ConnectionLimits {
            max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
            header_timeout: args.header_timeout,
            max_header_bytes: args.max_header_bytes as usize,
            idle_timeout: args.idle_timeout,
            h2_max_concurrent_streams: args.h2_max_concurrent_streams,
            h2_keepalive_interval: args.h2_keepalive_interval,
            h2_keepalive_timeout: args.h2_keepalive_timeout,
        },
        ..Config::default()
    };
    let activator = Activator::new(config, Arc::new(KubeWaker::new(client.clone())));
    let admin = tokio::net::TcpListener::bind(args.admin_address)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_address))?;
    let trusted: Vec<String> = args
        .trusted_callers
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(admin = %args.admin_address, listen = %args.listen_address, trusted_callers = trusted.join(","), "crac-activator starting");
    tokio::spawn(crac_activator::admin::serve(admin, Arc::clone(&activator)));
    let listeners = activator.start();
    tokio::spawn(watch_apps(
        client.clone(),
        Arc::clone(activator.registry()),
        args.default_wake_timeout,
    ));
    tokio::spawn(watch_pods(client.clone(), Arc::clone(activator.registry())));
    tokio::spawn(load_control_key(
        client.clone(),
        args.control_key_namespace.clone(),
        Arc::clone(activator.registry()),
    ));
    tokio::spawn(watch_callers(client, Arc::clone(activator.registry())));

    shutdown_signal().await?;
    tracing::info!("shutting down");
    let drained = activator.shutdown().await;
    listeners.abort();
    if !drained {
        anyhow::bail!("drain timeout passed with requests still open");
    }
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        res = tokio::signal::ctrl_c() => res.context("waiting for SIGINT")?,
    }
    Ok(())
}
