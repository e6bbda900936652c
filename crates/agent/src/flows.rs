//! The three modes, top to bottom: checkpoint, restore (with its fallback), run.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crac_api::agent::{ActivityReport, AgentSummary, Outcome, mode};

use crate::activity::{self, Activity};
use crate::config::{self, Config, Engine, Fallback};
use crate::error::{Failure, reason};
use crate::image::{self, Metadata, Published};
use crate::jvm::{self, Tail};
use crate::supervisor::Supervisor;
use crate::sys::{self, ExitStatus};
use crate::{crac, criu, probe};

pub struct Ctx {
    pub cfg: Config,
    pub sup: Supervisor,
    /// When the agent started: restore and cold-start times count from here.
    pub started: Instant,
    /// The activity port, bound before any JVM runs and held until the agent exits (see
    /// `activity::listen`); served once the JVM is up in restore and run modes.
    pub activity_listener: Option<TcpListener>,
    /// A wake in place (`control`): this PID namespace is not fresh, so restore first makes
    /// sure the checkpointed PIDs are free, and times itself from the wake request.
    pub in_place: bool,
    /// Restore mode: the token of `POST /sleep` and `POST /wake`; `None`: both are off.
    pub control_token: Option<crate::control::Token>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn log(msg: impl AsRef<str>) {
    eprintln!("crac-agent: {}", msg.as_ref());
}

impl Ctx {
    pub(crate) fn summary(&self) -> AgentSummary {
        AgentSummary {
            checkpoint_id: self.cfg.checkpoint_id.clone(),
            engine: Some(self.cfg.engine.as_str().to_string()),
            ..Default::default()
        }
    }

    pub(crate) fn write_summary(&self, s: &AgentSummary) {
        crate::summary::write(&self.cfg.termination_log, s);
    }

    fn deadline(&self) -> Instant {
        self.started + self.cfg.timeout
    }

    fn image_dir_and_id(&self) -> Result<(PathBuf, String), Failure> {
        let dir = self
            .cfg
            .image_dir
            .clone()
            .ok_or_else(|| Failure::config("CRAC_IMAGE_DIR (--image-dir) is required"))?;
        let id =
            self.cfg.checkpoint_id.clone().ok_or_else(|| {
                Failure::config("CRAC_CHECKPOINT_ID (--checkpoint-id) is required")
            })?;
        if !config::valid_checkpoint_id(&id) {
            return Err(Failure::config(format!(
                "checkpoint id {id:?} must be [A-Za-z0-9._-], not starting with a dot"
            )));
        }
        Ok((dir, id))
    }
}

/// On failure paths: stops forwarding signals and kills the JVM's whole process group.
struct JvmGuard<'a> {
    sup: &'a Supervisor,
    pid: i32,
    armed: bool,
}

impl Drop for JvmGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.sup.forward_signals_to(None);
        if !self.sup.has_exited(self.pid) {
            let _ = sys::kill(-self.pid, libc::SIGKILL);
            let _ = sys::kill(self.pid, libc::SIGKILL);
            let _ = self
                .sup
                .wait(self.pid, Some(Duration::from_secs(10)), false);
        }
    }
}

/// Why waiting for readiness ended without success.
fn not_ready(
    ctx: &Ctx,
    pid: i32,
    tail: &Tail,
    what: &str,
    last_err: String,
    restoring: bool,
) -> Failure {
    if let Some(sig) = ctx.sup.terminated_by() {
        return Failure::new(
            reason::TERMINATED,
            format!("received signal {sig} while {what}"),
        );
    }
    if ctx.sup.has_exited(pid) {
        if let Some(f) =
            crac::classify_output(&tail.text()).filter(|_| ctx.cfg.engine == Engine::Crac)
        {
            return f;
        }
        let last = tail
            .text()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string();
        return Failure::new(
            reason::JVM_EXITED,
            format!(
                "the JVM exited while {what}; its last line: {}",
                last.chars().take(300).collect::<String>()
            ),
        );
    }
    let r = if restoring {
        reason::RESTORE_TIMEOUT
    } else {
        reason::READINESS_TIMEOUT
    };
    let probe = ctx
        .cfg
        .readiness
        .as_ref()
        .map(describe_readiness)
        .unwrap_or_default();
    Failure::new(
        r,
        format!(
            "the app did not pass its readiness check {probe} within {}s ({last_err}): check the readiness URL, the app's log, or raise the timeout",
            ctx.cfg.timeout.as_secs()
        ),
    )
}

