//! Sleep in place (issue 17): in restore mode, `POST /sleep` ends the JVM and keeps the pod with
//! the agent as its only process; `POST /wake` restores the JVM in place, exactly as at pod
//! start (digest, integrity check, `CRAC_FALLBACK`). Both are served on the activity port and
//! need the bearer token of `CRAC_CONTROL_TOKEN_FILE` (see `crac_api::agent`).
//!
//! One thread owns the JVM: the agent's main thread, in [`supervise`]. Connection threads only
//! queue a request and wait for its answer. The main thread takes queued requests in order,
//! a run of equal ones at a time (concurrent `/wake` calls share one restore), so transitions
//! never overlap: a `/sleep` that arrives during a wake runs after it, and there is never a
//! second JVM, nor a mode that says awake with none.

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crac_api::agent::{
    AgentSummary, ControlAnswer, MAX_CONTROL_TOKEN_BYTES, MIN_CONTROL_TOKEN_BYTES, SLEEP_PATH,
    WAKE_PATH, mode,
};
use sha2::{Digest, Sha256};

use crate::activity::{self, Handler, Request};
use crate::error::{Failure, reason};
use crate::flows::{self, Ctx, Running};
use crate::image::ImageLock;
use crate::supervisor::{Event, Supervisor};
use crate::sys::{self, ExitStatus};

fn log(msg: impl AsRef<str>) {
    eprintln!("crac-agent: {}", msg.as_ref());
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// the token

/// The control token, kept only as its sha256: callers' tokens are hashed and the two digests
/// compared in constant time, so neither the token's bytes nor its length leak through timing.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Whether an `Authorization` header value is `Bearer <this token>`.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let given = authorization
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .unwrap_or("");
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let diff = digest
            .iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // An empty token never matches (nor could one be configured).
        std::hint::black_box(diff) == 0 && !given.is_empty()
    }
}

/// Reads the token file once: a regular file (a Secret's mounted symlink is followed), at
/// most `MAX_CONTROL_TOKEN_BYTES`, at least `MIN_CONTROL_TOKEN_BYTES` of visible ASCII once
/// surrounding whitespace is trimmed (it travels in an HTTP header).
pub fn read_token(path: &Path) -> Result<Token, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONTROL_TOKEN_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    token_from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn token_from_bytes(bytes: &[u8]) -> Result<Token, String> {
    if bytes.len() > MAX_CONTROL_TOKEN_BYTES {
        return Err(format!("over {MAX_CONTROL_TOKEN_BYTES} bytes"));
    }
    let token = bytes.trim_ascii();
    if token.len() < MIN_CONTROL_TOKEN_BYTES {
        return Err(format!(
            "the token has {} bytes, fewer than {MIN_CONTROL_TOKEN_BYTES}",
            token.len()
        ));
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be visible ASCII (it is sent in a header)".into());
    }
    Ok(Token(Sha256::digest(token).into()))
}

// ---------------------------------------------------------------------------------------------
// requests, from the connection threads to the main thread

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Sleep,
    Wake,
}

type Reply = (u16, String);

struct Pending {
    want: Want,
    received: Instant,
    reply: SyncSender<Reply>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// Set once the agent is ending: every request is answered with it at once.
    closed: Option<Reply>,
}

pub struct Control {
    token: Token,
    sup: Supervisor,
    queue: Mutex<Queue>,
}

fn json(status: u16, body: &ControlAnswer) -> Reply {
    (
        status,
        serde_json::to_string(body).unwrap_or_else(|_| "{}".into()),
    )
}

fn error(status: u16, what: &str) -> Reply {
    (status, serde_json::json!({ "error": what }).to_string())
}

