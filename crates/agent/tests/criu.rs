//! crac-agent against a real JVM and real CRIU, each run as PID 1 of fresh PID and mount
//! namespaces. Needs root and CRIU 4.2.1 (scripts/fetch-criu); fails, never skips, without it.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crac_api::agent::{ActivityReport, ENV_CONTROL_TOKEN_FILE, ENV_IMAGE_DIGEST, Outcome};
use support::*;

fn metadata(s: &Scratch, id: &str) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(s.images().join(id).join("metadata.json")).unwrap())
        .unwrap()
}

/// GET /activity (the agent opens its listener once it has seen the app ready, which may lag
/// the test's own first answer by a poll interval).
fn activity(r: &Running) -> ActivityReport {
    let deadline = Instant::now() + Duration::from_secs(5);
    let (code, body) = loop {
        match http_get(r.activity_port, "/activity") {
            Ok(x) => break x,
            Err(e) if Instant::now() > deadline => {
                panic!("activity endpoint: {e}; log:\n{}", r.log())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Every answer to `GET /` on `port` until the first 200 (polled every 2 ms, 30 s at most):
/// a restore that must never serve shows here as anything before the cold start's answer.
fn answers_until_the_first_200(port: u16) -> Vec<String> {
    let started = Instant::now();
    let mut answers = Vec::new();
    while started.elapsed() < Duration::from_secs(30) {
        match http_get(port, "/") {
            Ok((200, body)) => {
                answers.push(body.trim().to_string());
                break;
            }
            Ok((code, body)) => answers.push(format!("{code} {body}")),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    answers
}

fn image_dirs(s: &Scratch) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(s.images())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn checkpoint_then_restore_keeps_heap_state_and_forwards_sigterm() {
    let _g = serial();
    let s = Scratch::new("roundtrip");
    let port = free_port();
    let ck = checkpoint(&s, "c1", port, &[]);

    let sum = ck.summary();
    assert_eq!(sum.outcome, Some(Outcome::Checkpointed));
    assert_eq!(sum.checkpoint_id.as_deref(), Some("c1"));
    assert_eq!(sum.engine.as_deref(), Some("criu"));
    assert!(sum.jdk.is_some());
    assert!(sum.image_bytes.unwrap() > 1_000_000);
    assert!(sum.ready_ms.is_some() && sum.warmup_ms.is_some() && sum.checkpoint_ms.is_some());
    // The image was restored once, to readiness, before it was published.
    assert!(sum.trial_restore_ms.is_some(), "{sum:?}");
    assert!(
        ck.log().contains("trial restore: ready after"),
        "{}",
        ck.log()
    );
    // Published by rename: only the final directory, no temporary left.
    assert_eq!(image_dirs(&s), vec!["c1"]);
    let meta = metadata(&s, "c1");
    assert_eq!(meta["checkpointId"], "c1");
    assert_eq!(meta["arch"], std::env::consts::ARCH);
    // The agent was PID 1 and raised ns_last_pid to 200: the JVM got 201.
    assert_eq!(meta["rootPid"], 201, "{meta}");
    assert!(meta["stdioPipes"].as_array().unwrap().len() == 2);
    assert!(
        meta["files"]["pages-1.img"]["sha256"]
            .as_str()
            .unwrap()
            .len()
            == 64
    );
    // The summary carries the image's digest: that of metadata.json's exact bytes.
    let meta_bytes = fs::read(s.images().join("c1/metadata.json")).unwrap();
    assert_eq!(sum.image_digest, Some(digest_of(&meta_bytes)));
    // The image holds the JVM's memory: the owner alone may read it; the command line (which
    // may carry secrets) is not recorded.
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&s.images().join("c1")), 0o700);
    for e in fs::read_dir(s.images().join("c1")).unwrap() {
        let e = e.unwrap();
        assert_eq!(mode(&e.path()), 0o600, "{:?}", e.file_name());
    }
    assert!(meta.get("command").is_none(), "{meta}");
    // The app is gone after the dump.
    assert!(http_get(port, "/").is_err());

    let mut r = restore_run(&s, "restore", "c1", port).start();
    // 200 warm-up requests were answered before the checkpoint: the heap came back.
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 201",
        "log:\n{}",
        r.log()
    );
    assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 202");
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::Restored), "{sum:?}");
    assert!(sum.restore_ms.is_some() && sum.reason.is_none());
    let act = activity(&r);
    assert_eq!(act.mode, "restored");
    assert_eq!(act.checkpoint_id.as_deref(), Some("c1"));
    assert!(act.start_ms.is_some());
    // The restored JVM's stdout still reaches the agent's log.
    let shutdown = s.dir.join("shutdown-c1");
    assert!(!shutdown.exists());
    let code = r.stop();
    assert_eq!(
        code, 143,
        "agent must exit with the JVM's status (SIGTERM → 143)"
    );
    assert!(
        fs::read_to_string(&shutdown)
            .unwrap()
            .starts_with("stopped 202"),
        "SIGTERM did not reach the restored JVM"
    );
    let log = fs::read_to_string(s.dir.join("restore.log")).unwrap();
    assert!(
        log.contains("hello-app: shutting down after 202 requests"),
        "restored JVM's stdout lost:\n{log}"
    );
    let sum = read_summary(&s.dir.join("restore.summary"), &log);
    assert_eq!(sum.exit_code, Some(143));
    assert_eq!(sum.outcome, Some(Outcome::Restored));
    // Where the restore's time went, from the agent and CRIU's -v4 log; CRIU was handed the
    // kernel features its dump found on this boot (kept in the image, covered by its digest).
    let timing = log
        .lines()
        .find_map(|l| l.split_once("restore timing: ").map(|(_, t)| t.to_string()))
        .unwrap_or_else(|| panic!("no restore timing line:\n{log}"));
    for key in [
        "check_ms=",
        "pages_check_ms=",
        "criu_start_ms=",
        "tree_ms=",
        "memory_ms=",
        "resume_ms=",
        "exit_to_ready_ms=",
        "total_ms=",
    ] {
        assert!(timing.contains(key), "{key} missing: {timing}");
    }
    assert!(timing.contains("kdat=cached"), "{timing}");
    assert!(!timing.contains("memory_ms=0.0 "), "{timing}");
    assert!(meta["files"]["criu.kdat"]["sha256"].is_string(), "{meta}");
    assert!(
        meta["files"]["criu.kdat.host"]["sha256"].is_string(),
        "{meta}"
    );
    // The heap was shrunk with jcmd before the dump, and the attach socket jcmd made the JVM
    // open is restored with it (the restore above answered).
    assert!(
        ck.log().contains("heap shrunk before the dump"),
        "{}",
        ck.log()
    );
}

#[test]
fn corrupted_image_is_refused_and_cold_started() {
    let _g = serial();
    let s = Scratch::new("corrupt");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    corrupt_byte(&s.images().join("c1/pages-1.img"), 4096 * 10 + 7);

    let mut r = restore_run(&s, "restore", "c1", port).start();
    // A cold JVM: the counter starts again.
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 1"
    );
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::ColdStarted), "{sum:?}");
    assert_eq!(sum.reason.as_deref(), Some("ImageCorrupt"));
    assert!(
        sum.message.as_deref().unwrap().contains("pages-1.img"),
        "{sum:?}"
    );
    assert_eq!(activity(&r).mode, "coldStarted");
    assert_eq!(r.stop(), 143);
}

