//! Scale to zero, decided without a cluster: which policy governs an app, the settings that
//! result, and the next step of the sleep/wake cycle.
//!
//! The cycle, as recorded in the app's status:
//! - awake: `servingMode: Pods`, no `sleptAt`;
//! - draining: `servingMode: Activator` (new requests reach the activator, which still
//!   forwards them to the ready pods), `sleepStartedAt` set, waiting for open connections
//!   on the pods to end;
//! - asleep: `sleptAt` set, Deployment at zero;
//! - waking: asleep with a wake request newer than `sleptAt`: Deployment back at
//!   `spec.replicas`, the Service still on the activator until a pod is ready.

use crac_api::cracapp::{ScaleToZeroSpec, ServingMode, SleepMode};
use crac_api::duration;
use crac_api::policy::{CracScalePolicy, QuietHours};
use crac_api::{CracApp, CracAppStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::collections::BTreeMap;
use std::time::Duration;

pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(15 * 60);
pub use crac_api::cracapp::DEFAULT_WAKE_TIMEOUT;
/// Idle threshold inside quiet hours: sleep as soon as the app has been quiet this long.
pub const QUIET_HOURS_IDLE: Duration = Duration::from_secs(30);
/// A drain that has not ended this long after it began is abandoned: the app keeps serving
/// (long-lived streams are activity, not idleness).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// A drain lasts at least this long, however soon the pods' connections end: the Service's
/// move to the activator has to reach every node (kube-proxy, ingress controllers) before
/// the pods go, or requests still routed to them are refused.
pub const DRAIN_DWELL: Duration = Duration::from_secs(5);

/// Scale-to-zero settings in force for one app.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub enabled: bool,
    pub idle_after: Duration,
    pub wake_timeout: Duration,
    /// Inside a quiet-hours window of the governing policy now.
    pub quiet: bool,
    /// Name of the governing policy.
    pub policy: Option<String>,
    pub max_awake: Option<i32>,
    /// Namespaces whose pods may call the app through the activator, besides its own.
    pub caller_namespaces: Vec<String>,
    /// How the app sleeps (see [`sleep_mode`]).
    pub mode: SleepMode,
}

/// How an app sleeps: its own `mode`, else its policy's, else `Recreate`. An app container
/// with a liveness probe sleeps the recreate way whatever a policy says (the kubelet would
/// restart a container whose JVM sleeps); the app's own `InPlace` with one is refused by
/// validation instead.
pub fn sleep_mode(
    own: Option<&ScaleToZeroSpec>,
    policy: Option<&CracScalePolicy>,
    has_liveness_probe: bool,
) -> SleepMode {
    let theirs = policy.and_then(|p| p.spec.scale_to_zero.as_ref());
    let wanted = own
        .and_then(|s| s.mode)
        .or_else(|| theirs.and_then(|s| s.mode))
        .unwrap_or_default();
    if has_liveness_probe {
        SleepMode::Recreate
    } else {
        wanted
    }
}

/// Whether `labels` satisfy `selector` (matchLabels and matchExpressions).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// The policy that governs an app: among those whose selectors match, the lowest priority,
/// then the first by name.
pub fn governing_policy<'a>(
    app: &CracApp,
    namespace_labels: &BTreeMap<String, String>,
    policies: &'a [CracScalePolicy],
) -> Option<&'a CracScalePolicy> {
    let empty = BTreeMap::new();
    let app_labels = app.metadata.labels.as_ref().unwrap_or(&empty);
    policies
        .iter()
        .filter(|p| {
            p.spec
                .namespace_selector
                .as_ref()
                .is_none_or(|s| selector_matches(s, namespace_labels))
                && p.spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| selector_matches(s, app_labels))
        })
        .min_by(|a, b| (a.spec.priority, a.name_any()).cmp(&(b.spec.priority, b.name_any())))
}

/// Minutes since midnight UTC.
pub fn minute_of_day(now: Timestamp) -> u32 {
    let secs = now.as_second().rem_euclid(86_400);
    u32::try_from(secs / 60).unwrap_or(0)
}

