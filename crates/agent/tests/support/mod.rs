//! Test support: a real JVM (examples/hello-app, compiled with the machine's javac), real CRIU
//! (provisioned by scripts/fetch-criu), and the agent run as PID 1 of fresh PID and mount
//! namespaces (`unshare -p -f --mount-proc`), as in a pod.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crac_api::agent::{AgentSummary, ENV_IMAGE_DIGEST};
use sha2::{Digest, Sha256};

const CRIU_VERSION: &str = "4.2.1";

/// Tests run one at a time: each starts JVMs and CRIU, and the machine has two cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The CRIU the tests use: `CRAC_CRIU`, else what scripts/fetch-criu provisions. Fails (never
/// skips) when it is missing.
pub fn criu() -> String {
    static CRIU: OnceLock<String> = OnceLock::new();
    CRIU.get_or_init(|| {
        let path = std::env::var("CRAC_CRIU").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| {
            let cache = std::env::var("CRAC_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/crac-operator"));
            cache.join("criu/bin/criu").to_string_lossy().into_owned()
        });
        let out = Command::new(&path).arg("--version").output();
        match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).contains(&format!("Version: {CRIU_VERSION}")) => path,
            _ => panic!(
                "CRIU {CRIU_VERSION} is not provisioned at {path}: run scripts/fetch-criu (or set CRAC_CRIU) before these tests"
            ),
        }
    })
    .clone()
}

/// Compiles examples/hello-app into target/hello-app/classes (once) and returns that directory.
pub fn hello_classes() -> PathBuf {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    CLASSES
        .get_or_init(|| {
            let src = workspace().join("examples/hello-app/src/Hello.java");
            let out = target_dir().join("hello-app/classes");
            let class = out.join("Hello.class");
            let stale = match (
                fs::metadata(&class).and_then(|m| m.modified()),
                fs::metadata(&src).and_then(|m| m.modified()),
            ) {
                (Ok(c), Ok(s)) => c < s,
                _ => true,
            };
            if stale {
                fs::create_dir_all(&out).unwrap();
                let st = Command::new("javac")
                    .arg("-d")
                    .arg(&out)
                    .arg(&src)
                    .status()
                    .expect("javac must be installed (a JDK 17+) to build examples/hello-app");
                assert!(st.success(), "javac failed on {}", src.display());
            }
            out
        })
        .clone()
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crac-agent"))
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory for one test: images, logs, the termination log.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = target_dir().join("agent-tests").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("images")).unwrap();
        Scratch { dir }
    }
    pub fn images(&self) -> PathBuf {
        self.dir.join("images")
    }
}

impl Drop for Scratch {
    /// Kept when the test failed, for its logs; removed otherwise (images are tens of MB).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// One agent invocation: mode, flags, and the hello-app command on `port`.
pub struct AgentRun {
    pub name: String,
    pub mode: &'static str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub port: u16,
    pub activity_port: u16,
    pub dir: PathBuf,
    /// Mount the images directory read-only in the agent's mount namespace, as restore pods
    /// mount the claim.
    pub read_only_images: bool,
}

impl AgentRun {
    pub fn new(s: &Scratch, name: &str, mode: &'static str, id: &str, port: u16) -> AgentRun {
        let activity_port = free_port();
        let args = vec![
            "--image-dir".into(),
            s.images().to_string_lossy().into_owned(),
            "--checkpoint-id".into(),
            id.into(),
            "--readiness".into(),
            format!("http://127.0.0.1:{port}/ready"),
            "--activity-port".into(),
            activity_port.to_string(),
            "--termination-log".into(),
            s.dir
                .join(format!("{name}.summary"))
                .to_string_lossy()
                .into_owned(),
            "--criu".into(),
            criu(),
            "--timeout-seconds".into(),
            "30".into(),
        ];
        AgentRun {
            name: name.into(),
            mode,
            args,
            env: Vec::new(),
            port,
            activity_port,
            dir: s.dir.clone(),
            read_only_images: false,
        }
    }

    pub fn read_only_images(mut self) -> AgentRun {
        self.read_only_images = true;
        self
    }

