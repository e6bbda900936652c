//! Engine `criu`: the agent dumps the JVM's process tree with CRIU and restores it.
//!
//! The agent is the JVM's parent and is never dumped: `criu dump -t <jvm pid>` takes the JVM
//! (a session leader holding only /dev/null and two pipes) and nothing of ours. Restore runs
//! `criu restore --restore-detached --restore-sibling`, so the JVM comes back as the agent's
//! own child, and hands CRIU new pipes for the JVM's stdout and stderr with `--inherit-fd`.
//!
//! Lazy restore (`CRAC_LAZY_PAGES=true`, off by default) starts `criu lazy-pages` first and
//! runs `criu restore --lazy-pages`: the JVM's private anonymous memory (its heap) is not
//! copied in by CRIU but registered with userfaultfd, and the daemon fills each page on first
//! touch, then the rest in the background, from the same page data.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Failure, reason};
use crate::image::StdioPipe;
use crate::jvm::{self, Tail};
use crate::supervisor::Supervisor;

pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";
pub const LAZY_PAGES_LOG: &str = "lazy-pages.log";

/// `criu dump` arguments for the tree rooted at `pid`, written to `dir`.
pub fn dump_args(pid: i32, dir: &Path) -> Vec<String> {
    vec![
        "dump".into(),
        "--tree".into(),
        pid.to_string(),
        "--images-dir".into(),
        dir.to_string_lossy().into_owned(),
        "--log-file".into(),
        DUMP_LOG.into(),
        "-v3".into(),
        // A connection the app still holds (a keep-alive client, a server closing its side)
        // is not dumped for repair, which would need iptables and more privileges: it comes
        // back closed, as CRaC apps expect connections made before a checkpoint to be.
        "--tcp-close".into(),
        UNPRIVILEGED.into(),
    ]
}

/// In a container CRIU has only CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE: without this flag
/// it probes kernel features by creating a network namespace and fails (`Unable create a
/// network namespace: Operation not permitted`), even with CAP_SYS_ADMIN. With it, CRIU skips
/// what needs more than those two, which a JVM's tree does not use.
pub const UNPRIVILEGED: &str = "--unprivileged";

/// `criu restore` arguments. `stdio` are the JVM's output pipes at dump time: the new ones are
/// CRIU's own fds 1 and 2 (fd 2 only when the JVM had two distinct pipes). `lazy`: the memory
/// is left to `criu lazy-pages` (see [`lazy_pages_args`]), which listens in the same `work`.
pub fn restore_args(images: &Path, work: &Path, stdio: &[StdioPipe], lazy: bool) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "restore".into(),
        "--images-dir".into(),
        images.to_string_lossy().into_owned(),
        "--work-dir".into(),
        work.to_string_lossy().into_owned(),
        "--log-file".into(),
        RESTORE_LOG.into(),
        // -v4: the restorer's page reads are logged with timestamps (`Preadv`, `returned`),
        // which is how the agent splits a restore into its phases (`parse_restore_phases`).
        "-v4".into(),
        "--tcp-close".into(),
        "--restore-detached".into(),
        "--restore-sibling".into(),
        // The tree stays stopped when CRIU exits: the agent resumes it (`resume_tree`) only
        // once the page data, hashed while CRIU ran, is known to match the metadata.
        "--leave-stopped".into(),
    ];
    if lazy {
        // No --unprivileged: in that mode CRIU 4.2 never probes userfaultfd and refuses lazy
        // pages ("UFFD is not supported"). So lazy restore needs what CRIU's full mode needs.
        v.push("--lazy-pages".into());
    } else {
        v.push(UNPRIVILEGED.into());
    }
    v.extend(["--pidfile".into(), "restored.pid".into()]);
    let mut seen = Vec::new();
    for p in stdio {
        if seen.contains(&p.inode) {
            continue;
        }
        seen.push(p.inode);
        v.push("--inherit-fd".into());
        v.push(format!("fd[{}]:pipe:[{}]", p.fd, p.inode));
    }
    v
}

