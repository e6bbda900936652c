//! The I/O side of scale to zero: reading the agents' activity, finding the governing policy,
//! counting awake apps for a policy's cap, and handing out activator ports. The decisions
//! themselves are in [`crate::scale`].

use crate::controller::Context;
use crate::error::Result;
use crate::scale::{
    self, Activity, Cycle, Settings, Situation, Step, allocate_ports, cycle_of, next_step,
    settings_for, wake_request,
};
use crac_api::agent::{ACTIVITY_PATH, ActivityReport, DEFAULT_ACTIVITY_PORT};
use crac_api::cracapp::{ActivatorPort, CracAppStatus, ServingMode, WakeStatus};
use crac_api::policy::CracScalePolicy;
use crac_api::{CracApp, labels};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The cycle step for one reconcile, and what it means for the objects.
pub struct Plan {
    pub settings: Settings,
    pub step: Step,
    /// The cycle once the step is taken, and before.
    pub cycle: Cycle,
    pub previous_cycle: Cycle,
    /// The newest traffic the agents saw.
    pub last_activity: Option<Timestamp>,
}

impl Plan {
    /// Pods the Deployment should run.
    pub fn replicas(&self, awake_size: i32) -> i32 {
        match self.cycle {
            Cycle::Asleep => 0,
            _ => awake_size,
        }
    }

    pub fn serving_mode(&self) -> ServingMode {
        match self.cycle {
            Cycle::Awake => ServingMode::Pods,
            _ => ServingMode::Activator,
        }
    }
}

fn parse_time(text: Option<&String>) -> Option<Timestamp> {
    text.and_then(|t| t.parse().ok())
}

