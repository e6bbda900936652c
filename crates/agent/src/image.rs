//! Checkpoint images on the shared volume: `metadata.json`, integrity (sizes and sha256),
//! checks against the restoring host, atomic publication, pruning, and the in-use lock.
//!
//! Layout: `<image dir>/<checkpoint id>/` is a published image. `.tmp-<id>-<rand>` is one being
//! written (never read by restore), `.old-…`/`.trash-…` are being removed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crac_api::agent::METADATA_FILE;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Failure, reason};
use crate::sys;

/// Bump when the layout or the meaning of a field changes; restore refuses other formats.
pub const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

/// A file outside the image that the checkpointed JVM had mapped (the `java` launcher,
/// `libjvm.so`): restore needs the same one at the same path.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HostFile {
    pub path: String,
    pub size: u64,
}

/// A pipe the JVM wrote its stdout or stderr to, by inode: restore hands CRIU the new pipe
/// for it (`--inherit-fd fd[N]:pipe:[inode]`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StdioPipe {
    pub fd: i32,
    pub inode: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub format: u32,
    pub checkpoint_id: String,
    pub engine: String,
    pub agent_version: String,
    /// RFC 3339.
    pub created_at: String,
    pub created_unix: u64,
    pub arch: String,
    pub kernel: String,
    /// Instruction-set extensions of the checkpointing CPU that a JIT may have used: restore
    /// needs every one of them.
    pub cpu_flags: Vec<String>,
    pub jdk: Option<String>,
    pub java_home: Option<String>,
    pub criu_version: Option<String>,
    /// The dumped JVM's pid and every thread and process id in its tree (restore needs them free).
    pub root_pid: i32,
    pub pids: Vec<i32>,
    pub stdio_pipes: Vec<StdioPipe>,
    pub host_files: Vec<HostFile>,
    pub command: Vec<String>,
    pub ready_ms: u64,
    pub warmup_ms: u64,
    pub dump_ms: u64,
    pub total_bytes: u64,
    /// Every file of the image except metadata.json, by name.
    pub files: BTreeMap<String, FileEntry>,
}

/// What restore compares the metadata against.
#[derive(Clone, Debug, Default)]
pub struct HostInfo {
    pub arch: String,
    pub cpu_flags: BTreeSet<String>,
}

/// Flags HotSpot (and C2/Graal JIT code) may use on x86-64, as `/proc/cpuinfo` names them.
/// Others (virtualisation, power management, bug flags) do not matter to a restored JVM.
const X86_ISA_FLAGS: &[&str] = &[
    "cmov",
    "cx8",
    "cx16",
    "fxsr",
    "mmx",
    "sse",
    "sse2",
    "pni",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "popcnt",
    "abm",
    "lzcnt",
    "avx",
    "avx2",
    "f16c",
    "fma",
    "bmi1",
    "bmi2",
    "adx",
    "aes",
    "pclmulqdq",
    "vpclmulqdq",
    "vaes",
    "gfni",
    "sha_ni",
    "erms",
    "fsrm",
    "rtm",
    "hle",
    "movbe",
    "rdrand",
    "rdseed",
    "clflushopt",
    "clwb",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "serialize",
    "xsave",
    "xsaveopt",
    "xsavec",
    "apx",
];

/// ISA flags from `/proc/cpuinfo` text: on x86-64 the ones in [`X86_ISA_FLAGS`]; elsewhere
/// (aarch64's `Features:` line) all of them.
pub fn cpu_flags_from_cpuinfo(cpuinfo: &str, arch: &str) -> BTreeSet<String> {
    let line = cpuinfo
        .lines()
        .find(|l| {
            let key = l.split(':').next().unwrap_or("").trim();
            key == "flags" || key == "Features"
        })
        .and_then(|l| l.split_once(':').map(|(_, v)| v))
        .unwrap_or("");
    line.split_whitespace()
        .filter(|f| arch != "x86_64" || X86_ISA_FLAGS.contains(f))
        .map(str::to_string)
        .collect()
}

