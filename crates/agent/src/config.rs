//! Configuration: the operator's environment variables (see `crac_api::agent`), overridden by
//! flags. Parsing is pure and unit-tested.

use std::path::PathBuf;
use std::time::Duration;

use crac_api::agent as api;
use serde::Deserialize;

use crate::error::Failure;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Checkpoint,
    Restore,
    Run,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Checkpoint => "checkpoint",
            Mode::Restore => "restore",
            Mode::Run => "run",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// A CRaC JDK checkpoints itself (`-XX:CRaCCheckpointTo`, `jcmd JDK.checkpoint`).
    Crac,
    /// Any JDK: the agent drives CRIU.
    Criu,
}

impl Engine {
    pub fn parse(s: &str) -> Result<Engine, Failure> {
        match s.trim().to_ascii_lowercase().as_str() {
            "crac" => Ok(Engine::Crac),
            "criu" => Ok(Engine::Criu),
            other => Err(Failure::config(format!(
                "engine must be crac or criu, not {other:?}"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Crac => "crac",
            Engine::Criu => "criu",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    ColdStart,
    Fail,
}

impl Fallback {
    pub fn parse(s: &str) -> Result<Fallback, Failure> {
        match s.trim() {
            "ColdStart" | "coldStart" | "coldstart" => Ok(Fallback::ColdStart),
            "Fail" | "fail" => Ok(Fallback::Fail),
            other => Err(Failure::config(format!(
                "fallback must be ColdStart or Fail, not {other:?}"
            ))),
        }
    }
}

/// How to tell the app is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// GET this path; 2xx or 3xx means ready.
    Http {
        host: String,
        port: u16,
        path: String,
    },
    /// A TCP connect succeeds.
    Tcp { host: String, port: u16 },
}

impl Readiness {
    /// Parses `http://127.0.0.1:8080/path` or `tcp://127.0.0.1:8080`.
    pub fn parse(s: &str) -> Result<Readiness, Failure> {
        let s = s.trim();
        let bad = |why: &str| {
            Failure::config(format!(
                "readiness {s:?}: {why} (want http://HOST:PORT/PATH or tcp://HOST:PORT)"
            ))
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("no HOST:PORT"))?;
        match scheme {
            "http" => Ok(Readiness::Http {
                host,
                port,
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                },
            }),
            "tcp" => {
                if !path.is_empty() && path != "/" {
                    return Err(bad("tcp takes no path"));
                }
                Ok(Readiness::Tcp { host, port })
            }
            _ => Err(bad("scheme must be http or tcp")),
        }
    }

    pub fn host_port(&self) -> (&str, u16) {
        match self {
            Readiness::Http { host, port, .. } | Readiness::Tcp { host, port } => (host, *port),
        }
    }
}

/// `host:port`, `[v6]:port`. The host may not be empty.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    if host.is_empty() || host.contains(':') && !s.starts_with('[') {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some((host.to_string(), port))
}

/// One warm-up step: GET `path`, `count` times.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct WarmupRequest {
    pub path: String,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Parses `[{"path":"/","count":200}]` (an empty string means no warm-up).
pub fn parse_warmup(s: &str) -> Result<Vec<WarmupRequest>, Failure> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let reqs: Vec<WarmupRequest> = serde_json::from_str(s).map_err(|e| {
        Failure::config(format!(
            "warm-up {s:?} is not [{{\"path\":\"/\",\"count\":N}}]: {e}"
        ))
    })?;
    for r in &reqs {
        if !r.path.starts_with('/') {
            return Err(Failure::config(format!(
                "warm-up path {:?} must start with /",
                r.path
            )));
        }
    }
    Ok(reqs)
}

#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub command: Vec<String>,
    pub image_dir: Option<PathBuf>,
    pub checkpoint_id: Option<String>,
    pub engine: Engine,
    pub readiness: Option<Readiness>,
    pub warmup: Vec<WarmupRequest>,
    pub retain: usize,
    /// Checkpoint: the spec generation this image is taken for (0 when not given): prune
    /// never removes an image of a greater one.
    pub spec_generation: u64,
    pub fallback: Fallback,
    pub timeout: Duration,
    pub app_port: Option<u16>,
    pub activity_port: u16,
    pub termination_log: PathBuf,
    pub criu: String,
    /// Restore: the `sha256:<hex>` digest of the image's metadata.json the operator recorded
    /// from the checkpoint's summary (validated where it is used, see `image::expected_digest`).
    pub image_digest: Option<String>,
    /// `ns_last_pid` to raise to before starting a JVM to checkpoint.
    pub min_pid: u32,
    /// Checkpoint: restore the new image once, to readiness, before publishing it.
    pub trial_restore: bool,
    /// Restore, engine criu: copy memory in lazily (`criu lazy-pages`), see `criu::restore`.
    pub lazy_pages: bool,
    /// Restore: the file holding the token of `POST /sleep` and `POST /wake` (read once at
    /// start, see `control::read_token`); `None`: the endpoints are off.
    pub control_token_file: Option<PathBuf>,
}

