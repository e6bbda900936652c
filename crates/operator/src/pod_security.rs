//! What a CracApp's pod template may ask for. The operator creates the checkpoint Job and the
//! restore Deployment from the template under its own identity, so it refuses a template that
//! would give the author more than they could get by creating pods in the namespace: no more
//! than the PodSecurity *baseline* level, plus exactly the two capabilities and the seccomp
//! profile restore needs on the `app` container (which the operator adds itself), plus the
//! capabilities a platform team allowed explicitly (`--allowed-capabilities`).
//!
//! The pods are still admitted by the namespace's own rules (PodSecurity, and the chart's
//! ValidatingAdmissionPolicy); this check gives the author a clear error before anything is
//! created, naming the field.

use crac_api::cracapp::APP_CONTAINER;
use k8s_openapi::api::core::v1::{
    Container, PodSpec, SELinuxOptions, SecurityContext, WindowsSecurityContextOptions,
};

/// Capabilities checkpoint and restore need (Linux >= 5.9), added to the app container and
/// nothing more: not privileged, no SYS_ADMIN.
pub const RESTORE_CAPABILITIES: [&str; 2] = ["CHECKPOINT_RESTORE", "SYS_PTRACE"];

/// Capabilities the PodSecurity baseline level lets any container add (the runtime's default
/// set): adding them grants nothing a plain pod in the namespace could not have.
pub const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Sysctls the PodSecurity baseline level allows (namespaced and safe).
const SAFE_SYSCTLS: [&str; 10] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// SELinux types the baseline level allows.
const SELINUX_TYPES: [&str; 4] = [
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// What the platform team allows beyond baseline (`--allowed-capabilities`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodAllowance {
    /// Capabilities any container of a CracApp may add, upper case without `CAP_`.
    pub extra_capabilities: Vec<String>,
}

impl PodAllowance {
    /// From the flag's comma-separated list; `CAP_` prefixes and case are ignored.
    pub fn from_list(list: &str) -> Self {
        PodAllowance {
            extra_capabilities: list
                .split(',')
                .map(capability_name)
                .filter(|c| !c.is_empty())
                .collect(),
        }
    }

    fn allows(&self, container: &str, capability: &str) -> bool {
        BASELINE_CAPABILITIES.contains(&capability)
            || (container == APP_CONTAINER && RESTORE_CAPABILITIES.contains(&capability))
            || self.extra_capabilities.iter().any(|c| c == capability)
    }
}

fn capability_name(raw: &str) -> String {
    let upper = raw.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

/// What a template asks for that it may not: the field, and why.
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub field: String,
    pub problem: String,
}

fn refused(field: String, problem: &str) -> Refusal {
    Refusal {
        field,
        problem: problem.to_string(),
    }
}

/// Refuses the first thing in `pod` that asks for more than baseline plus what restore needs.
pub fn check(pod: &PodSpec, allowance: &PodAllowance) -> Result<(), Refusal> {
    const AT: &str = "spec.template.spec";
    for (set, field) in [
        (pod.host_pid, "hostPID"),
        (pod.host_ipc, "hostIPC"),
        (pod.host_network, "hostNetwork"),
    ] {
        if set == Some(true) {
            return Err(refused(
                format!("{AT}.{field}"),
                "host namespaces are not allowed: the pod would see or join the node's",
            ));
        }
    }
    for volume in pod.volumes.iter().flatten() {
        if volume.host_path.is_some() {
            return Err(refused(
                format!("{AT}.volumes[{}].hostPath", volume.name),
                "hostPath volumes are not allowed: they expose the node's files",
            ));
        }
    }
    if let Some(security) = &pod.security_context {
        if let Some(profile) = &security.seccomp_profile
            && profile.type_ == "Unconfined"
        {
            return Err(refused(
                format!("{AT}.securityContext.seccompProfile.type"),
                "Unconfined is not allowed for the whole pod; the operator sets it on the \
                 'app' container only, where restore needs it",
            ));
        }
        for sysctl in security.sysctls.iter().flatten() {
            if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
                return Err(refused(
                    format!("{AT}.securityContext.sysctls[{}]", sysctl.name),
                    "only the sysctls the PodSecurity baseline level allows may be set",
                ));
            }
        }
        check_selinux_and_host_process(
            &format!("{AT}.securityContext"),
            security.se_linux_options.as_ref(),
            security.windows_options.as_ref(),
        )?;
    }
    let containers = [
        (
            "initContainers",
            pod.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", pod.containers.as_slice()),
    ];
    for (list, containers) in containers {
        for container in containers {
            check_container(
                &format!("{AT}.{list}[{}]", container.name),
                container,
                allowance,
            )?;
        }
    }
    for container in pod.ephemeral_containers.iter().flatten() {
        if container
            .security_context
            .as_ref()
            .is_some_and(|s| s.privileged == Some(true))
        {
            return Err(refused(
                format!(
                    "{AT}.ephemeralContainers[{}].securityContext.privileged",
                    container.name
                ),
                "privileged containers are not allowed",
            ));
        }
    }
    Ok(())
}

