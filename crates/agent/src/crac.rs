//! Engine `crac`: a CRaC JDK checkpoints and restores itself. The agent builds the commands
//! (`-XX:CRaCCheckpointTo`, `jcmd <pid> JDK.checkpoint`, `-XX:CRaCRestoreFrom`) and turns the
//! JDK's error output into reasons. No CRaC JDK can be installed on this project's build
//! machines, so only these pure functions are tested here (see docs/agent.md).

use std::path::{Path, PathBuf};

use crate::error::{Failure, reason};
use crate::jvm;

/// The `java` to use for restore: the command's own `java` when it starts with one, else
/// `$JAVA_HOME/bin/java`, else `java` on PATH.
pub fn java_of(command: &[String], java_home: Option<&str>) -> String {
    match command.first() {
        Some(c) if Path::new(c).file_name().is_some_and(|n| n == "java") => c.clone(),
        _ => match java_home {
            Some(h) if !h.is_empty() => {
                Path::new(h).join("bin/java").to_string_lossy().into_owned()
            }
            _ => "java".into(),
        },
    }
}

/// Options for the JVM that will be checkpointed. `cpu_features` (e.g. `generic`) makes the
/// image restorable on CPUs older than the checkpointing one.
pub fn checkpoint_options(image: &Path, cpu_features: Option<&str>) -> Vec<String> {
    let mut v = vec![format!("-XX:CRaCCheckpointTo={}", image.display())];
    if let Some(f) = cpu_features.filter(|f| !f.is_empty()) {
        v.push(format!("-XX:CPUFeatures={f}"));
    }
    v
}

/// The checkpoint command: the user's command with the CRaC options (after `java`, or in
/// `JAVA_TOOL_OPTIONS` when a script starts the JVM).
pub fn checkpoint_command(
    command: &[String],
    image: &Path,
    cpu_features: Option<&str>,
    tool_options: Option<&str>,
) -> (Vec<String>, Option<(String, String)>) {
    jvm::with_jvm_options(
        command,
        &checkpoint_options(image, cpu_features),
        tool_options,
    )
}

/// `jcmd <pid> JDK.checkpoint`, with the `jcmd` next to the JVM's `java` when known.
pub fn jcmd_command(java: Option<&Path>, pid: i32) -> Vec<String> {
    let jcmd = jcmd_of(java);
    vec![
        jcmd.to_string_lossy().into_owned(),
        pid.to_string(),
        "JDK.checkpoint".into(),
    ]
}

/// The `jcmd` beside the JVM's `java` (the same JDK), else the one on PATH.
pub fn jcmd_of(java: Option<&Path>) -> PathBuf {
    java.and_then(|j| j.parent())
        .map(|bin| bin.join("jcmd"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("jcmd"))
}

/// `java -XX:CRaCRestoreFrom=<image>`: the JDK restores the process (through its bundled CRIU).
pub fn restore_command(java: &str, image: &Path) -> Vec<String> {
    vec![
        java.to_string(),
        format!("-XX:CRaCRestoreFrom={}", image.display()),
    ]
}

/// Finds the first thing after `marker` on its line (the path or resource a CRaC exception names).
fn detail_after(text: &str, marker: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let i = l.find(marker)?;
        let rest = l[i + marker.len()..].trim_start_matches(':').trim();
        (!rest.is_empty()).then(|| rest.chars().take(200).collect())
    })
}