/// The page data is hashed while CRIU restores (engine criu): a tampered pages file is
/// restored by CRIU, left stopped and killed, and no request is ever answered from it. A
/// client that connects throughout (its connections queue on the restored, stopped socket)
/// sees only the cold JVM's first answer.
#[test]
fn tampered_page_data_is_killed_before_it_runs_and_never_served() {
    let _g = serial();
    let s = Scratch::new("tampered-pages");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    corrupt_byte(&s.images().join("c1/pages-1.img"), 4096 * 10 + 7);

    let r = restore_run(&s, "restore", "c1", port).start();
    let answers = answers_until_the_first_200(port);
    assert_eq!(answers, vec!["hello 1".to_string()], "log:\n{}", r.log());
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::ColdStarted), "{sum:?}");
    assert_eq!(sum.reason.as_deref(), Some("ImageCorrupt"));
    assert!(
        sum.message.as_deref().unwrap().contains("pages-1.img"),
        "{sum:?}"
    );
    // CRIU did restore it (the check ran beside it), and the tree was killed unresumed.
    let log = r.log();
    assert!(log.contains("killed the restored tree"), "{log}");
    assert!(!log.contains("restore timing:"), "{log}");
    assert_eq!(r.stop(), 143);
}

/// Every file CRIU parses is checked before CRIU runs: a damaged one is refused with CRIU
/// never started.
#[test]
fn a_tampered_file_criu_parses_is_refused_before_criu_runs() {
    let _g = serial();
    let s = Scratch::new("tampered-core");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    corrupt_byte(&s.images().join("c1/core-201.img"), 40);

    let mut r = restore_run(&s, "restore", "c1", port).start();
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 1"
    );
    let sum = r.summary();
    assert_eq!(sum.reason.as_deref(), Some("ImageCorrupt"), "{sum:?}");
    assert!(
        sum.message.as_deref().unwrap().contains("core-201.img"),
        "{sum:?}"
    );
    let log = r.log();
    assert!(!log.contains("killed the restored tree"), "{log}");
    assert!(!log.contains("criu restore"), "{log}");
    assert_eq!(r.stop(), 143);
}

