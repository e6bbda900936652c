//! Which pods serve an app. The operator (for the Service's endpoints and activity polling)
//! and the activator (for forwarding) must agree, so the rule lives here once.

use crate::labels;
use k8s_openapi::api::core::v1::Pod;

/// Label selector of an app's restore pods; checkpoint and cleanup pods carry the app label
/// too but never serve.
pub fn restore_pods_selector(app: Option<&str>) -> String {
    match app {
        Some(app) => format!("{}={app},{}=restore", labels::APP, labels::COMPONENT),
        None => format!("{},{}=restore", labels::APP, labels::COMPONENT),
    }
}

/// Whether the pod is one of the app's restore pods: [`restore_pods_selector`] as a test.
pub fn is_restore_pod_of(pod: &Pod, app: &str) -> bool {
    let labels = pod.metadata.labels.as_ref();
    let has =
        |key: &str, value: &str| labels.and_then(|l| l.get(key)).map(String::as_str) == Some(value);
    has(labels::APP, app) && has(labels::COMPONENT, "restore")
}

/// The pod's address when it should receive traffic: Running, Ready, not terminating, with an
/// address. (A pod that has ended can still carry a stale Ready condition.)
pub fn serving_address(pod: &Pod) -> Option<&str> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    status.pod_ip.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, ready: &str, deleting: bool) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "status": { "phase": phase, "podIP": "10.0.0.7",
                        "conditions": [{ "type": "Ready", "status": ready }] }
        }))
        .expect("test pod parses");
        if deleting {
            pod.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        pod
    }

    #[test]
    fn only_running_ready_live_pods_serve() {
        assert_eq!(
            serving_address(&pod("Running", "True", false)),
            Some("10.0.0.7")
        );
        assert_eq!(serving_address(&pod("Running", "False", false)), None);
        assert_eq!(
            serving_address(&pod("Succeeded", "True", false)),
            None,
            "stale Ready"
        );
        assert_eq!(
            serving_address(&pod("Running", "True", true)),
            None,
            "terminating"
        );
        assert_eq!(
            restore_pods_selector(Some("a")),
            "crac.dev/app=a,app.kubernetes.io/component=restore"
        );
    }
}
