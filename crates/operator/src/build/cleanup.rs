//! The cleanup Job: before a CracApp that used an `existingClaim` goes, it removes the app's
//! image directory from the shared claim (a claim of the app's own goes with the app).

use super::inject::IMAGES_VOLUME;
use super::{AGENT_IMAGE_BINARY, BuildConfig, app_name, labels_for, owner_ref};
use crac_api::CracApp;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

/// How long a cleanup may take before the Job fails (and the operator tries again).
pub const CLEANUP_DEADLINE_SECONDS: i64 = 300;

/// The cleanup Job's name (one per app: it runs once, as the app goes).
pub fn cleanup_job_name(app: &CracApp) -> String {
    format!("{}-crac-cleanup", app_name(app))
}

/// The Job that runs `crac-agent clean <image dir of the app>` on `claim`.
///
/// The checkpoint pod wrote those files as whatever user the app's image runs as (often
/// root), so the agent's own non-root user could not remove them: the cleanup runs as root
/// with every capability dropped but DAC_OVERRIDE (remove files whoever owns them). It runs
/// only the operator's agent image with a fixed command; the tenant chooses neither.
pub fn cleanup_job_for(app: &CracApp, name: &str, claim: &str, config: &BuildConfig) -> Job {
    let dir = format!("{}/{}", crac_api::agent::IMAGE_MOUNT, app_name(app));
    let template = app.spec.template.spec.as_ref();
    Job {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: app.namespace(),
            labels: Some(labels_for(app_name(app), "cleanup")),
            owner_references: Some(vec![owner_ref(app)]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(3),
            active_deadline_seconds: Some(CLEANUP_DEADLINE_SECONDS),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels_for(app_name(app), "cleanup")),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    node_selector: template.and_then(|s| s.node_selector.clone()),
                    tolerations: template.and_then(|s| s.tolerations.clone()),
                    containers: vec![Container {
                        name: "clean".into(),
                        image: Some(config.agent_image.clone()),
                        command: Some(vec![AGENT_IMAGE_BINARY.into(), "clean".into(), dir]),
                        volume_mounts: Some(vec![VolumeMount {
                            name: IMAGES_VOLUME.into(),
                            mount_path: crac_api::agent::IMAGE_MOUNT.into(),
                            ..Default::default()
                        }]),
                        security_context: Some(SecurityContext {
                            run_as_user: Some(0),
                            run_as_non_root: Some(false),
                            allow_privilege_escalation: Some(false),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                add: Some(vec!["DAC_OVERRIDE".into()]),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: IMAGES_VOLUME.into(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: claim.into(),
                            read_only: Some(false),
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_runs_the_agent_with_only_dac_override_and_a_deadline_where_the_app_runs() {
        let app: CracApp = serde_json::from_value(serde_json::json!({
            "apiVersion": "crac.dev/v1alpha1", "kind": "CracApp",
            "metadata": { "name": "shop", "namespace": "ns", "uid": "u1" },
            "spec": {
                "template": { "spec": {
                    "nodeSelector": { "disk": "ssd" },
                    "containers": [{ "name": "app", "image": "a", "command": ["java"] }]
                }},
                "checkpoint": { "storage": { "existingClaim": "shared" } }
            }
        }))
        .unwrap();
        let config = BuildConfig {
            agent_image: "agent:1".into(),
        };
        let job = cleanup_job_for(&app, "shop-cleanup", "shared", &config);
        let spec = job.spec.unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(CLEANUP_DEADLINE_SECONDS));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["disk"], "ssd");
        let c = &pod.containers[0];
        assert_eq!(
            c.command.as_ref().unwrap(),
            &["/usr/local/bin/crac-agent", "clean", "/crac/shop"]
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_user, Some(0));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(caps.add.as_deref(), Some(&["DAC_OVERRIDE".to_string()][..]));
        let claim = pod.volumes.unwrap()[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!(claim.claim_name, "shared");
    }
}