/// `criu lazy-pages` arguments: the daemon serving the page data in `images` to a `criu restore
/// --lazy-pages` run with the same `work` (they meet on `lazy-pages.socket` there). It writes
/// one byte to its stdout (`--status-fd 1`) once it listens.
pub fn lazy_pages_args(images: &Path, work: &Path) -> Vec<String> {
    vec![
        "lazy-pages".into(),
        "--images-dir".into(),
        images.to_string_lossy().into_owned(),
        "--work-dir".into(),
        work.to_string_lossy().into_owned(),
        "--log-file".into(),
        LAZY_PAGES_LOG.into(),
        // -v3: errors, warnings and a line per task; -v4 would log every page fault.
        "-v3".into(),
        "--status-fd".into(),
        "1".into(),
    ]
}

/// Turns CRIU's log into a reason and a line for the user. `restoring` picks the default.
pub fn classify_log(log: &str, restoring: bool) -> Failure {
    let first_error = log
        .lines()
        .find(|l| l.contains("Error (") || l.starts_with("Error"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| {
            log.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        });
    let has = |s: &str| log.contains(s);
    let (r, hint) = if has("Connected TCP socket")
        || has("--tcp-established")
        || has("Failed to lock TCP connection")
    {
        (
            reason::OPEN_SOCKETS,
            "the JVM holds an established TCP connection (database pool, client, debugger): close it before the checkpoint or use engine crac with a Resource that closes it",
        )
    } else if has("Can't lookup mount") || has("is not in the dumped") || has("Can't dump mount") {
        (
            reason::OPEN_FILES,
            "the JVM holds a file from outside its container's mounts (an inherited descriptor or a host path)",
        )
    } else if has("unix socket") && has("external") || has("External socket") {
        (
            reason::OPEN_SOCKETS,
            "the JVM is connected to a unix socket outside its process tree",
        )
    } else if has("has bad size") || has("File validation failed") || has("build-id") {
        (
            reason::FILE_CHANGED,
            "a file the JVM had open changed since the checkpoint (another container image or JDK): checkpoint again",
        )
    } else if restoring
        && (has("Can't open file") || has("No such file or directory") && has("open"))
    {
        (
            reason::FILE_CHANGED,
            "a file the JVM had open at checkpoint is missing here: restore needs the same container image",
        )
    } else if restoring
        && (has("File exists")
            || has("do not match expected")
            || has("set_tid")
            || has("PID") && has("busy"))
    {
        (
            reason::PID_CONFLICT,
            "a PID the JVM had at checkpoint is taken: run the agent as the container's first process (PID 1)",
        )
    } else if has("Operation not permitted") || has("Permission denied") || has("CAP_") {
        (
            reason::PERMISSION_DENIED,
            "CRIU lacks privileges: the container needs CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE and seccomp Unconfined (the operator sets these; a policy may have removed them)",
        )
    } else if restoring {
        (
            reason::CRIU_RESTORE_FAILED,
            "see the CRIU log in the container's output",
        )
    } else {
        (
            reason::CRIU_DUMP_FAILED,
            "see the CRIU log in the container's output",
        )
    };
    let msg = if first_error.is_empty() {
        hint.to_string()
    } else {
        format!("{hint}; criu: {first_error}")
    };
    Failure::new(r, msg)
}

/// A CRIU bundle: the directory the agent image carries at `/usr/local/lib/crac-agent/criu`
/// and `crac-agent install` copies beside the agent. CRIU runs through the bundle's own glibc
/// loader, so a user's image needs nothing but its JDK.
pub const BUNDLE_DIR: &str = "criu";
pub const BUNDLE_LOADER: &str = "ld-linux-x86-64.so.2";
pub const BUNDLE_BINARY: &str = "criu";
pub const BUNDLE_LIBS: &str = "lib";

/// Whether `dir` holds a CRIU bundle.
pub fn is_bundle(dir: &Path) -> bool {
    dir.join(BUNDLE_LOADER).is_file() && dir.join(BUNDLE_BINARY).is_file()
}

/// The command that runs `criu`: a binary (a path or a name on PATH), or a bundle directory.
pub fn command(criu: &str) -> Command {
    let path = Path::new(criu);
    if is_bundle(path) {
        let mut cmd = Command::new(path.join(BUNDLE_LOADER));
        cmd.arg("--library-path")
            .arg(path.join(BUNDLE_LIBS))
            .arg(path.join(BUNDLE_BINARY));
        cmd
    } else {
        Command::new(criu)
    }
}

/// `criu --version` → `4.2.1`. Fails with `CriuMissing` when criu cannot run.
pub fn version(sup: &Supervisor, criu: &str) -> Result<String, Failure> {
    let mut cmd = command(criu);
    cmd.arg("--version");
    let missing = |why: String| {
        Failure::new(
            reason::CRIU_MISSING,
            format!(
                "cannot run {criu:?} ({why}): engine criu needs CRIU >= 4.2 in the app image, or set CRAC_CRIU"
            ),
        )
    };
    match sup.run_capture(cmd, Duration::from_secs(10)) {
        Ok((status, out)) if status.as_exit_code() == 0 => {
            Ok(parse_version(&out).unwrap_or_else(|| out.trim().to_string()))
        }
        Ok((status, out)) => Err(missing(format!("{status}: {}", out.trim()))),
        Err(e) => Err(missing(e.to_string())),
    }
}

pub fn parse_version(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

/// Dumps the tree of `pid` into `dir` (CRIU kills it afterwards).
pub fn dump(
    sup: &Supervisor,
    criu: &str,
    pid: i32,
    dir: &Path,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut cmd = command(criu);
    cmd.args(dump_args(pid, dir));
    // CRIU probes the kernel and saves what it found in an empty cache directory: kept in
    // the image for restores on this node and boot (see `KDAT_FILE`).
    let kdat_dir = KdatDir::new();
    if let Some(k) = &kdat_dir {
        cmd.env("XDG_RUNTIME_DIR", &k.path);
    }
    let result = sup.run_capture(cmd, timeout);
    let log = std::fs::read_to_string(dir.join(DUMP_LOG)).unwrap_or_default();
    match result {
        Ok((status, _))
            if status.as_exit_code() == 0
                && dir.join("inventory.img").exists()
                && dir.join(format!("core-{pid}.img")).exists() =>
        {
            if let Some(k) = &kdat_dir {
                k.keep_in_image(criu, dir);
            }
            Ok(())
        }
        Ok((status, out)) => {
            print_log_tail("dump", &log, &out);
            let mut f = classify_log(&format!("{log}\n{out}"), false);
            f.message = format!("criu dump failed ({status}): {}", f.message);
            Err(f)
        }
        Err(e) => Err(Failure::new(
            reason::CHECKPOINT_TIMEOUT,
            format!("criu dump: {e}"),
        )),
    }
}

fn print_log_tail(what: &str, log: &str, out: &str) {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(40);
    eprintln!("crac-agent: criu {what} failed; last lines of its log:");
    for l in &lines[from..] {
        eprintln!("  {l}");
    }
    if !out.trim().is_empty() {
        eprintln!("crac-agent: criu said: {}", out.trim());
    }
}

/// A restored process tree, stopped (`--leave-stopped`) until [`resume_tree`].
pub struct Restored {
    /// The restored JVM, now our child.
    pub pid: i32,
    pub tail: Tail,
    /// From spawning CRIU to its exit, on the agent's clock.
    pub criu_wall: Duration,
    /// The phases CRIU's log shows (`None` if the log lacks its markers).
    pub phases: Option<Phases>,
    /// Whether CRIU was handed the kernel features the checkpoint found on this node and boot.
    pub kdat_cached: bool,
    /// Lazy restore: the daemon still to copy the heap in. Killed if this is dropped before
    /// [`Restored::resume`] (the tree never ran); after it, left to finish.
    pub lazy: Option<LazyPages>,
}

impl Restored {
    /// Resumes the stopped tree ([`resume_tree`]). A lazy restore's daemon is left to copy the
    /// rest of the memory in, watched by a thread: the JVM is killed if the daemon fails,
    /// since a page it never copied would read as zeros once its userfaultfd is gone.
    pub fn resume(&mut self) -> std::io::Result<()> {
        resume_tree(self.pid)?;
        if let Some(daemon) = self.lazy.take() {
            daemon.watch(self.pid);
        }
        Ok(())
    }
}

/// A running `criu lazy-pages`, our child. Dropped: killed and reaped.
pub struct LazyPages {
    sup: Supervisor,
    pid: i32,
    work: PathBuf,
    started: Instant,
    /// Killed on drop: until the tree runs ([`LazyPages::watch`]).
    armed: bool,
    /// Whether dropping it removes `work` (once CRIU restored the tree).
    remove_work: bool,
    /// From spawning the daemon to its status byte: what lazy restore adds before CRIU runs.
    pub ready_in: Duration,
}

impl LazyPages {
    /// Starts the daemon and waits (at most `timeout`) until it listens.
    fn start(
        sup: &Supervisor,
        criu: &str,
        images: &Path,
        work: &Path,
        timeout: Duration,
    ) -> Result<LazyPages, Failure> {
        let fail = |m: String| Failure::new(reason::CRIU_RESTORE_FAILED, m);
        let (mut ready, ready_w) =
            std::io::pipe().map_err(|e| fail(format!("cannot create a pipe: {e}")))?;
        let mut cmd = command(criu);
        cmd.args(lazy_pages_args(images, work))
            .stdin(Stdio::null())
            .stdout(ready_w);
        let started = Instant::now();
        let child = sup.spawn(&mut cmd).map_err(|e| {
            Failure::new(
                reason::CRIU_MISSING,
                format!("cannot run {criu:?}: {e}: engine criu needs CRIU in the app image"),
            )
        })?;
        // Our copy of the write end goes: the read below ends when the daemon's does.
        drop(cmd);
        let mut daemon = LazyPages {
            sup: sup.clone(),
            pid: child.id() as i32,
            work: work.to_path_buf(),
            started,
            armed: true,
            remove_work: false,
            ready_in: Duration::ZERO,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let _ = tx.send(matches!(std::io::Read::read(&mut ready, &mut byte), Ok(1)));
        });
        match rx.recv_timeout(timeout) {
            Ok(true) => {
                daemon.ready_in = started.elapsed();
                Ok(daemon)
            }
            Ok(false) => {
                let log = daemon.log();
                print_log_tail("lazy-pages", &log, "");
                let mut f = classify_log(&log, true);
                f.message = format!("criu lazy-pages exited before it listened: {}", f.message);
                Err(f)
            }
            // Dropping the daemon kills it, which ends the reading thread.
            Err(_) => Err(Failure::new(
                reason::RESTORE_TIMEOUT,
                format!(
                    "criu lazy-pages did not listen within {}s",
                    timeout.as_secs()
                ),
            )),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.join(LAZY_PAGES_LOG)).unwrap_or_default()
    }

    /// After the tree is resumed: a thread waits for the daemon to have copied every page in
    /// and exit. If it fails instead, the JVM `jvm` is killed.
    fn watch(mut self, jvm: i32) {
        self.armed = false;
        let (sup, pid, started, work) =
            (self.sup.clone(), self.pid, self.started, self.work.clone());
        std::thread::spawn(move || {
            let status = sup.wait(pid, None, false);
            let ok = status.as_ref().is_some_and(|s| s.as_exit_code() == 0);
            if ok {
                eprintln!(
                    "crac-agent: lazy pages: every page copied in, daemon exited {} ms after it started",
                    started.elapsed().as_millis()
                );
                let _ = std::fs::remove_dir_all(&work);
            } else if !sup.has_exited(jvm) && crate::sys::process_exists(jvm) {
                let _ = crate::sys::kill(jvm, libc::SIGKILL);
                eprintln!(
                    "crac-agent: criu lazy-pages failed ({}) before it copied every page in: killed the JVM (pid {jvm}), which would read zeros there; log kept in {}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    work.display()
                );
            }
        });
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = crate::sys::kill(self.pid, libc::SIGKILL);
        let _ = self.sup.wait(self.pid, Some(Duration::from_secs(5)), false);
        // Dropped after a restore that succeeded but never ran (its page data failed the
        // check): the work directory goes, as an eager restore's does. A failed restore
        // has kept its copy for the logs (`restore` decides before this runs).
        if self.remove_work {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// Restores the image in `images`, leaving the tree stopped: call [`Restored::resume`] to run
/// it. `lazy`: with `criu lazy-pages` beside CRIU (see the module's doc).
pub fn restore(
    sup: &Supervisor,
    criu: &str,
    images: &Path,
    stdio: &[StdioPipe],
    timeout: Duration,
    lazy: bool,
) -> Result<Restored, Failure> {
    let fail = |m: String| Failure::new(reason::CRIU_RESTORE_FAILED, m);
    let work = std::env::temp_dir().join(format!(
        "crac-agent-restore-{}",
        crate::image::unique_suffix()
    ));
    std::fs::create_dir_all(&work)
        .map_err(|e| fail(format!("cannot create {}: {e}", work.display())))?;
    let t_start = Instant::now();
    let mut daemon = if lazy {
        match LazyPages::start(sup, criu, images, &work, timeout) {
            Ok(d) => Some(d),
            Err(f) => {
                eprintln!("crac-agent: criu lazy-pages log kept in {}", work.display());
                return Err(f);
            }
        }
    } else {
        None
    };
    let timeout = timeout.saturating_sub(t_start.elapsed());
    let pipes = jvm::output_pipes().map_err(|e| fail(format!("cannot create pipes: {e}")))?;
    let mut cmd = command(criu);
    cmd.args(restore_args(images, &work, stdio, lazy))
        .stdin(Stdio::null())
        .stdout(pipes.stdout)
        .stderr(pipes.stderr);
    // The cache is an unprivileged CRIU's (the dump's): CRIU's full mode would not read it.
    let kdat_dir = (!lazy).then(|| KdatDir::from_image(criu, images)).flatten();
    if let Some(k) = &kdat_dir {
        cmd.env("XDG_RUNTIME_DIR", &k.path);
    }
    let t_spawn = std::time::Instant::now();
    let child = sup.spawn(&mut cmd).map_err(|e| {
        Failure::new(
            reason::CRIU_MISSING,
            format!("cannot run {criu:?}: {e}: engine criu needs CRIU in the app image"),
        )
    })?;
    drop(cmd);
    let criu_pid = child.id() as i32;
    let status = sup.wait(criu_pid, Some(timeout), false);
    let criu_wall = t_spawn.elapsed();
    drop(kdat_dir);
    let log = std::fs::read_to_string(work.join(RESTORE_LOG)).unwrap_or_default();
    let pid = std::fs::read_to_string(work.join("restored.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let result = match (status, pid) {
        (Some(s), Some(pid)) if s.as_exit_code() == 0 => Ok({
            if let Some(d) = &mut daemon {
                d.remove_work = true;
                let pages = parse_lazy_pages(&log);
                eprintln!(
                    "crac-agent: lazy restore: criu lazy-pages listened after {} ms; {pages} pages ({} MiB) left to it",
                    d.ready_in.as_millis(),
                    pages * 4096 / (1 << 20)
                );
            }
            Restored {
                pid,
                tail: pipes.tail,
                criu_wall,
                phases: parse_restore_phases(&log),
                kdat_cached: log.contains("Loaded kdat cache"),
                lazy: daemon,
            }
        }),
        (Some(s), _) => {
            print_log_tail("restore", &log, "");
            let mut f = classify_log(&log, true);
            f.message = format!("criu restore failed ({s}): {}", f.message);
            Err(f)
        }
        (None, _) => {
            let _ = crate::sys::kill(criu_pid, libc::SIGKILL);
            Err(Failure::new(
                reason::RESTORE_TIMEOUT,
                format!("criu restore took longer than {}s", timeout.as_secs()),
            ))
        }
    };
    // A lazy restore's daemon still works in `work` (its log, its socket): it goes with it.
    if result.as_ref().is_ok_and(|r| r.lazy.is_none()) {
        let _ = std::fs::remove_dir_all(&work);
    } else if result.is_err() {
        eprintln!("crac-agent: criu restore log kept in {}", work.display());
    }
    result
}

/// Resumes a tree CRIU left stopped: SIGCONT to every task under `pid`.
pub fn resume_tree(pid: i32) -> std::io::Result<()> {
    crate::sys::kill(pid, libc::SIGCONT)?;
    for tid in jvm::tree_ids(pid) {
        let _ = crate::sys::kill(tid, libc::SIGCONT);
    }
    Ok(())
}

/// Where a restore's time went inside CRIU, from the timestamps of its `-v4` log (offsets from
/// CRIU's start, in microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Phases {
    /// CRIU's start-up and kernel-feature probing: to `Reading image tree`.
    pub startup_us: u64,
    /// Forking the tree, files, sockets, memory layout: to the first page read (`Preadv`).
    pub tree_us: u64,
    /// Reading page data into place: the first `Preadv` to the last `returned`.
    pub memory_us: u64,
    /// Threads, signals, seccomp and detaching: to `Restore finished successfully`.
    pub resume_us: u64,
}

/// Pages a `criu restore --lazy-pages` left to the daemon: the sum of its `nr_lazy:` lines.
pub fn parse_lazy_pages(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split_once("nr_lazy:"))
        .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
        .sum()
}

/// Splits a successful `criu restore -v4` log into [`Phases`].
pub fn parse_restore_phases(log: &str) -> Option<Phases> {
    let stamp = |line: &str| -> Option<u64> {
        let rest = line.strip_prefix('(')?;
        let secs: f64 = rest[..rest.find(')')?].trim().parse().ok()?;
        Some((secs * 1e6).round() as u64)
    };
    let mut tree_start = None;
    let mut mem_start = None;
    let mut mem_end = None;
    let mut finished = None;
    for line in log.lines() {
        let Some(t) = stamp(line) else { continue };
        if tree_start.is_none() && line.contains("Reading image tree") {
            tree_start = Some(t);
        } else if line.contains("pie: ") && line.contains(" Preadv ") {
            mem_start.get_or_insert(t);
        } else if line.contains("pie: ") && line.contains("`- returned ") {
            mem_end = Some(t);
        } else if line.contains("Restore finished successfully") {
            finished = Some(t);
        }
    }
    let (tree_start, finished) = (tree_start?, finished?);
    // No page data at all: the memory phase is empty.
    let mem_start = mem_start.unwrap_or(finished).max(tree_start);
    let mem_end = mem_end.unwrap_or(mem_start).clamp(mem_start, finished);
    Some(Phases {
        startup_us: tree_start,
        tree_us: mem_start - tree_start,
        memory_us: mem_end - mem_start,
        resume_us: finished - mem_end,
    })
}

/// CRIU's kernel-feature cache file, as CRIU names it in `$XDG_RUNTIME_DIR` when it runs
/// `--unprivileged`. CRIU saves it only on a tmpfs (so that a reboot clears it) and checks
/// nothing but a magic number when it loads it. The checkpoint keeps the file its dump wrote
/// in the image, with [`KDAT_HOST_FILE`] saying which node, boot, kernel and CRIU wrote it;
/// a restore hands it to CRIU (on a private tmpfs directory) only when all of those are
/// this host's, and both files are checked against the image's metadata before CRIU runs.
pub const KDAT_FILE: &str = "criu.kdat";
/// See [`KDAT_FILE`].
pub const KDAT_HOST_FILE: &str = "criu.kdat.host";

/// What makes a kernel-feature cache valid here: this boot of this kernel, and this CRIU.
pub fn kdat_host_key(criu: &str) -> Option<String> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let boot = read("/proc/sys/kernel/random/boot_id")?;
    let release = read("/proc/sys/kernel/osrelease")?;
    let version = read("/proc/sys/kernel/version")?;
    let bin = criu_binary(criu)?;
    let m = std::fs::metadata(&bin).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!(
        "boot {boot}\nkernel {release} {version}\ncriu {} {} {mtime}\n",
        bin.display(),
        m.len()
    ))
}

/// The file that is CRIU: a bundle's binary, a path, or the first match on PATH.
fn criu_binary(criu: &str) -> Option<std::path::PathBuf> {
    let path = Path::new(criu);
    if is_bundle(path) {
        return Some(path.join(BUNDLE_BINARY));
    }
    if criu.contains('/') {
        return Some(path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(criu))
        .find(|p| p.is_file())
}

/// Whether `path` lies on a tmpfs, by the longest mount point above it in `mountinfo`.
pub fn on_tmpfs(mountinfo: &str, path: &Path) -> bool {
    let mut best: Option<(usize, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount_point), Some(fstype)) = (fields.get(4), fields.get(sep + 1)) else {
            continue;
        };
        let mp = Path::new(mount_point);
        if path.starts_with(mp) {
            let len = mp.as_os_str().len();
            if best.is_none_or(|(l, _)| len >= l) {
                best = Some((len, *fstype == "tmpfs"));
            }
        }
    }
    best.is_some_and(|(_, tmpfs)| tmpfs)
}