#[test]
fn metadata_mismatch_is_refused_and_cold_started() {
    let _g = serial();
    let s = Scratch::new("mismatch");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    let path = s.images().join("c1/metadata.json");
    let original = fs::read_to_string(&path).unwrap();

    for (edit, want_reason) in [("arch", "MetadataMismatch"), ("cpu", "CpuFeaturesMissing")] {
        let mut meta: serde_json::Value = serde_json::from_str(&original).unwrap();
        match edit {
            "arch" => meta["arch"] = "riscv64".into(),
            _ => meta["cpuFlags"]
                .as_array_mut()
                .unwrap()
                .push("avx1024_imaginary".into()),
        }
        let edited = serde_json::to_string(&meta).unwrap();
        fs::write(&path, &edited).unwrap();
        // As if the operator had recorded this metadata: the host checks are what is tested.
        let mut r = AgentRun::new(&s, &format!("restore-{edit}"), "restore", "c1", port)
            .env(ENV_IMAGE_DIGEST, &digest_of(edited.as_bytes()))
            .start();
        assert_eq!(
            r.get_when_up("/", Duration::from_secs(20)).trim(),
            "hello 1"
        );
        let sum = r.summary();
        assert_eq!(sum.outcome, Some(Outcome::ColdStarted), "{sum:?}");
        assert_eq!(sum.reason.as_deref(), Some(want_reason), "{sum:?}");
        let msg = sum.message.unwrap();
        assert!(
            msg.contains(if edit == "arch" {
                "riscv64"
            } else {
                "avx1024_imaginary"
            }),
            "{msg}"
        );
        assert_eq!(r.stop(), 143);
    }
}

#[test]
fn fallback_fail_exits_nonzero_with_the_reason() {
    let _g = serial();
    let s = Scratch::new("fail");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    corrupt_byte(&s.images().join("c1/pages-1.img"), 100);
    let r = restore_run(&s, "restore", "c1", port).arg("--fallback", "Fail");
    let code = r.run(Duration::from_secs(30));
    assert_eq!(code, 1, "log:\n{}", r.log());
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::Failed));
    assert_eq!(sum.reason.as_deref(), Some("ImageCorrupt"));
    assert!(
        http_get(port, "/").is_err(),
        "nothing may serve after a failed restore with fallback Fail"
    );

    // No image at all: same, with its own reason.
    let r = AgentRun::new(&s, "restore-missing", "restore", "nope", port)
        .env(ENV_IMAGE_DIGEST, &digest_of(b"{}"))
        .arg("--fallback", "Fail");
    assert_eq!(r.run(Duration::from_secs(30)), 1);
    assert_eq!(r.summary().reason.as_deref(), Some("ImageMissing"));
}

#[test]
fn an_image_that_fails_its_trial_restore_is_not_published() {
    let _g = serial();
    let s = Scratch::new("trial");
    let port = free_port();
    // The warm-up arms hello-app to exit on its next readiness check: the dump succeeds, and
    // the image's JVM exits as soon as it is restored and asked whether it is ready.
    let armed = r#"[{"path":"/","count":5},{"path":"/exit-on-next-ready","count":1}]"#;
    let r = AgentRun::new(&s, "checkpoint", "checkpoint", "c1", port).arg("--warmup", armed);
    assert_eq!(r.run(Duration::from_secs(60)), 1, "{}", r.log());
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::Failed));
    assert_eq!(sum.reason.as_deref(), Some("TrialRestoreFailed"), "{sum:?}");
    let message = sum.message.unwrap();
    assert!(
        message.contains("not published") && message.contains("JvmExited"),
        "{message}"
    );
    // Nothing published, no temporary image left, and the trial's JVM is gone.
    assert!(image_dirs(&s).is_empty(), "{:?}", image_dirs(&s));
    assert!(http_get(port, "/").is_err());

    // The same image without the trial is published: the trial is what refused it.
    let r = AgentRun::new(&s, "checkpoint-untried", "checkpoint", "c1", port)
        .arg("--warmup", armed)
        .arg("--trial-restore", "false");
    assert_eq!(r.run(Duration::from_secs(60)), 0, "{}", r.log());
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::Checkpointed));
    assert_eq!(sum.trial_restore_ms, None);
    assert_eq!(image_dirs(&s), vec!["c1"]);
}

#[test]
fn readiness_that_never_comes_fails_the_checkpoint() {
    let _g = serial();
    let s = Scratch::new("never-ready");
    let port = free_port();
    let r = AgentRun::new(&s, "checkpoint", "checkpoint", "c1", port)
        .arg("--readiness", &format!("http://127.0.0.1:{port}/never"))
        .arg("--timeout-seconds", "3");
    let start = Instant::now();
    let code = r.run(Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(start.elapsed() < Duration::from_secs(15));
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::Failed));
    assert_eq!(sum.reason.as_deref(), Some("ReadinessTimeout"), "{sum:?}");
    assert!(sum.message.unwrap().contains("/never"));
    // Nothing published, nothing half-written left, and the JVM is gone.
    assert!(image_dirs(&s).is_empty(), "{:?}", image_dirs(&s));
    assert!(http_get(port, "/").is_err());
}

#[test]
fn sigterm_reaches_the_jvm_and_the_agent_exits_with_its_status() {
    let _g = serial();
    let s = Scratch::new("sigterm");
    let port = free_port();
    let shutdown = s.dir.join("shutdown-run");
    let mut r = AgentRun::new(&s, "run", "run", "c1", port)
        .env("HELLO_SHUTDOWN_FILE", &shutdown.to_string_lossy())
        .start();
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 1"
    );
    // The agent is PID 1 in its namespace; the JVM is its child.
    assert_eq!(r.stop(), 143);
    assert_eq!(fs::read_to_string(&shutdown).unwrap().trim(), "stopped 1");
    let sum = read_summary(&s.dir.join("run.summary"), "");
    assert_eq!(sum.outcome, Some(Outcome::Exited));
    assert_eq!(sum.exit_code, Some(143));
    assert!(sum.ready_ms.is_some());
}

