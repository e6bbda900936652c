//! The sleep/wake step of one reconcile, without a cluster: from what was observed (the
//! settings in force, the wake and sleep requests, the agents' activity, the policy's cap),
//! the next step of the cycle ([`crate::scale::next_step`]) and what it changes in the status.

use super::status::AVAILABLE;
use crate::scale::{
    Activity, Cycle, Settings, Situation, Step, cycle_of, next_step, sleeps_first, wake_request,
};
use crac_api::cracapp::{CracAppStatus, Phase, ServingMode, SleepMode, WakeStatus};
use crac_api::{CracApp, labels};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

/// Namespace and name of an app.
pub type AppKey = (String, String);

/// What the cycle step looks at, as observed.
#[derive(Clone, Debug)]
pub struct CycleSeen {
    pub settings: Settings,
    pub requests: Requests,
    /// What the agents reported (asked only while the app is awake or draining).
    pub activity: Activity,
    /// With a governing policy's `maxAwake`: the cap, and every awake app the policy governs
    /// with its last activity (this app's fresh from its agents).
    pub capped: Option<Cap>,
    /// At least one activator pod is ready (no drain starts without one).
    pub activator_ready: bool,
}

/// A policy's cap on awake apps, and the awake apps it governs with their last activity.
#[derive(Clone, Debug, PartialEq)]
pub struct Cap {
    pub max: usize,
    pub awake: Vec<(Option<Timestamp>, AppKey)>,
}

/// The wake and sleep requests, and the cycle they put the app in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Requests {
    pub wake: Option<Timestamp>,
    pub sleep_requested: bool,
    pub cycle: Cycle,
}

fn parse_time(text: Option<&String>) -> Option<Timestamp> {
    text.and_then(|t| t.parse().ok())
}

/// The requests in the app's annotations and status.
pub fn requests_of(app: &CracApp, previous: &CracAppStatus) -> Requests {
    let annotations = app.annotations();
    let wake = wake_request(
        previous,
        parse_time(annotations.get(labels::WAKE_REQUESTED_AT)),
    );
    let last_wake = previous
        .last_wake
        .as_ref()
        .map_or(Timestamp::UNIX_EPOCH, |w| w.at.0);
    let sleep_requested = parse_time(annotations.get(labels::SLEEP_REQUESTED_AT))
        .is_some_and(|asked| asked > last_wake);
    Requests {
        wake,
        sleep_requested,
        cycle: cycle_of(previous, wake),
    }
}

/// Whether the agents are asked for activity: only an app that may fall asleep and has pods.
pub fn watching(settings: &Settings, cycle: Cycle) -> bool {
    settings.enabled && matches!(cycle, Cycle::Awake | Cycle::Draining)
}

/// The cycle step for one reconcile, and what it means for the objects.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub settings: Settings,
    pub step: Step,
    /// The cycle once the step is taken.
    pub cycle: Cycle,
    /// The newest traffic the agents saw.
    pub last_activity: Option<Timestamp>,
}