/// Default for `--min-pid`: the checkpointed JVM gets PIDs above this, which the agent (PID 1,
/// its few threads, CRIU) never reaches in a fresh pod, so restore finds them free.
pub const DEFAULT_MIN_PID: u32 = 200;

pub const USAGE: &str = "usage:
  crac-agent checkpoint [flags] -- <command...>   start, warm up, checkpoint, publish
  crac-agent restore [flags] -- <command...>      restore the image (or fall back to cold start)
  crac-agent run [flags] -- <command...>          plain start (for comparison)
  crac-agent install <dest-path>                  copy this binary to dest-path (mode 0755)
  crac-agent clean <image-dir>                    remove an app's images (used before deletion)
flags (each overrides its environment variable):
  --image-dir DIR        CRAC_IMAGE_DIR
  --checkpoint-id ID     CRAC_CHECKPOINT_ID
  --engine crac|criu     CRAC_ENGINE (default criu)
  --readiness URL        CRAC_READINESS  http://127.0.0.1:8080/path or tcp://127.0.0.1:8080
  --warmup JSON          CRAC_WARMUP     [{\"path\":\"/\",\"count\":200}]
  --retain N             CRAC_RETAIN (default 2)
  --spec-generation N    CRAC_SPEC_GENERATION (checkpoint: the spec's generation, default 0;
                         prune never removes an image taken for a greater one)
  --fallback F           CRAC_FALLBACK   ColdStart (default) or Fail
  --timeout-seconds N    CRAC_TIMEOUT_SECONDS (default 600)
  --app-port N           CRAC_APP_PORT
  --activity-port N      CRAC_ACTIVITY_PORT (default 9901, 0 disables)
  --termination-log P    CRAC_TERMINATION_LOG (default /dev/termination-log)
  --criu PATH            CRAC_CRIU: a criu binary or a CRIU bundle directory (default: the
                         bundle installed beside the agent, else criu on PATH)
  --min-pid N            CRAC_MIN_PID (default 200)
  --image-digest D       CRAC_IMAGE_DIGEST (restore: sha256:<64 hex> of the image's metadata.json)
  --trial-restore B      CRAC_TRIAL_RESTORE (checkpoint: true (default) or false; restore the
                         new image once, to readiness, before publishing it)
  --lazy-pages BOOL      CRAC_LAZY_PAGES (restore, engine criu: true copies memory in lazily,
                         with criu lazy-pages; needs root with full privileges; default false)
  --control-token-file P CRAC_CONTROL_TOKEN_FILE (restore: the bearer token of POST /sleep and
                         POST /wake on the activity port; unset: both answer 404)";

const FLAGS: [(&str, &str); 18] = [
    ("--image-dir", api::ENV_IMAGE_DIR),
    ("--checkpoint-id", api::ENV_CHECKPOINT_ID),
    ("--engine", api::ENV_ENGINE),
    ("--readiness", api::ENV_READINESS),
    ("--warmup", api::ENV_WARMUP),
    ("--retain", api::ENV_RETAIN),
    ("--spec-generation", api::ENV_SPEC_GENERATION),
    ("--fallback", api::ENV_FALLBACK),
    ("--timeout-seconds", api::ENV_TIMEOUT_SECONDS),
    ("--app-port", api::ENV_APP_PORT),
    ("--activity-port", api::ENV_ACTIVITY_PORT),
    ("--termination-log", api::ENV_TERMINATION_LOG),
    ("--criu", "CRAC_CRIU"),
    ("--min-pid", "CRAC_MIN_PID"),
    ("--image-digest", api::ENV_IMAGE_DIGEST),
    ("--trial-restore", api::ENV_TRIAL_RESTORE),
    ("--lazy-pages", api::ENV_LAZY_PAGES),
    ("--control-token-file", api::ENV_CONTROL_TOKEN_FILE),
];

/// Parses `args` (without the program name) with `env` as the source of defaults.
pub fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Config, Failure> {
    let mode = match args.first().map(String::as_str) {
        Some("checkpoint") => Mode::Checkpoint,
        Some("restore") => Mode::Restore,
        Some("run") => Mode::Run,
        Some(other) => return Err(Failure::config(format!("unknown mode {other:?}\n{USAGE}"))),
        None => return Err(Failure::config(USAGE.to_string())),
    };
    let mut values: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    for (_, var) in FLAGS {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            values.insert(var, v);
        }
    }
    let mut i = 1;
    let mut command = Vec::new();
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            command = args[i + 1..].to_vec();
            break;
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        let var = FLAGS
            .iter()
            .find(|(f, _)| *f == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| Failure::config(format!("unknown flag {a:?}\n{USAGE}")))?;
        let value = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .ok_or_else(|| Failure::config(format!("{name} needs a value")))?
            }
        };
        values.insert(var, value);
        i += 1;
    }
    if command.is_empty() {
        return Err(Failure::config(format!("no command after --\n{USAGE}")));
    }
    let get = |var: &str| values.get(var).map(String::as_str);
    let num = |var: &str, default: u64| -> Result<u64, Failure> {
        match get(var) {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| Failure::config(format!("{var}={v:?} is not a number"))),
            None => Ok(default),
        }
    };
    let flag = |var: &str, default: bool| -> Result<bool, Failure> {
        match get(var).map(str::trim) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(Failure::config(format!(
                "{var}={other:?} must be true or false"
            ))),
        }
    };
    let app_port = match get(api::ENV_APP_PORT) {
        Some(_) => Some(num(api::ENV_APP_PORT, 0)? as u16).filter(|p| *p != 0),
        None => None,
    };
    let readiness = match get(api::ENV_READINESS) {
        Some(r) => Some(Readiness::parse(r)?),
        None => app_port.map(|port| Readiness::Tcp {
            host: "127.0.0.1".into(),
            port,
        }),
    };
    // The app port defaults to the readiness port: that is where its traffic arrives.
    let app_port = app_port.or(readiness.as_ref().map(|r| r.host_port().1));
    let activity_port = num(api::ENV_ACTIVITY_PORT, api::DEFAULT_ACTIVITY_PORT as u64)?;
    let activity_port = u16::try_from(activity_port).map_err(|_| {
        Failure::config(format!(
            "{}={activity_port} is not a port",
            api::ENV_ACTIVITY_PORT
        ))
    })?;
    // The agent holds the activity port for the pod's life; an app serving there would never
    // get it (and must not be able to answer in the agent's name).
    if let Some(p) = app_port.filter(|p| activity_port != 0 && *p == activity_port) {
        return Err(Failure::config(format!(
            "the app's port {p} is the agent's activity port ({}): give the app another port, or move the activity port",
            api::ENV_ACTIVITY_PORT
        )));
    }
    Ok(Config {
        mode,
        command,
        image_dir: get(api::ENV_IMAGE_DIR).map(PathBuf::from),
        checkpoint_id: get(api::ENV_CHECKPOINT_ID).map(str::to_string),
        engine: Engine::parse(get(api::ENV_ENGINE).unwrap_or("criu"))?,
        readiness,
        warmup: parse_warmup(get(api::ENV_WARMUP).unwrap_or(""))?,
        retain: num(api::ENV_RETAIN, 2)?.max(1) as usize,
        spec_generation: num(api::ENV_SPEC_GENERATION, 0)?,
        fallback: Fallback::parse(get(api::ENV_FALLBACK).unwrap_or("ColdStart"))?,
        timeout: Duration::from_secs(num(api::ENV_TIMEOUT_SECONDS, 600)?.max(1)),
        app_port,
        activity_port,
        termination_log: PathBuf::from(
            get(api::ENV_TERMINATION_LOG).unwrap_or(api::DEFAULT_TERMINATION_LOG),
        ),
        criu: get("CRAC_CRIU")
            .map(str::to_string)
            .unwrap_or_else(default_criu),
        min_pid: num("CRAC_MIN_PID", DEFAULT_MIN_PID as u64)? as u32,
        image_digest: get(api::ENV_IMAGE_DIGEST).map(str::to_string),
        trial_restore: flag(api::ENV_TRIAL_RESTORE, true)?,
        lazy_pages: flag(api::ENV_LAZY_PAGES, false)?,
        control_token_file: get(api::ENV_CONTROL_TOKEN_FILE).map(PathBuf::from),
    })
}