fn check_container(
    at: &str,
    container: &Container,
    allowance: &PodAllowance,
) -> Result<(), Refusal> {
    for port in container.ports.iter().flatten() {
        if port.host_port.is_some_and(|p| p != 0) {
            return Err(refused(
                format!("{at}.ports[{}].hostPort", port.container_port),
                "host ports are not allowed",
            ));
        }
    }
    let Some(security) = &container.security_context else {
        return Ok(());
    };
    check_security_context(at, &container.name, security, allowance)
}

fn check_security_context(
    at: &str,
    container: &str,
    security: &SecurityContext,
    allowance: &PodAllowance,
) -> Result<(), Refusal> {
    let at = format!("{at}.securityContext");
    if security.privileged == Some(true) {
        return Err(refused(
            format!("{at}.privileged"),
            "privileged containers are not allowed",
        ));
    }
    for raw in security
        .capabilities
        .iter()
        .flat_map(|c| c.add.iter().flatten())
    {
        let capability = capability_name(raw);
        if !allowance.allows(container, &capability) {
            let problem = if container == APP_CONTAINER {
                format!(
                    "capability {capability} is not allowed: the 'app' container gets {} \
                     (what restore needs) and the baseline set; a platform team can allow \
                     more with the operator's --allowed-capabilities",
                    RESTORE_CAPABILITIES.join(" and ")
                )
            } else {
                format!(
                    "capability {capability} is not allowed: containers other than 'app' get \
                     only the baseline set; a platform team can allow more with the \
                     operator's --allowed-capabilities"
                )
            };
            return Err(Refusal {
                field: format!("{at}.capabilities.add"),
                problem,
            });
        }
    }
    if let Some(profile) = &security.seccomp_profile
        && profile.type_ == "Unconfined"
        && container != APP_CONTAINER
    {
        return Err(refused(
            format!("{at}.seccompProfile.type"),
            "Unconfined is allowed only on the 'app' container, where restore needs it",
        ));
    }
    if security
        .proc_mount
        .as_deref()
        .is_some_and(|m| m != "Default")
    {
        return Err(refused(
            format!("{at}.procMount"),
            "only the Default proc mount is allowed",
        ));
    }
    check_selinux_and_host_process(
        &at,
        security.se_linux_options.as_ref(),
        security.windows_options.as_ref(),
    )?;
    if security
        .app_armor_profile
        .as_ref()
        .map(|p| p.type_.as_str())
        == Some("Unconfined")
    {
        return Err(refused(
            format!("{at}.appArmorProfile.type"),
            "Unconfined AppArmor is not allowed",
        ));
    }
    Ok(())
}