pub fn host_info() -> HostInfo {
    let arch = std::env::consts::ARCH.to_string();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    HostInfo {
        cpu_flags: cpu_flags_from_cpuinfo(&cpuinfo, &arch),
        arch,
    }
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Checks that this host can run the image: format, id, engine, architecture, CPU features.
pub fn verify_host(
    meta: &Metadata,
    host: &HostInfo,
    want_id: &str,
    want_engine: &str,
) -> Result<(), Failure> {
    let mismatch = |m: String| Err(Failure::new(reason::METADATA_MISMATCH, m));
    if meta.format != FORMAT {
        return mismatch(format!(
            "image format {} is not {FORMAT}: checkpoint again with this agent",
            meta.format
        ));
    }
    if meta.checkpoint_id != want_id {
        return mismatch(format!(
            "image holds checkpoint {:?}, this pod wants {want_id:?}: the image directory is mixed up",
            meta.checkpoint_id
        ));
    }
    if meta.engine != want_engine {
        return mismatch(format!(
            "image was made by engine {}, this pod uses {want_engine}",
            meta.engine
        ));
    }
    if meta.arch != host.arch {
        return mismatch(format!(
            "image is for {}, this node is {}: schedule restore pods on {} nodes (nodeSelector kubernetes.io/arch)",
            meta.arch, host.arch, meta.arch
        ));
    }
    let missing: Vec<&str> = meta
        .cpu_flags
        .iter()
        .filter(|f| !host.cpu_flags.contains(*f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(Failure::new(
            reason::CPU_FEATURES_MISSING,
            format!(
                "this node's CPU lacks {} that the checkpointing CPU had: restore on nodes like the one that checkpointed (node affinity), or checkpoint on the oldest CPU model",
                missing.join(",")
            ),
        ));
    }
    Ok(())
}

/// Checks the JDK files the JVM had mapped are at the same paths with the same sizes.
pub fn verify_host_files(meta: &Metadata) -> Result<(), Failure> {
    for hf in &meta.host_files {
        match fs::metadata(&hf.path) {
            Ok(m) if m.len() == hf.size => {}
            Ok(m) => {
                return Err(Failure::new(
                    reason::METADATA_MISMATCH,
                    format!(
                        "{} is {} bytes here but was {} at checkpoint: the container image changed (another JDK?); restore needs the same image",
                        hf.path,
                        m.len(),
                        hf.size
                    ),
                ));
            }
            Err(e) => {
                return Err(Failure::new(
                    reason::METADATA_MISMATCH,
                    format!(
                        "{} ({e}): the container image is not the one that was checkpointed",
                        hf.path
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Names of the regular files in `dir`, except metadata.json. Sub-directories are an error
/// (CRIU and CRaC write flat images).
fn image_file_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == METADATA_FILE {
            continue;
        }
        if !e.file_type()?.is_file() {
            return Err(io::Error::other(format!("{name} is not a regular file")));
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Sizes and sha256 of every file in `dir`, hashed on two threads (the pages file dominates).
pub fn hash_dir(dir: &Path) -> io::Result<BTreeMap<String, FileEntry>> {
    let names = image_file_names(dir)?;
    let mut sized: Vec<(String, u64)> = names
        .into_iter()
        .map(|n| {
            let len = fs::metadata(dir.join(&n))?.len();
            Ok((n, len))
        })
        .collect::<io::Result<_>>()?;
    // Largest first, dealt to two workers greedily.
    sized.sort_by_key(|item| std::cmp::Reverse(item.1));
    let mut lanes: [Vec<(String, u64)>; 2] = [Vec::new(), Vec::new()];
    let mut load = [0u64; 2];
    for item in sized {
        let i = if load[0] <= load[1] { 0 } else { 1 };
        load[i] += item.1;
        lanes[i].push(item);
    }
    let [lane0, lane1] = lanes;
    let hash_lane = |lane: Vec<(String, u64)>| -> io::Result<Vec<(String, FileEntry)>> {
        lane.into_iter()
            .map(|(n, size)| {
                Ok((
                    n.clone(),
                    FileEntry {
                        size,
                        sha256: sha256_file(&dir.join(&n))?,
                    },
                ))
            })
            .collect()
    };
    let (r0, r1) = std::thread::scope(|s| {
        let h = s.spawn(|| hash_lane(lane1));
        let r0 = hash_lane(lane0);
        (
            r0,
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("hash thread panicked"))),
        )
    });
    Ok(r0?.into_iter().chain(r1?).collect())
}

/// Compares the files in `dir` with what the metadata lists: the same names, sizes and hashes.
pub fn verify_files(dir: &Path, meta: &Metadata) -> Result<(), Failure> {
    let corrupt = |m: String| Failure::new(reason::IMAGE_CORRUPT, m);
    let names = image_file_names(dir)
        .map_err(|e| corrupt(format!("cannot list {}: {e}", dir.display())))?;
    let listed: BTreeSet<&String> = meta.files.keys().collect();
    let present: BTreeSet<&String> = names.iter().collect();
    if let Some(missing) = listed.difference(&present).next() {
        return Err(corrupt(format!(
            "image file {missing} is missing: checkpoint again"
        )));
    }
    if let Some(extra) = present.difference(&listed).next() {
        return Err(corrupt(format!(
            "image has an unlisted file {extra}: checkpoint again"
        )));
    }
    for (name, want) in &meta.files {
        let len = fs::metadata(dir.join(name))
            .map(|m| m.len())
            .unwrap_or(u64::MAX);
        if len != want.size {
            return Err(corrupt(format!(
                "image file {name} is {len} bytes, metadata says {}: the image is damaged; checkpoint again",
                want.size
            )));
        }
    }
    let actual = hash_dir(dir).map_err(|e| corrupt(format!("cannot read image: {e}")))?;
    for (name, want) in &meta.files {
        if actual.get(name).map(|e| &e.sha256) != Some(&want.sha256) {
            return Err(corrupt(format!(
                "image file {name} does not match its sha256: the image is damaged; checkpoint again"
            )));
        }
    }
    Ok(())
}

/// Parses metadata.json text.
pub fn parse_metadata(text: &str) -> Result<Metadata, Failure> {
    serde_json::from_str(text).map_err(|e| {
        Failure::new(
            reason::METADATA_MISMATCH,
            format!("{METADATA_FILE} is not valid: {e}"),
        )
    })
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A short random-enough suffix for temporary names (pid and clock; no RNG crate needed).
pub fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// Writes `meta` into `tmp`, syncs every file and the directory.
pub fn write_metadata(tmp: &Path, meta: &Metadata) -> io::Result<()> {
    let text = serde_json::to_string_pretty(meta).map_err(io::Error::other)?;
    fs::write(tmp.join(METADATA_FILE), text)?;
    for e in fs::read_dir(tmp)? {
        File::open(e?.path())?.sync_all()?;
    }
    fsync_dir(tmp)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    New,
    /// An image with this id existed; it was not in use and was replaced.
    Replaced,
    /// An image with this id existed and a running pod restored from it: it was kept and the
    /// new one discarded (a checkpoint never overwrites an image in use).
    KeptInUse,
}

/// Publishes `tmp` as `<image_dir>/<id>` by rename.
pub fn publish(image_dir: &Path, tmp: &Path, id: &str) -> Result<Published, Failure> {
    let fail = |m: String| Failure::new(reason::PUBLISH_FAILED, m);
    let dest = image_dir.join(id);
    let mut outcome = Published::New;
    if dest.exists() {
        let meta_path = dest.join(METADATA_FILE);
        let lock = File::open(&meta_path).ok();
        let free = match &lock {
            Some(f) => sys::flock(f, true, true).unwrap_or(false),
            None => true,
        };
        if !free {
            let _ = fs::remove_dir_all(tmp);
            return Ok(Published::KeptInUse);
        }
        let old = image_dir.join(format!(".old-{id}-{}", unique_suffix()));
        fs::rename(&dest, &old)
            .map_err(|e| fail(format!("cannot move the previous image aside: {e}")))?;
        fs::rename(tmp, &dest)
            .map_err(|e| fail(format!("cannot rename {} to {id}: {e}", tmp.display())))?;
        drop(lock);
        let _ = fs::remove_dir_all(&old);
        outcome = Published::Replaced;
    } else {
        fs::rename(tmp, &dest)
            .map_err(|e| fail(format!("cannot rename {} to {id}: {e}", tmp.display())))?;
    }
    fsync_dir(image_dir).map_err(|e| fail(format!("cannot sync {}: {e}", image_dir.display())))?;
    Ok(outcome)
}

/// A published image found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    pub id: String,
    pub created_unix: u64,
}

/// Which images to prune: all but the newest `retain`, never `keep` (the one just published).
pub fn select_prunable(images: &[ImageEntry], retain: usize, keep: &str) -> Vec<String> {
    let mut sorted: Vec<&ImageEntry> = images.iter().collect();
    sorted.sort_by(|a, b| {
        b.created_unix
            .cmp(&a.created_unix)
            .then_with(|| b.id.cmp(&a.id))
    });
    let mut kept = 0;
    let mut prune = Vec::new();
    // The image being published always counts as kept.
    if images.iter().any(|i| i.id == keep) {
        kept += 1;
    }
    for img in sorted {
        if img.id == keep {
            continue;
        }
        if kept < retain {
            kept += 1;
        } else {
            prune.push(img.id.clone());
        }
    }
    prune
}

pub fn list_images(image_dir: &Path) -> Vec<ImageEntry> {
    let Ok(rd) = fs::read_dir(image_dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let e = e.ok()?;
        let id = e.file_name().to_string_lossy().into_owned();
        if id.starts_with('.') || !e.file_type().ok()?.is_dir() {
            return None;
        }
        let meta_path = e.path().join(METADATA_FILE);
        let created_unix = fs::read_to_string(&meta_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Metadata>(&t).ok())
            .map(|m| m.created_unix)
            .or_else(|| {
                fs::metadata(&meta_path)
                    .ok()
                    .map(|m| m.mtime().max(0) as u64)
            })?;
        Some(ImageEntry { id, created_unix })
    })
    .collect()
}

/// What pruning did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub removed: Vec<String>,
    pub in_use: Vec<String>,
}

/// Removes images beyond `retain` that no running pod holds, and leftovers of earlier runs.
pub fn prune(image_dir: &Path, retain: usize, keep: &str) -> PruneReport {
    let mut report = PruneReport::default();
    for id in select_prunable(&list_images(image_dir), retain, keep) {
        let dir = image_dir.join(&id);
        let Ok(lock) = File::open(dir.join(METADATA_FILE)) else {
            continue;
        };
        if !sys::flock(&lock, true, true).unwrap_or(false) {
            report.in_use.push(id);
            continue;
        }
        let trash = image_dir.join(format!(".trash-{id}-{}", unique_suffix()));
        if fs::rename(&dir, &trash).is_ok() {
            drop(lock);
            let _ = fs::remove_dir_all(&trash);
            report.removed.push(id);
        }
    }
    // Leftovers: .old/.trash always; .tmp only when clearly abandoned (a day old).
    if let Ok(rd) = fs::read_dir(image_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale_tmp = name.starts_with(".tmp-")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(86_400));
            if name.starts_with(".old-") || name.starts_with(".trash-") || stale_tmp {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if !report.removed.is_empty() {
        let _ = fsync_dir(image_dir);
    }
    report
}

/// An image this pod restored from, locked shared for as long as the JVM runs, so that no
/// checkpoint replaces it and no prune removes it.
pub struct ImageLock {
    _file: File,
}

/// Opens and share-locks `<dir>/metadata.json`, returning its text. Retries if the image was
/// replaced between the open and the lock.
pub fn lock_and_read(dir: &Path) -> Result<(ImageLock, String), Failure> {
    let path: PathBuf = dir.join(METADATA_FILE);
    for _ in 0..5 {
        let file = File::open(&path).map_err(|e| {
            Failure::new(
                reason::IMAGE_MISSING,
                format!(
                    "no image at {} ({e}): the checkpoint job has not published it yet",
                    dir.display()
                ),
            )
        })?;
        sys::flock(&file, false, false).map_err(|e| {
            Failure::new(
                reason::IMAGE_MISSING,
                format!("cannot lock {}: {e}", path.display()),
            )
        })?;
        let same = match (file.metadata(), fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if !same {
            continue;
        }
        let text = fs::read_to_string(&path).map_err(|e| {
            Failure::new(
                reason::IMAGE_CORRUPT,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        return Ok((ImageLock { _file: file }, text));
    }
    Err(Failure::new(
        reason::IMAGE_MISSING,
        format!(
            "{} keeps changing: a checkpoint is replacing it",
            dir.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            format: FORMAT,
            checkpoint_id: "abc".into(),
            engine: "criu".into(),
            arch: "x86_64".into(),
            cpu_flags: vec!["avx2".into(), "sse4_2".into()],
            ..Default::default()
        }
    }

    fn host(flags: &[&str]) -> HostInfo {
        HostInfo {
            arch: "x86_64".into(),
            cpu_flags: flags.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn host_checks() {
        let m = meta();
        assert!(verify_host(&m, &host(&["avx2", "sse4_2", "avx512f"]), "abc", "criu").is_ok());
        let e = verify_host(&m, &host(&["sse4_2"]), "abc", "criu").unwrap_err();
        assert_eq!(e.reason, reason::CPU_FEATURES_MISSING);
        assert!(e.message.contains("avx2"), "{}", e.message);
        assert_eq!(
            verify_host(&m, &host(&["avx2", "sse4_2"]), "xyz", "criu")
                .unwrap_err()
                .reason,
            reason::METADATA_MISMATCH
        );
        assert_eq!(
            verify_host(&m, &host(&["avx2", "sse4_2"]), "abc", "crac")
                .unwrap_err()
                .reason,
            reason::METADATA_MISMATCH
        );
        let mut arm = host(&["avx2", "sse4_2"]);
        arm.arch = "aarch64".into();
        let e = verify_host(&m, &arm, "abc", "criu").unwrap_err();
        assert_eq!(e.reason, reason::METADATA_MISMATCH);
        assert!(e.message.contains("aarch64"));
        let mut old = meta();
        old.format = 0;
        assert_eq!(
            verify_host(&old, &host(&["avx2", "sse4_2"]), "abc", "criu")
                .unwrap_err()
                .reason,
            reason::METADATA_MISMATCH
        );
    }

    #[test]
    fn cpu_flags_keep_isa_extensions_only() {
        let info = "processor\t: 0\nflags\t\t: fpu vme sse sse2 avx2 hypervisor sha_ni avx512f bugs_x\nbugs\t: spectre\n";
        let f = cpu_flags_from_cpuinfo(info, "x86_64");
        assert_eq!(
            f.into_iter().collect::<Vec<_>>(),
            vec!["avx2", "avx512f", "sha_ni", "sse", "sse2"]
        );
        let arm = "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n";
        assert_eq!(cpu_flags_from_cpuinfo(arm, "aarch64").len(), 5);
    }

    #[test]
    fn prune_selection() {
        let imgs: Vec<ImageEntry> = [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
            .iter()
            .map(|(id, t)| ImageEntry {
                id: id.to_string(),
                created_unix: *t,
            })
            .collect();
        assert_eq!(select_prunable(&imgs, 2, "d"), vec!["b", "a"]);
        // The image being published is kept even when it is not the newest.
        assert_eq!(select_prunable(&imgs, 2, "a"), vec!["c", "b"]);
        assert_eq!(select_prunable(&imgs, 1, "b"), vec!["d", "c", "a"]);
        assert!(select_prunable(&imgs, 10, "d").is_empty());
        assert_eq!(select_prunable(&imgs, 0, "d").len(), 3);
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("crac-agent-unit-{name}-{}", unique_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_verify_and_detect_damage() {
        let d = tempdir("verify");
        fs::write(d.join("pages-1.img"), vec![7u8; 100_000]).unwrap();
        fs::write(d.join("core-201.img"), b"core").unwrap();
        let mut m = meta();
        m.files = hash_dir(&d).unwrap();
        assert_eq!(m.files["core-201.img"].size, 4);
        write_metadata(&d, &m).unwrap();
        assert!(verify_files(&d, &m).is_ok());

        // Same size, one byte changed.
        let mut bytes = fs::read(d.join("pages-1.img")).unwrap();
        bytes[50_000] ^= 1;
        fs::write(d.join("pages-1.img"), &bytes).unwrap();
        let e = verify_files(&d, &m).unwrap_err();
        assert_eq!(e.reason, reason::IMAGE_CORRUPT);
        assert!(
            e.message.contains("pages-1.img") && e.message.contains("sha256"),
            "{}",
            e.message
        );

        bytes[50_000] ^= 1;
        bytes.truncate(10);
        fs::write(d.join("pages-1.img"), &bytes).unwrap();
        assert!(verify_files(&d, &m).unwrap_err().message.contains("bytes"));

        fs::remove_file(d.join("pages-1.img")).unwrap();
        assert!(
            verify_files(&d, &m)
                .unwrap_err()
                .message
                .contains("missing")
        );
        fs::write(d.join("pages-1.img"), vec![7u8; 100_000]).unwrap();
        fs::write(d.join("extra.img"), b"x").unwrap();
        assert!(
            verify_files(&d, &m)
                .unwrap_err()
                .message
                .contains("unlisted")
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn publish_prune_and_locks() {
        let root = tempdir("publish");
        let mk = |id: &str, t: u64| {
            let tmp = root.join(format!(".tmp-{id}-x"));
            fs::create_dir_all(&tmp).unwrap();
            fs::write(tmp.join("a.img"), id).unwrap();
            let mut m = meta();
            m.checkpoint_id = id.into();
            m.created_unix = t;
            m.files = hash_dir(&tmp).unwrap();
            write_metadata(&tmp, &m).unwrap();
            publish(&root, &tmp, id).unwrap()
        };
        assert_eq!(mk("one", 1), Published::New);
        assert_eq!(mk("two", 2), Published::New);
        // A restoring pod holds "one".
        let (lock, text) = lock_and_read(&root.join("one")).unwrap();
        assert_eq!(parse_metadata(&text).unwrap().checkpoint_id, "one");
        // Re-checkpointing an in-use id keeps the old image.
        assert_eq!(mk("one", 5), Published::KeptInUse);
        assert_eq!(
            parse_metadata(&fs::read_to_string(root.join("one/metadata.json")).unwrap())
                .unwrap()
                .created_unix,
            1
        );
        assert_eq!(mk("three", 3), Published::New);
        let r = prune(&root, 1, "three");
        assert_eq!(r.removed, vec!["two"]);
        assert_eq!(r.in_use, vec!["one"]);
        drop(lock);
        assert_eq!(mk("two", 2), Published::New);
        let r = prune(&root, 1, "three");
        assert_eq!(r.removed.len(), 2);
        assert_eq!(
            list_images(&root),
            vec![ImageEntry {
                id: "three".into(),
                created_unix: 3
            }]
        );
        // Not in use any more: replaced.
        assert_eq!(mk("three", 4), Published::Replaced);
        let left: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["three"]);
        assert!(
            matches!(lock_and_read(&root.join("nope")), Err(f) if f.reason == reason::IMAGE_MISSING)
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