/// A private directory on a tmpfs (mode 0700, removed on drop) given to CRIU as
/// `$XDG_RUNTIME_DIR`, where it loads and saves its kernel-feature cache.
struct KdatDir {
    path: std::path::PathBuf,
}

impl KdatDir {
    /// An empty one, or `None` when no tmpfs is at hand (CRIU then probes and keeps nothing).
    fn new() -> Option<KdatDir> {
        if crate::config::bench_disabled("kdat") {
            return None;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let base = [Path::new("/dev/shm").to_path_buf(), std::env::temp_dir()]
            .into_iter()
            .find(|d| d.is_dir() && on_tmpfs(&mountinfo, d))?;
        let path = base.join(format!("crac-agent-kdat-{}", crate::image::unique_suffix()));
        crate::image::create_private_dir(&path).ok()?;
        Some(KdatDir { path })
    }

    /// One holding the cache kept in the image at `images`, if it was written on this host's
    /// current boot by this CRIU. The caller has checked both files against the metadata.
    fn from_image(criu: &str, images: &Path) -> Option<KdatDir> {
        let recorded = std::fs::read_to_string(images.join(KDAT_HOST_FILE)).ok()?;
        if kdat_host_key(criu)? != recorded {
            return None;
        }
        let dir = KdatDir::new()?;
        std::fs::copy(images.join(KDAT_FILE), dir.path.join(KDAT_FILE)).ok()?;
        Some(dir)
    }

    /// After a dump: copies the cache CRIU saved into the image being written, with the key
    /// that says where it is valid.
    fn keep_in_image(&self, criu: &str, image: &Path) {
        let saved = self.path.join(KDAT_FILE);
        let Some(key) = kdat_host_key(criu) else {
            return;
        };
        if saved.is_file()
            && std::fs::copy(&saved, image.join(KDAT_FILE)).is_ok()
            && std::fs::write(image.join(KDAT_HOST_FILE), key).is_err()
        {
            let _ = std::fs::remove_file(image.join(KDAT_FILE));
        }
    }
}

impl Drop for KdatDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_dump_and_restore_commands() {
        assert_eq!(
            dump_args(201, Path::new("/crac/.tmp-x")).join(" "),
            "dump --tree 201 --images-dir /crac/.tmp-x --log-file dump.log -v3 --tcp-close --unprivileged"
        );
        let pipes = [
            StdioPipe { fd: 1, inode: 11 },
            StdioPipe { fd: 2, inode: 12 },
        ];
        let args =
            restore_args(Path::new("/crac/abc"), Path::new("/tmp/w"), &pipes, false).join(" ");
        assert!(args.starts_with("restore --images-dir /crac/abc --work-dir /tmp/w"));
        assert!(args.contains(
            "-v4 --tcp-close --restore-detached --restore-sibling --leave-stopped --unprivileged"
        ));
        assert!(
            args.ends_with("--inherit-fd fd[1]:pipe:[11] --inherit-fd fd[2]:pipe:[12]"),
            "{args}"
        );
        // stdout and stderr on one pipe: one --inherit-fd.
        let same = [
            StdioPipe { fd: 1, inode: 11 },
            StdioPipe { fd: 2, inode: 11 },
        ];
        assert_eq!(
            restore_args(Path::new("/i"), Path::new("/w"), &same, false)
                .iter()
                .filter(|a| *a == "--inherit-fd")
                .count(),
            1
        );
    }

