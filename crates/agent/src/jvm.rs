//! Starting the JVM (or CRIU restoring it) with its stdout and stderr on pipes the agent
//! copies to its own, and what `/proc` tells about the running JVM.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::image::{HostFile, StdioPipe};
use crate::supervisor::Supervisor;
use crate::sys;

const TAIL_BYTES: usize = 64 * 1024;

/// The last bytes the JVM (or CRIU) wrote, kept to explain failures.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    fn push(&self, bytes: &[u8]) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.extend(bytes);
        let excess = t.len().saturating_sub(TAIL_BYTES);
        t.drain(..excess);
    }
    pub fn text(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&t.iter().copied().collect::<Vec<u8>>()).into_owned()
    }
}

/// The JVM's two output pipes: the agent keeps the read ends and copies them to its own
/// stdout and stderr (the container's log).
pub struct OutputPipes {
    pub stdout: io::PipeWriter,
    pub stderr: io::PipeWriter,
    pub tail: Tail,
}

pub fn output_pipes() -> io::Result<OutputPipes> {
    let tail = Tail::default();
    let (out_r, out_w) = io::pipe()?;
    let (err_r, err_w) = io::pipe()?;
    copy_thread(out_r, false, tail.clone())?;
    copy_thread(err_r, true, tail.clone())?;
    Ok(OutputPipes {
        stdout: out_w,
        stderr: err_w,
        tail,
    })
}

fn copy_thread(mut r: io::PipeReader, to_stderr: bool, tail: Tail) -> io::Result<()> {
    std::thread::Builder::new()
        .name("jvm-output".into())
        .spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                tail.push(&buf[..n]);
                // Keep draining even when our own output is gone, or the JVM blocks on a full pipe.
                let _ = if to_stderr {
                    io::stderr().lock().write_all(&buf[..n])
                } else {
                    io::stdout().lock().write_all(&buf[..n])
                };
            }
        })?;
    Ok(())
}

/// Inserts JVM options right after `java` when the command starts with it; otherwise passes
/// them in `JAVA_TOOL_OPTIONS` (read by every JVM, whatever script starts it).
pub fn with_jvm_options(
    command: &[String],
    options: &[String],
    existing_tool_options: Option<&str>,
) -> (Vec<String>, Option<(String, String)>) {
    if options.is_empty() {
        return (command.to_vec(), None);
    }
    let is_java = command
        .first()
        .map(|c| Path::new(c).file_name().is_some_and(|n| n == "java"))
        .unwrap_or(false);
    if is_java {
        let mut v = vec![command[0].clone()];
        v.extend(options.iter().cloned());
        v.extend(command[1..].iter().cloned());
        (v, None)
    } else {
        let mut value = existing_tool_options.unwrap_or("").trim().to_string();
        for o in options {
            if !value.is_empty() {
                value.push(' ');
            }
            value.push_str(o);
        }
        (
            command.to_vec(),
            Some(("JAVA_TOOL_OPTIONS".to_string(), value)),
        )
    }
}

pub struct Spawned {
    pub pid: i32,
    pub tail: Tail,
}

/// Starts `argv` as a session leader with only stdin (/dev/null), stdout and stderr (pipes).
pub fn spawn(sup: &Supervisor, argv: &[String], env: &[(String, String)]) -> io::Result<Spawned> {
    spawn_with(sup, output_pipes()?, argv, env)
}

/// [`spawn`] with pipes made earlier (their copy threads must exist before `ns_last_pid` is
/// raised, so that they do not take the PIDs meant for the JVM).
pub fn spawn_with(
    sup: &Supervisor,
    pipes: OutputPipes,
    argv: &[String],
    env: &[(String, String)],
) -> io::Result<Spawned> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(
            env.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .stdin(Stdio::null())
        .stdout(pipes.stdout)
        .stderr(pipes.stderr);
    sys::isolate_child(&mut cmd);
    let child = sup.spawn(&mut cmd)?;
    drop(cmd); // closes our copies of the pipes' write ends
    Ok(Spawned {
        pid: child.id() as i32,
        tail: pipes.tail,
    })
}