fn describe_readiness(r: &config::Readiness) -> String {
    match r {
        config::Readiness::Http { host, port, path } => format!("http://{host}:{port}{path}"),
        config::Readiness::Tcp { host, port } => format!("tcp://{host}:{port}"),
    }
}

fn wait_ready(ctx: &Ctx, pid: i32, deadline: Instant) -> Result<(), String> {
    match &ctx.cfg.readiness {
        Some(r) => probe::wait_ready(r, deadline, || {
            ctx.sup.has_exited(pid) || ctx.sup.terminated_by().is_some()
        }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// checkpoint

pub fn checkpoint(ctx: &Ctx) -> i32 {
    let mut s = ctx.summary();
    match do_checkpoint(ctx, &mut s) {
        Ok(()) => {
            s.outcome = Some(Outcome::Checkpointed);
            ctx.write_summary(&s);
            0
        }
        Err(f) => {
            log(format!("checkpoint failed: {f}"));
            s.outcome = Some(Outcome::Failed);
            s.reason = Some(f.reason.to_string());
            s.message = Some(f.message);
            ctx.write_summary(&s);
            1
        }
    }
}

fn do_checkpoint(ctx: &Ctx, s: &mut AgentSummary) -> Result<(), Failure> {
    let cfg = &ctx.cfg;
    let sup = &ctx.sup;
    let (image_dir, id) = ctx.image_dir_and_id()?;
    if cfg.readiness.is_none() {
        return Err(Failure::config(
            "a readiness check is required to checkpoint (CRAC_READINESS or CRAC_APP_PORT)",
        ));
    }
    image::create_private_dir_all(&image_dir).map_err(|e| {
        Failure::new(
            reason::PUBLISH_FAILED,
            format!("cannot create {}: {e}", image_dir.display()),
        )
    })?;
    let criu_version = match cfg.engine {
        Engine::Criu => Some(criu::version(sup, &cfg.criu)?),
        Engine::Crac => None,
    };
    // Locked while this checkpoint runs: a prune removes it only once this process is gone.
    let mut tmp = image::create_tmp_image(&image_dir, &id).map_err(|e| {
        Failure::new(
            reason::PUBLISH_FAILED,
            format!(
                "cannot create a temporary image directory in {}: {e}",
                image_dir.display()
            ),
        )
    })?;
    let tmp_path = tmp.path().to_path_buf();

    let tool_options = std::env::var("JAVA_TOOL_OPTIONS").ok();
    let (argv, env) = match cfg.engine {
        // hsperfdata is a file in /tmp mapped by the JVM: a fresh pod has no such file, so
        // a JVM dumped with it could not be restored there.
        Engine::Criu => jvm::with_jvm_options(
            &cfg.command,
            &["-XX:-UsePerfData".to_string()],
            tool_options.as_deref(),
        ),
        Engine::Crac => crac::checkpoint_command(
            &cfg.command,
            &tmp_path,
            std::env::var("CRAC_CPU_FEATURES").ok().as_deref(),
            tool_options.as_deref(),
        ),
    };
    let pipes = jvm::output_pipes()
        .map_err(|e| Failure::new(reason::SPAWN_FAILED, format!("cannot create pipes: {e}")))?;
    match jvm::raise_last_pid(cfg.min_pid) {
        Ok(was) if was < cfg.min_pid => {
            log(format!("raised ns_last_pid from {was} to {}", cfg.min_pid))
        }
        Ok(_) => {}
        // In a container /proc/sys is read-only: spend pids instead, a fork each.
        Err(e) => match sup.spend_pids_past(cfg.min_pid) {
            Ok(Some(last)) => log(format!(
                "ns_last_pid is not writable ({e}): spent pids up to {last} instead"
            )),
            Ok(None) => {}
            Err(e2) => log(format!(
                "cannot raise ns_last_pid ({e}) nor spend pids ({e2}): restore may find the JVM's PIDs taken"
            )),
        },
    }
    log(format!("starting {}", argv.join(" ")));
    let t_start = Instant::now();
    let spawned = jvm::spawn_with(sup, pipes, &argv, env.as_slice()).map_err(|e| {
        Failure::new(
            reason::SPAWN_FAILED,
            format!("cannot start {:?}: {e}", argv[0]),
        )
    })?;
    let pid = spawned.pid;
    sup.forward_signals_to(Some(pid));
    let mut guard = JvmGuard {
        sup,
        pid,
        armed: true,
    };
    if pid as u32 <= cfg.min_pid && std::process::id() == 1 {
        log(format!(
            "warning: the JVM got PID {pid}, not above {}: restore may find it taken",
            cfg.min_pid
        ));
    }

    wait_ready(ctx, pid, ctx.deadline())
        .map_err(|e| not_ready(ctx, pid, &spawned.tail, "starting", e, false))?;
    s.ready_ms = Some(ms(t_start.elapsed()));
    log(format!(
        "JVM (pid {pid}) ready after {} ms",
        ms(t_start.elapsed())
    ));

    let t_warm = Instant::now();
    if !cfg.warmup.is_empty() {
        let (host, port) = cfg
            .readiness
            .as_ref()
            .map(|r| r.host_port())
            .unwrap_or(("127.0.0.1", 0));
        let port = cfg.app_port.unwrap_or(port);
        let w = probe::warm_up(host, port, &cfg.warmup, ctx.deadline());
        log(format!("warm-up: {} requests, {} failed", w.sent, w.failed));
        if w.failed > 0 && w.failed >= w.sent {
            return Err(Failure::new(
                reason::WARMUP_FAILED,
                format!(
                    "all {} warm-up requests failed ({}): check the warm-up paths",
                    w.sent,
                    w.first_error.unwrap_or_default()
                ),
            ));
        }
        if w.failed > 0 {
            s.message = Some(format!(
                "{} of {} warm-up requests failed ({})",
                w.failed,
                w.sent,
                w.first_error.unwrap_or_default()
            ));
        }
    }
    s.warmup_ms = Some(ms(t_warm.elapsed()));
    if let Some(port) = cfg
        .app_port
        .or_else(|| cfg.readiness.as_ref().map(|r| r.host_port().1))
    {
        let held = crate::activity::wait_for_closed_connections(port, Duration::from_secs(5));
        if held > 0 {
            log(format!(
                "{held} connection(s) still open on port {port}; the dump may fail"
            ));
        }
    }
    if let Some(sig) = sup.terminated_by() {
        return Err(Failure::new(
            reason::TERMINATED,
            format!("received signal {sig} before the checkpoint"),
        ));
    }
    if sup.has_exited(pid) {
        return Err(not_ready(
            ctx,
            pid,
            &spawned.tail,
            "warming up",
            String::new(),
            false,
        ));
    }

    if cfg.engine == Engine::Criu && !config::bench_disabled("shrink") {
        let java = jvm::jvm_files(pid).0;
        match crate::shrink::before_dump(sup, java.as_deref(), pid, || {
            sup.terminated_by().is_some() || sup.has_exited(pid)
        }) {
            Ok(line) => log(line),
            Err(e) => log(format!(
                "could not shrink the heap before the dump ({e}); dumping it as it is"
            )),
        }
        if let Some(sig) = sup.terminated_by() {
            return Err(Failure::new(
                reason::TERMINATED,
                format!("received signal {sig} before the checkpoint"),
            ));
        }
    }

    // What restore needs to know about this JVM, read before it goes away.
    let pids = jvm::tree_ids(pid);
    let stdio_pipes = jvm::stdio_pipes(pid);
    let (exe, host_files) = jvm::jvm_files(pid);
    let java_home = exe.as_deref().and_then(jvm::java_home_of);
    let jdk = java_home.as_deref().and_then(jvm::jdk_version);
    s.jdk = jdk.clone();

    let t_dump = Instant::now();
    // Stop forwarding: a SIGTERM now must not hit a JVM half-way through its dump.
    sup.forward_signals_to(None);
    let remaining = ctx
        .deadline()
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5));
    match cfg.engine {
        Engine::Criu => {
            criu::dump(sup, &cfg.criu, pid, &tmp_path, remaining)?;
            // CRIU killed the dumped tree.
            if sup
                .wait(pid, Some(Duration::from_secs(10)), false)
                .is_none()
            {
                log("the JVM survived its dump; killing it");
            }
        }
        Engine::Crac => crac_checkpoint(
            ctx,
            pid,
            exe.as_deref(),
            &spawned.tail,
            &tmp_path,
            remaining,
        )?,
    }
    guard.armed = false;
    let dump_ms = ms(t_dump.elapsed());
    log(format!("dumped in {dump_ms} ms"));
    // The image holds the JVM's memory: 0600 files, whatever CRIU or the JVM created.
    image::seal_modes(&tmp_path).map_err(|e| {
        Failure::new(
            reason::PUBLISH_FAILED,
            format!("cannot set the new image's modes: {e}"),
        )
    })?;

    let files = image::hash_dir(&tmp_path).map_err(|e| {
        Failure::new(
            reason::PUBLISH_FAILED,
            format!("cannot read the new image: {e}"),
        )
    })?;
    if files.is_empty() {
        return Err(Failure::new(
            reason::CRIU_DUMP_FAILED,
            "the checkpoint wrote no files",
        ));
    }
    let total_bytes: u64 = files.values().map(|f| f.size).sum();
    let host = image::host_info();
    let now = SystemTime::now();
    let meta = Metadata {
        format: image::FORMAT,
        checkpoint_id: id.clone(),
        engine: cfg.engine.as_str().into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        created_at: activity::rfc3339(now),
        created_unix: now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        spec_generation: cfg.spec_generation,
        arch: host.arch,
        kernel: image::kernel_release(),
        cpu_flags: host.cpu_flags.into_iter().collect(),
        jdk,
        java_home: java_home.map(|p| p.to_string_lossy().into_owned()),
        criu_version,
        root_pid: pid,
        pids,
        stdio_pipes,
        host_files,
        ready_ms: s.ready_ms.unwrap_or(0),
        warmup_ms: s.warmup_ms.unwrap_or(0),
        dump_ms,
        total_bytes,
        files,
    };
    let written = image::write_metadata(&tmp_path, &meta).map_err(|e| {
        Failure::new(
            reason::PUBLISH_FAILED,
            format!("cannot write metadata: {e}"),
        )
    })?;
    let digest = image::digest_of(&written);
    // Verify what we are about to publish, as restore will: the same bytes on disk, and the
    // files they list.
    let on_disk = image::read_metadata_bytes(&tmp_path)
        .map_err(|e| Failure::new(reason::PUBLISH_FAILED, format!("cannot read metadata: {e}")))?;
    image::verify_digest(&on_disk, &digest)?;
    let verified = image::parse_metadata(&on_disk)?;
    image::verify_listing(&tmp_path, &verified)?;
    if cfg.trial_restore {
        // The trial checks every file's hash on its way, as a restore pod does.
        let took = trial_restore(ctx, &tmp_path, &verified)?;
        log(format!("trial restore: ready after {took} ms, ended"));
        s.trial_restore_ms = Some(took);
    } else {
        image::verify_hashes(&tmp_path, &verified, |_| true)?;
    }

    // Told to stop while dumping (the operator deletes a superseded checkpoint Job; a node
    // drains): the image is not published and nothing is pruned. The temporary directory
    // goes with `tmp`; a Job stopped for a drain is retried by the operator.
    if let Some(sig) = sup.terminated_by() {
        return Err(Failure::new(
            reason::TERMINATED,
            format!("received signal {sig} during the checkpoint: the image was not published"),
        ));
    }
    let dest = image_dir.join(&id);
    let published = image::publish(&image_dir, &tmp_path, &id)?;
    match published {
        Published::New => log(format!("published {} ({digest})", dest.display())),
        Published::Replaced => log(format!(
            "replaced the unused image {} ({digest})",
            dest.display()
        )),
        Published::KeptInUse => {
            log(format!(
                "{} is in use by a running pod: kept it, discarded the new image",
                dest.display()
            ));
            s.message = Some("an image with this id is in use by running pods: kept it".into());
        }
    }
    tmp.keep();
    s.image_digest = Some(match published {
        Published::KeptInUse => kept_image_digest(&dest)?,
        Published::New | Published::Replaced => digest,
    });
    s.checkpoint_ms = Some(ms(t_dump.elapsed()));
    s.image_bytes = Some(total_bytes);

    // A signal between the check above and the publication: the image stands, but a process
    // being stopped removes nothing (the next checkpoint prunes).
    if let Some(sig) = sup.terminated_by() {
        log(format!(
            "received signal {sig} while publishing: published, pruning left to the next checkpoint"
        ));
        return Ok(());
    }
    // A .tmp-… without a lock (an older agent's) may sit unchanged through a whole attempt's
    // readiness and warm-up: only older than the timeout is it surely abandoned.
    let pruned = image::prune(
        &image_dir,
        cfg.retain,
        &id,
        cfg.spec_generation,
        cfg.timeout,
    );
    if !pruned.removed.is_empty() || !pruned.in_use.is_empty() {
        log(format!(
            "pruned {:?}; kept in use {:?}",
            pruned.removed, pruned.in_use
        ));
    }
    if !pruned.removed_tmp.is_empty() {
        log(format!(
            "removed abandoned temporary images {:?}",
            pruned.removed_tmp
        ));
    }
    Ok(())
}

/// Restores the image just written in `dir` once, here, waits for the app's readiness and
/// ends the restored JVM: an image that does not restore fails its checkpoint, before any
/// restore pod is given it. The dumped JVM is gone, so its PIDs and ports are free.
fn trial_restore(ctx: &Ctx, dir: &Path, meta: &Metadata) -> Result<u64, Failure> {
    let t = Instant::now();
    let failed = |f: Failure| {
        if f.reason == reason::TERMINATED {
            return f;
        }
        Failure::new(
            reason::TRIAL_RESTORE_FAILED,
            format!(
                "the new image did not restore in its trial, so it was not published ({}: {})",
                f.reason, f.message
            ),
        )
    };
    let remaining = ctx
        .deadline()
        .saturating_duration_since(t)
        .max(Duration::from_secs(5));
    let (pid, tail) = match ctx.cfg.engine {
        Engine::Criu => {
            let (r, _) = restore_checked(ctx, dir, meta, t, remaining).map_err(failed)?;
            (r.pid, r.tail)
        }
        Engine::Crac => {
            image::verify_hashes(dir, meta, |_| true)?;
            let java = crac::java_of(&ctx.cfg.command, std::env::var("JAVA_HOME").ok().as_deref());
            let sp =
                jvm::spawn(&ctx.sup, &crac::restore_command(&java, dir), &[]).map_err(|e| {
                    failed(Failure::new(reason::SPAWN_FAILED, format!("{java:?}: {e}")))
                })?;
            (sp.pid, sp.tail)
        }
    };
    // Ends the trial's JVM on every path, ready or not.
    let _end = JvmGuard {
        sup: &ctx.sup,
        pid,
        armed: true,
    };
    wait_ready(ctx, pid, ctx.deadline()).map_err(|e| {
        let mut f = not_ready(ctx, pid, &tail, "restoring its trial", e, true);
        if ctx.cfg.engine == Engine::Crac && f.reason == reason::JVM_EXITED {
            f.reason = reason::CRAC_RESTORE_FAILED;
        }
        failed(f)
    })?;
    Ok(ms(t.elapsed()))
}

/// The digest of an image with this id that a running pod holds (a checkpoint kept it rather
/// than replace it): the restore pods the operator starts next must be given this one. Its
/// files are checked against its metadata first, as restore would.
fn kept_image_digest(dir: &Path) -> Result<String, Failure> {
    let bytes = image::read_metadata_bytes(dir).map_err(|e| {
        Failure::new(
            reason::IMAGE_CORRUPT,
            format!(
                "the image in use at {} cannot be read ({e}): checkpoint again once no pod uses it",
                dir.display()
            ),
        )
    })?;
    image::verify_files(dir, &image::parse_metadata(&bytes)?)?;
    Ok(image::digest_of(&bytes))
}

fn crac_checkpoint(
    ctx: &Ctx,
    pid: i32,
    java: Option<&Path>,
    tail: &Tail,
    image: &Path,
    remaining: Duration,
) -> Result<(), Failure> {
    let argv = crac::jcmd_command(java, pid);
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let jcmd_out = match ctx.sup.run_capture(cmd, remaining) {
        Ok((_, out)) => out,
        Err(e) => {
            return Err(Failure::new(
                reason::JCMD_FAILED,
                format!("{}: {e}", argv.join(" ")),
            ));
        }
    };
    // The JVM exits once its image is written.
    let exited = ctx.sup.wait(pid, Some(remaining), false);
    let text = format!("{jcmd_out}\n{}", tail.text());
    if let Some(f) = crac::classify_output(&text) {
        return Err(f);
    }
    if exited.is_none() {
        return Err(Failure::new(
            reason::CHECKPOINT_TIMEOUT,
            format!(
                "the JVM did not finish its checkpoint within {}s",
                remaining.as_secs()
            ),
        ));
    }
    let wrote = fs::read_dir(image).map(|d| d.count()).unwrap_or(0);
    if wrote == 0 {
        return Err(Failure::new(
            reason::CRAC_CHECKPOINT_FAILED,
            format!(
                "the JVM exited without writing an image; jcmd said: {}",
                jcmd_out.trim()
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// restore

/// A JVM that is up: restored, cold-started or plainly run.
pub(crate) struct Running {
    pub pid: i32,
    pub mode: &'static str,
    pub start_ms: u64,
    /// The image's shared lock (restored only): no prune removes it while this is held.
    pub lock: Option<image::ImageLock>,
}

pub fn restore(ctx: &Ctx) -> i32 {
    let mut s = ctx.summary();
    match restore_or_fallback(ctx, &mut s) {
        // Supervises the JVM, and sleeps and wakes it in place on request.
        Ok(running) => crate::control::supervise(ctx, running, &mut s),
        Err(code) => code,
    }
}

/// Restores the image or, on failure, falls back as `CRAC_FALLBACK` says. `Err`: the agent's
/// exit code, its summary written.
pub(crate) fn restore_or_fallback(ctx: &Ctx, s: &mut AgentSummary) -> Result<Running, i32> {
    let since = if ctx.in_place {
        "the wake request"
    } else {
        "the agent started"
    };
    let running = match try_restore(ctx, s) {
        Ok(r) => {
            s.outcome = Some(Outcome::Restored);
            s.restore_ms = Some(r.start_ms);
            log(format!(
                "restored (pid {}) and ready {} ms after {since}",
                r.pid, r.start_ms
            ));
            r
        }
        Err(f) => {
            log(format!("restore failed: {f}"));
            if let Some(sig) = ctx.sup.terminated_by() {
                s.outcome = Some(Outcome::Failed);
                s.reason = Some(reason::TERMINATED.into());
                s.message = Some(format!("received signal {sig} during restore"));
                ctx.write_summary(s);
                return Err(128 + sig);
            }
            s.reason = Some(f.reason.to_string());
            match ctx.cfg.fallback {
                Fallback::Fail => {
                    s.outcome = Some(Outcome::Failed);
                    s.message = Some(format!(
                        "{} (fallback is Fail, so the pod does not start cold)",
                        f.message
                    ));
                    ctx.write_summary(s);
                    return Err(1);
                }
                Fallback::ColdStart => {
                    s.outcome = Some(Outcome::ColdStarted);
                    s.message = Some(format!(
                        "restore did not happen, started cold: {}",
                        f.message
                    ));
                    match start_cold(ctx, mode::COLD_STARTED, s) {
                        Ok(r) => r,
                        Err(f) => {
                            s.outcome = Some(Outcome::Failed);
                            s.reason = Some(f.reason.to_string());
                            s.message = Some(f.message);
                            ctx.write_summary(s);
                            return Err(1);
                        }
                    }
                }
            }
        }
    };
    Ok(running)
}

fn try_restore(ctx: &Ctx, s: &mut AgentSummary) -> Result<Running, Failure> {
    let cfg = &ctx.cfg;
    let (image_dir, id) = ctx.image_dir_and_id()?;
    let want_digest = image::expected_digest(cfg.image_digest.as_deref())?;
    let dir = image_dir.join(&id);
    // Read once: the digest is checked on these bytes and these same bytes are parsed.
    let (lock, bytes) = image::lock_and_read(&dir)?;
    image::verify_digest(&bytes, want_digest)?;
    let meta = image::parse_metadata(&bytes)?;
    s.jdk = meta.jdk.clone();
    s.image_bytes = Some(meta.total_bytes);
    image::verify_host(&meta, &image::host_info(), &id, cfg.engine.as_str())?;
    image::verify_host_files(&meta)?;
    if ctx.in_place && cfg.engine == Engine::Criu {
        crate::control::free_checkpointed_pids(&ctx.sup, &meta.pids)?;
    }
    let t_verify = Instant::now();
    image::verify_listing(&dir, &meta)?;
    let remaining = ctx
        .deadline()
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5));
    let mut timing = None;
    let (pid, tail) = match cfg.engine {
        Engine::Criu => {
            let (r, t) = restore_checked(ctx, &dir, &meta, t_verify, remaining)?;
            timing = Some(t);
            (r.pid, r.tail)
        }
        Engine::Crac => {
            // The CRaC JDK runs its image itself: nothing may start before every file is checked.
            image::verify_hashes(&dir, &meta, |_| true)?;
            log(format!(
                "image {id} verified ({} bytes, {} ms)",
                meta.total_bytes,
                ms(t_verify.elapsed())
            ));
            let java = crac::java_of(&cfg.command, std::env::var("JAVA_HOME").ok().as_deref());
            let argv = crac::restore_command(&java, &dir);
            let sp = jvm::spawn(&ctx.sup, &argv, &[]).map_err(|e| {
                Failure::new(reason::SPAWN_FAILED, format!("cannot start {java:?}: {e}"))
            })?;
            (sp.pid, sp.tail)
        }
    };
    ctx.sup.forward_signals_to(Some(pid));
    let mut guard = JvmGuard {
        sup: &ctx.sup,
        pid,
        armed: true,
    };
    wait_ready(ctx, pid, ctx.deadline()).map_err(|e| {
        let mut f = not_ready(ctx, pid, &tail, "restoring", e, true);
        if cfg.engine == Engine::Crac && f.reason == reason::JVM_EXITED {
            f.reason = reason::CRAC_RESTORE_FAILED;
        }
        f
    })?;
    guard.armed = false; // keeps forwarding signals to the restored JVM
    if let Some(t) = timing {
        log(t.line(ms(ctx.started.elapsed())));
    }
    Ok(Running {
        pid,
        mode: mode::RESTORED,
        start_ms: ms(ctx.started.elapsed()),
        lock: Some(lock),
    })
}

/// Engine criu: every file CRIU parses is checked before CRIU runs; the page data (raw memory
/// CRIU copies into place and never parses) is hashed while CRIU restores, and the tree, left
/// stopped by CRIU, is resumed only once that hash matches the metadata, and killed otherwise.
/// So no instruction of the restored app runs, and no request is answered, from an image that
/// is not the one the operator recorded; the hash costs the restore only what it outlasts CRIU.
fn restore_checked(
    ctx: &Ctx,
    dir: &Path,
    meta: &Metadata,
    t_verify: Instant,
    remaining: Duration,
) -> Result<(criu::Restored, RestoreTiming), Failure> {
    // Benchmarks only: everything checked first, as before the overlap.
    let overlap = !config::bench_disabled("overlap");
    let beside = |n: &str| overlap && image::is_page_data(n);
    image::verify_hashes(dir, meta, |n| !beside(n))?;
    let check_before = t_verify.elapsed();
    let (restored, (pages, pages_took, pages_done)) = std::thread::scope(|sc| {
        let pages = sc.spawn(|| {
            let t = Instant::now();
            let r = image::verify_hashes(dir, meta, beside);
            (r, t.elapsed(), Instant::now())
        });
        let restored = criu::restore(
            &ctx.sup,
            &ctx.cfg.criu,
            dir,
            &meta.stdio_pipes,
            remaining,
            ctx.cfg.lazy_pages,
        )
        .map(|r| (r, Instant::now()));
        let pages = pages.join().unwrap_or_else(|_| {
            (
                Err(Failure::new(
                    reason::IMAGE_CORRUPT,
                    "the thread hashing the page data failed",
                )),
                Duration::ZERO,
                Instant::now(),
            )
        });
        (restored, pages)
    });
    let (mut restored, criu_exit) = match (restored, pages) {
        (Ok((r, exit)), Ok(())) => (r, exit),
        (Ok((r, _)), Err(f)) => {
            // Restored from page data that is not the checkpoint's: it never runs.
            drop(JvmGuard {
                sup: &ctx.sup,
                pid: r.pid,
                armed: true,
            });
            log(format!(
                "killed the restored tree (pid {}) before it ran: its page data failed the check",
                r.pid
            ));
            return Err(f);
        }
        // A damaged image explains a failed restore better than CRIU's log does.
        (Err(_), Err(f)) => return Err(f),
        (Err(f), Ok(())) => return Err(f),
    };
    log(format!(
        "image {} verified ({} bytes; {} ms before CRIU, page data {} ms beside it)",
        meta.checkpoint_id,
        meta.total_bytes,
        ms(check_before),
        ms(pages_took)
    ));
    if let Err(e) = restored.resume() {
        drop(JvmGuard {
            sup: &ctx.sup,
            pid: restored.pid,
            armed: true,
        });
        return Err(Failure::new(
            reason::CRIU_RESTORE_FAILED,
            format!("cannot resume the restored JVM: {e}"),
        ));
    }
    let timing = RestoreTiming {
        check_before,
        check_pages: pages_took,
        check_wait: pages_done.saturating_duration_since(criu_exit),
        criu_wall: restored.criu_wall,
        phases: restored.phases,
        kdat_cached: restored.kdat_cached,
        criu_exit,
    };
    Ok((restored, timing))
}

/// Where one restore's time went (engine criu), logged once the app is ready:
/// `crac-agent: restore timing: key=value …` (scripts/bench reads this line).
struct RestoreTiming {
    /// Listing, sizes and every file but the page data, before CRIU starts.
    check_before: Duration,
    /// Hashing the page data, while CRIU runs.
    check_pages: Duration,
    /// How long resuming waited for that hash after CRIU exited.
    check_wait: Duration,
    criu_wall: Duration,
    phases: Option<criu::Phases>,
    kdat_cached: bool,
    criu_exit: Instant,
}

impl RestoreTiming {
    fn line(&self, total_ms: u64) -> String {
        let f = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        let us = |u: u64| format!("{:.1}", u as f64 / 1e3);
        let p = self.phases.unwrap_or_default();
        // Everything of CRIU's wall time that is not a later phase: exec, start-up, probing
        // the kernel (or loading the cache), and exiting.
        let inner = Duration::from_micros(p.tree_us + p.memory_us + p.resume_us);
        format!(
            "restore timing: check_ms={} pages_check_ms={} check_wait_ms={} criu_ms={} criu_start_ms={} tree_ms={} memory_ms={} resume_ms={} exit_to_ready_ms={} kdat={} total_ms={total_ms}",
            f(self.check_before),
            f(self.check_pages),
            f(self.check_wait),
            f(self.criu_wall),
            f(self.criu_wall.saturating_sub(inner)),
            us(p.tree_us),
            us(p.memory_us),
            us(p.resume_us),
            f(self.criu_exit.elapsed()),
            if self.kdat_cached { "cached" } else { "probed" },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// run and cold start

fn start_cold(ctx: &Ctx, mode: &'static str, s: &mut AgentSummary) -> Result<Running, Failure> {
    let argv = &ctx.cfg.command;
    let spawned = jvm::spawn(&ctx.sup, argv, &[]).map_err(|e| {
        Failure::new(
            reason::SPAWN_FAILED,
            format!("cannot start {:?}: {e}", argv[0]),
        )
    })?;
    let pid = spawned.pid;
    ctx.sup.forward_signals_to(Some(pid));
    // Readiness only measures the start here: a slow app keeps running.
    match wait_ready(ctx, pid, ctx.deadline()) {
        Ok(()) => {
            let start_ms = ms(ctx.started.elapsed());
            s.ready_ms = Some(start_ms);
            log(format!(
                "JVM (pid {pid}) ready {start_ms} ms after the agent started"
            ));
            Ok(Running {
                pid,
                mode,
                start_ms,
                lock: None,
            })
        }
        Err(e) => {
            if !ctx.sup.has_exited(pid) && ctx.sup.terminated_by().is_none() {
                log(format!(
                    "the JVM is not ready yet ({e}); leaving it running"
                ));
            }
            Ok(Running {
                pid,
                mode,
                start_ms: 0,
                lock: None,
            })
        }
    }
}

pub fn run(ctx: &Ctx) -> i32 {
    let mut s = ctx.summary();
    s.outcome = Some(Outcome::Exited);
    match start_cold(ctx, mode::RUNNING, &mut s) {
        Ok(r) => supervise(ctx, r, &mut s),
        Err(f) => {
            s.outcome = Some(Outcome::Failed);
            s.reason = Some(f.reason.to_string());
            s.message = Some(f.message);
            ctx.write_summary(&s);
            1
        }
    }
}

/// What `GET /activity` reports for a JVM that is up.
pub(crate) fn activity_report(ctx: &Ctx, r: &Running, s: &AgentSummary) -> ActivityReport {
    ActivityReport {
        mode: r.mode.to_string(),
        checkpoint_id: if r.mode == mode::RESTORED {
            ctx.cfg.checkpoint_id.clone()
        } else {
            None
        },
        open_connections: 0,
        last_activity_time: None,
        start_ms: (r.start_ms > 0).then_some(r.start_ms),
        reason: if r.mode == mode::COLD_STARTED {
            s.reason.clone()
        } else {
            None
        },
        ..Default::default()
    }
}

/// Starts serving activity on the agent's port (and `control`'s endpoints, if any).
pub(crate) fn start_activity(
    ctx: &Ctx,
    r: &Running,
    s: &AgentSummary,
    control: Option<activity::Handler>,
) -> Option<Activity> {
    // A second handle on the same socket: the agent's own stays open for its whole life.
    let listener = ctx
        .activity_listener
        .as_ref()
        .and_then(|l| l.try_clone().ok());
    match Activity::start(
        activity_report(ctx, r, s),
        ctx.cfg.app_port,
        listener,
        control,
    ) {
        Ok(a) => Some(a),
        Err(e) => {
            log(format!(
                "activity endpoint on port {} unavailable: {e}",
                ctx.cfg.activity_port
            ));
            None
        }
    }
}

/// Serves activity while the JVM runs, then reports how it ended and returns its exit code.
fn supervise(ctx: &Ctx, r: Running, s: &mut AgentSummary) -> i32 {
    let _activity = start_activity(ctx, &r, s, None);
    // Written now too, so the operator learns how the pod started even if we are killed.
    ctx.write_summary(s);
    let status = ctx
        .sup
        .wait(r.pid, None, false)
        .unwrap_or(ExitStatus::Code(-1));
    log(format!("JVM (pid {}) ended: {status}", r.pid));
    s.exit_code = Some(status.as_exit_code());
    ctx.write_summary(s);
    status.as_exit_code()
}