#[test]
fn activity_endpoint_counts_an_open_connection() {
    let _g = serial();
    let s = Scratch::new("activity");
    let port = free_port();
    let mut r = AgentRun::new(&s, "run", "run", "c1", port).start();
    r.get_when_up("/ready", Duration::from_secs(20));
    let before = activity(&r);
    assert_eq!(before.mode, "running");
    assert_eq!(before.open_connections, 0);

    // An idle keep-alive connection: no request in flight, but a client is connected.
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let during = loop {
        let a = activity(&r);
        if a.open_connections >= 1 || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(during.open_connections, 1, "{during:?}");
    assert!(during.last_activity_time.is_some());
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if activity(&r).open_connections == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "connection count did not drop");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _) = http_get(r.activity_port, "/other").unwrap();
    assert_eq!(code, 404);
    assert_eq!(r.stop(), 143);
}

#[test]
fn prune_keeps_retain_images_and_never_one_in_use() {
    let _g = serial();
    let s = Scratch::new("prune");
    let (p1, p2) = (free_port(), free_port());
    checkpoint(&s, "a", p1, &[("--retain", "1")]);
    // A pod restores "a" and keeps running: "a" is in use.
    let digest_a = reported_digest(&s, "a");
    let mut pod = restore_run(&s, "restore-a", "a", p1).start();
    assert_eq!(
        pod.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 201"
    );

    checkpoint(&s, "b", p2, &[("--retain", "1")]);
    // retain 1: "b" is the one kept; "a" is beyond retain but in use.
    assert_eq!(image_dirs(&s), vec!["a", "b"]);
    checkpoint(&s, "c", p2, &[("--retain", "2")]);
    assert_eq!(
        image_dirs(&s),
        vec!["a", "b", "c"],
        "a in use, b and c within retain 2"
    );
    // A re-checkpoint of the in-use id never replaces it.
    let before = fs::read_to_string(s.images().join("a/metadata.json")).unwrap();
    let again = checkpoint(&s, "a", p2, &[("--retain", "3")]);
    assert_eq!(
        fs::read_to_string(s.images().join("a/metadata.json")).unwrap(),
        before
    );
    assert!(again.summary().message.unwrap().contains("in use"));
    // The summary names the image kept, which restore pods will be given.
    assert_eq!(again.summary().image_digest, Some(digest_a));

    assert_eq!(pod.stop(), 143);
    checkpoint(&s, "d", p2, &[("--retain", "2")]);
    assert_eq!(image_dirs(&s), vec!["c", "d"]);
}

#[test]
fn missing_criu_is_reported() {
    let _g = serial();
    let s = Scratch::new("no-criu");
    let r = AgentRun::new(&s, "checkpoint", "checkpoint", "c1", free_port())
        .arg("--criu", "/nonexistent/criu");
    assert_eq!(r.run(Duration::from_secs(30)), 1);
    let sum = r.summary();
    assert_eq!(sum.reason.as_deref(), Some("CriuMissing"), "{sum:?}");
    assert!(image_dirs(&s).is_empty());
}

/// Another app sharing the volume rewrites an image consistently: a pages file and its entry in
/// metadata.json, so the files match the metadata. The digest the operator recorded at
/// checkpoint no longer matches: refused (`ImageNotTrusted`), cold-started like `ImageCorrupt`.
#[test]
fn an_image_rewritten_consistently_is_not_trusted() {
    let _g = serial();
    let s = Scratch::new("forged");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    let digest = reported_digest(&s, "c1");
    let dir = s.images().join("c1");
    let (pages, meta_path) = (dir.join("pages-1.img"), dir.join("metadata.json"));
    let (orig_pages, orig_meta) = (fs::read(&pages).unwrap(), fs::read(&meta_path).unwrap());

    corrupt_byte(&pages, 4096 * 10 + 7);
    let mut meta: serde_json::Value = serde_json::from_slice(&orig_meta).unwrap();
    let forged_sha = digest_of(&fs::read(&pages).unwrap())[7..].to_string();
    meta["files"]["pages-1.img"]["sha256"] = forged_sha.into();
    fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();

    let mut r = restore_run(&s, "restore-forged", "c1", port).start();
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 1",
        "a forged image must not be restored; log:\n{}",
        r.log()
    );
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::ColdStarted), "{sum:?}");
    assert_eq!(sum.reason.as_deref(), Some("ImageNotTrusted"), "{sum:?}");
    let msg = sum.message.unwrap();
    assert!(msg.contains("digest the operator recorded"), "{msg}");
    assert!(msg.contains("checkpoint again"), "{msg}");
    assert_eq!(activity(&r).mode, "coldStarted");
    assert_eq!(r.stop(), 143);

    // With fallback Fail it fails, as ImageCorrupt does; so do a missing and a malformed digest.
    for (name, digest) in [
        ("restore-forged-fail", Some(digest.as_str())),
        ("restore-no-digest", None),
        ("restore-bad-digest", Some(&digest[..70])),
    ] {
        let mut run = AgentRun::new(&s, name, "restore", "c1", port).arg("--fallback", "Fail");
        if let Some(d) = digest {
            run = run.env(ENV_IMAGE_DIGEST, d);
        }
        assert_eq!(run.run(Duration::from_secs(30)), 1, "log:\n{}", run.log());
        let sum = run.summary();
        assert_eq!(sum.outcome, Some(Outcome::Failed), "{sum:?}");
        assert_eq!(sum.reason.as_deref(), Some("ImageNotTrusted"), "{sum:?}");
        if digest.is_none() {
            assert!(sum.message.unwrap().contains("no image digest"));
        }
    }
    assert!(http_get(port, "/").is_err());

    // The untouched image, with the digest its checkpoint reported, still restores.
    fs::write(&pages, &orig_pages).unwrap();
    fs::write(&meta_path, &orig_meta).unwrap();
    let mut r = restore_run(&s, "restore-original", "c1", port).start();
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 201",
        "log:\n{}",
        r.log()
    );
    assert_eq!(r.summary().outcome, Some(Outcome::Restored));
    assert_eq!(r.stop(), 143);
}

