//! `crac-agent`: the program every app container runs. It starts the JVM, checkpoints it when
//! it is warm (`checkpoint`), restores it (`restore`, falling back to a cold start), or just
//! runs it (`run`); as PID 1 it forwards signals, reaps children and exits with the JVM's
//! status, and it writes one JSON summary line to the termination log. See docs/agent.md.

mod activity;
mod config;
mod control;
mod crac;
mod criu;
mod error;
mod flows;
mod image;
mod install;
mod jvm;
mod probe;
mod shrink;
mod summary;
mod supervisor;
mod sys;

use std::path::Path;
use std::time::Instant;

use crac_api::agent::{AgentSummary, Outcome};

fn main() {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("install") => std::process::exit(install::run(args.get(1).map(String::as_str))),
        Some("clean") => std::process::exit(clean(args.get(1).map(String::as_str))),
        Some("-h" | "--help" | "help") => {
            println!("{}", config::USAGE);
            return;
        }
        Some("--version" | "version") => {
            println!("crac-agent {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        _ => {}
    }
    // A long-lived PID 1 that may sleep in place holds as little memory as it can.
    sys::tune_allocator();
    // Nothing we inherited may reach the JVM or CRIU.
    if let Err(e) = sys::cloexec_from_3() {
        eprintln!("crac-agent: warning: cannot mark inherited descriptors close-on-exec: {e}");
    }
    // Before any other thread exists: signals are taken by the supervisor's thread only.
    let sup = match supervisor::Supervisor::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("crac-agent: cannot set up signal handling: {e}");
            std::process::exit(2);
        }
    };
    let cfg = match config::parse(&args, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(f) => {
            eprintln!("crac-agent: {}", f.message);
            let path = std::env::var(crac_api::agent::ENV_TERMINATION_LOG)
                .unwrap_or_else(|_| crac_api::agent::DEFAULT_TERMINATION_LOG.into());
            summary::write(
                Path::new(&path),
                &AgentSummary {
                    outcome: Some(Outcome::Failed),
                    reason: Some(f.reason.into()),
                    message: Some(f.message),
                    ..Default::default()
                },
            );
            std::process::exit(2);
        }
    };
    // Before any JVM runs, in every mode: the app can then never bind the activity port.
    let activity_listener = match cfg.activity_port {
        0 => None,
        port => match activity::listen(port) {
            Ok(l) => {
                eprintln!("crac-agent: activity port {port} bound");
                Some(l)
            }
            Err(e) => {
                eprintln!(
                    "crac-agent: warning: cannot bind the activity port {port} ({e}): the operator will not see this pod's activity"
                );
                None
            }
        },
    };
    // Read once, before any JVM runs. A bad file turns sleeping in place off for this pod (the
    // endpoints answer 404); the app itself starts as it would without it.
    let control_token = match (&cfg.control_token_file, cfg.mode) {
        (Some(path), config::Mode::Restore) => match control::read_token(path) {
            Ok(t) => {
                eprintln!(
                    "crac-agent: POST /sleep and /wake on the activity port: on (token from {})",
                    path.display()
                );
                Some(t)
            }
            Err(e) => {
                eprintln!(
                    "crac-agent: warning: control token unusable ({e}): POST /sleep and /wake answer 404"
                );
                None
            }
        },
        _ => None,
    };
    let ctx = flows::Ctx {
        cfg,
        sup,
        started,
        activity_listener,
        in_place: false,
        control_token,
    };
    let code = match ctx.cfg.mode {
        config::Mode::Checkpoint => flows::checkpoint(&ctx),
        config::Mode::Restore => flows::restore(&ctx),
        config::Mode::Run => flows::run(&ctx),
    };
    eprintln!("crac-agent: {} done, exit {code}", ctx.cfg.mode.as_str());
    std::process::exit(code);
}

/// Removes an app's image directory from a shared claim (the operator runs this in a Job
/// before a CracApp that used an `existingClaim` goes). A directory already gone is success.
fn clean(dir: Option<&str>) -> i32 {
    let Some(dir) = dir else {
        eprintln!("usage: crac-agent clean <image-dir>");
        return 2;
    };
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            eprintln!("crac-agent: removed {dir}");
            0
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("crac-agent: {dir} does not exist; nothing to remove");
            0
        }
        Err(e) => {
            eprintln!("crac-agent: cannot remove {dir}: {e}");
            1
        }
    }
}