/// SELinux options (no user or role, only the container types) and Windows host processes,
/// the same rules for the pod and for each container (`at` names the securityContext).
fn check_selinux_and_host_process(
    at: &str,
    selinux: Option<&SELinuxOptions>,
    windows: Option<&WindowsSecurityContextOptions>,
) -> Result<(), Refusal> {
    if let Some(selinux) = selinux {
        if selinux.user.is_some() || selinux.role.is_some() {
            return Err(refused(
                format!("{at}.seLinuxOptions"),
                "SELinux user and role may not be set",
            ));
        }
        if let Some(kind) = selinux.type_.as_deref()
            && !kind.is_empty()
            && !SELINUX_TYPES.contains(&kind)
        {
            return Err(refused(
                format!("{at}.seLinuxOptions"),
                "only the container SELinux types the baseline level allows may be set",
            ));
        }
    }
    if windows.and_then(|w| w.host_process) == Some(true) {
        return Err(refused(
            format!("{at}.windowsOptions.hostProcess"),
            "host processes are not allowed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> PodSpec {
        serde_json::from_value(spec).unwrap()
    }

    fn app_with(extra: serde_json::Value) -> PodSpec {
        let mut spec = json!({ "containers": [{ "name": "app", "image": "demo" }] });
        merge(&mut spec, extra);
        pod(spec)
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, value) => *slot = value,
        }
    }

    fn field_of(result: Result<(), Refusal>) -> String {
        match result {
            Err(Refusal { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn none() -> PodAllowance {
        PodAllowance::default()
    }

    #[test]
    fn a_plain_template_and_the_restore_capabilities_on_app_pass() {
        check(&app_with(json!({})), &none()).unwrap();
        let spec = pod(json!({ "containers": [
            { "name": "app", "image": "demo", "securityContext": {
                "capabilities": { "add": ["CHECKPOINT_RESTORE", "CAP_SYS_PTRACE", "NET_BIND_SERVICE"] },
                "seccompProfile": { "type": "Unconfined" } } },
            { "name": "sidecar", "image": "proxy", "securityContext": {
                "capabilities": { "add": ["NET_BIND_SERVICE"], "drop": ["ALL"] } } }
        ]}));
        check(&spec, &none()).unwrap();
    }

    #[test]
    fn host_namespaces_and_host_path_are_refused_naming_the_field() {
        for (field, extra) in [
            ("hostPID", json!({ "hostPID": true })),
            ("hostIPC", json!({ "hostIPC": true })),
            ("hostNetwork", json!({ "hostNetwork": true })),
        ] {
            assert_eq!(
                field_of(check(&app_with(extra), &none())),
                format!("spec.template.spec.{field}")
            );
        }
        let spec = app_with(json!({ "volumes": [
            { "name": "ok", "emptyDir": {} },
            { "name": "root", "hostPath": { "path": "/" } }
        ]}));
        assert_eq!(
            field_of(check(&spec, &none())),
            "spec.template.spec.volumes[root].hostPath"
        );
        // hostPID: false is fine.
        check(&app_with(json!({ "hostPID": false })), &none()).unwrap();
    }

    #[test]
    fn privileged_containers_are_refused_wherever_they_are() {
        let privileged = json!({ "privileged": true });
        let sidecar = pod(json!({ "containers": [
            { "name": "app", "image": "demo" },
            { "name": "helper", "image": "x", "securityContext": privileged }
        ]}));
        assert_eq!(
            field_of(check(&sidecar, &none())),
            "spec.template.spec.containers[helper].securityContext.privileged"
        );
        let init = app_with(json!({ "initContainers": [
            { "name": "setup", "image": "x", "securityContext": { "privileged": true } }
        ]}));
        assert_eq!(
            field_of(check(&init, &none())),
            "spec.template.spec.initContainers[setup].securityContext.privileged"
        );
        let app = pod(json!({ "containers": [
            { "name": "app", "image": "demo", "securityContext": { "privileged": true } }
        ]}));
        assert_eq!(
            field_of(check(&app, &none())),
            "spec.template.spec.containers[app].securityContext.privileged"
        );
    }

    #[test]
    fn capabilities_beyond_restore_and_baseline_are_refused_unless_allowed() {
        let app = pod(json!({ "containers": [
            { "name": "app", "image": "demo", "securityContext": {
                "capabilities": { "add": ["CHECKPOINT_RESTORE", "SYS_ADMIN"] } } }
        ]}));
        let err = format!("{:?}", check(&app, &none()).unwrap_err());
        assert!(
            err.contains("containers[app].securityContext.capabilities.add"),
            "{err}"
        );
        assert!(err.contains("SYS_ADMIN"), "{err}");
        // The restore capabilities belong to 'app' only.
        let sidecar = pod(json!({ "containers": [
            { "name": "app", "image": "demo" },
            { "name": "debug", "image": "x", "securityContext": {
                "capabilities": { "add": ["sys_ptrace"] } } }
        ]}));
        let err = format!("{:?}", check(&sidecar, &none()).unwrap_err());
        assert!(
            err.contains("containers[debug]") && err.contains("SYS_PTRACE"),
            "{err}"
        );
        // A platform team's explicit allowance lets them through.
        let allowed = PodAllowance::from_list(" cap_sys_ptrace , NET_ADMIN,");
        assert_eq!(allowed.extra_capabilities, ["SYS_PTRACE", "NET_ADMIN"]);
        check(&sidecar, &allowed).unwrap();
        assert!(check(&app, &allowed).is_err(), "SYS_ADMIN was not allowed");
    }

    #[test]
    fn host_ports_unsafe_sysctls_and_unconfined_profiles_are_refused() {
        let host_port = pod(json!({ "containers": [
            { "name": "app", "image": "demo", "ports": [{ "containerPort": 8080, "hostPort": 80 }] }
        ]}));
        assert_eq!(
            field_of(check(&host_port, &none())),
            "spec.template.spec.containers[app].ports[8080].hostPort"
        );
        let sysctl = app_with(json!({ "securityContext": { "sysctls": [
            { "name": "net.ipv4.tcp_syncookies", "value": "1" },
            { "name": "kernel.msgmax", "value": "1" }
        ]}}));
        assert_eq!(
            field_of(check(&sysctl, &none())),
            "spec.template.spec.securityContext.sysctls[kernel.msgmax]"
        );
        let pod_unconfined =
            app_with(json!({ "securityContext": { "seccompProfile": { "type": "Unconfined" } } }));
        assert_eq!(
            field_of(check(&pod_unconfined, &none())),
            "spec.template.spec.securityContext.seccompProfile.type"
        );
        let sidecar_unconfined = pod(json!({ "containers": [
            { "name": "app", "image": "demo" },
            { "name": "x", "image": "x", "securityContext": { "seccompProfile": { "type": "Unconfined" } } }
        ]}));
        assert_eq!(
            field_of(check(&sidecar_unconfined, &none())),
            "spec.template.spec.containers[x].securityContext.seccompProfile.type"
        );
        let proc_mount = pod(json!({ "containers": [
            { "name": "app", "image": "demo", "securityContext": { "procMount": "Unmasked" } }
        ]}));
        assert_eq!(
            field_of(check(&proc_mount, &none())),
            "spec.template.spec.containers[app].securityContext.procMount"
        );
        let selinux =
            app_with(json!({ "securityContext": { "seLinuxOptions": { "type": "spc_t" } } }));
        assert_eq!(
            field_of(check(&selinux, &none())),
            "spec.template.spec.securityContext.seLinuxOptions"
        );
    }
}