pub async fn plan(
    app: &CracApp,
    ctx: &Context,
    previous: &CracAppStatus,
    ready_ips: &[String],
    now: Timestamp,
) -> Result<Plan> {
    let policies = ctx.caches.policies();
    let ns_labels = namespace_labels(ctx, app, &policies).await?;
    let policy = scale::governing_policy(app, &ns_labels, &policies);
    let settings = settings_for(app.spec.scale_to_zero.as_ref(), policy, now);

    let annotations = app.annotations();
    let wake = wake_request(
        previous,
        parse_time(annotations.get(labels::WAKE_REQUESTED_AT)),
    );
    let cycle = cycle_of(previous, wake);
    let sleep_started = previous.sleep_started_at.as_ref().map(|t| t.0);
    let sleep_requested =
        parse_time(annotations.get(labels::SLEEP_REQUESTED_AT)).is_some_and(|asked| {
            asked
                > previous
                    .last_wake
                    .as_ref()
                    .map_or(Timestamp::UNIX_EPOCH, |w| w.at.0)
        });

    let watching = settings.enabled && matches!(cycle, Cycle::Awake | Cycle::Draining);
    let activity = if watching {
        poll_activity(ready_ips).await
    } else {
        Activity::default()
    };
    let over_cap = match (settings.max_awake, &settings.policy) {
        (Some(max), Some(name)) if watching => {
            over_cap(app, ctx, name, max, &policies, activity.last_activity).await?
        }
        _ => false,
    };
    // The idle clock starts no earlier than the app became available (now, if it has not).
    let idle_since = [
        activity.last_activity,
        previous.last_activity_time.as_ref().map(|t| t.0),
        previous.last_wake.as_ref().map(|w| w.at.0),
        Some(available_since(previous).unwrap_or(now)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(now);
    let situation = Situation {
        cycle,
        settings: settings.clone(),
        activity,
        idle_since,
        sleep_started,
        sleep_requested,
        over_cap,
        ready_pods: i32::try_from(ready_ips.len()).unwrap_or(i32::MAX),
        wake,
        now,
    };
    let step = next_step(&situation);
    let previous_cycle = cycle;
    let cycle = match (&step, cycle) {
        (Step::StartDrain { .. }, _) => Cycle::Draining,
        (Step::Sleep, _) => Cycle::Asleep,
        (Step::Wake, _) => Cycle::Waking,
        (Step::Serve { .. }, _) => Cycle::Awake,
        (Step::Stay(_), c) => c,
    };
    tracing::debug!(
        app = %app.name_any(),
        ?step,
        reporting = situation.activity.reporting,
        asked = situation.activity.asked,
        open = situation.activity.open_connections,
        over_cap,
        policy = ?situation.settings.policy,
        "scale to zero"
    );
    Ok(Plan {
        settings,
        step,
        cycle,
        previous_cycle,
        last_activity: situation.activity.last_activity,
    })
}

/// Writes what the step changes into the next status; returns an Event note to publish.
/// `next` starts as a copy of the previous cycle fields.
pub fn record(
    plan: &Plan,
    previous: &CracAppStatus,
    next: &mut CracAppStatus,
    now: Timestamp,
) -> Option<(String, String)> {
    next.serving_mode = Some(plan.serving_mode());
    // Moved only by ten seconds or more: a status write per request would be a hot loop.
    if let Some(seen) = plan.last_activity {
        let old = previous.last_activity_time.as_ref().map(|t| t.0);
        if old.is_none_or(|o| seen.as_second() - o.as_second() >= 10) {
            next.last_activity_time = Some(Time(seen));
        }
    }
    match &plan.step {
        Step::Stay(_) => None,
        Step::StartDrain { why } => {
            next.sleep_started_at = Some(Time(now));
            Some((
                "Draining".into(),
                format!(
                    "{why}; the Service now points at the activator, waiting for open connections to end"
                ),
            ))
        }
        Step::Sleep => {
            next.sleep_started_at = None;
            next.slept_at = Some(Time(now));
            Some(("Sleeping".into(), "drained; scaled to zero".into()))
        }
        // Once: the first wake step still sees the asleep phase.
        Step::Wake => (previous.phase == Some(crac_api::cracapp::Phase::ScaledToZero)).then(|| {
            (
                "Waking".into(),
                "a wake was requested; scaling back up".into(),
            )
        }),
        Step::Serve { woke_from } => {
            next.sleep_started_at = None;
            next.slept_at = None;
            match woke_from {
                Some(at) => {
                    let latency = now.duration_since(*at).as_millis();
                    next.last_wake = Some(WakeStatus {
                        at: Time(*at),
                        latency_ms: Some(i64::try_from(latency).unwrap_or(i64::MAX)),
                    });
                    Some((
                        "Woken".into(),
                        format!(
                            "a pod is ready {latency} ms after the wake request; the Service points at the pods again"
                        ),
                    ))
                }
                None => Some((
                    "Serving".into(),
                    "traffic resumed; the Service points at the pods again".into(),
                )),
            }
        }
    }
}

fn available_since(status: &CracAppStatus) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::status::AVAILABLE && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// Labels of the app's namespace, read only when a policy selects namespaces.
async fn namespace_labels(
    ctx: &Context,
    app: &CracApp,
    policies: &[CracScalePolicy],
) -> Result<BTreeMap<String, String>> {
    if policies.iter().all(|p| p.spec.namespace_selector.is_none()) {
        return Ok(BTreeMap::new());
    }
    let ns = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&app.namespace().unwrap_or_default())
        .await?;
    Ok(ns.and_then(|n| n.metadata.labels).unwrap_or_default())
}

/// Whether the policy's cap puts this app over it: of the awake apps it governs, the
/// longest-idle ones beyond `max` should sleep.
async fn over_cap(
    app: &CracApp,
    ctx: &Context,
    policy: &str,
    max: i32,
    policies: &[CracScalePolicy],
    my_last_activity: Option<Timestamp>,
) -> Result<bool> {
    let apps = Api::<CracApp>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let namespaces: BTreeMap<String, BTreeMap<String, String>> =
        Api::<Namespace>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|n| (n.name_any(), n.metadata.labels.unwrap_or_default()))
            .collect();
    let empty = BTreeMap::new();
    let me = (app.namespace().unwrap_or_default(), app.name_any());
    let awake: Vec<(Option<Timestamp>, (String, String))> = apps
        .iter()
        .filter(|a| {
            let labels = namespaces
                .get(&a.namespace().unwrap_or_default())
                .unwrap_or(&empty);
            scale::governing_policy(a, labels, policies).is_some_and(|p| p.name_any() == policy)
        })
        .filter(|a| {
            a.status
                .as_ref()
                .is_none_or(|s| s.slept_at.is_none() && s.checkpoint.is_some())
        })
        .map(|a| {
            let key = (a.namespace().unwrap_or_default(), a.name_any());
            // This app's own activity is fresh; the others' comes from their status.
            let last = if key == me {
                my_last_activity
            } else {
                a.status
                    .as_ref()
                    .and_then(|s| s.last_activity_time.as_ref())
                    .map(|t| t.0)
            };
            (last, key)
        })
        .collect();
    Ok(scale::sleeps_first(
        &awake,
        usize::try_from(max).unwrap_or(0),
        &me,
    ))
}

