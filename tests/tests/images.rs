//! The images the real node runs (`tests/cluster/images`, no container engine) carry what
//! `images/*/Dockerfile` puts in the images a container engine builds: for each component the
//! final stage's `USER` and `ENTRYPOINT` are the archive's config, and every `COPY`
//! destination is in its layers; the agent's also holds a CRIU bundle of real files. The
//! archives are read as `ctr images import` reads them: `manifest.json`, the config blob it
//! names, the layers it lists. When the script or a Dockerfile drifts, this fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use crac_tests::repo_root;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// What the last stage of a Dockerfile puts in its image.
#[derive(Debug, Default)]
struct FinalStage {
    /// Paths `COPY` creates: the destination, or `<dest>/<source name>` when a file is copied
    /// into a directory.
    copies: Vec<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
}

fn final_stage(dockerfile: &str) -> FinalStage {
    let mut stage = FinalStage::default();
    let joined = dockerfile.replace("\\\n", " ");
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => stage = FinalStage::default(),
            "COPY" | "ADD" => {
                let words: Vec<&str> = rest
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                assert!(words.len() >= 2, "cannot parse {line:?}");
                let dest = words[words.len() - 1];
                for source in &words[..words.len() - 1] {
                    let path = if dest.ends_with('/') && !source.ends_with('/') {
                        format!("{dest}{}", source.rsplit('/').next().unwrap())
                    } else {
                        dest.trim_end_matches('/').to_string()
                    };
                    stage.copies.push(path);
                }
            }
            "USER" => stage.user = Some(rest.to_string()),
            "ENTRYPOINT" => {
                // Exec form is JSON; shell form runs under /bin/sh -c, as Docker does.
                stage.entrypoint = Some(
                    serde_json::from_str(rest)
                        .unwrap_or_else(|_| vec!["/bin/sh".into(), "-c".into(), rest.to_string()]),
                );
            }
            _ => {}
        }
    }
    stage
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One member of a (docker-save) archive.
fn member(archive: &Path, name: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: no member {name}: {}",
        archive.display(),
        text(&out)
    );
    out.stdout
}

/// Every path the image's layers hold (absolute, no trailing slash) and its type as `tar -tv`
/// prints it (`-` file, `d` directory, `l` symlink, `h` hard link).
fn layer_entries(archive: &Path, layers: &[String]) -> BTreeMap<String, char> {
    let mut entries = BTreeMap::new();
    for layer in layers {
        let mut blob = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(layer)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let list = Command::new("tar")
            .args(["-tvzf", "-"])
            .stdin(blob.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(blob.wait().unwrap().success(), "{layer} unreadable");
        assert!(list.status.success(), "{layer}: {}", text(&list));
        for line in String::from_utf8(list.stdout).unwrap().lines() {
            // "drwxr-xr-x 0/0 0 1970-01-01 00:00 usr/local/bin/" (then " -> target" for links)
            let kind = line.chars().next().unwrap();
            let name = line.split_whitespace().nth(5).unwrap();
            let name = name.trim_start_matches("./").trim_end_matches('/');
            entries.insert(format!("/{name}"), kind);
        }
    }
    entries
}

#[test]
fn test_images_carry_what_the_dockerfiles_put_in_them() {
    let root = repo_root();
    let out = Command::new(root.join("tests/cluster/images"))
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "tests/cluster/images failed");
    let dir = String::from_utf8(out.stdout).unwrap();
    let dir = Path::new(dir.trim());
    let version = env!("CARGO_PKG_VERSION");

    for component in ["operator", "activator", "agent"] {
        let dockerfile = root.join(format!("images/{component}/Dockerfile"));
        let stage = final_stage(&std::fs::read_to_string(&dockerfile).unwrap());
        let archive = dir.join(format!("crac-{component}.tar"));
        let what = format!("{} vs {}", archive.display(), dockerfile.display());
        assert!(
            !stage.copies.is_empty(),
            "{what}: the final stage copies nothing"
        );

        let manifest: serde_json::Value =
            serde_json::from_slice(&member(&archive, "manifest.json")).unwrap();
        let manifest = &manifest.as_array().expect("manifest.json: a list")[0];
        assert_eq!(
            manifest["RepoTags"],
            serde_json::json!([format!("ghcr.io/crac-operator/crac-{component}:{version}")]),
            "{what}: the image's name"
        );
        let config: serde_json::Value =
            serde_json::from_slice(&member(&archive, manifest["Config"].as_str().unwrap()))
                .unwrap();
        assert_eq!(
            (config["os"].as_str(), config["architecture"].as_str()),
            (Some("linux"), Some("amd64")),
            "{what}: containerd imports and unpacks for its own platform only"
        );
        let user = config["config"]["User"].as_str().filter(|u| !u.is_empty());
        assert_eq!(user, stage.user.as_deref(), "{what}: USER");
        let entrypoint: Option<Vec<String>> =
            serde_json::from_value(config["config"]["Entrypoint"].clone()).unwrap();
        assert_eq!(entrypoint, stage.entrypoint, "{what}: ENTRYPOINT");

        let layers: Vec<String> = serde_json::from_value(manifest["Layers"].clone()).unwrap();
        let entries = layer_entries(&archive, &layers);
        for path in &stage.copies {
            assert!(
                entries.contains_key(path),
                "{what}: the Dockerfile copies to {path}, the archive's layers lack it"
            );
        }
        if component == "agent" {
            let bundle = "/usr/local/lib/crac-agent/criu";
            for file in ["criu", "ld-linux-x86-64.so.2", "lib/libc.so.6"] {
                assert_eq!(
                    entries.get(&format!("{bundle}/{file}")),
                    Some(&'-'),
                    "{what}: the CRIU bundle needs {file} as a real file"
                );
            }
            let libs: Vec<_> = entries
                .iter()
                .filter(|(p, _)| p.starts_with(&format!("{bundle}/lib/")))
                .collect();
            assert!(
                libs.iter().all(|(_, kind)| **kind == '-'),
                "{what}: the bundle's libraries must be real files: {libs:?}"
            );
        }
    }
}

#[test]
fn final_stage_reads_copies_user_and_entrypoint_of_the_last_stage() {
    let stage = final_stage(
        "FROM rust AS build\nCOPY . .\nUSER 1\nENTRYPOINT [\"/x\"]\n\
         FROM scratch\n# a comment\nCOPY --from=build /out/bin /usr/local/bin/\n\
         COPY --from=b /out/dir/ \\\n  /opt/dir/\nUSER 65532:65532\nENTRYPOINT [\"/usr/local/bin/bin\"]\n",
    );
    assert_eq!(stage.copies, ["/usr/local/bin/bin", "/opt/dir"]);
    assert_eq!(stage.user.as_deref(), Some("65532:65532"));
    assert_eq!(
        stage.entrypoint,
        Some(vec!["/usr/local/bin/bin".to_string()])
    );
}
