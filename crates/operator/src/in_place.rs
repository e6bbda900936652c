//! Sleeping in place (`scaleToZero.mode: InPlace`), decided without a cluster: which restore
//! pods to put to sleep, to wake and to resize, from what the cache says of them.
//!
//! A pod sleeps in place once its agent answered `POST /sleep` and the operator marked it
//! ([`labels::ASLEEP_IN_PLACE_SINCE`]). While the app is asleep every unmarked pod (a new one,
//! or one the marking missed) is put to sleep; a marked pod is never put back to sleep, since
//! the activator may have just woken it for a request. While the app is not asleep, a marked
//! pod is grown back and sent `POST /wake` (at once answered when the activator woke it
//! already), and unmarked once its agent says it is awake. Its Ready condition says nothing
//! here: the kubelet notices a sleeping JVM only at its next probe, so a marked pod never
//! counts as a ready one.

use crac_api::cracapp::APP_CONTAINER;
use crac_api::labels;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// What a sleeping pod's app container requests (or less, when it asked for less awake): the
/// agent alone holds about 3 MB and no CPU.
pub const SLEEP_CPU: &str = "10m";
pub const SLEEP_MEMORY: &str = "16Mi";

pub type Requests = BTreeMap<String, Quantity>;

/// One restore pod, as far as sleeping in place cares.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    pub ip: Option<String>,
    pub ready: bool,
    pub marked: bool,
    /// Its app container's requests now.
    pub requests: Requests,
    /// Whether its requests may be changed in place: a Burstable pod (a Guaranteed one would
    /// change class, a BestEffort one reserves nothing) whose container restarts on no resize.
    pub resizable: bool,
}

impl PodView {
    pub fn of(pod: &Pod) -> Option<PodView> {
        if pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let status = pod.status.as_ref()?;
        if status.phase.as_deref() != Some("Running") {
            return None;
        }
        let container = app_container(pod)?;
        let restarts_on_resize = container
            .resize_policy
            .iter()
            .flatten()
            .any(|p| p.restart_policy == "RestartContainer");
        Some(PodView {
            name: pod.name_any(),
            ip: status.pod_ip.clone(),
            ready: status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            marked: pod
                .annotations()
                .contains_key(labels::ASLEEP_IN_PLACE_SINCE),
            requests: requests_of(container),
            resizable: status.qos_class.as_deref() == Some("Burstable") && !restarts_on_resize,
        })
    }
}

fn app_container(pod: &Pod) -> Option<&Container> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == APP_CONTAINER)
}

pub fn requests_of(container: &Container) -> Requests {
    container
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default()
}

/// What a template's container requests once the API server has defaulted it: its requests,
/// and its limits for any resource it sets no request for.
pub fn template_requests(container: &Container) -> Requests {
    let mut requests = requests_of(container);
    let limits = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    for (resource, limit) in limits {
        requests.entry(resource).or_insert(limit);
    }
    requests
}

/// A pod to call, by name and address.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub pod: String,
    pub ip: String,
}

/// New requests for a pod's app container.
#[derive(Clone, Debug, PartialEq)]
pub struct Resize {
    pub pod: String,
    pub requests: Requests,
}

/// What one reconcile does to the pods.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Work {
    /// `POST /sleep`, then (on success) mark, and shrink to these requests (a resizable pod).
    pub sleep: Vec<(Target, Option<Requests>)>,
    /// Grow back to these requests (a resizable pod that shrank), `POST /wake`, then (once
    /// awake) unmark. A pod that cannot be woken is deleted: its replacement restores.
    pub wake: Vec<(Target, Option<Requests>)>,
    /// Awake, unmarked, but still at a sleeping pod's requests (its growing failed once):
    /// grown back.
    pub grow: Vec<Resize>,
}

impl Work {
    pub fn is_empty(&self) -> bool {
        self.sleep.is_empty() && self.wake.is_empty() && self.grow.is_empty()
    }
}

/// The requests of a sleeping pod whose awake requests are `awake`: each of CPU and memory
/// lowered to the sleep value, never raised.
pub fn sleeping_requests(awake: &Requests) -> Requests {
    awake
        .iter()
        .map(|(resource, q)| {
            let floor = match resource.as_str() {
                "cpu" => SLEEP_CPU,
                "memory" => SLEEP_MEMORY,
                _ => return (resource.clone(), q.clone()),
            };
            let lower = match (quantity(&q.0), quantity(floor)) {
                (Some(now), Some(sleep)) if sleep < now => Quantity(floor.into()),
                _ => q.clone(),
            };
            (resource.clone(), lower)
        })
        .collect()
}

/// The pods' next step. `asleep`: the app's cycle once this reconcile's step is taken;
/// `awake`: the Deployment template's requests for the app container.
pub fn work(asleep: bool, pods: &[PodView], awake: &Requests) -> Work {
    let mut w = Work::default();
    for pod in pods {
        if asleep {
            if !pod.marked
                && let Some(ip) = &pod.ip
            {
                let shrink = (pod.resizable && !pod.requests.is_empty())
                    .then(|| sleeping_requests(&pod.requests))
                    .filter(|small| !same_requests(small, &pod.requests));
                w.sleep.push((
                    Target {
                        pod: pod.name.clone(),
                        ip: ip.clone(),
                    },
                    shrink,
                ));
            }
            continue;
        }
        let shrunk = pod.resizable
            && !awake.is_empty()
            && !same_requests(awake, &sleeping_requests(awake))
            && same_requests(&pod.requests, &sleeping_requests(awake));
        if !pod.marked && shrunk {
            w.grow.push(Resize {
                pod: pod.name.clone(),
                requests: awake.clone(),
            });
        }
        let (true, Some(ip)) = (pod.marked, &pod.ip) else {
            continue;
        };
        let grow = (pod.resizable && !awake.is_empty() && !same_requests(&pod.requests, awake))
            .then(|| awake.clone());
        w.wake.push((
            Target {
                pod: pod.name.clone(),
                ip: ip.clone(),
            },
            grow,
        ));
    }
    w
}