/// Asks each ready pod's agent for its activity, 2 s each at most, all at once.
async fn poll_activity(ips: &[String]) -> Activity {
    let reports = futures::future::join_all(ips.iter().map(|ip| fetch_activity(ip))).await;
    let mut activity = Activity {
        asked: ips.len(),
        ..Default::default()
    };
    for report in reports.into_iter().flatten() {
        activity.reporting += 1;
        activity.open_connections += report.open_connections;
        let seen = report
            .last_activity_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        activity.last_activity = activity.last_activity.max(seen);
    }
    activity
}

async fn fetch_activity(ip: &str) -> Option<ActivityReport> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((ip, DEFAULT_ACTIVITY_PORT))
            .await
            .ok()?;
        let request = format!("GET {ACTIVITY_PATH} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream
            .take(64 * 1024)
            .read_to_end(&mut response)
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.").then_some(())?;
        head.split(' ').nth(1).filter(|code| *code == "200")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

/// The app's activator ports: kept once assigned, else the lowest free ones cluster-wide.
pub async fn activator_ports(
    app: &CracApp,
    ctx: &Context,
    previous: &CracAppStatus,
    target_ports: &[i32],
) -> Result<Vec<ActivatorPort>> {
    let kept: Vec<i32> = previous
        .activator_ports
        .iter()
        .map(|p| p.target_port)
        .collect();
    if kept == target_ports {
        return Ok(previous.activator_ports.clone());
    }
    let key = (app.namespace().unwrap_or_default(), app.name_any());
    // One allocation at a time, from a table seeded from every app's status once.
    let mut table = ctx.activator_ports.lock().await;
    if table.is_none() {
        let apps = Api::<CracApp>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await?;
        let mut seeded = BTreeMap::new();
        for a in apps {
            for p in a.status.iter().flat_map(|s| s.activator_ports.iter()) {
                seeded.insert(
                    p.activator_port,
                    (a.namespace().unwrap_or_default(), a.name_any()),
                );
            }
        }
        *table = Some(seeded);
    }
    let table = table.get_or_insert_with(BTreeMap::new);
    table.retain(|_, owner| owner != &key);
    let taken: BTreeSet<i32> = table.keys().copied().collect();
    let ports = allocate_ports(target_ports.len(), &taken);
    let assigned: Vec<ActivatorPort> = target_ports
        .iter()
        .zip(ports)
        .map(|(&target_port, activator_port)| {
            table.insert(activator_port, key.clone());
            ActivatorPort {
                name: None,
                target_port,
                activator_port,
            }
        })
        .collect();
    Ok(assigned)
}

/// Addresses of the ready activator pods.
pub async fn activator_ips(ctx: &Context) -> Result<Vec<String>> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ctx.activator.namespace);
    let list = pods
        .list(&ListParams::default().labels(&ctx.activator.selector))
        .await?;
    Ok(list.items.iter().filter_map(ready_ip).collect())
}

/// A pod's address when it serves (the rule shared with the activator).
pub fn ready_ip(pod: &Pod) -> Option<String> {
    crac_api::serving::serving_address(pod).map(String::from)
}