fn parse_hhmm(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    Some(h.parse::<u32>().ok()? * 60 + m.parse::<u32>().ok()?)
}

/// Whether `minute` (of the day, UTC) falls in any window; a window may span midnight.
pub fn in_quiet_hours(windows: &[QuietHours], minute: u32) -> bool {
    windows
        .iter()
        .any(|w| match (parse_hhmm(&w.start), parse_hhmm(&w.end)) {
            (Some(start), Some(end)) if start <= end => (start..end).contains(&minute),
            (Some(start), Some(end)) => minute >= start || minute < end,
            _ => false,
        })
}

/// The app's own fields, then the policy's, then the defaults.
pub fn settings_for(
    own: Option<&ScaleToZeroSpec>,
    policy: Option<&CracScalePolicy>,
    now: Timestamp,
) -> Settings {
    let theirs = policy.and_then(|p| p.spec.scale_to_zero.as_ref());
    let pick = |f: fn(&ScaleToZeroSpec) -> Option<&String>| {
        own.and_then(f)
            .or_else(|| theirs.and_then(f))
            .and_then(|d| duration::parse(d))
    };
    Settings {
        enabled: own
            .and_then(|s| s.enabled)
            .or_else(|| theirs.and_then(|s| s.enabled))
            .unwrap_or(false),
        idle_after: pick(|s| s.idle_after.as_ref()).unwrap_or(DEFAULT_IDLE_AFTER),
        wake_timeout: pick(|s| s.wake_timeout.as_ref()).unwrap_or(DEFAULT_WAKE_TIMEOUT),
        quiet: policy.is_some_and(|p| in_quiet_hours(&p.spec.quiet_hours, minute_of_day(now))),
        policy: policy.map(|p| p.name_any()),
        max_awake: policy.and_then(|p| p.spec.max_awake),
        caller_namespaces: own
            .map(|s| &s.caller_namespaces)
            .filter(|l| !l.is_empty())
            .or_else(|| theirs.map(|s| &s.caller_namespaces))
            .cloned()
            .unwrap_or_default(),
        mode: SleepMode::Recreate,
    }
}

/// What the agents in the app's pods report, summed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Activity {
    /// Pods that answered.
    pub reporting: usize,
    /// Pods asked.
    pub asked: usize,
    pub open_connections: u32,
    pub last_activity: Option<Timestamp>,
}

/// Where the app is in the cycle (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cycle {
    Awake,
    Draining,
    Asleep,
    Waking,
}

/// The newest wake request (the activator's status field, or the annotation), if any.
pub fn wake_request(status: &CracAppStatus, annotation: Option<Timestamp>) -> Option<Timestamp> {
    let from_activator = status.wake_requested_at.as_ref().map(|t| t.0);
    from_activator.max(annotation)
}

pub fn cycle_of(status: &CracAppStatus, wake: Option<Timestamp>) -> Cycle {
    match (&status.slept_at, status.serving_mode) {
        // Microseconds on both sides (the cycle's times are MicroTimes): a wake in the same
        // second as the sleep, but before it, is an old one (the activator repeats a wake
        // that is still needed).
        (Some(slept), _) if wake.is_some_and(|w| w >= slept.0) => Cycle::Waking,
        (Some(_), _) => Cycle::Asleep,
        (None, Some(ServingMode::Activator)) => Cycle::Draining,
        (None, _) => Cycle::Awake,
    }
}

/// The next step.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing to change; look again after this long.
    Stay(Duration),
    /// Point the Service at the activator and wait for the pods' connections to end.
    StartDrain { why: String },
    /// The app serves again: the Service back on the pods (a drain abandoned, a wake done).
    Serve { woke_from: Option<Timestamp> },
    /// Drained: scale to zero.
    Sleep,
    /// Scale back up; the Service stays on the activator until a pod is ready.
    Wake,
}