    pub fn arg(mut self, k: &str, v: &str) -> AgentRun {
        self.args.push(k.into());
        self.args.push(v.into());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> AgentRun {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn summary_path(&self) -> PathBuf {
        self.dir.join(format!("{}.summary", self.name))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn command(&self) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--pid", "--fork", "--mount-proc"]);
        if self.read_only_images {
            // In the new (private) mount namespace only; `exec` keeps the agent PID 1.
            c.args([
                "sh",
                "-c",
                r#"mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@""#,
            ])
            .arg(self.dir.join("images"));
        }
        c.arg(agent_bin())
            .arg(self.mode)
            .args(&self.args)
            .arg("--")
            .args(["java", "-cp"])
            .arg(hello_classes())
            .arg("Hello")
            .arg(self.port.to_string())
            .current_dir(&self.dir)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null());
        let log = File::create(self.log_path()).unwrap();
        c.stdout(log.try_clone().unwrap()).stderr(log);
        c
    }

    /// Runs to completion (bounded) and returns the exit code.
    pub fn run(&self, limit: Duration) -> i32 {
        let mut child = self.command().spawn().expect("unshare must be installed");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} {} ran longer than {limit:?}; log:\n{}",
                    self.mode,
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts in the background.
    pub fn start(&self) -> Running {
        let child = self.command().spawn().expect("unshare must be installed");
        Running {
            child,
            log: self.log_path(),
            summary: self.summary_path(),
            port: self.port,
            activity_port: self.activity_port,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn summary(&self) -> AgentSummary {
        read_summary(&self.summary_path(), &self.log())
    }
}

pub fn read_summary(path: &Path, log: &str) -> AgentSummary {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no summary at {} ({e}); log:\n{log}", path.display()));
    assert!(text.len() < 4096, "summary over 4 KiB: {text}");
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "summary must be one line: {text}"
    );
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("summary {text:?} is not an AgentSummary: {e}"))
}

/// A background agent (`unshare` → agent as PID 1 → JVM).
pub struct Running {
    pub child: Child,
    pub log: PathBuf,
    pub summary: PathBuf,
    pub port: u16,
    pub activity_port: u16,
}

impl Running {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's pid as this test sees it (the child of `unshare`).
    pub fn agent_pid(&self) -> i32 {
        let unshare = self.child.id();
        for _ in 0..200 {
            let children = fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                .unwrap_or_default();
            if let Some(p) = children.split_whitespace().next() {
                return p.parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the agent did not start; log:\n{}", self.log())
    }

    /// Sends `sig` to the agent (not to unshare).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.agent_pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the agent (through unshare) to exit; returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("agent did not exit within {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GETs `path` from the app until it answers 200 (or panics after `limit`).
    pub fn get_when_up(&mut self, path: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok((200, body)) = http_get(self.port, path) {
                return body;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "agent exited ({st}) before the app answered; log:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "app did not answer {path} within {limit:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The summary the agent writes once the JVM is up (it may lag the first answer a little).
    pub fn summary(&self) -> AgentSummary {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.summary.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        read_summary(&self.summary, &self.log())
    }

    /// Stops the agent with SIGTERM and returns its exit code.
    pub fn stop(mut self) -> i32 {
        self.signal("TERM");
        self.wait(Duration::from_secs(20))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            if let Ok(c) =
                fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
            {
                for p in c.split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", p]).status();
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP GET on loopback: status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    exchange(port, &format!("GET {path}"), "", Duration::from_secs(5))
}

/// One HTTP/1.1 request on loopback (`request_line` without the version, extra header lines
/// each ending in CRLF), read to the end within `limit`: status and body.
fn exchange(
    port: u16,
    request_line: &str,
    headers: &str,
    limit: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(limit))?;
    write!(
        s,
        "{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// Checkpoints hello-app (200 warm-up requests to /) as `id` into the scratch dir's images.
pub fn checkpoint(s: &Scratch, id: &str, port: u16, extra: &[(&str, &str)]) -> AgentRun {
    let mut run = AgentRun::new(s, &format!("checkpoint-{id}"), "checkpoint", id, port)
        .arg("--warmup", r#"[{"path":"/","count":200}]"#)
        .env(
            "HELLO_SHUTDOWN_FILE",
            &s.dir.join(format!("shutdown-{id}")).to_string_lossy(),
        );
    for (k, v) in extra {
        run = run.arg(k, v);
    }
    let code = run.run(Duration::from_secs(60));
    assert_eq!(code, 0, "checkpoint failed; log:\n{}", run.log());
    run
}

/// The digest the checkpoint of `id` reported (`imageDigest` of its summary), which the
/// operator gives restore pods as `CRAC_IMAGE_DIGEST`.
pub fn reported_digest(s: &Scratch, id: &str) -> String {
    let path = s.dir.join(format!("checkpoint-{id}.summary"));
    let sum = read_summary(&path, "");
    let d = sum
        .image_digest
        .clone()
        .unwrap_or_else(|| panic!("the checkpoint of {id} reported no imageDigest: {sum:?}"));
    assert!(d.starts_with("sha256:") && d.len() == 71, "{d}");
    d
}

/// `sha256:` + the hex sha256 of `bytes`, as the agent computes an image's digest.
pub fn digest_of(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// A restore of `id` as the operator starts one: with the digest its checkpoint reported.
pub fn restore_run(s: &Scratch, name: &str, id: &str, port: u16) -> AgentRun {
    let digest = reported_digest(s, id);
    AgentRun::new(s, name, "restore", id, port).env(ENV_IMAGE_DIGEST, &digest)
}

/// A plain HTTP POST on loopback with no body (and a bearer token, if any): status and body.
pub fn http_post(port: u16, path: &str, token: Option<&str>) -> std::io::Result<(u16, String)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    exchange(
        port,
        &format!("POST {path}"),
        &format!("{auth}Content-Length: 0\r\n"),
        Duration::from_secs(60),
    )
}

/// Writes a control token file (0600) in the scratch dir, as the operator's Secret would
/// provide it, and returns the token.
pub fn control_token(s: &Scratch) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let token: String = digest_of(s.dir.to_string_lossy().as_bytes())[7..55].to_string();
    let path = s.dir.join("control-token");
    fs::write(&path, format!("{token}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    (path, token)
}

pub fn corrupt_byte(file: &Path, at: u64) {
    let mut bytes = fs::read(file).unwrap();
    let i = (at as usize).min(bytes.len() - 1);
    bytes[i] ^= 0x5a;
    fs::write(file, bytes).unwrap();
}
