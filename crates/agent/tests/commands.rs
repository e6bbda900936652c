//! The agent's small commands the operator's pods run: `install` (the init container copies
//! the binary into the app container) and `clean` (removes an app's images from a shared
//! claim before the CracApp goes).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crac-agent"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("crac-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn install_copies_an_executable_agent() {
    let dir = temp_dir("install");
    let status = agent().arg("install").arg(&dir).status().unwrap();
    assert!(status.success());
    let copied = dir.join("crac-agent");
    assert_eq!(
        std::fs::metadata(&copied).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let out = Command::new(&copied).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("crac-agent "));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn clean_removes_the_app_images_and_tolerates_a_missing_directory() {
    let root = temp_dir("clean");
    let app = root.join("demo");
    std::fs::create_dir_all(app.join("abc123")).unwrap();
    std::fs::write(app.join("abc123/metadata.json"), "{}").unwrap();
    std::fs::create_dir_all(root.join("other")).unwrap();
    assert!(agent().arg("clean").arg(&app).status().unwrap().success());
    assert!(!app.exists());
    assert!(
        root.join("other").exists(),
        "only the named app's directory goes"
    );
    assert!(
        agent().arg("clean").arg(&app).status().unwrap().success(),
        "already gone is fine"
    );
    assert_eq!(
        agent().arg("clean").status().unwrap().code(),
        Some(2),
        "usage error"
    );
    std::fs::remove_dir_all(root).unwrap();
}
