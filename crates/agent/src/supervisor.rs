//! PID 1 duties: one thread takes every signal; it reaps all children (our own, and orphans
//! re-parented to us) and forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the JVM.
//!
//! Every child the agent starts is spawned through [`Supervisor::spawn`] and waited for through
//! [`Supervisor::wait`], never with std's `Child::wait` (the reaper would steal its status).

use std::collections::HashMap;
use std::io;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sys::{self, ExitStatus};

#[derive(Default)]
struct State {
    exited: HashMap<i32, ExitStatus>,
    /// Where forwarded signals go (the JVM, once it runs).
    forward_to: Option<i32>,
    /// First termination signal received, if any.
    terminated_by: Option<i32>,
}

/// What ended a [`Supervisor::wait_event`].
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Exited(ExitStatus),
    Interrupted,
    /// The first termination signal (SIGTERM or SIGINT).
    Terminated(i32),
}

#[derive(Clone)]
pub struct Supervisor {
    state: Arc<(Mutex<State>, Condvar)>,
    /// Held while spawning: std reaps a child whose exec failed itself, so the reaper must not
    /// run `waitpid(-1)` meanwhile.
    spawn_lock: Arc<Mutex<()>>,
}

impl Supervisor {
    /// Blocks the handled signals in this thread (call it first in `main`, before any thread
    /// starts) and starts the signal thread.
    pub fn start() -> io::Result<Supervisor> {
        sys::block_signals()?;
        if std::process::id() != 1 {
            // Not PID 1 (a plain container with a shell wrapper, a test): still adopt orphans.
            let _ = sys::set_child_subreaper();
        }
        let sup = Supervisor {
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
            spawn_lock: Arc::new(Mutex::new(())),
        };
        let s = sup.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || s.signal_loop())?;
        Ok(sup)
    }

    /// A supervisor without its signal thread, for unit tests of what only queues and notifies.
    #[cfg(test)]
    pub fn detached() -> Supervisor {
        Supervisor {
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
            spawn_lock: Arc::new(Mutex::new(())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal_loop(&self) {
        loop {
            let sig = match sys::wait_signal() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("crac-agent: sigwait failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if sig == libc::SIGCHLD {
                self.reap_all();
                continue;
            }
            let target = {
                let mut st = self.lock();
                if st.terminated_by.is_none() && sig != libc::SIGQUIT && sig != libc::SIGHUP {
                    st.terminated_by = Some(sig);
                }
                st.forward_to
            };
            if let Some(pid) = target
                && let Err(e) = sys::kill(pid, sig)
            {
                eprintln!("crac-agent: forwarding signal {sig} to pid {pid}: {e}");
            }
            self.state.1.notify_all();
        }
    }

    /// Spends pids until the next process gets one above `min` (at most `min` + 64 forks),
    /// for a JVM that must not take a pid the restoring pod's own processes will hold.
    /// Returns the last pid spent, or `None` when none had to be.
    pub fn spend_pids_past(&self, min: u32) -> std::io::Result<Option<i32>> {
        let _guard = self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = None;
        for _ in 0..min.saturating_add(64) {
            let pid = sys::fork_and_reap()?;
            last = Some(pid);
            if pid as u32 >= min {
                break;
            }
        }
        Ok(last)
    }

    fn reap_all(&self) {
        let _guard = self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut reaped = false;
        loop {
            match sys::reap_one() {
                Ok(Some((pid, status))) => {
                    let mut st = self.lock();
                    // Bound the table: orphans nobody waits for must not grow it forever.
                    if st.exited.len() > 4096 {
                        st.exited.clear();
                    }
                    st.exited.insert(pid, status);
                    reaped = true;
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("crac-agent: waitpid: {e}");
                    break;
                }
            }
        }
        if reaped {
            self.state.1.notify_all();
        }
    }

    /// Spawns `cmd` and returns its pid. Never wait on the returned child with std.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<std::process::Child> {
        let _guard = self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner());
        cmd.spawn()
    }

    /// Sends forwarded signals to `pid` from now on (`None` stops forwarding). If a termination
    /// signal already arrived, it is delivered right away.
    pub fn forward_signals_to(&self, pid: Option<i32>) {
        let pending = {
            let mut st = self.lock();
            st.forward_to = pid;
            st.terminated_by
        };
        if let (Some(pid), Some(sig)) = (pid, pending) {
            let _ = sys::kill(pid, sig);
        }
    }

    /// The first SIGTERM or SIGINT the agent received, if any.
    pub fn terminated_by(&self) -> Option<i32> {
        self.lock().terminated_by
    }

    /// Waits until `pid` exits or `timeout` passes (`None`: forever). Also returns (with
    /// `None`) when a termination signal arrives and `stop_on_signal` is set.
    pub fn wait(
        &self,
        pid: i32,
        timeout: Option<Duration>,
        stop_on_signal: bool,
    ) -> Option<ExitStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if let Some(status) = st.exited.remove(&pid) {
                return Some(status);
            }
            if stop_on_signal && st.terminated_by.is_some() {
                return None;
            }
            let wait_for = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    (d - now).min(Duration::from_millis(500))
                }
                None => Duration::from_millis(500),
            };
            st = self
                .state
                .1
                .wait_timeout(st, wait_for)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            // A lost SIGCHLD (coalesced while we held the lock) must not strand us.
            if !st.exited.contains_key(&pid) && !sys::process_exists(pid) {
                drop(st);
                self.reap_all();
                st = self.lock();
            }
        }
    }

    /// Waits until `pid` (if any) exits (its status is consumed), with `stop_on_signal` a
    /// termination signal has arrived, or `interrupted()` holds; checked in that order. Whoever
    /// makes `interrupted()` true calls [`Supervisor::notify`] afterwards. `interrupted` runs
    /// with the supervisor's lock held: it may take other locks, but none held while calling
    /// into the supervisor.
    pub fn wait_event(
        &self,
        pid: Option<i32>,
        stop_on_signal: bool,
        interrupted: impl Fn() -> bool,
    ) -> Event {
        let mut st = self.lock();
        loop {
            if let Some(status) = pid.and_then(|p| st.exited.remove(&p)) {
                return Event::Exited(status);
            }
            if let Some(sig) = st.terminated_by.filter(|_| stop_on_signal) {
                return Event::Terminated(sig);
            }
            if interrupted() {
                return Event::Interrupted;
            }
            st = self
                .state
                .1
                .wait_timeout(st, Duration::from_millis(500))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            // A lost SIGCHLD (coalesced while we held the lock) must not strand us.
            if let Some(p) = pid
                && !st.exited.contains_key(&p)
                && !sys::process_exists(p)
            {
                drop(st);
                self.reap_all();
                st = self.lock();
            }
        }
    }

    /// Wakes every [`Supervisor::wait_event`] so that it checks its `interrupted` again.
    pub fn notify(&self) {
        let _st = self.lock();
        self.state.1.notify_all();
    }

    /// Whether `pid` has exited (without consuming its status).
    pub fn has_exited(&self, pid: i32) -> bool {
        self.lock().exited.contains_key(&pid)
    }

    /// Runs `cmd` to completion with stdout and stderr captured together (up to 1 MiB).
    pub fn run_capture(
        &self,
        mut cmd: Command,
        timeout: Duration,
    ) -> io::Result<(ExitStatus, String)> {
        let (mut reader, writer) = io::pipe()?;
        let writer2 = writer.try_clone()?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(writer2);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = self.spawn(&mut cmd)?;
        // Drop our copies of the write end so the reader sees EOF when the child exits.
        drop(cmd);
        let pid = child.id() as i32;
        let out = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = io::Read::read_to_end(&mut io::Read::take(&mut reader, 1 << 20), &mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        });
        match self.wait(pid, Some(timeout), false) {
            Some(status) => {
                let text = out.join().unwrap_or_default();
                Ok((status, text))
            }
            None => {
                let _ = sys::kill(pid, libc::SIGKILL);
                let _ = self.wait(pid, Some(Duration::from_secs(5)), false);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{program} did not finish within {}s", timeout.as_secs()),
                ))
            }
        }
    }
}