/// Raises `ns_last_pid` to `min` (if it is lower) so the next process gets a PID above it.
/// Returns the value it was.
pub fn raise_last_pid(min: u32) -> io::Result<u32> {
    let path = "/proc/sys/kernel/ns_last_pid";
    let cur: u32 = fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(io::Error::other)?;
    if cur < min {
        fs::write(path, min.to_string())?;
    }
    Ok(cur)
}

/// The pid and every thread and descendant of `pid`, from /proc.
pub fn tree_ids(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            out.push(tid);
            if let Ok(children) = fs::read_to_string(t.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `pipe:[12345]` → 12345.
pub fn parse_pipe_link(link: &str) -> Option<u64> {
    link.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// The pipes on fds 1 and 2 of `pid`.
pub fn stdio_pipes(pid: i32) -> Vec<StdioPipe> {
    [1, 2]
        .iter()
        .filter_map(|fd| {
            let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            Some(StdioPipe {
                fd: *fd,
                inode: parse_pipe_link(&link.to_string_lossy())?,
            })
        })
        .collect()
}

/// The JVM's executable and `libjvm.so`, with their sizes.
pub fn jvm_files(pid: i32) -> (Option<PathBuf>, Vec<HostFile>) {
    let mut files = Vec::new();
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    let mut paths: Vec<PathBuf> = exe.iter().cloned().collect();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    if let Some(lib) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libjvm.so"))
    {
        paths.push(PathBuf::from(lib));
    }
    for p in paths {
        if let Ok(m) = fs::metadata(&p) {
            files.push(HostFile {
                path: p.to_string_lossy().into_owned(),
                size: m.len(),
            });
        }
    }
    (exe, files)
}

/// `JAVA_HOME` of a `.../bin/java` executable.
pub fn java_home_of(exe: &Path) -> Option<PathBuf> {
    let bin = exe.parent()?;
    (bin.file_name()? == "bin").then(|| bin.parent().map(Path::to_path_buf))?
}

/// `JAVA_VERSION="17.0.15"` from a JDK's `release` file.
pub fn parse_release_version(release: &str) -> Option<String> {
    release
        .lines()
        .find_map(|l| l.strip_prefix("JAVA_VERSION="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

pub fn jdk_version(java_home: &Path) -> Option<String> {
    parse_release_version(&fs::read_to_string(java_home.join("release")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn jvm_options_go_after_java_or_into_tool_options() {
        let (argv, env) = with_jvm_options(
            &s(&["/opt/jdk/bin/java", "-jar", "a.jar"]),
            &s(&["-XX:-UsePerfData"]),
            None,
        );
        assert_eq!(
            argv,
            s(&["/opt/jdk/bin/java", "-XX:-UsePerfData", "-jar", "a.jar"])
        );
        assert!(env.is_none());
        let (argv, env) = with_jvm_options(
            &s(&["./start.sh"]),
            &s(&["-XX:-UsePerfData", "-Xmx1g"]),
            Some("-Da=b"),
        );
        assert_eq!(argv, s(&["./start.sh"]));
        assert_eq!(
            env,
            Some((
                "JAVA_TOOL_OPTIONS".into(),
                "-Da=b -XX:-UsePerfData -Xmx1g".into()
            ))
        );
        assert_eq!(with_jvm_options(&s(&["java"]), &[], None).0, s(&["java"]));
    }

    #[test]
    fn proc_parsing() {
        assert_eq!(parse_pipe_link("pipe:[4242]"), Some(4242));
        assert_eq!(parse_pipe_link("/dev/null"), None);
        assert_eq!(parse_pipe_link("socket:[1]"), None);
        assert_eq!(
            parse_release_version("IMPLEMENTOR=\"X\"\nJAVA_VERSION=\"17.0.15\"\n"),
            Some("17.0.15".into())
        );
        assert_eq!(parse_release_version("X=1"), None);
        assert_eq!(
            java_home_of(Path::new("/usr/lib/jvm/j17/bin/java")),
            Some(PathBuf::from("/usr/lib/jvm/j17"))
        );
        assert_eq!(java_home_of(Path::new("/java")), None);
    }

    #[test]
    fn this_process_shows_up_in_proc() {
        let ids = tree_ids(std::process::id() as i32);
        assert!(ids.contains(&(std::process::id() as i32)));
    }
}