impl Plan {
    /// Pods the Deployment should run.
    pub fn replicas(&self, awake_size: i32) -> i32 {
        match (self.cycle, self.settings.mode) {
            // Asleep in place, the pods stay (their JVMs do not).
            (Cycle::Asleep, SleepMode::Recreate) => 0,
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

pub fn plan(
    me: &AppKey,
    seen: &CycleSeen,
    previous: &CracAppStatus,
    ready_pods: usize,
    now: Timestamp,
) -> Plan {
    let over_cap = seen
        .capped
        .as_ref()
        .is_some_and(|cap| sleeps_first(&cap.awake, cap.max, me));
    // The idle clock starts no earlier than the app became available (now, if it has not).
    let idle_since = [
        seen.activity.last_activity,
        previous.last_activity_time.as_ref().map(|t| t.0),
        previous.last_wake.as_ref().map(|w| w.at.0),
        Some(available_since(previous).unwrap_or(now)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(now);
    let situation = Situation {
        cycle: seen.requests.cycle,
        settings: seen.settings.clone(),
        activity: seen.activity.clone(),
        idle_since,
        sleep_started: previous.sleep_started_at.as_ref().map(|t| t.0),
        sleep_requested: seen.requests.sleep_requested,
        over_cap,
        ready_pods: i32::try_from(ready_pods).unwrap_or(i32::MAX),
        activator_ready: seen.activator_ready,
        wake: seen.requests.wake,
        now,
    };
    let step = next_step(&situation);
    let cycle = match (&step, seen.requests.cycle) {
        (Step::StartDrain { .. }, _) => Cycle::Draining,
        (Step::Sleep, _) => Cycle::Asleep,
        (Step::Wake, _) => Cycle::Waking,
        (Step::Serve { .. }, _) => Cycle::Awake,
        (Step::Stay(_), c) => c,
    };
    tracing::debug!(
        app = %me.1,
        ?step,
        reporting = situation.activity.reporting,
        asked = situation.activity.asked,
        open = situation.activity.open_connections,
        over_cap,
        policy = ?situation.settings.policy,
        "scale to zero"
    );
    Plan {
        settings: seen.settings.clone(),
        step,
        cycle,
        last_activity: seen.activity.last_activity,
    }
}

/// Writes what the step changes into the next status; returns an Event (reason, message) to
/// publish. `next` starts as a copy of the previous cycle fields.
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
            next.sleep_started_at = Some(MicroTime(now));
            Some((
                "Draining".into(),
                format!(
                    "{why}; the Service now points at the activator, waiting for open connections to end"
                ),
            ))
        }
        Step::Sleep => {
            next.sleep_started_at = None;
            next.slept_at = Some(MicroTime(now));
            Some((
                "Sleeping".into(),
                match plan.settings.mode {
                    SleepMode::Recreate => "drained; scaled to zero".into(),
                    SleepMode::InPlace => {
                        "drained; the pods sleep in place (their JVMs end, their agents stay)"
                            .into()
                    }
                },
            ))
        }
        // Once: the first wake step still sees the asleep phase.
        Step::Wake => (previous.phase == Some(Phase::ScaledToZero)).then(|| {
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
                        at: MicroTime(*at),
                        latency_ms: Some(i64::try_from(latency).unwrap_or(i64::MAX)),
                        // Filled in from the woken pod's agent (decide::split_wake).
                        outcome: None,
                        restore_ms: None,
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
        .find(|c| c.type_ == AVAILABLE && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn key(name: &str) -> AppKey {
        ("ns".into(), name.into())
    }

    fn seen(capped: Option<Cap>) -> CycleSeen {
        CycleSeen {
            settings: Settings {
                enabled: true,
                idle_after: Duration::from_secs(3600),
                wake_timeout: Duration::from_secs(30),
                quiet: false,
                policy: Some("cap".into()),
                max_awake: Some(1),
                caller_namespaces: Vec::new(),
                mode: crac_api::cracapp::SleepMode::Recreate,
            },
            requests: Requests {
                wake: None,
                sleep_requested: false,
                cycle: Cycle::Awake,
            },
            activity: Activity {
                reporting: 1,
                asked: 1,
                open_connections: 0,
                last_activity: Some(t(100)),
            },
            capped,
            activator_ready: true,
        }
    }

    #[test]
    fn the_longest_idle_app_over_a_cap_drains_and_says_why() {
        let awake = vec![(Some(t(100)), key("me")), (Some(t(200)), key("busy"))];
        let previous = CracAppStatus::default();
        let p = plan(
            &key("me"),
            &seen(Some(Cap {
                max: 1,
                awake: awake.clone(),
            })),
            &previous,
            1,
            t(300),
        );
        assert_eq!(p.cycle, Cycle::Draining);
        assert_eq!(p.serving_mode(), ServingMode::Activator);
        let mut next = previous.clone();
        let (reason, message) = record(&p, &previous, &mut next, t(300)).expect("an Event");
        assert_eq!(reason, "Draining");
        assert!(
            message.contains("policy cap allows 1 awake apps"),
            "{message}"
        );
        assert_eq!(next.sleep_started_at, Some(MicroTime(t(300))));
        // The busier app stays awake.
        let p = plan(
            &key("busy"),
            &seen(Some(Cap { max: 1, awake })),
            &previous,
            1,
            t(300),
        );
        assert_eq!(p.cycle, Cycle::Awake);
        assert_eq!(p.replicas(2), 2);
    }

    #[test]
    fn a_wake_request_in_the_annotation_wakes_an_app_asleep_since_before_it() {
        let mut app = CracApp::new(
            "demo",
            serde_json::from_value(serde_json::json!({"template": {}})).unwrap(),
        );
        app.metadata.annotations = Some(
            [(
                labels::WAKE_REQUESTED_AT.to_string(),
                "2027-01-15T08:00:10Z".to_string(),
            )]
            .into(),
        );
        let previous = CracAppStatus {
            slept_at: Some(MicroTime("2027-01-15T08:00:00Z".parse().unwrap())),
            ..Default::default()
        };
        assert_eq!(requests_of(&app, &previous).cycle, Cycle::Waking);
        let later = CracAppStatus {
            slept_at: Some(MicroTime("2027-01-15T08:01:00Z".parse().unwrap())),
            ..Default::default()
        };
        assert_eq!(requests_of(&app, &later).cycle, Cycle::Asleep);
    }

    /// Sleep and wake within one second are ordered by their microseconds, written and read
    /// back through the status as the API server stores them.
    #[test]
    fn a_sleep_and_a_wake_in_one_second_keep_their_order_through_the_status() {
        let at = |ms: i64| Timestamp::from_millisecond(ms).unwrap();
        let stored = |status: &CracAppStatus| -> CracAppStatus {
            serde_json::from_value(serde_json::to_value(status).unwrap()).unwrap()
        };
        let app = |sleep_asked: Option<Timestamp>| {
            let mut app = crate::validate::tests::app();
            if let Some(asked) = sleep_asked {
                app.metadata.annotations =
                    Some([(labels::SLEEP_REQUESTED_AT.to_string(), asked.to_string())].into());
            }
            app
        };
        // Asleep at 10.700 s: a wake stamped 10.300 s is older (repeated later if still
        // needed); one stamped 10.900 s wakes the app.
        let mut asleep = stored(&CracAppStatus {
            slept_at: Some(MicroTime(at(10_700))),
            serving_mode: Some(ServingMode::Activator),
            ..Default::default()
        });
        asleep.wake_requested_at = Some(MicroTime(at(10_300)));
        assert_eq!(
            requests_of(&app(None), &stored(&asleep)).cycle,
            Cycle::Asleep
        );
        asleep.wake_requested_at = Some(MicroTime(at(10_900)));
        assert_eq!(
            requests_of(&app(None), &stored(&asleep)).cycle,
            Cycle::Waking
        );

        // Woken from a wake at 20.900 s: a sleep asked at 20.300 s (the one that put it to
        // sleep) is not asked again, so the app stays awake; one asked at 21.000 s is.
        let woken = stored(&CracAppStatus {
            last_wake: Some(WakeStatus {
                at: MicroTime(at(20_900)),
                latency_ms: Some(300),
                outcome: None,
                restore_ms: None,
            }),
            ..Default::default()
        });
        assert!(!requests_of(&app(Some(at(20_300))), &woken).sleep_requested);
        assert!(requests_of(&app(Some(at(21_000))), &woken).sleep_requested);
    }
}