/// The CRIU bundle installed beside this executable (`crac-agent install`), else `criu` on PATH.
fn default_criu() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(crate::criu::BUNDLE_DIR)))
        .filter(|dir| crate::criu::is_bundle(dir))
        .map(|dir| dir.to_string_lossy().into_owned())
        .unwrap_or_else(|| "criu".into())
}

/// A checkpoint id becomes a directory name: keep it to a safe alphabet.
pub fn valid_checkpoint_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Benchmarks only: `CRAC_AGENT_BENCH_DISABLE=overlap,shrink,kdat` turns off one of restore's
/// speed-ups (the page-data check beside CRIU, the heap shrink before the dump, the kernel
/// feature cache) so that `make bench` can measure each on its own. Not a product setting:
/// none of them changes what is restored or what is checked.
pub fn bench_disabled(what: &str) -> bool {
    std::env::var("CRAC_AGENT_BENCH_DISABLE").is_ok_and(|v| v.split(',').any(|x| x.trim() == what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn readiness_http_and_tcp() {
        assert_eq!(
            Readiness::parse("http://127.0.0.1:8080/actuator/health").unwrap(),
            Readiness::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/actuator/health".into()
            }
        );
        assert_eq!(
            Readiness::parse("http://localhost:80").unwrap(),
            Readiness::Http {
                host: "localhost".into(),
                port: 80,
                path: "/".into()
            }
        );
        assert_eq!(
            Readiness::parse("tcp://127.0.0.1:9000").unwrap(),
            Readiness::Tcp {
                host: "127.0.0.1".into(),
                port: 9000
            }
        );
        assert_eq!(
            Readiness::parse("http://[::1]:8080/r?x=1").unwrap(),
            Readiness::Http {
                host: "::1".into(),
                port: 8080,
                path: "/r?x=1".into()
            }
        );
    }

    #[test]
    fn readiness_rejects_nonsense() {
        for bad in [
            "",
            "127.0.0.1:8080",
            "ftp://h:1",
            "http://h",
            "http://h:0/",
            "http://:80/",
            "tcp://h:1/x",
            "http://h:99999/",
        ] {
            assert!(Readiness::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn warmup_parses_and_validates() {
        assert_eq!(
            parse_warmup(r#"[{"path":"/","count":200},{"path":"/a"}]"#).unwrap(),
            vec![
                WarmupRequest {
                    path: "/".into(),
                    count: 200
                },
                WarmupRequest {
                    path: "/a".into(),
                    count: 1
                }
            ]
        );
        assert!(parse_warmup("").unwrap().is_empty());
        assert!(parse_warmup(r#"[{"path":"a","count":1}]"#).is_err());
        assert!(parse_warmup(r#"{"path":"/"}"#).is_err());
    }

    #[test]
    fn flags_override_env() {
        let env = |k: &str| match k {
            "CRAC_ENGINE" => Some("crac".to_string()),
            "CRAC_RETAIN" => Some("5".to_string()),
            "CRAC_SPEC_GENERATION" => Some("7".to_string()),
            "CRAC_READINESS" => Some("http://127.0.0.1:8080/ready".to_string()),
            _ => None,
        };
        let c = parse(
            &args(&[
                "checkpoint",
                "--engine",
                "criu",
                "--retain=3",
                "--",
                "java",
                "-jar",
                "x.jar",
            ]),
            env,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Checkpoint);
        assert_eq!(c.engine, Engine::Criu);
        assert_eq!(c.retain, 3);
        assert_eq!(c.spec_generation, 7);
        assert_eq!(c.app_port, Some(8080));
        assert_eq!(c.command, args(&["java", "-jar", "x.jar"]));
        assert_eq!(c.fallback, Fallback::ColdStart);
        assert_eq!(c.activity_port, 9901);
        assert!(c.trial_restore, "a trial restore unless told otherwise");
    }

    #[test]
    fn trial_restore_is_on_unless_false() {
        let with = |v: &str| {
            let v = v.to_string();
            parse(&args(&["checkpoint", "--", "java"]), move |k| {
                (k == "CRAC_TRIAL_RESTORE").then(|| v.clone())
            })
        };
        assert!(!with("false").unwrap().trial_restore);
        assert!(with("true").unwrap().trial_restore);
        assert!(with("no").is_err());
    }

    #[test]
    fn lazy_pages_is_off_unless_set_to_true() {
        let lazy = |flag: Option<&str>, env: Option<&str>| {
            let mut a = vec!["restore"];
            if let Some(f) = flag {
                a.extend(["--lazy-pages", f]);
            }
            a.extend(["--", "java"]);
            let env = env.map(str::to_string);
            parse(&args(&a), move |k| {
                (k == api::ENV_LAZY_PAGES).then(|| env.clone()).flatten()
            })
            .map(|c| c.lazy_pages)
        };
        assert!(!lazy(None, None).unwrap());
        assert!(lazy(None, Some("true")).unwrap());
        assert!(!lazy(None, Some("")).unwrap(), "empty is unset");
        assert!(!lazy(Some("false"), Some("true")).unwrap(), "the flag wins");
        assert!(lazy(Some("true"), None).unwrap());
        for bad in ["yes", "1", "TRUE"] {
            let e = lazy(None, Some(bad)).unwrap_err();
            assert!(e.message.contains("CRAC_LAZY_PAGES"), "{}", e.message);
        }
    }

    #[test]
    fn app_port_gives_default_tcp_readiness() {
        let c = parse(&args(&["run", "--app-port", "8081", "--", "java"]), |_| {
            None
        })
        .unwrap();
        assert_eq!(
            c.readiness,
            Some(Readiness::Tcp {
                host: "127.0.0.1".into(),
                port: 8081
            })
        );
    }

    #[test]
    fn parse_errors() {
        assert!(parse(&args(&["bogus", "--", "x"]), |_| None).is_err());
        assert!(parse(&args(&["run"]), |_| None).is_err());
        assert!(parse(&args(&["run", "--nope", "1", "--", "x"]), |_| None).is_err());
        assert!(parse(&args(&["run", "--retain", "x", "--", "x"]), |_| None).is_err());
        assert!(
            parse(
                &args(&["run", "--spec-generation", "-1", "--", "x"]),
                |_| None
            )
            .is_err()
        );
        assert!(parse(&args(&["run", "--fallback", "Maybe", "--", "x"]), |_| None).is_err());
    }

    #[test]
    fn the_app_may_not_use_the_activity_port() {
        // Given outright, or through the readiness URL (the app port defaults to its port).
        for a in [
            args(&["run", "--app-port", "9901", "--", "java"]),
            args(&[
                "run",
                "--readiness",
                "http://127.0.0.1:9901/r",
                "--",
                "java",
            ]),
            args(&[
                "run",
                "--app-port",
                "8080",
                "--activity-port",
                "8080",
                "--",
                "java",
            ]),
        ] {
            let e = parse(&a, |_| None).unwrap_err();
            assert_eq!(e.reason, crate::error::reason::CONFIG_INVALID);
            assert!(e.message.contains("activity port"), "{}", e.message);
        }
        // The activity endpoint disabled: any app port is fine.
        assert!(
            parse(
                &args(&[
                    "run",
                    "--app-port",
                    "8080",
                    "--activity-port",
                    "0",
                    "--",
                    "java"
                ]),
                |_| None
            )
            .is_ok()
        );
        assert!(
            parse(
                &args(&["run", "--activity-port", "70000", "--", "java"]),
                |_| None
            )
            .is_err()
        );
    }

    #[test]
    fn image_digest_comes_from_the_environment() {
        let d = format!("sha256:{}", "a".repeat(64));
        let env = |k: &str| (k == "CRAC_IMAGE_DIGEST").then(|| d.clone());
        let c = parse(&args(&["restore", "--", "java"]), env).unwrap();
        assert_eq!(c.image_digest.as_deref(), Some(d.as_str()));
        let c = parse(&args(&["restore", "--", "java"]), |_| Some(String::new())).unwrap();
        assert_eq!(c.image_digest, None, "an empty variable is no digest");
    }

    #[test]
    fn checkpoint_ids() {
        assert!(valid_checkpoint_id("7f3a-01_b.c"));
        assert!(!valid_checkpoint_id(""));
        assert!(!valid_checkpoint_id(".tmp"));
        assert!(!valid_checkpoint_id("a/b"));
        assert!(!valid_checkpoint_id("a b"));
    }
}