impl Control {
    pub fn new(token: Token, sup: Supervisor) -> Control {
        Control {
            token,
            sup,
            queue: Mutex::new(Queue::default()),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers a request on the activity port (on its connection's thread), or `None` when it
    /// is not one of ours. Blocks until the main thread has done what it asks.
    pub fn handle(&self, req: &Request<'_>) -> Option<Reply> {
        let want = match req.path {
            SLEEP_PATH => Want::Sleep,
            WAKE_PATH => Want::Wake,
            _ => return None,
        };
        if !self.token.admits(req.authorization) {
            return Some(error(401, "a valid bearer token is required"));
        }
        if req.method != "POST" {
            return Some(error(405, "POST only"));
        }
        let (tx, rx) = sync_channel(1);
        {
            let mut q = self.queue();
            if let Some(closed) = &q.closed {
                return Some(closed.clone());
            }
            q.pending.push_back(Pending {
                want,
                received: req.received,
                reply: tx,
            });
        }
        self.sup.notify();
        Some(
            rx.recv()
                .unwrap_or_else(|_| error(503, "the agent is ending")),
        )
    }

    fn has_pending(&self) -> bool {
        !self.queue().pending.is_empty()
    }

    /// The oldest request and every one after it that wants the same.
    fn take_run(&self) -> Vec<Pending> {
        let mut q = self.queue();
        let Some(first) = q.pending.pop_front() else {
            return Vec::new();
        };
        let mut run = vec![first];
        while q.pending.front().is_some_and(|p| p.want == run[0].want) {
            run.extend(q.pending.pop_front());
        }
        run
    }

    /// The agent is ending: every request, queued or to come, gets `reply`.
    fn close(&self, reply: Reply) {
        let mut q = self.queue();
        for p in q.pending.drain(..) {
            let _ = p.reply.send(reply.clone());
        }
        q.closed = Some(reply);
    }
}

fn answer_all(run: Vec<Pending>, reply: &Reply) {
    for p in run {
        let _ = p.reply.send(reply.clone());
    }
}

// ---------------------------------------------------------------------------------------------
// the main thread

/// Restore mode, once the JVM is up: serves activity (and the control endpoints when a token
/// is configured), and sleeps and wakes the JVM on request. Returns the agent's exit code: the
/// JVM's when it exits on its own; 0 when a termination signal arrives while asleep; the
/// restore's failure code when a wake can neither restore nor fall back.
pub fn supervise(ctx: &Ctx, first: Running, s: &mut AgentSummary) -> i32 {
    let control = ctx
        .control_token
        .clone()
        .map(|token| Arc::new(Control::new(token, ctx.sup.clone())));
    let handler: Option<Handler> = control.clone().map(|c| {
        let h: Handler = Arc::new(move |r: &Request<'_>| c.handle(r));
        h
    });
    let activity = flows::start_activity(ctx, &first, s, handler);
    ctx.write_summary(s);
    let pending = || control.as_ref().is_some_and(|c| c.has_pending());
    let mut phase = Phase::Awake(first);
    // The last wake's answer and when it was given: a /wake received before then waited for
    // that wake, and gets its answer.
    let mut last_wake: Option<(Instant, Reply)> = None;
    loop {
        phase = match phase {
            Phase::Awake(r) => match ctx.sup.wait_event(Some(r.pid), false, pending) {
                Event::Exited(status) => {
                    if let Some(c) = &control {
                        c.close(json(
                            503,
                            &ControlAnswer {
                                mode: r.mode.to_string(),
                                reason: Some(reason::JVM_EXITED.into()),
                                message: Some(format!(
                                    "the JVM exited on its own ({status}); the agent is ending"
                                )),
                                ..Default::default()
                            },
                        ));
                    }
                    return jvm_ended(ctx, r.pid, status, s);
                }
                Event::Terminated(_) | Event::Interrupted => {
                    let run = control.as_ref().map(|c| c.take_run()).unwrap_or_default();
                    match run.first().map(|p| p.want) {
                        None => Phase::Awake(r),
                        Some(Want::Wake) => {
                            for p in run {
                                let reply = match &last_wake {
                                    Some((at, reply)) if p.received <= *at => reply.clone(),
                                    _ => json(200, &awake_answer(&r, s)),
                                };
                                let _ = p.reply.send(reply);
                            }
                            Phase::Awake(r)
                        }
                        Some(Want::Sleep) if ctx.sup.has_exited(r.pid) => {
                            // Left to the next turn, which reports how it ended.
                            answer_all(
                                run,
                                &json(
                                    503,
                                    &ControlAnswer {
                                        mode: r.mode.to_string(),
                                        reason: Some(reason::JVM_EXITED.into()),
                                        message: Some(
                                            "the JVM exited on its own; the agent is ending".into(),
                                        ),
                                        ..Default::default()
                                    },
                                ),
                            );
                            Phase::Awake(r)
                        }
                        Some(Want::Sleep) => {
                            let received = run.iter().map(|p| p.received).min();
                            let lock = put_to_sleep(ctx, r);
                            let took = received.map(|t| ms(t.elapsed())).unwrap_or(0);
                            log(format!(
                                "asleep {took} ms after the request: the JVM's tree is gone, the agent keeps the pod{}",
                                if lock.is_some() {
                                    " and the image's lock"
                                } else {
                                    ""
                                }
                            ));
                            s.asleep = Some(true);
                            ctx.write_summary(s);
                            if let Some(a) = &activity {
                                a.update(|a| {
                                    a.mode = mode::SLEEPING.into();
                                    a.open_connections = 0;
                                    a.checkpoint_id = ctx.cfg.checkpoint_id.clone();
                                    a.start_ms = None;
                                    a.reason = None;
                                    a.sleeping_since = Some(activity::rfc3339(SystemTime::now()));
                                });
                            }
                            answer_all(
                                run,
                                &json(
                                    200,
                                    &ControlAnswer {
                                        mode: mode::SLEEPING.into(),
                                        sleep_ms: Some(took),
                                        ..Default::default()
                                    },
                                ),
                            );
                            Phase::Asleep(lock)
                        }
                    }
                }
            },
            Phase::Asleep(lock) => match ctx.sup.wait_event(None, true, pending) {
                Event::Terminated(sig) => {
                    let reply = error(503, "the agent is ending");
                    if let Some(c) = &control {
                        c.close(reply);
                    }
                    log(format!(
                        "received signal {sig} while asleep: no JVM runs, exiting 0"
                    ));
                    s.message = Some(format!("received signal {sig} while asleep"));
                    ctx.write_summary(s);
                    return 0;
                }
                Event::Exited(_) | Event::Interrupted => {
                    let run = control.as_ref().map(|c| c.take_run()).unwrap_or_default();
                    match run.first().map(|p| p.want) {
                        None => Phase::Asleep(lock),
                        Some(Want::Sleep) => {
                            answer_all(
                                run,
                                &json(
                                    200,
                                    &ControlAnswer {
                                        mode: mode::SLEEPING.into(),
                                        ..Default::default()
                                    },
                                ),
                            );
                            Phase::Asleep(lock)
                        }
                        Some(Want::Wake) => {
                            let received = run
                                .iter()
                                .map(|p| p.received)
                                .min()
                                .unwrap_or_else(Instant::now);
                            match wake(ctx, s, received) {
                                Ok(r) => {
                                    // The new JVM holds its own lock (a cold start none).
                                    drop(lock);
                                    let wakes = s.wakes.unwrap_or(0);
                                    let answer = ControlAnswer {
                                        restore_ms: Some(r.start_ms),
                                        ..awake_answer(&r, s)
                                    };
                                    let reply =
                                        json(if r.start_ms > 0 { 200 } else { 503 }, &answer);
                                    if let Some(a) = &activity {
                                        let report = flows::activity_report(ctx, &r, s);
                                        a.update(|a| {
                                            *a = crac_api::agent::ActivityReport {
                                                wakes: Some(wakes),
                                                // The wake is traffic: the request it was
                                                // made for follows.
                                                last_activity_time: Some(activity::rfc3339(
                                                    SystemTime::now(),
                                                )),
                                                ..report
                                            };
                                        });
                                    }
                                    answer_all(run, &reply);
                                    last_wake = Some((Instant::now(), reply));
                                    Phase::Awake(r)
                                }
                                Err(code) => {
                                    let reply = json(
                                        503,
                                        &ControlAnswer {
                                            mode: mode::SLEEPING.into(),
                                            reason: s.reason.clone(),
                                            message: s.message.clone(),
                                            ..Default::default()
                                        },
                                    );
                                    answer_all(run, &reply);
                                    if let Some(c) = &control {
                                        c.close(reply);
                                    }
                                    return code;
                                }
                            }
                        }
                    }
                }
            },
        };
    }
}

enum Phase {
    Awake(Running),
    /// No JVM; the image's lock, if the JVM that went to sleep was restored from it.
    Asleep(Option<ImageLock>),
}

fn awake_answer(r: &Running, s: &AgentSummary) -> ControlAnswer {
    let cold = r.mode == mode::COLD_STARTED;
    ControlAnswer {
        mode: r.mode.to_string(),
        reason: if cold { s.reason.clone() } else { None },
        message: if cold { s.message.clone() } else { None },
        ..Default::default()
    }
}

/// The JVM exited on its own: the agent exits with its status, as it always has.
fn jvm_ended(ctx: &Ctx, pid: i32, status: ExitStatus, s: &mut AgentSummary) -> i32 {
    log(format!("JVM (pid {pid}) ended: {status}"));
    s.exit_code = Some(status.as_exit_code());
    ctx.write_summary(s);
    status.as_exit_code()
}

/// Ends the JVM's whole tree and reaps it; nothing is dumped (the image is on the volume).
/// Returns the image lock the JVM held: a sleeping pod keeps it, so that no checkpoint prunes
/// or replaces the image it will restore from at its next wake.
fn put_to_sleep(ctx: &Ctx, r: Running) -> Option<ImageLock> {
    ctx.sup.forward_signals_to(None);
    end_tree(&ctx.sup, r.pid);
    // What the restore allocated (CRIU's log, hashing buffers) goes back to the kernel.
    sys::trim_heap();
    r.lock
}

/// SIGKILLs `pid`, its process group, every process and thread of its tree and, when the agent
/// is PID 1 of its namespace (a pod's, where every other process is the app's), every other
/// process; then waits (at most 10 s) until none of them exists, zombies included, so the
/// checkpointed PIDs are free for the next restore.
fn end_tree(sup: &Supervisor, pid: i32) {
    let mut ids = crate::jvm::tree_ids(pid);
    let _ = sys::kill(-pid, libc::SIGKILL);
    for &id in &ids {
        let _ = sys::kill(id, libc::SIGKILL);
    }
    if std::process::id() == 1 {
        let others = other_processes();
        for &p in &others {
            let _ = sys::kill(p, libc::SIGKILL);
        }
        ids.extend(others);
    }
    if sup
        .wait(pid, Some(Duration::from_secs(10)), false)
        .is_none()
    {
        log(format!("the JVM (pid {pid}) survived SIGKILL for 10 s"));
    }
    // Orphans of the tree are re-parented to the agent, and its reaper reaps them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let me = std::process::id() as i32;
    loop {
        let left: Vec<i32> = ids
            .iter()
            .copied()
            .filter(|&id| sys::process_exists(id) && thread_group(id) != Some(me))
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            log(format!("still present 10 s after SIGKILL: {left:?}"));
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every process of the namespace but the agent (from /proc: thread groups only).
fn other_processes() -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&p| p != me)
                .collect()
        })
        .unwrap_or_default()
}

/// The thread group (process) a task belongs to: a pid of the dead tree may already be one
/// of the agent's own new threads.
fn thread_group(task: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{task}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Restores in place, as at pod start (the same checks and fallback), timed from `received`.
/// `Err`: the agent's exit code (fallback `Fail`, or a termination signal); the summary is
/// written.
fn wake(ctx: &Ctx, s: &mut AgentSummary, received: Instant) -> Result<Running, i32> {
    let wakes = s.wakes.unwrap_or(0) + 1;
    let in_place = Ctx {
        cfg: ctx.cfg.clone(),
        sup: ctx.sup.clone(),
        started: received,
        activity_listener: None,
        in_place: true,
        control_token: None,
    };
    *s = AgentSummary {
        wakes: Some(wakes),
        ..ctx.summary()
    };
    log(format!("waking in place (wake {wakes})"));
    let r = flows::restore_or_fallback(&in_place, s)?;
    if r.mode == mode::RESTORED {
        s.restore_ms = Some(r.start_ms);
    } else {
        s.restore_ms = (r.start_ms > 0).then_some(r.start_ms);
    }
    ctx.write_summary(s);
    Ok(r)
}

/// Before a restore in place: the restored tree needs the checkpointed PIDs (`pids`) free, and
/// the PIDs CRIU and the agent's threads take meanwhile must not land on them. Unlike a fresh
/// pod's, this namespace's PID counter may sit below or among them (CRIU gives the restored
/// tree its PIDs without moving the counter), so it is moved past the highest one first (by
/// writing `ns_last_pid`, else by spending PIDs), and every one of them is checked free.
pub fn free_checkpointed_pids(sup: &Supervisor, pids: &[i32]) -> Result<(), Failure> {
    let Some(&top) = pids.iter().max() else {
        return Ok(());
    };
    let top = top.max(0) as u32;
    if crate::jvm::raise_last_pid(top).is_err() {
        sup.spend_pids_past(top.saturating_add(1)).map_err(|e| {
            Failure::new(
                reason::PID_CONFLICT,
                format!("cannot move the PID counter past {top}: {e}"),
            )
        })?;
    }
    let busy: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| sys::process_exists(p))
        .collect();
    if !busy.is_empty() {
        return Err(Failure::new(
            reason::PID_CONFLICT,
            format!("PIDs the image needs are taken in this pod: {busy:?}; the app started cold"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef-x";

    #[test]
    fn token_rules() {
        assert!(token_from_bytes(format!("  {TOKEN}\n").as_bytes()).is_ok());
        assert!(token_from_bytes(b"short").is_err());
        assert!(token_from_bytes(&[b'a'; 31]).is_err());
        assert!(token_from_bytes(&[b'a'; 32]).is_ok());
        assert!(token_from_bytes(&[b'a'; MAX_CONTROL_TOKEN_BYTES + 1]).is_err());
        let spaced = format!("{} {}", &TOKEN[..20], &TOKEN[20..]);
        assert!(token_from_bytes(spaced.as_bytes()).is_err());
    }

    #[test]
    fn only_the_bearer_token_is_admitted() {
        let t = token_from_bytes(TOKEN.as_bytes()).unwrap();
        assert!(t.admits(Some(&format!("Bearer {TOKEN}"))));
        assert!(t.admits(Some(&format!("bearer  {TOKEN} "))));
        for wrong in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some(TOKEN),
            Some(&format!("Basic {TOKEN}")),
            Some(&format!("Bearer {TOKEN}x")),
            Some(&format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        ] {
            assert!(!t.admits(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn the_token_file_is_read_bounded() {
        let dir = std::env::temp_dir().join(format!("crac-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("ok");
        std::fs::write(&ok, format!("{TOKEN}\n")).unwrap();
        assert!(
            read_token(&ok)
                .unwrap()
                .admits(Some(&format!("Bearer {TOKEN}")))
        );
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; MAX_CONTROL_TOKEN_BYTES + 10]).unwrap();
        assert!(read_token(&big).unwrap_err().contains("over"));
        assert!(read_token(&dir).unwrap_err().contains("not a regular file"));
        assert!(read_token(&dir.join("none")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn pending(want: Want) -> (Pending, std::sync::mpsc::Receiver<Reply>) {
        let (tx, rx) = sync_channel(1);
        (
            Pending {
                want,
                received: Instant::now(),
                reply: tx,
            },
            rx,
        )
    }

    #[test]
    fn runs_of_equal_requests_are_taken_together_in_order() {
        let c = Control::new(
            token_from_bytes(TOKEN.as_bytes()).unwrap(),
            Supervisor::detached(),
        );
        let mut rxs = Vec::new();
        for w in [Want::Wake, Want::Wake, Want::Sleep, Want::Wake] {
            let (p, rx) = pending(w);
            c.queue().pending.push_back(p);
            rxs.push(rx);
        }
        let wants = |run: Vec<Pending>| run.iter().map(|p| p.want).collect::<Vec<_>>();
        assert_eq!(wants(c.take_run()), vec![Want::Wake, Want::Wake]);
        assert_eq!(wants(c.take_run()), vec![Want::Sleep]);
        assert!(c.has_pending());
        c.close(error(503, "ending"));
        assert!(!c.has_pending());
        assert_eq!(
            rxs[3].recv().unwrap().0,
            503,
            "a queued request is answered"
        );
        // Once closed, a request is answered at once.
        let req = Request {
            method: "POST",
            path: WAKE_PATH,
            authorization: Some(&format!("Bearer {TOKEN}")),
            received: Instant::now(),
        };
        assert_eq!(c.handle(&req).unwrap().0, 503);
        let wrong = Request {
            authorization: Some("Bearer nope"),
            ..req
        };
        assert_eq!(c.handle(&wrong).unwrap().0, 401);
        let get = Request {
            method: "GET",
            authorization: Some(&format!("Bearer {TOKEN}")),
            ..wrong
        };
        assert_eq!(c.handle(&get).unwrap().0, 405);
        let other = Request {
            path: "/other",
            ..get
        };
        assert!(c.handle(&other).is_none());
    }
}
