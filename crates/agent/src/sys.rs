//! The few raw syscalls the agent needs that std does not wrap: signal masks and `sigwait`,
//! `waitpid(-1)`, `kill`, `flock`, `setsid` and fd hygiene in the child before `exec`, and
//! `PR_SET_CHILD_SUBREAPER`, a fork that only exits (to spend pids), a dual-stack TCP
//! listener without `SO_REUSEPORT`, and `malloc_trim`.
//!
//! This is the only module allowed `unsafe` (the workspace forbids it elsewhere): every block is
//! a direct libc call on plain integers or on memory owned by the calling function.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Signals the agent forwards to the JVM. SIGCHLD is handled, not forwarded.
pub const FORWARDED_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The exit code a shell would report: the code, or 128 + the signal number.
    pub fn as_exit_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

fn signal_set(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn handled_signals() -> Vec<i32> {
    let mut v = FORWARDED_SIGNALS.to_vec();
    v.push(libc::SIGCHLD);
    v
}

/// Blocks the forwarded signals and SIGCHLD in the calling thread (and every thread it spawns
/// afterwards), so that one thread can take them with [`wait_signal`]. Call before spawning
/// threads. Children get an empty mask back: std resets it between fork and exec.
pub fn block_signals() -> io::Result<()> {
    let set = signal_set(&handled_signals());
    // SAFETY: valid sigset pointer; the old-mask pointer may be null.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits for one of the blocked signals and returns its number.
pub fn wait_signal() -> io::Result<i32> {
    let set = signal_set(&handled_signals());
    let mut sig: libc::c_int = 0;
    // SAFETY: valid pointers to a sigset and an int owned by this frame.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}

/// Reaps one exited child without blocking: `Ok(None)` when none is waiting to be reaped
/// (or there are no children at all).
pub fn reap_one() -> io::Result<Option<(i32, ExitStatus)>> {
    let mut status: libc::c_int = 0;
    // SAFETY: valid pointer to an int owned by this frame.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid == 0 {
        return Ok(None);
    }
    if pid < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ECHILD) {
            return Ok(None);
        }
        return Err(err);
    }
    let st = if libc::WIFEXITED(status) {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        // Without WUNTRACED/WCONTINUED only exits are reported; keep the pid anyway.
        ExitStatus::Code(-1)
    };
    Ok(Some((pid, st)))
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain integers.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Forks a child that exits at once, waits for it and returns its pid: spending pids moves the
/// namespace's pid counter forward where `ns_last_pid` cannot be written (a container's
/// /proc/sys is read-only). The caller holds the supervisor's spawn lock, so the reaper does
/// not race this `waitpid`.
pub fn fork_and_reap() -> io::Result<i32> {
    // SAFETY: the child calls only `_exit`, which is async-signal-safe even after a fork of a
    // multi-threaded process; the parent waits for exactly that pid.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe { libc::_exit(0) }
    }
    let mut status = 0;
    // SAFETY: plain integers and a status word owned by this function.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(pid)
}

/// Keeps the agent's heap small and returnable: one malloc arena for every thread (the agent
/// allocates little and rarely, so threads need no arenas of their own, which glibc would keep
/// at 1-2 MB each), and a fixed mmap threshold (128 KiB), so a large buffer (the 1 MiB a hash
/// reads with) is its own mapping, gone when freed. Call it first in `main`. Measured with
/// sleep in place: without it the sleeping agent grew by 1-2 MB per sleep and wake.
pub fn tune_allocator() {
    // SAFETY: integer arguments; before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Gives the heap's free memory (of every malloc arena) back to the kernel: the agent asleep
/// in place holds only what it uses.
pub fn trim_heap() {
    // SAFETY: no arguments but a padding size; glibc's allocator takes its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether a process with this pid exists (in our PID namespace).
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Becomes a child subreaper, so processes orphaned below us (CRIU's restored tree, the JVM's
/// own children) are re-parented to the agent and reaped by it even when it is not PID 1.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every fd from 3 up close-on-exec, so nothing the agent inherited (a runtime's stray
/// `/dev/null` on fd 10 makes `criu dump` fail with "Can't lookup mount") reaches a child.
pub fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: close_range with integer arguments (Linux >= 5.11 for CLOSE_RANGE_CLOEXEC).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child of `cmd` a session (and process group) leader holding only fds 0, 1 and 2:
/// CRIU can then dump its tree without `--shell-job` and without external files.
pub fn isolate_child(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls (setsid, syscall) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Takes an advisory lock on `file`: shared or exclusive, blocking or not. Returns `Ok(false)`
/// when `nonblocking` and another process holds a conflicting lock.
pub fn flock(file: &impl AsRawFd, exclusive: bool, nonblocking: bool) -> io::Result<bool> {
    let mut op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if nonblocking {
        op |= libc::LOCK_NB;
    }
    // SAFETY: flock on an fd borrowed for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        let err = io::Error::last_os_error();
        if nonblocking && err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(true)
}

/// Listens on `port` on every address, IPv4 and IPv6 (one `[::]` socket with `IPV6_V6ONLY`
/// off; `0.0.0.0` where the kernel has no IPv6), close-on-exec, with `SO_REUSEADDR` (a restart
/// is not held up by TIME_WAIT) and never `SO_REUSEPORT`: while it is open, no other socket in
/// the pod can bind the port on any address, so nothing else can answer in the agent's name.
pub fn listen_all_addresses(port: u16) -> io::Result<TcpListener> {
    match listen_dual_stack(port) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            TcpListener::bind(("0.0.0.0", port))
        }
        r => r,
    }
}

fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a pointer to an int owned by this frame and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn listen_dual_stack(port: u16) -> io::Result<TcpListener> {
    // SAFETY: socket with integer arguments.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just created and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // SAFETY: sockaddr_in6 is plain data; all zeroes is `[::]`, port 0, before the fields set.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    // SAFETY: a pointer to a sockaddr_in6 owned by this frame and its exact size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen with integer arguments.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    /// What an app could try: bind `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`).
    fn bind_with_reuseport(addr: SocketAddrV4) -> io::Result<()> {
        // SAFETY: as in listen_dual_stack.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        // SAFETY: plain data, then the fields set.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = addr.port().to_be();
        sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
        // SAFETY: a pointer to a sockaddr_in owned by this frame and its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[test]
    fn nobody_else_can_bind_the_listened_port() {
        let ours = listen_all_addresses(0).unwrap();
        let port = ours.local_addr().unwrap().port();
        // std's bind sets SO_REUSEADDR, as most servers do.
        for addr in ["0.0.0.0", "127.0.0.1", "[::]", "[::1]"] {
            let r = TcpListener::bind(format!("{addr}:{port}"));
            assert!(r.is_err(), "{addr}:{port} could be bound beside the agent");
        }
        for ip in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST] {
            let e = bind_with_reuseport(SocketAddrV4::new(ip, port)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{ip}");
        }
        // It serves both families (IPv6 only where the kernel has it).
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        if ours.local_addr().unwrap().is_ipv6() {
            std::net::TcpStream::connect(("::1", port)).unwrap();
        }
        // Close-on-exec, so neither the JVM nor CRIU inherits it.
        // SAFETY: fcntl with integer arguments on a descriptor we own.
        let flags = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
        drop(ours);
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