/// Whether two sets of requests are equal as quantities (`1Gi` is `1024Mi`).
pub fn same_requests(a: &Requests, b: &Requests) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, q)| {
            b.get(k).is_some_and(|r| {
                q.0 == r.0 || (quantity(&q.0).is_some() && quantity(&q.0) == quantity(&r.0))
            })
        })
}

/// A quantity's value (`100m`, `2`, `64Mi`, `1G`, `1e3`), `None` for a form not understood.
pub fn quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let base: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(base * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    fn reqs(cpu: &str, memory: &str) -> Requests {
        [
            ("cpu".to_string(), q(cpu)),
            ("memory".to_string(), q(memory)),
        ]
        .into()
    }

    fn pod(name: &str, ready: bool, marked: bool, requests: Requests) -> PodView {
        PodView {
            name: name.into(),
            ip: Some(format!("10.0.0.{}", name.len())),
            ready,
            marked,
            requests,
            resizable: true,
        }
    }

    #[test]
    fn a_template_requests_its_limits_where_it_sets_no_request() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "app",
            "resources": { "limits": { "memory": "256Mi", "cpu": "1" }, "requests": { "cpu": "100m" } }
        }))
        .unwrap();
        assert_eq!(template_requests(&c), reqs("100m", "256Mi"));
    }

    #[test]
    fn quantities_are_compared_by_value() {
        assert_eq!(quantity("100m"), Some(0.1));
        assert_eq!(quantity("1Gi"), quantity("1024Mi"));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("12Xi"), None);
        assert!(same_requests(&reqs("1", "1Gi"), &reqs("1000m", "1024Mi")));
        assert!(!same_requests(&reqs("1", "1Gi"), &reqs("1", "1G")));
    }

    #[test]
    fn sleeping_requests_only_go_down() {
        assert_eq!(
            sleeping_requests(&reqs("500m", "256Mi")),
            reqs(SLEEP_CPU, SLEEP_MEMORY)
        );
        // Already below the sleep values: kept.
        assert_eq!(sleeping_requests(&reqs("5m", "8Mi")), reqs("5m", "8Mi"));
        let gpu: Requests = [("nvidia.com/gpu".to_string(), q("1"))].into();
        assert_eq!(sleeping_requests(&gpu), gpu);
    }

    #[test]
    fn asleep_only_unmarked_pods_are_put_to_sleep() {
        let awake = reqs("500m", "256Mi");
        let pods = [
            pod("new", true, false, awake.clone()),
            // Marked and Ready: the activator woke it for a request; left alone.
            pod("woken", true, true, awake.clone()),
            pod("asleep", false, true, reqs(SLEEP_CPU, SLEEP_MEMORY)),
        ];
        let w = work(true, &pods, &awake);
        assert_eq!(
            w.sleep
                .iter()
                .map(|(t, _)| t.pod.as_str())
                .collect::<Vec<_>>(),
            ["new"]
        );
        assert_eq!(w.sleep[0].1, Some(reqs(SLEEP_CPU, SLEEP_MEMORY)));
        let fixed = [PodView {
            resizable: false,
            ..pod("guaranteed", true, false, awake.clone())
        }];
        assert_eq!(work(true, &fixed, &awake).sleep[0].1, None);
    }

    #[test]
    fn awake_marked_pods_are_grown_and_woken_whatever_their_ready_condition() {
        let awake = reqs("500m", "256Mi");
        let small = reqs(SLEEP_CPU, SLEEP_MEMORY);
        let pods = [
            pod("asleep", false, true, small.clone()),
            // Ready by the kubelet's last probe, which may predate its sleep.
            pod("listed", true, true, small.clone()),
            pod("never", false, false, awake.clone()),
            PodView {
                resizable: false,
                ..pod("guaranteed", false, true, small.clone())
            },
        ];
        let w = work(false, &pods, &awake);
        assert!(w.sleep.is_empty());
        let woken: Vec<(&str, bool)> = w
            .wake
            .iter()
            .map(|(t, grow)| (t.pod.as_str(), grow.is_some()))
            .collect();
        assert_eq!(
            woken,
            [("asleep", true), ("listed", true), ("guaranteed", false)],
            "an unmarked pod that is not Ready is starting, not asleep"
        );
        assert!(
            w.wake
                .iter()
                .filter_map(|(_, g)| g.as_ref())
                .all(|g| *g == awake)
        );
        assert!(w.grow.is_empty());
        // Woken and unmarked, but its growing failed: grown at the next look.
        let left_small = [pod("left", true, false, small.clone())];
        let w = work(false, &left_small, &awake);
        assert_eq!(
            w.grow,
            [Resize {
                pod: "left".into(),
                requests: awake.clone()
            }]
        );
        assert!(w.wake.is_empty());
    }
}