/// Names, sizes and modification times of everything under the images directory.
fn tree_state(dir: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        v.push((
            e.path().to_string_lossy().into_owned(),
            m.len(),
            m.modified().unwrap(),
        ));
        if m.is_dir() {
            v.extend(tree_state(&e.path()));
        }
    }
    v.sort();
    v
}

/// Restore pods mount the claim read-only: restore writes nothing into the image directory
/// (CRIU's log, its pidfile and work files go to a directory in $TMPDIR), so it works from a
/// read-only mount and leaves the image as it found it, restore after restore. The activity
/// port is bound before the JVM is restored and nothing else can bind it meanwhile.
#[test]
fn restore_from_a_read_only_image_writes_nothing_there() {
    let _g = serial();
    let s = Scratch::new("read-only");
    let port = free_port();
    let ck = checkpoint(&s, "c1", port, &[]);
    // The checkpoint held the activity port before it started the JVM.
    let log = ck.log();
    let bound = format!("activity port {} bound", ck.activity_port);
    let (b, st) = (log.find(&bound), log.find("crac-agent: starting "));
    assert!(
        b.is_some() && b < st,
        "bind must precede the JVM's start:\n{log}"
    );
    let before = tree_state(&s.images());

    for round in 0..2 {
        let mut r = restore_run(&s, &format!("restore-ro-{round}"), "c1", port)
            .read_only_images()
            .start();
        assert_eq!(
            r.get_when_up("/", Duration::from_secs(20)).trim(),
            "hello 201",
            "log:\n{}",
            r.log()
        );
        assert_eq!(r.summary().outcome, Some(Outcome::Restored), "{}", r.log());
        // The images directory really is read-only for the agent.
        let mountinfo = fs::read_to_string(format!("/proc/{}/mountinfo", r.agent_pid())).unwrap();
        let images = s.images().canonicalize().unwrap();
        let images = images.to_string_lossy();
        assert!(
            mountinfo.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.get(4) == Some(&&*images)
                    && f.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"))
            }),
            "{images} is not mounted read-only for the agent:\n{mountinfo}"
        );
        let log = r.log();
        let bound = format!("activity port {} bound", r.activity_port);
        let (b, v) = (log.find(&bound), log.find("image c1 verified"));
        assert!(
            b.is_some() && b < v,
            "bind must precede the restore:\n{log}"
        );
        // While the agent holds it, nothing else can bind the activity port (the app could
        // otherwise answer in the agent's name).
        for addr in ["0.0.0.0", "127.0.0.1"] {
            assert!(
                std::net::TcpListener::bind((addr, r.activity_port)).is_err(),
                "{addr}:{} could be bound beside the agent",
                r.activity_port
            );
        }
        assert_eq!(activity(&r).mode, "restored");
        assert_eq!(r.stop(), 143);
        assert_eq!(
            tree_state(&s.images()),
            before,
            "restore changed the image directory"
        );
    }
}

/// The `criu lazy-pages` daemons (by command line) still running for the images of `s`.
fn lazy_daemons(s: &Scratch) -> Vec<String> {
    let images = s.images().to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid = e.ok()?.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains(" lazy-pages ") && cmd.contains(&images)).then(|| format!("{pid}: {cmd}"))
        })
        .collect()
}