    #[test]
    fn builds_lazy_restore_commands() {
        let args = restore_args(Path::new("/crac/abc"), Path::new("/tmp/w"), &[], true);
        assert!(args.iter().any(|a| a == "--lazy-pages"), "{args:?}");
        // CRIU's unprivileged mode refuses lazy pages.
        assert!(!args.iter().any(|a| a == UNPRIVILEGED), "{args:?}");
        assert!(args.iter().any(|a| a == "--leave-stopped"), "{args:?}");
        // The daemon shares the restore's work directory (its socket) and reads the same images.
        assert_eq!(
            lazy_pages_args(Path::new("/crac/abc"), Path::new("/tmp/w")).join(" "),
            "lazy-pages --images-dir /crac/abc --work-dir /tmp/w --log-file lazy-pages.log -v3 --status-fd 1"
        );
    }

    #[test]
    fn splits_a_restore_log_into_phases() {
        let log = "(00.000000) CRIU run id = x
(00.000090) Running on vm Linux
(00.046000) Warn  (criu/kerndat.c:1200): $XDG_RUNTIME_DIR not set
(00.056285) Reading image tree
(00.056760) Forking task with 201 pid (flags 0x8000)
(00.062973) pie: 201: Preadv 0x69e000000:376832... (228 iovs)
(00.100000) pie: 201: `- returned 20000000
(00.100100) pie: 201: Preadv 0x7f0000000:4096... (1 iovs)
(00.125152) pie: 201: `- returned 17302272
task_args->pid: 201
(00.132600) 221 was trapped
(00.168762) Restore finished successfully. Tasks resumed.
(00.168766) Writing stats
";
        assert_eq!(
            parse_restore_phases(log),
            Some(Phases {
                startup_us: 56_285,
                tree_us: 6_688,
                memory_us: 62_179,
                resume_us: 43_610,
            })
        );
        assert_eq!(
            parse_lazy_pages(
                "(00.1) nr_restored: 10\n(00.1) nr_lazy:           4096\n(00.2) nr_lazy: 2\n"
            ),
            4098
        );
        assert_eq!(parse_lazy_pages(log), 0);
        // No page data: an empty memory phase. No end marker: no phases.
        let none = "(00.010000) Reading image tree\n(00.020000) Restore finished successfully.\n";
        assert_eq!(parse_restore_phases(none).unwrap().memory_us, 0);
        assert_eq!(parse_restore_phases(none).unwrap().tree_us, 10_000);
        assert_eq!(parse_restore_phases("(00.01) Reading image tree\n"), None);
    }

