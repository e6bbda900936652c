//! Engine `criu`: dump less. Before its checkpoint the CRaC JDK runs a full GC that gives
//! unused heap back to the OS and trims the native heap, so free memory stays out of the
//! image. A stock JDK can be asked for the same with `jcmd`: lower the heap free ratios, run
//! a GC (G1 and Serial shrink the heap to the ratios after a full GC), put the ratios back
//! (the heap grows again only at a later GC, after restore, as it would have), and a few
//! seconds later, once the JIT's compiler arenas are free, trim the native heap.
//!
//! Nothing here is needed for a correct image: a step that fails is logged and the dump goes
//! on with a bigger image.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::supervisor::Supervisor;

/// The heap free ratios used while shrinking (percent of the heap after a GC).
pub const SHRINK_MIN_FREE: u32 = 5;
pub const SHRINK_MAX_FREE: u32 = 10;
/// How long the JIT's arenas are given to go free before the native heap is trimmed.
pub const TRIM_AFTER: Duration = Duration::from_secs(2);

/// `MinHeapFreeRatio` and `MaxHeapFreeRatio` from `jcmd <pid> VM.flags -all`.
pub fn heap_free_ratios(flags: &str) -> Option<(u32, u32)> {
    let value = |name: &str| -> Option<u32> {
        flags.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            let _type = words.next()?;
            if words.next()? != name || words.next()? != "=" {
                return None;
            }
            words.next()?.parse().ok()
        })
    };
    Some((value("MinHeapFreeRatio")?, value("MaxHeapFreeRatio")?))
}

/// The jcmd script of the first step: report the flags, lower the ratios, run a full GC.
/// Min first: Max may never go below Min.
pub fn shrink_script() -> String {
    format!(
        "VM.flags -all\nVM.set_flag MinHeapFreeRatio {SHRINK_MIN_FREE}\nVM.set_flag MaxHeapFreeRatio {SHRINK_MAX_FREE}\nGC.run\n"
    )
}

/// The second step: the ratios back as they were (Max first, so Min never exceeds it), then
/// the native heap trimmed.
pub fn restore_script(min: u32, max: u32) -> String {
    format!(
        "VM.set_flag MaxHeapFreeRatio {max}\nVM.set_flag MinHeapFreeRatio {min}\nSystem.trim_native_heap\n"
    )
}

/// The JVM's resident memory in KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs both steps against the JVM `pid` with the `jcmd` beside `java`; returns a line for
/// the log. `stop` is polled while waiting (a SIGTERM must not wait for the trim).
pub fn before_dump(
    sup: &Supervisor,
    java: Option<&Path>,
    pid: i32,
    stop: impl Fn() -> bool,
) -> Result<String, String> {
    let jcmd = crate::crac::jcmd_of(java);
    let dir =
        std::env::temp_dir().join(format!("crac-agent-jcmd-{}", crate::image::unique_suffix()));
    crate::image::create_private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_steps(sup, &jcmd, &dir, pid, stop);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_steps(
    sup: &Supervisor,
    jcmd: &Path,
    dir: &Path,
    pid: i32,
    stop: impl Fn() -> bool,
) -> Result<String, String> {
    let t = Instant::now();
    let before = rss_kib(pid);
    let run = |name: &str, script: String| -> Result<String, String> {
        let file = dir.join(name);
        std::fs::write(&file, script).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut cmd = Command::new(jcmd);
        cmd.arg(pid.to_string()).arg("-f").arg(&file);
        match sup.run_capture(cmd, Duration::from_secs(60)) {
            Ok((status, out)) if status.as_exit_code() == 0 => Ok(out),
            Ok((status, out)) => Err(format!(
                "{} {pid} -f {name}: {status}: {}",
                jcmd.display(),
                out.trim().lines().last().unwrap_or("")
            )),
            Err(e) => Err(format!("{}: {e}", jcmd.display())),
        }
    };
    let out = run("shrink", shrink_script())?;
    let (min, max) = heap_free_ratios(&out)
        .ok_or_else(|| "jcmd VM.flags -all printed no heap free ratios".to_string())?;
    let wait_until = Instant::now() + TRIM_AFTER;
    while Instant::now() < wait_until && !stop() {
        std::thread::sleep(Duration::from_millis(50));
    }
    run("restore", restore_script(min, max))?;
    let mib = |k: Option<u64>| k.map(|k| (k / 1024).to_string()).unwrap_or("?".into());
    Ok(format!(
        "heap shrunk before the dump: RSS {} → {} MiB in {} ms (free ratios {SHRINK_MIN_FREE}/{SHRINK_MAX_FREE} for a full GC, then back to {min}/{max}; native heap trimmed)",
        mib(before),
        mib(rss_kib(pid)),
        t.elapsed().as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_heap_free_ratios_and_orders_the_flags() {
        let flags = "     bool UseG1GC                                  = true      {product} {ergonomic}\n    uintx MaxHeapFreeRatio                         = 70                                     {manageable} {default}\n    uintx MinHeapFreeRatio                         = 40                                     {manageable} {default}\n";
        assert_eq!(heap_free_ratios(flags), Some((40, 70)));
        assert_eq!(heap_free_ratios("uintx MinHeapFreeRatio = 40\n"), None);
        // Lowering: Min before Max; raising back: Max before Min.
        let s = shrink_script();
        assert!(s.find("MinHeapFreeRatio 5").unwrap() < s.find("MaxHeapFreeRatio 10").unwrap());
        assert!(s.ends_with("GC.run\n"));
        let r = restore_script(40, 70);
        assert!(r.find("MaxHeapFreeRatio 70").unwrap() < r.find("MinHeapFreeRatio 40").unwrap());
        assert!(r.ends_with("System.trim_native_heap\n"));
    }
}
