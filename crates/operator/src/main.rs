//! `crac-operator`: reconciles CracApps. Flags and environment only; the work is in the library.

use clap::Parser;
use crac_operator::api_requests::counted_client;
use crac_operator::context::{
    ActivatorRef, Context, DEFAULT_ACTIVATOR_NAMESPACE, DEFAULT_ACTIVATOR_SELECTOR, Settings,
};
use crac_operator::leader::{self, Elector, LeaseSettings};
use crac_operator::metrics::Metrics;
use crac_operator::pod_security::PodAllowance;
use crac_operator::server::{self, Health};
use crac_operator::watches;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Config};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "Runs JVM apps from CRaC checkpoints on Kubernetes")]
struct Args {
    /// Image that holds the static crac-agent binary, injected into every app pod.
    #[arg(long, env = "CRAC_AGENT_IMAGE", default_value = concat!("ghcr.io/crac-operator/crac-agent:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CRAC_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// CracApps reconciled at once.
    #[arg(long, env = "CRAC_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Take a Lease before reconciling, so only one replica acts.
    #[arg(long, env = "CRAC_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "crac-system")]
    lease_namespace: String,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the activator pods sleeping apps' Services point at.
    #[arg(long, env = "CRAC_ACTIVATOR_NAMESPACE", default_value = DEFAULT_ACTIVATOR_NAMESPACE)]
    activator_namespace: String,
    /// Label selector of the activator pods.
    #[arg(long, env = "CRAC_ACTIVATOR_SELECTOR", default_value = DEFAULT_ACTIVATOR_SELECTOR)]
    activator_selector: String,
    /// Reconcile CracApps of this namespace only (default: all namespaces).
    #[arg(long, env = "CRAC_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Capabilities a CracApp's containers may add beyond the PodSecurity baseline set (and
    /// beyond CHECKPOINT_RESTORE and SYS_PTRACE on `app`), comma-separated. A platform team's
    /// explicit opt-in; empty by default.
    #[arg(long, env = "CRAC_ALLOWED_CAPABILITIES", default_value = "")]
    allowed_capabilities: String,
    /// Log as JSON lines.
    #[arg(long, env = "CRAC_LOG_JSON", default_value_t = false)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let client = counted_client(Config::infer().await?, metrics.clone())?;
    let health = Arc::new(Health::default());
    tokio::spawn(server::serve(
        args.metrics_addr,
        Arc::new(registry),
        health.clone(),
    ));

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("crac-operator-{}", std::process::id()));
    let lease_api = Api::<Lease>::namespaced(client.clone(), &args.lease_namespace);
    let mut elector = Elector::new(LeaseSettings::new("crac-operator", identity.clone()));
    if args.leader_elect {
        // A standby replica is healthy and ready: it is waiting, not failing.
        health.ready.store(true, Ordering::Relaxed);
        tracing::info!(%identity, "waiting for the leader lease");
        leader::acquire(&lease_api, &mut elector).await;
        tracing::info!(%identity, "leading");
        health.ready.store(false, Ordering::Relaxed);
    }

    let settings = Settings {
        activator: ActivatorRef {
            namespace: args.activator_namespace,
            selector: args.activator_selector,
        },
        namespace: args.namespace,
        pod_allowance: PodAllowance::from_list(&args.allowed_capabilities),
        ..Settings::new(args.agent_image, identity)
    };
    let ctx = Arc::new(Context::new(client, settings, metrics));
    let keep_status = tokio::spawn(crac_operator::policies::keep_status(
        ctx.clone(),
        Duration::from_secs(10),
    ));
    let ready = health.clone();
    let run = watches::run(ctx, args.concurrency, move || {
        ready.ready.store(true, Ordering::Relaxed)
    });
    if args.leader_elect {
        tokio::select! {
            // Ends on SIGTERM once the reconciles in flight have finished.
            () = run => {}
            // Returns the moment this replica must stop acting: exit, dropping every reconcile.
            () = leader::hold(&lease_api, &mut elector) => {
                anyhow::bail!("lost the leader lease; exiting so another replica leads");
            }
        }
        // Nothing acts any more: give the lease up so a standby leads at once, rather than a
        // lease duration later.
        keep_status.abort();
        let _ = keep_status.await;
        match tokio::time::timeout(
            Duration::from_secs(5),
            leader::release(&lease_api, &mut elector),
        )
        .await
        {
            Ok(Ok(true)) => tracing::info!("released the leader lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lease"),
            Err(_) => tracing::warn!("releasing the leader lease timed out"),
        }
    } else {
        run.await;
    }
    Ok(())
}