    #[test]
    fn finds_whether_a_path_is_on_tmpfs() {
        let mountinfo = "22 1 0:21 / / rw,relatime - overlay overlay rw
23 22 0:22 / /dev rw,nosuid - tmpfs tmpfs rw,mode=755
24 23 0:23 / /dev/shm rw,nosuid,nodev - tmpfs shm rw,size=65536k
25 23 0:24 / /dev/pts rw - devpts devpts rw
26 22 0:25 / /tmp rw - ext4 /dev/sda1 rw
";
        assert!(on_tmpfs(mountinfo, Path::new("/dev/shm")));
        assert!(on_tmpfs(mountinfo, Path::new("/dev/shm/crac-agent-kdat-1")));
        assert!(!on_tmpfs(mountinfo, Path::new("/tmp")));
        assert!(!on_tmpfs(mountinfo, Path::new("/dev/pts/0")));
        // /dev/shmx is not under /dev/shm: /dev's tmpfs decides.
        assert!(on_tmpfs(mountinfo, Path::new("/dev/shmx")));
        assert!(!on_tmpfs(mountinfo, Path::new("/var/run")));
        assert!(!on_tmpfs("", Path::new("/dev/shm")));
    }

    #[test]
    fn classifies_criu_logs() {
        let c = |log: &str, r: bool| classify_log(log, r).reason;
        // A held connection is the cause even when an unrelated rlimit warning comes first.
        assert_eq!(
            c(
                "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\nError (criu/sk-tcp.c:81): tcp: Failed to lock TCP connection 6e93d",
                false
            ),
            reason::OPEN_SOCKETS
        );
        assert_eq!(
            c(
                "(00.1) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using --tcp-established option.",
                false
            ),
            reason::OPEN_SOCKETS
        );
        assert_eq!(
            c(
                "Error (criu/files-reg.c:1710): Can't lookup mount=1234 for fd=10 path=/dev/null",
                false
            ),
            reason::OPEN_FILES
        );
        assert_eq!(
            c(
                "Error (criu/files-reg.c:2150): File usr/lib/jvm/x/libjvm.so has bad size 1 (expect 2)",
                true
            ),
            reason::FILE_CHANGED
        );
        assert_eq!(
            c(
                "Error (criu/cr-restore.c:1400): Can't fork for 201: File exists",
                true
            ),
            reason::PID_CONFLICT
        );
        assert_eq!(
            c(
                "Error (criu/ptrace.c:10): Unable to seize 201: Operation not permitted",
                false
            ),
            reason::PERMISSION_DENIED
        );
        assert_eq!(
            c("Error (criu/x.c:1): something odd", false),
            reason::CRIU_DUMP_FAILED
        );
        assert_eq!(
            c("Error (criu/x.c:1): something odd", true),
            reason::CRIU_RESTORE_FAILED
        );
        let f = classify_log(
            "(0.1) Warn x\n(0.2) Error (criu/x.c:1): boom\n(0.3) Error (criu/y.c:2): later",
            true,
        );
        assert!(
            f.message.ends_with("criu: (0.2) Error (criu/x.c:1): boom"),
            "{}",
            f.message
        );
        assert_eq!(
            parse_version("Version: 4.2.1\nGitID: v4.2.1\n"),
            Some("4.2.1".into())
        );
    }
}
