//! Injecting the agent into a pod: an init container copies the static binary into an
//! `emptyDir`, and the app container's command becomes `crac-agent <mode> -- <command>`.

use super::{AGENT_IMAGE_BINARY, BuildConfig, claim_name};
use crate::validate::ValidatedApp;
use crac_api::CracApp;
use crac_api::agent as contract;
use crac_api::cracapp::APP_CONTAINER;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    PersistentVolumeClaimVolumeSource, PodSpec, Probe, SeccompProfile, SecurityContext,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

const AGENT_VOLUME: &str = "crac-agent";
/// The volume of the claim holding the app's images (also the cleanup Job's).
pub(super) const IMAGES_VOLUME: &str = "crac-images";

/// What the agent does in this pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Checkpoint,
    Restore,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Checkpoint => "checkpoint",
            Mode::Restore => "restore",
        }
    }
}

use crate::pod_security::RESTORE_CAPABILITIES as CAPABILITIES;

/// The seccomp profile of the app container (see `inject_agent`).
pub const SECCOMP_PROFILE: &str = "Unconfined";

/// Rewrites `spec` so the app container runs under the agent.
pub fn inject_agent(
    spec: &mut PodSpec,
    mode: Mode,
    app: &CracApp,
    validated: &ValidatedApp,
    checkpoint_id: &str,
    config: &BuildConfig,
) {
    spec.init_containers.get_or_insert_with(Vec::new).insert(
        0,
        Container {
            name: "install-crac-agent".into(),
            image: Some(config.agent_image.clone()),
            command: Some(vec![
                AGENT_IMAGE_BINARY.into(),
                "install".into(),
                contract::AGENT_BIN.into(),
            ]),
            volume_mounts: Some(vec![mount(AGENT_VOLUME, contract::AGENT_BIN_DIR, false)]),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: AGENT_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    volumes.push(Volume {
        name: IMAGES_VOLUME.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim_name(app),
            read_only: Some(mode == Mode::Restore),
        }),
        ..Default::default()
    });

    let Some(container) = spec.containers.iter_mut().find(|c| c.name == APP_CONTAINER) else {
        return;
    };
    let mut command = vec![
        contract::AGENT_BIN.to_string(),
        mode.as_str().into(),
        "--".into(),
    ];
    command.extend(validated.command.iter().cloned());
    container.command = Some(command);
    container.args = None;
    container
        .env
        .get_or_insert_with(Vec::new)
        .extend(agent_env(app, validated, checkpoint_id));
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    mounts.push(mount(AGENT_VOLUME, contract::AGENT_BIN_DIR, true));
    mounts.push(mount(
        IMAGES_VOLUME,
        contract::IMAGE_MOUNT,
        mode == Mode::Restore,
    ));

    let security = container
        .security_context
        .get_or_insert_with(Default::default);
    security.privileged = Some(false);
    let caps = security.capabilities.get_or_insert_with(Default::default);
    let add = caps.add.get_or_insert_with(Vec::new);
    for cap in CAPABILITIES {
        if !add.iter().any(|c| c == cap) {
            add.push(cap.into());
        }
    }
    // CRIU needs syscalls a runtime's default seccomp profile blocks: dump suspends the JVM's
    // seccomp state (`compel: suspending seccomp failed`) and restore uses clone3 with set_tid.
    // A Localhost profile would need a file on every node, which the operator cannot put
    // there; so this one container is Unconfined (docs/install.md: the PodSecurity level).
    security.seccomp_profile = Some(SeccompProfile {
        type_: SECCOMP_PROFILE.into(),
        localhost_profile: None,
    });
    // The agent reports the reason of a failure here; the operator reads it back.
    container.termination_message_path = Some(contract::DEFAULT_TERMINATION_LOG.into());
    container.termination_message_policy = Some("FallbackToLogsOnError".into());

    match mode {
        // The agent checks readiness itself; a probe restarting the JVM mid-dump would only
        // turn a slow checkpoint into a failed one.
        Mode::Checkpoint => {
            container.liveness_probe = None;
            container.startup_probe = None;
            container.readiness_probe = None;
        }
        Mode::Restore => {
            // A restore answers in a few hundred milliseconds; at the default period (10 s)
            // the first probe usually comes too early and the next one a whole period later,
            // which would dwarf the restore (and every wake). Once a second, unless the user
            // chose a period.
            match container.readiness_probe.as_mut() {
                Some(probe) => {
                    probe.period_seconds.get_or_insert(1);
                }
                // Without a probe the pod would count as ready, and get traffic, as soon as
                // its container started, before the JVM is restored. The agent waits on the
                // first port in that case (see validate.rs); so does this probe.
                None => {
                    container.readiness_probe = container.ports.as_ref().and_then(|ports| {
                        let port = ports.first()?.container_port;
                        Some(Probe {
                            tcp_socket: Some(TCPSocketAction {
                                port: IntOrString::Int(port),
                                ..Default::default()
                            }),
                            period_seconds: Some(1),
                            ..Default::default()
                        })
                    });
                }
            }
            container
                .ports
                .get_or_insert_with(Vec::new)
                .push(ContainerPort {
                    name: Some("crac-activity".into()),
                    container_port: i32::from(contract::DEFAULT_ACTIVITY_PORT),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                });
        }
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The environment of the agent contract (`crac_api::agent`).
fn agent_env(app: &CracApp, validated: &ValidatedApp, checkpoint_id: &str) -> Vec<EnvVar> {
    let checkpoint = &app.spec.checkpoint;
    let warmup = serde_json::to_string(&checkpoint.warmup.requests)
        .expect("warm-up requests always serialize");
    let mut vars = vec![
        env(
            contract::ENV_IMAGE_DIR,
            format!("{}/{}", contract::IMAGE_MOUNT, validated.name),
        ),
        env(contract::ENV_CHECKPOINT_ID, checkpoint_id),
        env(contract::ENV_ENGINE, checkpoint.engine.as_str()),
        env(contract::ENV_READINESS, validated.readiness.clone()),
        env(contract::ENV_WARMUP, warmup),
        env(contract::ENV_RETAIN, checkpoint.retain.to_string()),
        env(contract::ENV_FALLBACK, app.spec.restore.fallback.as_str()),
        env(
            contract::ENV_TIMEOUT_SECONDS,
            validated.checkpoint_timeout.as_secs().to_string(),
        ),
        env(
            contract::ENV_ACTIVITY_PORT,
            contract::DEFAULT_ACTIVITY_PORT.to_string(),
        ),
    ];
    if let Some(port) = validated.app_port {
        vars.push(env(contract::ENV_APP_PORT, port.to_string()));
    }
    vars
}

const CONTROL_VOLUME: &str = "crac-control";

/// Restore pods of an app that sleeps in place: the app's control token, from its Secret, at
/// [`crac_api::control::TOKEN_FILE`], and the agent told to read it (which turns on its
/// `/sleep` and `/wake`).
pub fn mount_control_token(spec: &mut PodSpec, app: &str) {
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: CONTROL_VOLUME.into(),
        secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
            secret_name: Some(crac_api::control::token_secret_name(app)),
            items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                key: crac_api::control::TOKEN_FIELD.into(),
                path: crac_api::control::TOKEN_FIELD.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let Some(container) = spec.containers.iter_mut().find(|c| c.name == APP_CONTAINER) else {
        return;
    };
    container
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(mount(CONTROL_VOLUME, crac_api::control::TOKEN_DIR, true));
    container.env.get_or_insert_with(Vec::new).push(env(
        contract::ENV_CONTROL_TOKEN_FILE,
        crac_api::control::TOKEN_FILE,
    ));
}