/// Lazy restore (`CRAC_LAZY_PAGES=true`): CRIU leaves the heap to `criu lazy-pages`, the JVM
/// answers from the checkpoint's heap, the daemon copies the rest in and exits, and the image
/// (mounted read-only, as in a restore pod) is left as it was.
#[test]
fn lazy_restore_keeps_heap_state_and_its_daemon_finishes() {
    let _g = serial();
    let s = Scratch::new("lazy");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    let before = tree_state(&s.images());

    let mut r = restore_run(&s, "restore", "c1", port)
        .env("CRAC_LAZY_PAGES", "true")
        .read_only_images()
        .start();
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 201",
        "log:\n{}",
        r.log()
    );
    assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 202");
    assert_eq!(r.summary().outcome, Some(Outcome::Restored), "{}", r.log());
    // CRIU left pages to the daemon: the restore really was lazy.
    let log = r.log();
    let pages: u64 = log
        .lines()
        .find_map(|l| l.split_once("pages (").map(|(a, _)| a.to_string()))
        .and_then(|a| a.split_whitespace().last().and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no lazy restore line:\n{log}"));
    assert!(pages > 100, "only {pages} pages were lazy:\n{log}");
    assert!(log.contains("restore timing: "), "{log}");
    // The daemon copies the rest in and exits by itself; the JVM keeps running.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !r.log().contains("lazy pages: every page copied in") {
        assert!(
            Instant::now() < deadline,
            "the daemon never finished:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lazy_daemons(&s).is_empty(), "{:?}", lazy_daemons(&s));
    assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 203");
    assert_eq!(r.stop(), 143);
    assert!(
        fs::read_to_string(s.dir.join("shutdown-c1"))
            .unwrap()
            .starts_with("stopped 203"),
        "SIGTERM did not reach the lazily restored JVM"
    );
    assert_eq!(tree_state(&s.images()), before, "restore changed the image");
}

/// Lazy restore keeps the page-data check: the tree CRIU restored from a tampered pages file
/// is killed before it runs, the daemon with it, and the JVM is started cold.
#[test]
fn lazy_restore_of_tampered_page_data_is_killed_before_it_runs() {
    let _g = serial();
    let s = Scratch::new("lazy-tampered");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    corrupt_byte(&s.images().join("c1/pages-1.img"), 4096 * 10 + 7);

    let r = restore_run(&s, "restore", "c1", port)
        .env("CRAC_LAZY_PAGES", "true")
        .start();
    let answers = answers_until_the_first_200(port);
    assert_eq!(answers, vec!["hello 1".to_string()], "log:\n{}", r.log());
    let sum = r.summary();
    assert_eq!(sum.outcome, Some(Outcome::ColdStarted), "{sum:?}");
    assert_eq!(sum.reason.as_deref(), Some("ImageCorrupt"), "{sum:?}");
    let log = r.log();
    // CRIU ran lazily (the daemon listened) and the tree it restored was killed unresumed.
    assert!(
        log.contains("lazy restore: criu lazy-pages listened"),
        "{log}"
    );
    assert!(log.contains("killed the restored tree"), "{log}");
    assert!(!log.contains("restore timing:"), "{log}");
    assert!(lazy_daemons(&s).is_empty(), "{:?}", lazy_daemons(&s));
    assert_eq!(r.stop(), 143);
}

// ---------------------------------------------------------------------------------------------
// Sleep in place: POST /sleep and POST /wake on the activity port (docs/agent.md)

/// A control call's status and JSON body.
/// hello-app checkpointed as `c1`, then restored by an agent given a control token: the
/// restore (answering "hello 201") and the token.
fn restored_with_control(s: &Scratch, port: u16) -> (Running, String) {
    checkpoint(s, "c1", port, &[]);
    let (token_file, token) = control_token(s);
    let mut r = restore_run(s, "restore", "c1", port)
        .env(ENV_CONTROL_TOKEN_FILE, &token_file.to_string_lossy())
        .start();
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 201"
    );
    (r, token)
}

fn control(r: &Running, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let (code, body) = http_post(r.activity_port, path, token)
        .unwrap_or_else(|e| panic!("POST {path}: {e}; log:\n{}", r.log()));
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("POST {path} answered {code} {body:?}: {e}"));
    (code, json)
}

