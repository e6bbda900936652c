//! `kubectl-crac`, a kubectl plugin for crac-operator: `kubectl crac status|checkpoint|wake|
//! sleep|explain`. Connects like kubectl (KUBECONFIG, ~/.kube/config, or in-cluster).

use anyhow::{Context as _, Result, anyhow};
use clap::{Parser, Subcommand};
use crac_api::{CracApp, labels};
use crac_cli::format::{self, EventLine, PodReport};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Config};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl crac",
    version,
    about = "Run and inspect JVM apps restored from CRaC checkpoints"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Every namespace (status only).
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A table of the apps: phase, ready/replicas, checkpoint age and size, last activity, last wake.
    Status,
    /// Take a fresh checkpoint now, even though the spec did not change.
    Checkpoint { app: String },
    /// Wake an app that sleeps (scaled to zero).
    Wake { app: String },
    /// Put an app to sleep now (scale to zero must be enabled for it).
    Sleep { app: String },
    /// Why an app is not Ready: conditions, recent Events, the checkpoint pod's reason.
    Explain { app: String },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = Config::infer().await.map_err(|e| {
        anyhow!(
            "{e}: no cluster to talk to; set KUBECONFIG or check `kubectl config current-context`"
        )
    })?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("building the API client")?;
    let apps: Api<CracApp> = if cli.all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), &namespace)
    };
    match cli.command {
        Command::Status => {
            let list = apps
                .list(&ListParams::default())
                .await
                .map_err(|e| api_error(e, "list CracApps", &namespace))?;
            if list.items.is_empty() {
                let place = if cli.all_namespaces {
                    "any namespace".to_string()
                } else {
                    format!("namespace {namespace:?}")
                };
                println!(
                    "No CracApps in {place}. Create one: kubectl apply -f examples/spring-boot-demo/cracapp.yaml{}",
                    if cli.all_namespaces {
                        ""
                    } else {
                        " (or look everywhere with -A)"
                    }
                );
                return Ok(());
            }
            let mut items = list.items;
            items.sort_by_key(|a| (a.metadata.namespace.clone(), a.metadata.name.clone()));
            print!(
                "{}",
                format::status_table(&items, cli.all_namespaces, Timestamp::now())
            );
        }
        Command::Checkpoint { app } => {
            annotate(&client, &namespace, &app, labels::CHECKPOINT_REQUESTED_AT).await?;
            println!(
                "checkpoint of {namespace}/{app} requested; the pods keep serving the current image until the new one is ready. Follow it: kubectl crac explain -n {namespace} {app}"
            );
        }
        Command::Wake { app } => {
            annotate(&client, &namespace, &app, labels::WAKE_REQUESTED_AT).await?;
            println!(
                "wake of {namespace}/{app} requested; watch it: kubectl crac status -n {namespace}"
            );
        }
        Command::Sleep { app } => {
            let current = get_app(&client, &namespace, &app).await?;
            let enabled = current
                .spec
                .scale_to_zero
                .as_ref()
                .and_then(|s| s.enabled)
                .unwrap_or(false);
            annotate(&client, &namespace, &app, labels::SLEEP_REQUESTED_AT).await?;
            println!(
                "sleep of {namespace}/{app} requested; it drains open connections, then scales to zero."
            );
            if !enabled {
                println!(
                    "note: spec.scaleToZero.enabled is not true for {app}; unless a CracScalePolicy enables it, the operator will not put it to sleep."
                );
            }
        }
        Command::Explain { app } => {
            let current = get_app(&client, &namespace, &app).await?;
            let events = app_events(&client, &namespace, &app).await?;
            let pods = checkpoint_pods(&client, &namespace, &app).await?;
            print!(
                "{}",
                format::explain(&current, &events, &pods, Timestamp::now())
            );
        }
    }
    Ok(())
}

/// Turns an API error into one that says what to do.
fn api_error(e: kube::Error, action: &str, namespace: &str) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.code == 404 && action.contains("list") => anyhow!(
            "could not {action}: the CracApp CRD is not installed in this cluster. Install the operator: helm install crac-operator charts/crac-operator -n crac-system --create-namespace (docs/install.md)"
        ),
        kube::Error::Api(s) if s.code == 403 => anyhow!(
            "could not {action} in namespace {namespace:?}: forbidden ({}). Ask for access to crac.dev cracapps, or pick another namespace with -n",
            s.message
        ),
        _ => anyhow!("could not {action}: {e}"),
    }
}

async fn get_app(client: &Client, namespace: &str, app: &str) -> Result<CracApp> {
    let apps: Api<CracApp> = Api::namespaced(client.clone(), namespace);
    match apps.get_opt(app).await {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(anyhow!(
            "CracApp {app:?} not found in namespace {namespace:?}; list the apps with `kubectl crac status -n {namespace}` or `kubectl crac status -A`"
        )),
        Err(e) => Err(api_error(e, &format!("read CracApp {app}"), namespace)),
    }
}

/// Sets `key` to the current time on the app (a merge patch of one annotation: nothing else,
/// and no drift for GitOps tools that own the spec).
async fn annotate(client: &Client, namespace: &str, app: &str, key: &str) -> Result<()> {
    get_app(client, namespace, app).await?;
    let apps: Api<CracApp> = Api::namespaced(client.clone(), namespace);
    let now = Timestamp::now().to_string();
    let patch = serde_json::json!({ "metadata": { "annotations": { key: now } } });
    apps.patch(app, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|e| api_error(e, &format!("annotate CracApp {app}"), namespace))?;
    Ok(())
}

async fn app_events(client: &Client, namespace: &str, app: &str) -> Result<Vec<EventLine>> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let selector = format!("involvedObject.kind=CracApp,involvedObject.name={app}");
    let list = match events.list(&ListParams::default().fields(&selector)).await {
        Ok(l) => l.items,
        // Events are a help, not a must: a user who may not read them still gets the rest.
        Err(_) => vec![],
    };
    Ok(list
        .into_iter()
        .map(|e| EventLine {
            time: e
                .event_time
                .map(|t| t.0)
                .or(e.last_timestamp.map(|t| t.0))
                .or(e.metadata.creation_timestamp.map(|t| t.0)),
            type_: e.type_.unwrap_or_default(),
            reason: e.reason.unwrap_or_default(),
            message: e.message.unwrap_or_default(),
        })
        .collect())
}

async fn checkpoint_pods(client: &Client, namespace: &str, app: &str) -> Result<Vec<PodReport>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{}={app},{}=checkpoint", labels::APP, labels::COMPONENT);
    let mut list = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(l) => l.items,
        Err(_) => vec![],
    };
    list.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(list
        .into_iter()
        .map(|p| {
            let status = p.status.unwrap_or_default();
            let message = status
                .container_statuses
                .iter()
                .flatten()
                .find(|c| c.name == crac_api::cracapp::APP_CONTAINER)
                .and_then(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone());
            PodReport {
                pod: p.metadata.name.unwrap_or_default(),
                phase: status.phase.unwrap_or_default(),
                message,
            }
        })
        .collect())
}
