//! The checkpoint Job: runs the app once under `crac-agent checkpoint`, which publishes an
//! image to the claim and reports how it went in its termination message.

use super::inject::{Mode, inject_agent};
use super::{BuildConfig, app_name, labels_for, owner_ref};
use crate::checkpoint_id::short;
use crate::validate::ValidatedApp;
use crac_api::CracApp;
use crac_api::agent as contract;
use crac_api::cracapp::APP_CONTAINER;
use crac_api::labels;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{EnvVar, PodTemplateSpec};
use kube::api::ObjectMeta;
use std::collections::BTreeMap;

/// Pod retries inside one Job. None: one attempt is one Job, and the operator retries with
/// its own backoff, so each failure is reported with its reason before the next attempt.
pub const POD_RETRIES: i32 = 0;

/// The component label of checkpoint Jobs and their pods.
pub const CHECKPOINT_COMPONENT: &str = "checkpoint";

/// The Job's name: one per checkpoint id and attempt, so a restarted operator finds the Job
/// it already created instead of creating another.
pub fn checkpoint_job_name(app: &str, id: &str, attempt: i32) -> String {
    format!("{app}-ckpt-{}-{attempt}", short(id))
}

pub fn checkpoint_job_for(
    app: &CracApp,
    validated: &ValidatedApp,
    id: &str,
    attempt: i32,
    config: &BuildConfig,
) -> Job {
    let name = app_name(app);
    let mut pod_labels = app
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    pod_labels.extend(labels_for(name, CHECKPOINT_COMPONENT));
    pod_labels.insert(labels::CHECKPOINT_ID.into(), short(id).into());
    let mut job_labels = labels_for(name, CHECKPOINT_COMPONENT);
    job_labels.insert(labels::CHECKPOINT_ID.into(), short(id).into());

    let mut pod_spec = app.spec.template.spec.clone().unwrap_or_default();
    inject_agent(&mut pod_spec, Mode::Checkpoint, app, validated, id, config);
    pod_spec.restart_policy = Some("Never".into());
    // Orders this Job's image after those of earlier specs: its prune never removes an image
    // of a newer spec (a superseded Job is deleted, but its pod may still be publishing).
    // Only here: in the restore pods' template it would roll them on every spec change.
    if let Some(container) = pod_spec
        .containers
        .iter_mut()
        .find(|c| c.name == APP_CONTAINER)
    {
        let env = container.env.get_or_insert_with(Vec::new);
        env.push(EnvVar {
            name: contract::ENV_SPEC_GENERATION.into(),
            value: Some(app.metadata.generation.unwrap_or(0).to_string()),
            ..Default::default()
        });
        env.push(EnvVar {
            name: contract::ENV_TRIAL_RESTORE.into(),
            value: Some(app.spec.checkpoint.trial_restore.to_string()),
            ..Default::default()
        });
    }

    let attempt_deadline =
        i64::try_from(validated.checkpoint_timeout.as_secs()).unwrap_or(i64::MAX);
    Job {
        metadata: ObjectMeta {
            name: Some(checkpoint_job_name(name, id, attempt)),
            namespace: app.metadata.namespace.clone(),
            labels: Some(job_labels),
            annotations: Some(BTreeMap::from([(
                labels::CHECKPOINT_ID_ANNOTATION.to_string(),
                id.to_string(),
            )])),
            owner_references: Some(vec![owner_ref(app)]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(POD_RETRIES),
            // The agent enforces the deadline of each attempt; this bounds the whole Job,
            // retries included, in case a pod hangs where the agent cannot see it.
            active_deadline_seconds: Some(
                attempt_deadline.saturating_mul(i64::from(POD_RETRIES + 1)) + 120,
            ),
            // Keep a finished Job a day for `kubectl logs`; the image outlives it.
            ttl_seconds_after_finished: Some(86_400),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: app
                        .spec
                        .template
                        .metadata
                        .as_ref()
                        .and_then(|m| m.annotations.clone()),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{tests::app, validate};

    fn job() -> Job {
        let a = app();
        let v = validate(&a, &Default::default()).unwrap();
        let config = BuildConfig {
            agent_image: "crac-agent:test".into(),
        };
        checkpoint_job_for(&a, &v, &"ab".repeat(32), 0, &config)
    }

    #[test]
    fn app_container_runs_the_agent_in_checkpoint_mode() {
        let spec = job().spec.unwrap().template.spec.unwrap();
        let c = &spec.containers[0];
        assert_eq!(
            c.command.as_ref().unwrap(),
            &[
                contract::AGENT_BIN,
                "checkpoint",
                "--",
                "java",
                "-jar",
                "/home/app/demo.jar",
                "--server.port=8080"
            ]
        );
        assert!(c.args.is_none());
        assert!(
            c.readiness_probe.is_none(),
            "the agent checks readiness itself"
        );
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        for var in [
            contract::ENV_SPEC_GENERATION,
            contract::ENV_CHECKPOINT_ID,
            contract::ENV_IMAGE_DIR,
            contract::ENV_READINESS,
            contract::ENV_WARMUP,
        ] {
            assert!(env.contains(&var), "{var} missing from {env:?}");
        }
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.image.as_deref(), Some("crac-agent:test"));
        assert_eq!(init.command.as_ref().unwrap()[1], "install");
    }

    #[test]
    fn only_the_checkpoint_capabilities_are_added() {
        let spec = job().spec.unwrap().template.spec.unwrap();
        let sc = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().add.as_ref().unwrap(),
            &["CHECKPOINT_RESTORE", "SYS_PTRACE"]
        );
        // CRIU cannot dump under a runtime's default seccomp profile (proven on the real node).
        let seccomp = sc.seccomp_profile.as_ref().unwrap();
        assert_eq!(seccomp.type_, "Unconfined");
        // Only the app container: the agent's init container keeps the pod's profile.
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert!(
            init.security_context
                .as_ref()
                .unwrap()
                .seccomp_profile
                .is_none()
        );
    }

    #[test]
    fn images_volume_is_writable_and_deadline_follows_timeout() {
        let spec = job().spec.unwrap();
        let pod = spec.template.spec.unwrap();
        let mount = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == contract::IMAGE_MOUNT)
            .unwrap();
        assert_eq!(mount.read_only, Some(false));
        assert_eq!(spec.active_deadline_seconds, Some(600 + 120));
        assert_eq!(spec.backoff_limit, Some(POD_RETRIES));
    }

    #[test]
    fn the_agent_learns_the_spec_generation_it_checkpoints() {
        let mut a = app();
        a.metadata.generation = Some(7);
        let v = validate(&a, &Default::default()).unwrap();
        let config = BuildConfig {
            agent_image: "crac-agent:test".into(),
        };
        let job = checkpoint_job_for(&a, &v, &"ab".repeat(32), 0, &config);
        let env = job.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let generation: Vec<_> = env
            .iter()
            .filter(|e| e.name == contract::ENV_SPEC_GENERATION)
            .map(|e| e.value.as_deref())
            .collect();
        assert_eq!(generation, [Some("7")], "once, the app's generation");
    }

    #[test]
    fn the_agent_is_told_whether_to_trial_restore() {
        let trial = |on: bool| {
            let mut a = app();
            a.spec.checkpoint.trial_restore = on;
            let v = validate(&a, &Default::default()).unwrap();
            let config = BuildConfig {
                agent_image: "crac-agent:test".into(),
            };
            let job = checkpoint_job_for(&a, &v, &"ab".repeat(32), 0, &config);
            job.spec.unwrap().template.spec.unwrap().containers[0]
                .env
                .clone()
                .unwrap()
                .into_iter()
                .filter(|e| e.name == contract::ENV_TRIAL_RESTORE)
                .map(|e| e.value.unwrap_or_default())
                .collect::<Vec<_>>()
        };
        assert_eq!(trial(true), ["true"]);
        assert_eq!(trial(false), ["false"]);
    }

    #[test]
    fn name_is_deterministic_per_id_and_attempt() {
        let id = "0123456789abcdef";
        assert_eq!(checkpoint_job_name("demo", id, 0), "demo-ckpt-0123456789-0");
        assert_ne!(
            checkpoint_job_name("demo", id, 1),
            checkpoint_job_name("demo", id, 0)
        );
    }
}