/// The processes of the agent's PID namespace, as its own /proc lists them.
fn namespace_processes(agent: i32) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir(format!("/proc/{agent}/root/proc"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

/// A `kB` line of /proc/<pid>/status (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: i32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn image_pids(s: &Scratch) -> Vec<i64> {
    metadata(s, "c1")["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect()
}

/// Asleep: the app's port refuses connections, the agent (PID 1) is the namespace's only
/// process, every PID the image needs is free, and /activity says so.
fn assert_asleep(r: &mut Running, s: &Scratch, port: u16) {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the app's port still accepts while asleep; log:\n{}",
        r.log()
    );
    assert!(r.child.try_wait().unwrap().is_none(), "the agent ended");
    let agent = r.agent_pid();
    assert_eq!(namespace_processes(agent), vec![1], "{}", r.log());
    for p in image_pids(s) {
        assert!(
            !std::path::Path::new(&format!("/proc/{agent}/root/proc/{p}")).exists(),
            "pid {p} of the image is taken while asleep"
        );
    }
    let a = activity(r);
    assert_eq!(a.mode, "sleeping", "{a:?}");
    assert_eq!(a.open_connections, 0);
    assert!(a.sleeping_since.is_some() && a.start_ms.is_none(), "{a:?}");
    assert_eq!(a.checkpoint_id.as_deref(), Some("c1"));
}

/// Sleep ends the JVM and keeps the agent; wake restores it in place from the image (the
/// counter comes back at 201 each time), three times over; only the token's bearer may ask;
/// SIGTERM while asleep ends the agent at once with 0.
#[test]
fn sleep_and_wake_in_place_restore_from_the_image() {
    let _g = serial();
    let s = Scratch::new("in-place");
    let port = free_port();
    let (mut r, token) = restored_with_control(&s, port);
    // Without the token, or with another, nothing happens.
    let wrong = format!("{}x", &token[1..]);
    for t in [None, Some(wrong.as_str()), Some(&token[..token.len() - 1])] {
        for path in ["/sleep", "/wake"] {
            let (code, body) = control(&r, path, t);
            assert_eq!(code, 401, "{path} with {t:?}: {body}");
            assert!(body.get("mode").is_none(), "{body}");
        }
    }
    assert_eq!(
        http_get(r.activity_port, "/sleep").unwrap().0,
        401,
        "GET without a token"
    );
    assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 202");
    assert_eq!(activity(&r).mode, "restored");

    let agent = r.agent_pid();
    const ROUNDS: u32 = 3;
    for round in 1..=ROUNDS {
        let (code, body) = control(&r, "/sleep", Some(&token));
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["mode"], "sleeping");
        assert!(body["sleepMs"].as_u64().is_some(), "{body}");
        // Already asleep: answered at once, nothing done.
        let (code, again) = control(&r, "/sleep", Some(&token));
        assert_eq!((code, again["sleepMs"].is_null()), (200, true), "{again}");
        assert_asleep(&mut r, &s, port);
        let rss = status_kib(agent, "VmRSS");
        let threads = fs::read_dir(format!("/proc/{agent}/task")).unwrap().count();
        eprintln!(
            "asleep (round {round}): agent VmRSS {rss} kB (anon {} kB, file {} kB), {threads} threads",
            status_kib(agent, "RssAnon"),
            status_kib(agent, "RssFile")
        );
        // The agent alone, its heap given back after each sleep (and not growing with them).
        assert!(rss < 16 * 1024, "the sleeping agent holds {rss} kB");
        let anon = status_kib(agent, "RssAnon");
        assert!(anon < 2 * 1024, "the sleeping agent's heap is {anon} kB");

        let t = Instant::now();
        let (code, body) = control(&r, "/wake", Some(&token));
        let took = t.elapsed();
        assert_eq!(code, 200, "{body}; log:\n{}", r.log());
        assert_eq!(body["mode"], "restored", "{body}");
        let restore_ms = body["restoreMs"].as_u64().unwrap();
        assert!(restore_ms <= took.as_millis() as u64 + 1, "{body} {took:?}");
        eprintln!(
            "in-place wake {round}: restoreMs {restore_ms}, answered after {} ms",
            took.as_millis()
        );
        // Ready when it answers, and from the image's memory: 200 requests before the dump.
        assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 201");
        // Awake: answered at once, with no new restore.
        let (code, again) = control(&r, "/wake", Some(&token));
        assert_eq!(code, 200);
        assert_eq!(again["mode"], "restored");
        assert!(again["restoreMs"].is_null(), "{again}");
        assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 202");
        let a = activity(&r);
        assert_eq!(
            (a.mode.as_str(), a.wakes),
            ("restored", Some(round)),
            "{a:?}"
        );
        assert!(a.sleeping_since.is_none() && a.last_activity_time.is_some());
        let sum = r.summary();
        assert_eq!(sum.outcome, Some(Outcome::Restored), "{sum:?}");
        assert_eq!((sum.wakes, sum.asleep), (Some(round), None), "{sum:?}");
    }
    let log = r.log();
    for l in log.lines().filter(|l| {
        l.contains("restore timing: ") || l.contains("ns_last_pid") || l.contains("asleep ")
    }) {
        eprintln!("{l}");
    }
    assert_eq!(
        log.matches("restore timing: ").count(),
        ROUNDS as usize + 1,
        "{log}"
    );

    // SIGTERM while asleep: no JVM to stop, the agent exits 0 at once.
    assert_eq!(control(&r, "/sleep", Some(&token)).0, 200);
    let t = Instant::now();
    r.signal("TERM");
    assert_eq!(r.wait(Duration::from_secs(10)), 0, "{}", r.log());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let sum = read_summary(&r.summary, &r.log());
    assert_eq!(sum.asleep, Some(true), "{sum:?}");
    assert_eq!(sum.wakes, Some(ROUNDS));
    assert_eq!(sum.exit_code, None);
}