/// Recognises the JDK's checkpoint and restore errors in its output (stderr, jcmd's answer).
/// `None`: nothing recognisable.
pub fn classify_output(text: &str) -> Option<Failure> {
    let has = |s: &str| text.contains(s);
    let with = |r: &'static str, hint: &str, marker: &str| {
        let m = match detail_after(text, marker) {
            Some(d) => format!("{hint} ({d})"),
            None => hint.to_string(),
        };
        Some(Failure::new(r, m))
    };
    if has("CheckpointOpenSocketException") {
        return with(
            reason::OPEN_SOCKETS,
            "a socket was open at checkpoint: close connections (pools, clients) in a CRaC Resource's beforeCheckpoint",
            "CheckpointOpenSocketException",
        );
    }
    if has("CheckpointOpenFileException") {
        return with(
            reason::OPEN_FILES,
            "a file was open at checkpoint: close it in a CRaC Resource's beforeCheckpoint, or list it in -XX:CRaCIgnoredFileDescriptors",
            "CheckpointOpenFileException",
        );
    }
    if has("CheckpointOpenResourceException") {
        return with(
            reason::OPEN_FILES,
            "a resource was open at checkpoint: release it in a CRaC Resource's beforeCheckpoint",
            "CheckpointOpenResourceException",
        );
    }
    if has("Unrecognized VM option 'CRaCCheckpointTo")
        || has("Unrecognized VM option 'CRaCRestoreFrom")
        || has("Unrecognized VM option 'CPUFeatures")
        || has("Unknown diagnostic command") && has("JDK.checkpoint")
        || has("JDK.checkpoint") && has("not supported")
    {
        return Some(Failure::new(
            reason::NOT_A_CRAC_JDK,
            "this JDK has no CRaC support: use a CRaC JDK (e.g. Azul Zulu with CRaC, Liberica CRaC) or engine criu",
        ));
    }
    if has("CPU features") || has("CPUFeatures") && (has("missing") || has("supports only")) {
        return with(
            reason::CPU_FEATURES_MISSING,
            "this node's CPU lacks features the checkpoint used: checkpoint with CRAC_CPU_FEATURES=generic or restore on the same CPU model",
            "missing features of this machine",
        );
    }
    if has("Restore is not supported")
        || has("restore is not supported")
        || has("CRaC engine") && has("not supported")
    {
        return Some(Failure::new(
            reason::RESTORE_UNSUPPORTED,
            "the JDK cannot restore here (CRaC engine unsupported on this kernel or in this container): grant CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE",
        ));
    }
    if has("Operation not permitted") || has("Permission denied") {
        return Some(Failure::new(
            reason::PERMISSION_DENIED,
            "the JDK's CRIU lacks privileges: the container needs CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE",
        ));
    }
    if has("Unable to open socket file") || has("AttachNotSupportedException") {
        return Some(Failure::new(
            reason::JCMD_FAILED,
            "jcmd could not attach to the JVM (run it as the JVM's user, with the same /tmp; -XX:+DisableAttachMechanism must be off)",
        ));
    }
    if has("Failed to restore") || has("restore failed") || has("Restore failed") {
        return with(
            reason::CRAC_RESTORE_FAILED,
            "the JDK failed to restore the image",
            "Failed to restore",
        );
    }
    if has("Checkpoint failed") || has("checkpoint failed") || has("CheckpointException") {
        return with(
            reason::CRAC_CHECKPOINT_FAILED,
            "the JDK refused to checkpoint",
            "CheckpointException",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn builds_commands() {
        let (argv, env) = checkpoint_command(
            &s(&["java", "-jar", "/home/app/demo.jar"]),
            Path::new("/crac/.tmp-1"),
            None,
            None,
        );
        assert_eq!(
            argv,
            s(&[
                "java",
                "-XX:CRaCCheckpointTo=/crac/.tmp-1",
                "-jar",
                "/home/app/demo.jar"
            ])
        );
        assert!(env.is_none());
        let (argv, env) = checkpoint_command(
            &s(&["/app/run.sh"]),
            Path::new("/crac/x"),
            Some("generic"),
            Some("-Xmx1g"),
        );
        assert_eq!(argv, s(&["/app/run.sh"]));
        assert_eq!(
            env,
            Some((
                "JAVA_TOOL_OPTIONS".into(),
                "-Xmx1g -XX:CRaCCheckpointTo=/crac/x -XX:CPUFeatures=generic".into()
            ))
        );
        assert_eq!(
            restore_command("java", Path::new("/crac/abc")),
            s(&["java", "-XX:CRaCRestoreFrom=/crac/abc"])
        );
        assert_eq!(
            jcmd_command(None, 129),
            s(&["jcmd", "129", "JDK.checkpoint"])
        );
        assert_eq!(
            java_of(&s(&["/opt/jdk/bin/java", "-jar"]), None),
            "/opt/jdk/bin/java"
        );
        assert_eq!(
            java_of(&s(&["./run.sh"]), Some("/opt/jdk")),
            "/opt/jdk/bin/java"
        );
        assert_eq!(java_of(&s(&["./run.sh"]), None), "java");
    }

    #[test]
    fn parses_jdk_errors() {
        let c = |t: &str| classify_output(t).map(|f| f.reason);
        let open_file = "An exception during a checkpoint operation:\njdk.internal.crac.mirror.CheckpointException\n\tSuppressed: jdk.internal.crac.mirror.impl.CheckpointOpenFileException: /tmp/app.log\n";
        assert_eq!(c(open_file), Some(reason::OPEN_FILES));
        assert!(
            classify_output(open_file)
                .unwrap()
                .message
                .contains("/tmp/app.log")
        );
        assert_eq!(
            c(
                "\tSuppressed: jdk.internal.crac.mirror.impl.CheckpointOpenSocketException: tcp6 localAddr ::ffff:127.0.0.1 localPort 43210 remoteAddr ::ffff:127.0.0.1 remotePort 5432"
            ),
            Some(reason::OPEN_SOCKETS)
        );
        assert_eq!(
            c(
                "Unrecognized VM option 'CRaCCheckpointTo=/crac'\nError: Could not create the Java Virtual Machine."
            ),
            Some(reason::NOT_A_CRAC_JDK)
        );
        assert_eq!(
            c(
                "129:\njava.lang.IllegalArgumentException: Unknown diagnostic command JDK.checkpoint"
            ),
            Some(reason::NOT_A_CRAC_JDK)
        );
        assert_eq!(
            c(
                "You have to specify -XX:CPUFeatures=0x21421801fcfbd7,0x3e6 together with -XX:CRaCCheckpointTo when making a checkpoint file; specified -XX:CRaCRestoreFrom file contains CPU features 0x...; missing features of this machine: avx512f"
            ),
            Some(reason::CPU_FEATURES_MISSING)
        );
        assert_eq!(
            c("Error: Restore is not supported on this platform"),
            Some(reason::RESTORE_UNSUPPORTED)
        );
        assert_eq!(
            c("criu: Error (criu/cr-restore.c:1): Operation not permitted"),
            Some(reason::PERMISSION_DENIED)
        );
        assert_eq!(
            c("com.sun.tools.attach.AttachNotSupportedException: Unable to open socket file"),
            Some(reason::JCMD_FAILED)
        );
        assert_eq!(c("129:\nCR: Checkpoint ...\n"), None);
        assert_eq!(c("Hello at 2023-08-11"), None);
    }
}
