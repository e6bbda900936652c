//! The restore Deployment: pods that run `crac-agent restore`, reading the image from the
//! claim mounted read-only. A new image rolls out with maxUnavailable 0, so the pods of the
//! previous image keep serving until the new ones are ready.

use super::inject::{Mode, inject_agent, mount_control_token};
use super::{BuildConfig, app_name, labels_for, owner_ref};
use crate::checkpoint_id::short;
use crate::image_ref;
use crate::validate::ValidatedApp;
use crac_api::CracApp;
use crac_api::agent as contract;
use crac_api::cracapp::{APP_CONTAINER, CheckpointStatus};
use crac_api::labels;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{EnvVar, LifecycleHandler, PodSpec, PodTemplateSpec, SleepAction};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use std::collections::BTreeMap;

/// The label selector of the app's pods (immutable on a Deployment, so the id is not in it).
pub fn pod_selector(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(labels::APP.to_string(), app.to_string())])
}

/// The Deployment restoring the published `image` with `replicas` pods. The pods get the
/// image's digest in their spec, and restore only an image that matches it. Their app
/// container runs the container image the checkpoint pod ran, pinned by digest, when the
/// status records one. `in_place`: the app sleeps in place, and its pods get its control token.
pub fn restore_deployment_for(
    app: &CracApp,
    validated: &ValidatedApp,
    image: &CheckpointStatus,
    replicas: i32,
    in_place: bool,
    config: &BuildConfig,
) -> Deployment {
    let id = image.id.as_str();
    let name = app_name(app);
    let template_meta = app.spec.template.metadata.clone().unwrap_or_default();
    let mut pod_labels = template_meta.labels.unwrap_or_default();
    pod_labels.extend(labels_for(name, "restore"));
    pod_labels.insert(labels::CHECKPOINT_ID.into(), short(id).into());
    let mut pod_annotations = template_meta.annotations.unwrap_or_default();
    pod_annotations.insert(labels::CHECKPOINT_ID_ANNOTATION.into(), id.into());

    let mut pod_spec = app.spec.template.spec.clone().unwrap_or_default();
    inject_agent(&mut pod_spec, Mode::Restore, app, validated, id, config);
    serve_while_endpoints_move(&mut pod_spec);
    if in_place {
        mount_control_token(&mut pod_spec, name);
    }
    if let Some(container) = pod_spec
        .containers
        .iter_mut()
        .find(|c| c.name == APP_CONTAINER)
    {
        container.env.get_or_insert_with(Vec::new).push(EnvVar {
            name: contract::ENV_IMAGE_DIGEST.into(),
            value: image.digest.clone(),
            ..Default::default()
        });
        // Only the recorded digest is taken from the status (anyone who may write it could
        // write anything there); the repository is the spec's.
        let spec_image = container.image.as_deref().unwrap_or_default();
        if let Some(pinned) = image
            .app_image
            .as_deref()
            .and_then(|recorded| image_ref::pinned(spec_image, recorded))
        {
            container.image = Some(pinned);
        }
    }

    Deployment {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: app.metadata.namespace.clone(),
            labels: Some(labels_for(name, "restore")),
            owner_references: Some(vec![owner_ref(app)]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(pod_selector(name)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How long a restore pod keeps serving after it is told to stop, before its app gets
/// SIGTERM: the removal of its address reaches every node's proxy and the activator in this
/// time, so no request is sent to a pod that has already stopped listening.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;

/// Gives the app container a preStop sleep (the kubelet's own, so the image needs no `sleep`
/// binary) unless the template sets a preStop of its own. The sleep counts against the grace
/// period, so a shorter grace period shortens it, leaving a second for the app's own stop.
fn serve_while_endpoints_move(pod: &mut PodSpec) {
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let seconds = PRE_STOP_SLEEP_SECONDS.min(grace - 1);
    let Some(app) = pod.containers.iter_mut().find(|c| c.name == APP_CONTAINER) else {
        return;
    };
    let own = app.lifecycle.as_ref().is_some_and(|l| l.pre_stop.is_some());
    if own || seconds < 1 {
        return;
    }
    app.lifecycle.get_or_insert_with(Default::default).pre_stop = Some(LifecycleHandler {
        sleep: Some(SleepAction { seconds }),
        ..Default::default()
    });
}

/// The Secret holding the control token of an app that sleeps in place, for its pods.
pub fn control_secret_for(app: &CracApp, token: &str) -> k8s_openapi::api::core::v1::Secret {
    let name = app_name(app);
    k8s_openapi::api::core::v1::Secret {
        metadata: ObjectMeta {
            name: Some(crac_api::control::token_secret_name(name)),
            namespace: app.metadata.namespace.clone(),
            labels: Some(labels_for(name, "control")),
            owner_references: Some(vec![owner_ref(app)]),
            ..Default::default()
        },
        data: Some(
            [(
                crac_api::control::TOKEN_FIELD.to_string(),
                k8s_openapi::ByteString(token.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// The checkpoint id a Deployment's pods restore from.
pub fn restored_id(deployment: &Deployment) -> Option<&str> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(labels::CHECKPOINT_ID_ANNOTATION)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{tests::app, validate};
    use crac_api::agent as contract;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn deployment() -> Deployment {
        let a = app();
        let v = validate(&a, &Default::default()).unwrap();
        let config = BuildConfig {
            agent_image: "crac-agent:test".into(),
        };
        restore_deployment_for(&a, &v, &image(), 2, false, &config)
    }

    fn image() -> CheckpointStatus {
        CheckpointStatus {
            id: "cd".repeat(32),
            digest: Some(format!("sha256:{}", "e".repeat(64))),
            ..Default::default()
        }
    }

    fn pre_stop_sleep(d: &Deployment) -> Option<i64> {
        let pod = d.spec.as_ref()?.template.spec.as_ref()?;
        let handler = pod.containers[0].lifecycle.as_ref()?.pre_stop.as_ref()?;
        Some(handler.sleep.as_ref()?.seconds)
    }

    #[test]
    fn pods_keep_serving_while_their_endpoints_move_unless_the_template_says_otherwise() {
        assert_eq!(pre_stop_sleep(&deployment()), Some(PRE_STOP_SLEEP_SECONDS));
        let build = |edit: &dyn Fn(&mut PodSpec)| {
            let mut a = app();
            edit(a.spec.template.spec.as_mut().unwrap());
            let v = validate(&a, &Default::default()).unwrap();
            let config = BuildConfig {
                agent_image: "crac-agent:test".into(),
            };
            restore_deployment_for(&a, &v, &image(), 2, false, &config)
        };
        let short_grace = build(&|pod| pod.termination_grace_period_seconds = Some(3));
        assert_eq!(
            pre_stop_sleep(&short_grace),
            Some(2),
            "within the grace period"
        );
        let no_grace = build(&|pod| pod.termination_grace_period_seconds = Some(1));
        assert_eq!(pre_stop_sleep(&no_grace), None);
        let container = no_grace.spec.unwrap().template.spec.unwrap().containers[0].clone();
        assert_eq!(container.lifecycle, None, "nothing added");
        let own = build(&|pod| {
            pod.containers[0].lifecycle = Some(k8s_openapi::api::core::v1::Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction { seconds: 20 }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        });
        assert_eq!(pre_stop_sleep(&own), Some(20), "the template's own is kept");
    }

    #[test]
    fn pods_are_given_the_digest_the_status_records() {
        let d = deployment();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let env = pod.containers[0].env.as_ref().unwrap();
        let digest = env
            .iter()
            .find(|e| e.name == contract::ENV_IMAGE_DIGEST)
            .and_then(|e| e.value.clone());
        assert_eq!(digest, image().digest);
        // The spec generation is the checkpoint's alone: here it would roll the pods on every
        // change of the spec, replicas included.
        assert!(env.iter().all(|e| e.name != contract::ENV_SPEC_GENERATION));
    }

    fn app_image_with(spec_image: &str, recorded: Option<&str>) -> Option<String> {
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].image = Some(spec_image.into());
        let v = validate(&a, &Default::default()).unwrap();
        let config = BuildConfig {
            agent_image: "crac-agent:test".into(),
        };
        let image = CheckpointStatus {
            app_image: recorded.map(str::to_string),
            ..image()
        };
        let d = restore_deployment_for(&a, &v, &image, 1, false, &config);
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
    }

    #[test]
    fn pods_run_the_checkpointed_image_by_digest_in_the_specs_repository() {
        let digest = format!("sha256:{}", "5".repeat(64));
        let pinned = format!("reg:5000/demo@{digest}");
        assert_eq!(
            app_image_with("reg:5000/demo:1", Some(&pinned)),
            Some(pinned.clone())
        );
        // A status naming another repository contributes its digest only.
        assert_eq!(
            app_image_with("reg:5000/demo:1", Some(&format!("evil.example/x@{digest}"))),
            Some(pinned)
        );
        // Nothing recorded, or nothing usable: the spec's tag.
        assert_eq!(
            app_image_with("reg:5000/demo:1", None),
            Some("reg:5000/demo:1".into())
        );
        assert_eq!(
            app_image_with("reg:5000/demo:1", Some("demo:1 --evil")),
            Some("reg:5000/demo:1".into())
        );
        // A spec that pins its own digest keeps it.
        let own = format!("reg:5000/demo@sha256:{}", "6".repeat(64));
        assert_eq!(
            app_image_with(&own, Some(&format!("reg:5000/demo@{digest}"))),
            Some(own)
        );
    }

    #[test]
    fn pods_restore_with_two_capabilities_and_a_read_only_claim() {
        let d = deployment();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.command.as_ref().unwrap()[..3],
            [contract::AGENT_BIN, "restore", "--"]
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(
            sc.capabilities
                .as_ref()
                .unwrap()
                .add
                .as_ref()
                .unwrap()
                .len(),
            2
        );
        let images = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "crac-images")
            .unwrap();
        assert_eq!(
            images.persistent_volume_claim.as_ref().unwrap().read_only,
            Some(true)
        );
        let probe = c
            .readiness_probe
            .as_ref()
            .expect("the user's readiness probe is kept");
        assert_eq!(
            probe.period_seconds,
            Some(1),
            "probed every second when the user set no period"
        );
    }

    #[test]
    fn without_a_readiness_probe_pods_are_ready_once_the_restored_app_listens() {
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].readiness_probe = None;
        let v = validate(&a, &Default::default()).unwrap();
        let config = BuildConfig {
            agent_image: "crac-agent:test".into(),
        };
        let d = restore_deployment_for(&a, &v, &image(), 1, false, &config);
        let pod = d.spec.unwrap().template.spec.unwrap();
        let c = pod.containers.iter().find(|c| c.name == "app").unwrap();
        let probe = c.readiness_probe.as_ref().expect("a probe is added");
        let tcp = probe.tcp_socket.as_ref().expect("a TCP connect");
        assert_eq!(tcp.port, IntOrString::Int(8080), "the app's first port");
        assert_eq!(probe.period_seconds, Some(1));
    }

    #[test]
    fn rollout_keeps_old_pods_until_new_ones_are_ready() {
        let d = deployment();
        let spec = d.spec.as_ref().unwrap();
        let ru = spec
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap();
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap(),
            &pod_selector("demo")
        );
        assert_eq!(restored_id(&d), Some("cd".repeat(32).as_str()));
    }
}