/// Wakes that arrive together share one restore; a sleep that arrives during a wake waits for
/// it, then sleeps: never two JVMs, never none with a mode that says awake.
#[test]
fn concurrent_wakes_share_one_restore_and_a_sleep_waits_for_the_wake() {
    let _g = serial();
    let s = Scratch::new("in-place-races");
    let port = free_port();
    let (mut r, token) = restored_with_control(&s, port);
    assert_eq!(control(&r, "/sleep", Some(&token)).0, 200);

    let wakes: Vec<_> = (0..4)
        .map(|_| {
            let (ap, token) = (r.activity_port, token.clone());
            std::thread::spawn(move || http_post(ap, "/wake", Some(&token)).unwrap())
        })
        .collect();
    let answers: Vec<(u16, String)> = wakes.into_iter().map(|h| h.join().unwrap()).collect();
    for (code, body) in &answers {
        assert_eq!(*code, 200, "{body}");
        // The same wake's answer, restoreMs included.
        assert_eq!(body, &answers[0].1);
    }
    let first: serde_json::Value = serde_json::from_str(&answers[0].1).unwrap();
    assert_eq!(first["mode"], "restored");
    assert!(first["restoreMs"].as_u64().is_some(), "{first}");
    let log = r.log();
    assert_eq!(log.matches("waking in place").count(), 1, "{log}");
    assert_eq!(log.matches("restore timing: ").count(), 2, "{log}");
    assert_eq!(activity(&r).wakes, Some(1));
    assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 201");

    // A sleep during a wake.
    assert_eq!(control(&r, "/sleep", Some(&token)).0, 200);
    let (ap, t2) = (r.activity_port, token.clone());
    let wake = std::thread::spawn(move || {
        let a = http_post(ap, "/wake", Some(&t2)).unwrap();
        (a, Instant::now())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.log().contains("waking in place (wake 2)") {
        assert!(Instant::now() < deadline, "{}", r.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    let (code, slept) = control(&r, "/sleep", Some(&token));
    let slept_at = Instant::now();
    let ((wcode, woke), woke_at) = wake.join().unwrap();
    assert_eq!((wcode, code), (200, 200), "{woke} {slept}");
    assert!(woke.contains("\"restored\""), "{woke}");
    assert_eq!(slept["mode"], "sleeping");
    assert!(
        slept["sleepMs"].as_u64().is_some(),
        "the sleep ended a JVM: {slept}"
    );
    assert!(woke_at <= slept_at, "the sleep answered before the wake");
    assert_asleep(&mut r, &s, port);
    assert_eq!(r.log().matches("restore timing: ").count(), 3);
    r.signal("TERM");
    assert_eq!(r.wait(Duration::from_secs(10)), 0);
}

/// Without a token file the endpoints are off (404). A wake whose image was damaged while the
/// pod slept starts the app cold in place, as a pod start would; a cold pod sleeps and wakes
/// too. A JVM that exits on its own still ends the agent with its status.
#[test]
fn a_wake_from_a_damaged_image_starts_cold_in_place() {
    let _g = serial();
    let s = Scratch::new("in-place-cold");
    let port = free_port();
    checkpoint(&s, "c1", port, &[]);
    let (token_file, token) = control_token(&s);

    let mut off = restore_run(&s, "restore-off", "c1", port).start();
    assert_eq!(
        off.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 201"
    );
    for path in ["/sleep", "/wake"] {
        assert_eq!(
            http_post(off.activity_port, path, Some(&token)).unwrap().0,
            404
        );
    }
    assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 202");
    assert_eq!(off.stop(), 143);

    let mut r = restore_run(&s, "restore", "c1", port)
        .env(ENV_CONTROL_TOKEN_FILE, &token_file.to_string_lossy())
        .start();
    assert_eq!(
        r.get_when_up("/", Duration::from_secs(20)).trim(),
        "hello 201"
    );
    assert_eq!(control(&r, "/sleep", Some(&token)).0, 200);
    corrupt_byte(&s.images().join("c1/pages-1.img"), 4096 * 10 + 7);
    for round in 1..=2u32 {
        let (code, body) = control(&r, "/wake", Some(&token));
        assert_eq!(code, 200, "{body}; log:\n{}", r.log());
        assert_eq!(body["mode"], "coldStarted", "{body}");
        assert_eq!(body["reason"], "ImageCorrupt", "{body}");
        assert!(body["restoreMs"].as_u64().is_some(), "{body}");
        assert_eq!(http_get(port, "/").unwrap().1.trim(), "hello 1");
        let a = activity(&r);
        assert_eq!(a.mode, "coldStarted");
        assert_eq!(a.reason.as_deref(), Some("ImageCorrupt"));
        assert_eq!(a.wakes, Some(round));
        let sum = r.summary();
        assert_eq!(sum.outcome, Some(Outcome::ColdStarted), "{sum:?}");
        assert_eq!(sum.reason.as_deref(), Some("ImageCorrupt"));
        if round == 1 {
            // The cold JVM sleeps like a restored one.
            assert_eq!(control(&r, "/sleep", Some(&token)).0, 200);
            assert_asleep(&mut r, &s, port);
        }
    }
    // The JVM exits on its own (hello-app's /exit-on-next-ready makes its next readiness
    // answer halt it with status 3): the agent ends with its status.
    assert_eq!(http_get(port, "/exit-on-next-ready").unwrap().0, 200);
    let _ = http_get(port, "/ready");
    let code = r.wait(Duration::from_secs(10));
    assert_eq!(code, 3, "{}", r.log());
    let sum = read_summary(&r.summary, &r.log());
    assert_eq!(sum.exit_code, Some(code));
    assert_eq!(sum.asleep, None);
}