/// Everything [`next_step`] looks at.
#[derive(Clone, Debug)]
pub struct Situation {
    pub cycle: Cycle,
    pub settings: Settings,
    pub activity: Activity,
    /// When the app last saw traffic or woke; the idle clock runs from here.
    pub idle_since: Timestamp,
    pub sleep_started: Option<Timestamp>,
    pub sleep_requested: bool,
    /// The governing policy's cap on awake apps puts this app over it.
    pub over_cap: bool,
    pub ready_pods: i32,
    /// At least one activator pod is ready to take the app's traffic while it sleeps.
    pub activator_ready: bool,
    pub wake: Option<Timestamp>,
    pub now: Timestamp,
}

pub fn next_step(s: &Situation) -> Step {
    let poll = Duration::from_secs(10);
    match s.cycle {
        Cycle::Awake => {
            if !s.settings.enabled {
                return Step::Stay(Duration::from_secs(300));
            }
            // Without a ready activator the Service would point at nothing: stay awake.
            if !s.activator_ready {
                return Step::Stay(poll);
            }
            // Asked to sleep: drain now; the drain still waits for open connections to end.
            if s.sleep_requested {
                return Step::StartDrain {
                    why: "asked to sleep".into(),
                };
            }
            if s.activity.open_connections > 0 {
                return Step::Stay(poll);
            }
            // An app whose pods could not all report is not known to be idle.
            if s.activity.reporting < s.activity.asked || s.activity.asked == 0 {
                return Step::Stay(poll);
            }
            if s.over_cap {
                return Step::StartDrain {
                    why: format!(
                        "policy {} allows {} awake apps and this one has been idle longest",
                        s.settings.policy.as_deref().unwrap_or("?"),
                        s.settings.max_awake.unwrap_or(0)
                    ),
                };
            }
            let threshold = if s.settings.quiet {
                s.settings.idle_after.min(QUIET_HOURS_IDLE)
            } else {
                s.settings.idle_after
            };
            let idle = elapsed(s.idle_since, s.now);
            if idle >= threshold {
                let why = if s.settings.quiet {
                    "quiet hours"
                } else {
                    "idle"
                };
                Step::StartDrain {
                    why: format!("{why}: no traffic for {}s", idle.as_secs()),
                }
            } else {
                Step::Stay((threshold - idle).min(poll).max(Duration::from_secs(1)))
            }
        }
        Cycle::Draining => {
            let started = s.sleep_started.unwrap_or(s.now);
            let resumed = s.activity.last_activity.is_some_and(|t| t > started);
            // A wake, or no activator left to hold the app's requests: back on the pods.
            if !s.activator_ready {
                return Step::Serve { woke_from: None };
            }
            if let Some(wake) = s.wake.filter(|w| *w > started) {
                return back_on_pods(s, Some(wake));
            }
            if !s.settings.enabled {
                return back_on_pods(s, None);
            }
            let drained = elapsed(started, s.now);
            if s.activity.open_connections == 0 && s.activity.reporting == s.activity.asked {
                if drained < DRAIN_DWELL {
                    return Step::Stay(DRAIN_DWELL - drained);
                }
                return Step::Sleep;
            }
            if resumed && !s.sleep_requested && !s.over_cap
                || elapsed(started, s.now) >= DRAIN_TIMEOUT
            {
                return back_on_pods(s, None);
            }
            Step::Stay(Duration::from_secs(1))
        }
        Cycle::Asleep if !s.settings.enabled => Step::Wake,
        Cycle::Asleep => Step::Stay(Duration::from_secs(300)),
        Cycle::Waking if s.ready_pods > 0 => Step::Serve { woke_from: s.wake },
        Cycle::Waking => Step::Wake,
    }
}

/// Ends a drain with the Service back on the pods, once there is a ready one. A drain may
/// find none: the operator can die after scaling to zero and before recording the sleep, and
/// then the app looks as if still draining. Pointing the Service at no pods would refuse every
/// request, so the app wakes first and the activator holds its requests until a pod is ready.
/// A drain ended by a wake records it (`woke_from`): the wake is newer than the sleep request
/// that started the drain, which must not start it again.
fn back_on_pods(s: &Situation, woke_from: Option<Timestamp>) -> Step {
    if s.ready_pods > 0 {
        Step::Serve { woke_from }
    } else {
        Step::Wake
    }
}

fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

/// Whether `me` is among the longest-idle of `awake` beyond `max`, the apps a policy's cap
/// puts to sleep first. Undecided (false) while any of them has not reported activity yet:
/// acting on half the picture would put the wrong app to sleep.
pub fn sleeps_first<K: Ord + Clone>(awake: &[(Option<Timestamp>, K)], max: usize, me: &K) -> bool {
    if awake.len() <= max || awake.iter().any(|(last, _)| last.is_none()) {
        return false;
    }
    let mut sorted = awake.to_vec();
    sorted.sort();
    sorted[..awake.len() - max].iter().any(|(_, key)| key == me)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, MicroTime};

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn settings() -> Settings {
        Settings {
            enabled: true,
            idle_after: Duration::from_secs(60),
            wake_timeout: DEFAULT_WAKE_TIMEOUT,
            quiet: false,
            policy: None,
            max_awake: None,
            caller_namespaces: Vec::new(),
            mode: SleepMode::Recreate,
        }
    }

    fn situation(cycle: Cycle) -> Situation {
        Situation {
            cycle,
            settings: settings(),
            activity: Activity {
                reporting: 2,
                asked: 2,
                open_connections: 0,
                last_activity: Some(t(1000)),
            },
            idle_since: t(1000),
            sleep_started: None,
            sleep_requested: false,
            over_cap: false,
            ready_pods: 2,
            activator_ready: true,
            wake: None,
            now: t(1030),
        }
    }

    #[test]
    fn an_awake_app_drains_once_idle_long_enough() {
        let s = situation(Cycle::Awake);
        assert_eq!(next_step(&s), Step::Stay(Duration::from_secs(10)));
        let later = Situation {
            now: t(1060),
            ..s.clone()
        };
        assert!(matches!(next_step(&later), Step::StartDrain { .. }));
        let busy = Situation {
            activity: Activity {
                open_connections: 1,
                ..later.activity.clone()
            },
            ..later.clone()
        };
        assert!(
            matches!(next_step(&busy), Step::Stay(_)),
            "open connections are activity"
        );
        let unknown = Situation {
            activity: Activity {
                reporting: 1,
                ..later.activity.clone()
            },
            ..later.clone()
        };
        assert!(
            matches!(next_step(&unknown), Step::Stay(_)),
            "a silent pod is not idle"
        );
        let off = Situation {
            settings: Settings {
                enabled: false,
                ..settings()
            },
            ..later
        };
        assert!(matches!(next_step(&off), Step::Stay(_)));
    }

    #[test]
    fn quiet_hours_shorten_the_idle_threshold() {
        let mut s = situation(Cycle::Awake);
        s.settings.idle_after = Duration::from_secs(3600);
        s.now = t(1000 + 31);
        assert!(matches!(next_step(&s), Step::Stay(_)));
        s.settings.quiet = true;
        assert!(matches!(next_step(&s), Step::StartDrain { .. }));
    }

    #[test]
    fn no_drain_starts_without_a_ready_activator_and_one_in_progress_is_abandoned() {
        let mut s = situation(Cycle::Awake);
        s.now = t(1000 + 3600);
        assert!(matches!(next_step(&s), Step::StartDrain { .. }));
        s.activator_ready = false;
        assert!(
            matches!(next_step(&s), Step::Stay(_)),
            "idle, but nothing would hold it"
        );
        s.sleep_requested = true;
        assert!(
            matches!(next_step(&s), Step::Stay(_)),
            "asked, but nothing would hold it"
        );
        let mut draining = situation(Cycle::Draining);
        draining.sleep_started = Some(t(1020));
        draining.activator_ready = false;
        assert_eq!(next_step(&draining), Step::Serve { woke_from: None });
    }

    /// The operator died after scaling to zero and before recording the sleep: the status
    /// still says draining, and no pod is left. A wake must scale up with the Service kept on
    /// the activator, and point it at the pods only once one is ready.
    #[test]
    fn a_wake_during_a_drain_with_no_pod_left_keeps_the_activator_until_one_is_ready() {
        let mut s = situation(Cycle::Draining);
        s.sleep_started = Some(t(1020));
        s.wake = Some(t(1025));
        // The wake is recorded, so the sleep request that started the drain is older.
        let woken = Step::Serve {
            woke_from: Some(t(1025)),
        };
        assert_eq!(next_step(&s), woken);
        s.ready_pods = 0;
        s.activity = Activity::default();
        assert_eq!(next_step(&s), Step::Wake, "no pod to point the Service at");
        s.ready_pods = 1;
        assert_eq!(next_step(&s), woken);
        s.wake = None;
        s.settings.enabled = false;
        assert_eq!(next_step(&s), Step::Serve { woke_from: None });
        s.ready_pods = 0;
        assert_eq!(next_step(&s), Step::Wake, "switched off, with no pod left");
    }

    #[test]
    fn a_drain_lasts_long_enough_for_the_endpoints_to_move() {
        let mut s = situation(Cycle::Draining);
        s.sleep_started = Some(t(1028));
        s.now = t(1029);
        assert_eq!(
            next_step(&s),
            Step::Stay(DRAIN_DWELL - Duration::from_secs(1)),
            "drained, but the endpoints may still point at the pods"
        );
        s.now = t(1028) + DRAIN_DWELL;
        assert_eq!(next_step(&s), Step::Sleep);
    }

    #[test]
    fn drain_sleeps_when_connections_end_and_gives_up_on_long_streams() {
        let mut s = situation(Cycle::Draining);
        s.sleep_started = Some(t(1020));
        s.activity.open_connections = 0;
        assert_eq!(next_step(&s), Step::Sleep);
        s.activity.open_connections = 3;
        assert_eq!(next_step(&s), Step::Stay(Duration::from_secs(1)));
        s.now = t(1020 + 61);
        assert_eq!(
            next_step(&s),
            Step::Serve { woke_from: None },
            "a stream is not idleness"
        );
        let mut resumed = situation(Cycle::Draining);
        resumed.sleep_started = Some(t(1020));
        resumed.activity.open_connections = 1;
        resumed.activity.last_activity = Some(t(1025));
        assert_eq!(next_step(&resumed), Step::Serve { woke_from: None });
    }

    #[test]
    fn a_wake_request_after_the_sleep_wakes_and_a_ready_pod_ends_the_wake() {
        let mut status = CracAppStatus {
            slept_at: Some(MicroTime(t(2000))),
            serving_mode: Some(ServingMode::Activator),
            ..Default::default()
        };
        assert_eq!(cycle_of(&status, None), Cycle::Asleep);
        assert_eq!(
            cycle_of(&status, Some(t(1500))),
            Cycle::Asleep,
            "an old request does not wake"
        );
        status.wake_requested_at = Some(MicroTime(t(2005)));
        let wake = wake_request(&status, None);
        assert_eq!(cycle_of(&status, wake), Cycle::Waking);
        let mut s = situation(Cycle::Waking);
        s.wake = wake;
        s.ready_pods = 0;
        assert_eq!(next_step(&s), Step::Wake);
        s.ready_pods = 1;
        assert_eq!(
            next_step(&s),
            Step::Serve {
                woke_from: Some(t(2005))
            }
        );
        assert_eq!(
            wake_request(&status, Some(t(3000))),
            Some(t(3000)),
            "the annotation counts too"
        );
    }

    #[test]
    fn selectors_and_policy_precedence() {
        let sel = LabelSelector {
            match_labels: Some([("team".to_string(), "shop".to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["critical".into()]),
            }]),
        };
        let mut labels: BTreeMap<String, String> =
            [("team".to_string(), "shop".to_string())].into();
        assert!(selector_matches(&sel, &labels));
        labels.insert("tier".into(), "critical".into());
        assert!(!selector_matches(&sel, &labels));

        let policy = |name: &str, priority: i32, idle: &str| {
            let mut p = CracScalePolicy::new(name, Default::default());
            p.spec.priority = priority;
            p.spec.scale_to_zero = Some(ScaleToZeroSpec {
                enabled: Some(true),
                idle_after: Some(idle.into()),
                wake_timeout: None,
                caller_namespaces: vec!["ingress".into()],
                mode: Some(SleepMode::InPlace),
            });
            p
        };
        let policies = vec![
            policy("b", 0, "5m"),
            policy("a", 1, "1m"),
            policy("c", 0, "2m"),
        ];
        let app = CracApp::new(
            "x",
            serde_json::from_value(serde_json::json!({"template": {}})).unwrap(),
        );
        let chosen = governing_policy(&app, &BTreeMap::new(), &policies).unwrap();
        assert_eq!(chosen.name_any(), "b", "lowest priority, then name");

        let own = ScaleToZeroSpec {
            enabled: None,
            idle_after: Some("45s".into()),
            wake_timeout: None,
            caller_namespaces: Vec::new(),
            mode: None,
        };
        let s = settings_for(Some(&own), Some(chosen), t(0));
        // The policy's mode, unless the app says otherwise or has a liveness probe.
        assert_eq!(
            sleep_mode(Some(&own), Some(chosen), false),
            SleepMode::InPlace
        );
        assert_eq!(
            sleep_mode(Some(&own), Some(chosen), true),
            SleepMode::Recreate
        );
        let recreate = ScaleToZeroSpec {
            mode: Some(SleepMode::Recreate),
            ..own.clone()
        };
        assert_eq!(
            sleep_mode(Some(&recreate), Some(chosen), false),
            SleepMode::Recreate
        );
        assert_eq!(sleep_mode(None, None, false), SleepMode::Recreate);
        assert!(s.enabled, "from the policy");
        assert_eq!(s.caller_namespaces, ["ingress"], "from the policy");
        let mut mine = own.clone();
        mine.caller_namespaces = vec!["web".into()];
        let s = settings_for(Some(&mine), Some(chosen), t(0));
        assert_eq!(s.caller_namespaces, ["web"], "the app's own list wins");
        assert_eq!(
            s.idle_after,
            Duration::from_secs(45),
            "the app's own field wins"
        );
        assert_eq!(s.wake_timeout, DEFAULT_WAKE_TIMEOUT);
        assert!(!settings_for(None, None, t(0)).enabled, "off unless asked");
    }

    #[test]
    fn quiet_hours_windows_may_span_midnight() {
        let w = |a: &str, b: &str| QuietHours {
            start: a.into(),
            end: b.into(),
        };
        assert!(in_quiet_hours(&[w("22:00", "06:00")], 23 * 60));
        assert!(in_quiet_hours(&[w("22:00", "06:00")], 5 * 60 + 59));
        assert!(!in_quiet_hours(&[w("22:00", "06:00")], 6 * 60));
        assert!(in_quiet_hours(&[w("12:00", "13:00")], 12 * 60 + 30));
        assert!(!in_quiet_hours(&[], 0));
        assert_eq!(minute_of_day(t(86_400 + 90)), 1);
    }

    #[test]
    fn the_cap_sleeps_the_longest_idle_and_waits_for_every_report() {
        let awake = vec![(Some(t(100)), "b"), (Some(t(50)), "a"), (Some(t(300)), "c")];
        assert!(sleeps_first(&awake, 2, &"a"), "idle since 50: first to go");
        assert!(!sleeps_first(&awake, 2, &"b"));
        assert!(sleeps_first(&awake, 1, &"b"));
        assert!(!sleeps_first(&awake, 3, &"a"), "within the cap");
        let unknown = vec![(Some(t(50)), "a"), (None, "b")];
        assert!(
            !sleeps_first(&unknown, 1, &"a"),
            "not before every app reported"
        );
    }
}
