//! Checkpoint images on the shared volume: `metadata.json`, integrity (sizes and sha256),
//! checks against the restoring host, atomic publication, pruning, and the in-use lock.
//!
//! Layout: `<image dir>/<checkpoint id>/` is a published image. `.tmp-<id>-<rand>` is one being
//! written (never read by restore), locked by its writer through [`TMP_LOCK_FILE`] inside it;
//! `.old-…`/`.trash-…` are being removed.
//!
//! Trust: the volume may be shared with other apps, so `metadata.json` beside the files proves
//! nothing by itself. The image's digest is `sha256:` + the sha256 of the exact bytes of its
//! `metadata.json`, which lists every file's size and sha256; the checkpoint reports it, the
//! operator records it and gives it back to restore pods, and restore uses an image only if its
//! metadata hashes to it and its files match that metadata.
//!
//! Images hold the JVM's memory (secrets included): image directories are 0700 and their files
//! 0600.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crac_api::agent::METADATA_FILE;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Failure, reason};
use crate::sys;

/// Bump when the layout or the meaning of a field changes; restore refuses other formats.
pub const FORMAT: u32 = 1;

/// Mode of image directories (the app's and each image's): the owner only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file of an image, metadata.json included.
pub const FILE_MODE: u32 = 0o600;

/// metadata.json lists a few hundred files and pids at most; anything far bigger is not ours.
const MAX_METADATA_BYTES: u64 = 16 << 20;

/// The file inside a `.tmp-…` directory that its checkpoint holds an exclusive `flock` on for
/// as long as it writes the directory. The lock goes when the process does, however it ends:
/// a `.tmp-…` whose lock prune can take was abandoned. Never part of an image (not hashed,
/// removed just before publication).
pub const TMP_LOCK_FILE: &str = ".agent.lock";

/// The least time a `.tmp-…` directory without a lock file must have gone unchanged before
/// prune removes it. Such a directory is either an older agent's (which took no lock) or one
/// in the instant between its creation and its lock.
pub const UNLOCKED_TMP_MIN_AGE: Duration = Duration::from_secs(60);

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
    /// The CracApp's `metadata.generation` the checkpoint was taken for
    /// (`CRAC_SPEC_GENERATION`): images of newer specs have greater ones, and a checkpoint's
    /// prune never removes one greater than its own. 0 in images of agents that did not
    /// record it.
    #[serde(default)]
    pub spec_generation: u64,
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

/// Opens a file of an image for reading: not through a symlink, never blocking on a FIFO,
/// and only if it is a regular file (another app sharing the volume may have put anything
/// there).
fn open_regular(path: &Path) -> io::Result<File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = open_regular(path)?;
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

/// The digest of an image: `sha256:` + the hex sha256 of its metadata.json's bytes.
pub fn digest_of(metadata_bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(metadata_bytes)))
}

/// Whether `s` is a digest as [`digest_of`] writes it: `sha256:` and 64 lowercase hex digits.
pub fn valid_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The digest restore must find (`CRAC_IMAGE_DIGEST`): refused when missing or malformed.
pub fn expected_digest(given: Option<&str>) -> Result<&str, Failure> {
    match given {
        None => Err(Failure::new(
            reason::IMAGE_NOT_TRUSTED,
            format!(
                "no image digest was given ({}): the agent restores only an image the operator recorded at checkpoint; use the operator's agent image and release together, or checkpoint again",
                crac_api::agent::ENV_IMAGE_DIGEST
            ),
        )),
        Some(d) if !valid_digest(d) => Err(Failure::new(
            reason::IMAGE_NOT_TRUSTED,
            format!(
                "the image digest given ({}={:?}) is not sha256:<64 lowercase hex>: checkpoint again",
                crac_api::agent::ENV_IMAGE_DIGEST,
                d.chars().take(80).collect::<String>()
            ),
        )),
        Some(d) => Ok(d),
    }
}

/// Checks that `metadata_bytes` (read once, and parsed afterwards from these same bytes) are
/// the ones whose digest the operator recorded.
pub fn verify_digest(metadata_bytes: &[u8], want: &str) -> Result<(), Failure> {
    let got = digest_of(metadata_bytes);
    if got != want {
        return Err(Failure::new(
            reason::IMAGE_NOT_TRUSTED,
            format!(
                "the image does not match the digest the operator recorded at checkpoint ({METADATA_FILE} hashes to {got}, not {want}): it was changed after it was published; checkpoint again"
            ),
        ));
    }
    Ok(())
}

/// Names of the regular files in `dir`, except metadata.json and the lock of a directory being
/// written ([`TMP_LOCK_FILE`]). Sub-directories are an error
/// (CRIU and CRaC write flat images).
fn image_file_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == METADATA_FILE || name == TMP_LOCK_FILE {
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

/// Creates `dir` and its missing parents with mode 0700 (existing ones are left as they are:
/// the app's directory may be a volume's sub-path someone else made).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Creates one new directory (not its parents), mode exactly 0700 whatever the umask.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(DIR_MODE).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

/// Sets the modes of an image being written: the directory 0700 and every file 0600, whatever
/// CRIU or the JVM created them with. Anything but regular files is an error.
pub fn seal_modes(dir: &Path) -> io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    let mut names = image_file_names(dir)?;
    if dir.join(METADATA_FILE).exists() {
        names.push(METADATA_FILE.to_string());
    }
    for n in names {
        open_regular(&dir.join(&n))?.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

/// Sizes and sha256 of every file in `dir`, hashed on two threads (the pages file dominates).
pub fn hash_dir(dir: &Path) -> io::Result<BTreeMap<String, FileEntry>> {
    hash_files(dir, image_file_names(dir)?)
}

/// Sizes and sha256 of the files `names` in `dir`, hashed on two threads.
fn hash_files(dir: &Path, names: Vec<String>) -> io::Result<BTreeMap<String, FileEntry>> {
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
    verify_listing(dir, meta)?;
    verify_hashes(dir, meta, |_| true)
}

/// Whether an image file holds page data: raw memory that CRIU copies into the restored
/// process and never parses (`pages-<n>.img`). Every other file is parsed by CRIU.
pub fn is_page_data(name: &str) -> bool {
    name.strip_prefix("pages-")
        .and_then(|r| r.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The first half of [`verify_files`]: the files in `dir` are those the metadata lists, with
/// their sizes (no hashing).
pub fn verify_listing(dir: &Path, meta: &Metadata) -> Result<(), Failure> {
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
    Ok(())
}

/// The second half of [`verify_files`]: the listed files that `which` picks hash to what the
/// metadata says (run [`verify_listing`] first).
pub fn verify_hashes(
    dir: &Path,
    meta: &Metadata,
    which: impl Fn(&str) -> bool,
) -> Result<(), Failure> {
    let corrupt = |m: String| Failure::new(reason::IMAGE_CORRUPT, m);
    let names: Vec<String> = meta.files.keys().filter(|n| which(n)).cloned().collect();
    let actual = hash_files(dir, names).map_err(|e| corrupt(format!("cannot read image: {e}")))?;
    for (name, want) in meta.files.iter().filter(|(n, _)| which(n)) {
        if actual.get(name).map(|e| &e.sha256) != Some(&want.sha256) {
            return Err(corrupt(format!(
                "image file {name} does not match its sha256: the image is damaged; checkpoint again"
            )));
        }
    }
    Ok(())
}

/// Parses metadata.json's bytes.
pub fn parse_metadata(bytes: &[u8]) -> Result<Metadata, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
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

/// A checkpoint's image directory while it is written: `<image dir>/.tmp-<id>-<rand>`, 0700,
/// locked ([`TMP_LOCK_FILE`]) for as long as this value lives, and removed when it is dropped
/// unless [`TmpImage::keep`] was called (it was published).
pub struct TmpImage {
    path: PathBuf,
    _lock: File,
    remove_on_drop: bool,
}

impl TmpImage {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory was published (renamed away) or removed by [`publish`]: leave it.
    pub fn keep(&mut self) {
        self.remove_on_drop = false;
    }
}

impl Drop for TmpImage {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Creates and locks a new `.tmp-<id>-<rand>` directory in `image_dir`.
pub fn create_tmp_image(image_dir: &Path, id: &str) -> io::Result<TmpImage> {
    let path = image_dir.join(format!(".tmp-{id}-{}", unique_suffix()));
    // 0700 before CRIU or the JVM writes the process's memory into it.
    create_private_dir(&path)?;
    let locked = (|| {
        // Locked under another name, then renamed: a prune never finds the lock file unlocked
        // while its writer lives (until the rename, the directory has no lock file and is
        // protected by its age, UNLOCKED_TMP_MIN_AGE).
        let pending = path.join(format!("{TMP_LOCK_FILE}.new"));
        let lock = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&pending)?;
        if !sys::flock(&lock, true, true)? {
            return Err(io::Error::other("a new lock file is already locked"));
        }
        fs::rename(&pending, path.join(TMP_LOCK_FILE))?;
        Ok(lock)
    })();
    match locked {
        Ok(lock) => Ok(TmpImage {
            path,
            _lock: lock,
            remove_on_drop: true,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&path);
            Err(e)
        }
    }
}

/// Whether prune may remove the `.tmp-…` directory `dir`. One with a lock file: when the lock
/// can be taken (no live process writes it), whatever its age; the lock is returned, to be
/// held while it is removed. One without (an older agent's, or one being created): when
/// neither it nor anything in it changed for `unlocked_min_age`. `None`: keep it.
fn abandoned_tmp(dir: &Path, unlocked_min_age: Duration) -> Option<Option<File>> {
    match open_regular(&dir.join(TMP_LOCK_FILE)) {
        Ok(lock) => match sys::flock(&lock, true, true) {
            Ok(true) => return Some(Some(lock)),
            Ok(false) => return None,
            // A filesystem that cannot lock: judge it by its age as if it had no lock.
            Err(_) => {}
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Not a regular file, or unreadable: not one of ours to judge by its lock.
        Err(_) => {}
    }
    let newest = unchanged_for(dir)?;
    (newest >= unlocked_min_age).then_some(None)
}

/// How long ago `dir` or any entry in it last changed (its mtime; not following symlinks).
fn unchanged_for(dir: &Path) -> Option<Duration> {
    let mut newest = fs::symlink_metadata(dir).ok()?.modified().ok()?;
    for e in fs::read_dir(dir).ok()? {
        let modified = e.ok()?.metadata().ok()?.modified().ok()?;
        newest = newest.max(modified);
    }
    // A time in the future (a skewed clock that wrote it) counts as just now.
    Some(newest.elapsed().unwrap_or(Duration::ZERO))
}

/// Writes `meta` into `tmp` as a new file of mode 0600, syncs every file and the directory,
/// and returns the bytes written: the image's digest is theirs ([`digest_of`]).
pub fn write_metadata(tmp: &Path, meta: &Metadata) -> io::Result<Vec<u8>> {
    let bytes = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(tmp.join(METADATA_FILE))?;
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    f.write_all(&bytes)?;
    drop(f);
    for e in fs::read_dir(tmp)? {
        File::open(e?.path())?.sync_all()?;
    }
    fsync_dir(tmp)?;
    Ok(bytes)
}

/// Reads an image's metadata.json (at most 16 MiB, a regular file, not through a symlink).
pub fn read_metadata_bytes(dir: &Path) -> io::Result<Vec<u8>> {
    read_bounded(open_regular(&dir.join(METADATA_FILE))?)
}

fn read_bounded(file: impl Read) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(MAX_METADATA_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        return Err(io::Error::other(format!(
            "{METADATA_FILE} is larger than {MAX_METADATA_BYTES} bytes"
        )));
    }
    Ok(bytes)
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

/// Publishes `tmp` as `<image_dir>/<id>` by rename. Its lock file is removed first (the
/// caller still holds the lock): an image never carries it.
pub fn publish(image_dir: &Path, tmp: &Path, id: &str) -> Result<Published, Failure> {
    let fail = |m: String| Failure::new(reason::PUBLISH_FAILED, m);
    let dest = image_dir.join(id);
    match fs::remove_file(tmp.join(TMP_LOCK_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(fail(format!(
                "cannot remove the lock of {}: {e}",
                tmp.display()
            )));
        }
        _ => {}
    }
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
    /// [`Metadata::spec_generation`]; 0 when the metadata does not say.
    pub spec_generation: u64,
}

/// Which images to prune: all but the newest `retain`, never `keep` (the one just published,
/// taken for spec generation `generation`), and never an image of a greater generation.
///
/// Newest is by spec generation first, then creation time: a checkpoint of a superseded spec
/// may finish after the newer spec's (its Job is deleted, but a pod being stopped may still
/// publish), and the operator may already restore from the newer image, which no restore pod
/// holds yet. A later checkpoint of the newer spec prunes the late one.
pub fn select_prunable(
    images: &[ImageEntry],
    retain: usize,
    keep: &str,
    generation: u64,
) -> Vec<String> {
    let mut sorted: Vec<&ImageEntry> = images.iter().collect();
    sorted.sort_by(|a, b| {
        (b.spec_generation, b.created_unix, &b.id).cmp(&(a.spec_generation, a.created_unix, &a.id))
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
        if kept < retain || img.spec_generation > generation {
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
        let (created_unix, spec_generation) = read_metadata_bytes(&e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Metadata>(&b).ok())
            .map(|m| (m.created_unix, m.spec_generation))
            .or_else(|| {
                fs::metadata(&meta_path)
                    .ok()
                    .map(|m| (m.mtime().max(0) as u64, 0))
            })?;
        Some(ImageEntry {
            id,
            created_unix,
            spec_generation,
        })
    })
    .collect()
}

/// What pruning did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub removed: Vec<String>,
    pub in_use: Vec<String>,
    /// `.tmp-…` directories of checkpoints that died before publishing.
    pub removed_tmp: Vec<String>,
}

/// Removes images beyond `retain` that no running pod holds, and leftovers of earlier runs:
/// `.old-…`/`.trash-…` always, `.tmp-…` when abandoned (whose lock can be taken; without a lock
/// file, unchanged for `unlocked_tmp_age`, at least [`UNLOCKED_TMP_MIN_AGE`]).
pub fn prune(
    image_dir: &Path,
    retain: usize,
    keep: &str,
    generation: u64,
    unlocked_tmp_age: Duration,
) -> PruneReport {
    let mut report = PruneReport::default();
    for id in select_prunable(&list_images(image_dir), retain, keep, generation) {
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
    let unlocked_tmp_age = unlocked_tmp_age.max(UNLOCKED_TMP_MIN_AGE);
    if let Ok(rd) = fs::read_dir(image_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".old-") || name.starts_with(".trash-") {
                let _ = fs::remove_dir_all(e.path());
            } else if name.starts_with(".tmp-")
                && e.file_type().is_ok_and(|t| t.is_dir())
                && let Some(lock) = abandoned_tmp(&e.path(), unlocked_tmp_age)
            {
                // Removed while holding its lock; then the lock goes with its file.
                let _ = fs::remove_dir_all(e.path());
                drop(lock);
                report.removed_tmp.push(name);
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

/// Opens and share-locks `<dir>/metadata.json`, returning its bytes, read once from the locked
/// file itself (the caller checks the digest of these bytes and parses these same bytes).
/// Retries if the image was replaced between the open and the lock. Reads only: restore pods
/// mount the volume read-only.
pub fn lock_and_read(dir: &Path) -> Result<(ImageLock, Vec<u8>), Failure> {
    let path: PathBuf = dir.join(METADATA_FILE);
    for _ in 0..5 {
        let file = open_regular(&path).map_err(|e| {
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
        let bytes = read_bounded(&file).map_err(|e| {
            Failure::new(
                reason::IMAGE_CORRUPT,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        return Ok((ImageLock { _file: file }, bytes));
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

    #[test]
    fn only_pages_files_are_page_data() {
        assert!(is_page_data("pages-1.img") && is_page_data("pages-12.img"));
        for n in [
            "pagemap-201.img",
            "pages-.img",
            "pages-1.img.x",
            "xpages-1.img",
            "pages-a.img",
            "core-201.img",
            "criu.kdat",
        ] {
            assert!(!is_page_data(n), "{n}");
        }
    }

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
                spec_generation: 0,
            })
            .collect();
        assert_eq!(select_prunable(&imgs, 2, "d", 0), vec!["b", "a"]);
        // The image being published is kept even when it is not the newest.
        assert_eq!(select_prunable(&imgs, 2, "a", 0), vec!["c", "b"]);
        assert_eq!(select_prunable(&imgs, 1, "b", 0), vec!["d", "c", "a"]);
        assert!(select_prunable(&imgs, 10, "d", 0).is_empty());
        assert_eq!(select_prunable(&imgs, 0, "d", 0).len(), 3);
    }

    fn entries(images: &[(&str, u64, u64)]) -> Vec<ImageEntry> {
        images
            .iter()
            .map(|(id, generation, created)| ImageEntry {
                id: id.to_string(),
                created_unix: *created,
                spec_generation: *generation,
            })
            .collect()
    }

    #[test]
    fn prune_orders_by_spec_generation_and_spares_newer_specs_images() {
        // Issue 15: the checkpoint of spec 3 published "b"; the superseded checkpoint of spec 2
        // finishes later ("a", created after "b"). With retain 1 its prune must leave "b".
        let imgs = entries(&[("b", 3, 10), ("a", 2, 20)]);
        assert!(select_prunable(&imgs, 1, "a", 2).is_empty());
        // The next checkpoint of the newer spec removes the older spec's image, however new.
        let imgs = entries(&[("b", 3, 10), ("a", 2, 20), ("c", 3, 30)]);
        assert_eq!(select_prunable(&imgs, 1, "c", 3), vec!["b", "a"]);
        assert_eq!(select_prunable(&imgs, 2, "c", 3), vec!["a"]);
        // Newer specs' images are never removed, even beyond retain; they count as kept.
        let imgs = entries(&[
            ("p", 1, 1),
            ("q", 2, 2),
            ("me", 3, 3),
            ("r", 5, 0),
            ("s", 4, 9),
        ]);
        assert_eq!(select_prunable(&imgs, 1, "me", 3), vec!["q", "p"]);
        assert_eq!(select_prunable(&imgs, 4, "me", 3), vec!["p"]);
        // Images of agents that recorded no generation (0) are older than any that did.
        let imgs = entries(&[("x", 0, 100), ("y", 1, 5), ("z", 2, 6)]);
        assert_eq!(select_prunable(&imgs, 2, "z", 2), vec!["x"]);
        // Within one generation (a `kubectl crac checkpoint` refresh), the creation time.
        let imgs = entries(&[("old", 4, 1), ("new", 4, 2), ("me", 4, 3)]);
        assert_eq!(select_prunable(&imgs, 2, "me", 4), vec!["old"]);
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
    fn digests_are_strict() {
        let d = digest_of(b"{}");
        assert_eq!(
            d,
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert!(valid_digest(&d));
        assert_eq!(expected_digest(Some(&d)).unwrap(), d);
        for bad in [
            "",
            "sha256:",
            &d[7..],
            &d.to_uppercase(),
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha512:{}", &d[7..]),
            &format!("{d}0"),
            &d[..d.len() - 1],
            &format!(" {d}"),
            &format!("sha256:{}g", &d[7..70]),
        ] {
            assert!(!valid_digest(bad), "{bad:?} must be refused");
            let e = expected_digest(Some(bad)).unwrap_err();
            assert_eq!(e.reason, reason::IMAGE_NOT_TRUSTED);
        }
        let e = expected_digest(None).unwrap_err();
        assert_eq!(e.reason, reason::IMAGE_NOT_TRUSTED);
        assert!(e.message.contains("no image digest"), "{}", e.message);
    }

    #[test]
    fn digest_covers_every_file_through_the_metadata() {
        let d = tempdir("digest");
        fs::write(d.join("pages-1.img"), vec![7u8; 10_000]).unwrap();
        let mut m = meta();
        m.files = hash_dir(&d).unwrap();
        let written = write_metadata(&d, &m).unwrap();
        let digest = digest_of(&written);
        let (_lock, read) = lock_and_read(&d).unwrap();
        assert_eq!(read, written, "the bytes read are the bytes written");
        assert!(verify_digest(&read, &digest).is_ok());

        // Another app rewrites a file and the metadata consistently: the files match the
        // metadata, but the metadata no longer matches the digest.
        fs::write(d.join("pages-1.img"), vec![8u8; 10_000]).unwrap();
        m.files = hash_dir(&d).unwrap();
        fs::remove_file(d.join(METADATA_FILE)).unwrap();
        write_metadata(&d, &m).unwrap();
        let (_lock, forged) = lock_and_read(&d).unwrap();
        assert!(verify_files(&d, &parse_metadata(&forged).unwrap()).is_ok());
        let e = verify_digest(&forged, &digest).unwrap_err();
        assert_eq!(e.reason, reason::IMAGE_NOT_TRUSTED);
        assert!(e.message.contains("recorded"), "{}", e.message);
        // Even one byte of whitespace changes the digest.
        let mut spaced = written.clone();
        spaced.push(b' ');
        assert!(verify_digest(&spaced, &digest).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn images_are_private() {
        let root = tempdir("modes");
        let apps = root.join("apps/hello");
        create_private_dir_all(&apps).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&apps), 0o700);
        let tmp = apps.join(".tmp-x");
        create_private_dir(&tmp).unwrap();
        assert_eq!(mode(&tmp), 0o700);
        // As CRIU might leave them.
        fs::write(tmp.join("pages-1.img"), b"p").unwrap();
        fs::set_permissions(tmp.join("pages-1.img"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(tmp.join("dump.log"), b"l").unwrap();
        fs::set_permissions(tmp.join("dump.log"), fs::Permissions::from_mode(0o666)).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
        seal_modes(&tmp).unwrap();
        let mut m = meta();
        m.files = hash_dir(&tmp).unwrap();
        write_metadata(&tmp, &m).unwrap();
        assert_eq!(mode(&tmp), 0o700);
        for f in ["pages-1.img", "dump.log", METADATA_FILE] {
            assert_eq!(mode(&tmp.join(f)), 0o600, "{f}");
        }
        publish(&apps, &tmp, "one").unwrap();
        assert_eq!(mode(&apps.join("one")), 0o700);
        assert_eq!(mode(&apps.join("one").join(METADATA_FILE)), 0o600);
        // What was written is what the metadata says: no command line in it.
        let text = fs::read_to_string(apps.join("one").join(METADATA_FILE)).unwrap();
        assert!(!text.contains("\"command\""), "{text}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlinks_and_fifos_are_not_read() {
        let d = tempdir("links");
        let outside = d.join("outside.json");
        fs::write(&outside, b"{}").unwrap();
        let img = d.join("img");
        fs::create_dir(&img).unwrap();
        std::os::unix::fs::symlink(&outside, img.join(METADATA_FILE)).unwrap();
        assert!(lock_and_read(&img).is_err());
        fs::remove_file(img.join(METADATA_FILE)).unwrap();
        let st = std::process::Command::new("mkfifo")
            .arg(img.join(METADATA_FILE))
            .status()
            .unwrap();
        assert!(st.success());
        // Would block forever if opened as a plain read.
        assert!(lock_and_read(&img).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn publish_prune_and_locks() {
        let root = tempdir("publish");
        let mk = |id: &str, t: u64| publish_test_image(&root, id, t);
        assert_eq!(mk("one", 1), Published::New);
        assert_eq!(mk("two", 2), Published::New);
        // A restoring pod holds "one".
        let (lock, text) = lock_and_read(&root.join("one")).unwrap();
        assert_eq!(parse_metadata(&text).unwrap().checkpoint_id, "one");
        // Re-checkpointing an in-use id keeps the old image.
        assert_eq!(mk("one", 5), Published::KeptInUse);
        assert_eq!(
            parse_metadata(&fs::read(root.join("one/metadata.json")).unwrap())
                .unwrap()
                .created_unix,
            1
        );
        assert_eq!(mk("three", 3), Published::New);
        let r = prune(&root, 1, "three", 0, UNLOCKED_TMP_MIN_AGE);
        assert_eq!(r.removed, vec!["two"]);
        assert_eq!(r.in_use, vec!["one"]);
        drop(lock);
        assert_eq!(mk("two", 2), Published::New);
        let r = prune(&root, 1, "three", 0, UNLOCKED_TMP_MIN_AGE);
        assert_eq!(r.removed.len(), 2);
        assert_eq!(
            list_images(&root),
            vec![ImageEntry {
                id: "three".into(),
                created_unix: 3,
                spec_generation: 0,
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

    /// Writes an image as a checkpoint does, in a locked `.tmp-…`, and publishes it.
    fn publish_test_image(root: &Path, id: &str, created_unix: u64) -> Published {
        publish_test_image_of(root, id, created_unix, 0)
    }

    /// [`publish_test_image`] for the spec generation `generation`.
    fn publish_test_image_of(
        root: &Path,
        id: &str,
        created_unix: u64,
        generation: u64,
    ) -> Published {
        let mut tmp = create_tmp_image(root, id).unwrap();
        fs::write(tmp.path().join("a.img"), id).unwrap();
        let mut m = meta();
        m.checkpoint_id = id.into();
        m.created_unix = created_unix;
        m.spec_generation = generation;
        m.files = hash_dir(tmp.path()).unwrap();
        assert!(
            !m.files.contains_key(TMP_LOCK_FILE),
            "the lock is no image file"
        );
        write_metadata(tmp.path(), &m).unwrap();
        verify_files(tmp.path(), &m).unwrap();
        let published = publish(root, tmp.path(), id).unwrap();
        tmp.keep();
        published
    }

    #[test]
    fn a_late_checkpoint_of_a_superseded_spec_leaves_the_newer_specs_image() {
        let root = tempdir("generations");
        // Spec 2's checkpoint publishes first; the operator restores from it.
        assert_eq!(publish_test_image_of(&root, "new", 100, 2), Published::New);
        let published = fs::read(root.join("new").join(METADATA_FILE)).unwrap();
        // Spec 1's checkpoint, superseded but still running, publishes later and prunes with
        // retain 1. No restore pod holds "new" yet.
        assert_eq!(publish_test_image_of(&root, "old", 200, 1), Published::New);
        let r = prune(&root, 1, "old", 1, UNLOCKED_TMP_MIN_AGE);
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(
            fs::read(root.join("new").join(METADATA_FILE)).unwrap(),
            published,
            "the newer spec's image is untouched (its digest still holds)"
        );
        // The newer spec's next checkpoint removes the late one.
        assert_eq!(publish_test_image_of(&root, "next", 300, 3), Published::New);
        let mut r = prune(&root, 1, "next", 3, UNLOCKED_TMP_MIN_AGE).removed;
        r.sort();
        assert_eq!(r, vec!["new", "old"]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_image_without_a_spec_generation_counts_as_generation_zero() {
        let root = tempdir("no-generation");
        assert_eq!(
            publish_test_image_of(&root, "older-agent", 500, 0),
            Published::New
        );
        // As an agent that predates the field wrote it: no specGeneration key at all.
        let path = root.join("older-agent").join(METADATA_FILE);
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(
            json.as_object_mut()
                .unwrap()
                .remove("specGeneration")
                .is_some()
        );
        fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
        assert_eq!(
            parse_metadata(&fs::read(&path).unwrap())
                .unwrap()
                .spec_generation,
            0
        );
        assert_eq!(publish_test_image_of(&root, "mine", 10, 1), Published::New);
        let r = prune(&root, 1, "mine", 1, UNLOCKED_TMP_MIN_AGE);
        assert_eq!(r.removed, vec!["older-agent"], "older than generation 1");
        fs::remove_dir_all(&root).unwrap();
    }

    fn names(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn set_mtime(path: &Path, age: Duration) {
        File::open(path)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }

    /// A shell that locks `lock` exclusively and then sleeps holding it, as a live checkpoint
    /// in another pod would.
    fn hold_lock_in_another_process(lock: &Path) -> std::process::Child {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                r#"exec 9>"$1"; flock -x 9; echo locked; exec sleep 60"#,
                "sh",
            ])
            .arg(lock)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        io::BufRead::read_line(
            &mut io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "locked\n");
        child
    }

    #[test]
    fn abandoned_tmp_dirs_are_removed_at_once_and_live_ones_kept() {
        let root = tempdir("tmp-prune");
        assert_eq!(publish_test_image(&root, "one", 1), Published::New);
        assert!(
            !root.join("one").join(TMP_LOCK_FILE).exists(),
            "published without its lock"
        );
        let published_before = fs::read(root.join("one/metadata.json")).unwrap();

        // A live checkpoint of this process, writing on another thread.
        let (created, take) = std::sync::mpsc::channel();
        let (release, done) = std::sync::mpsc::channel::<()>();
        let writer_root = root.clone();
        let writer = std::thread::spawn(move || {
            let tmp = create_tmp_image(&writer_root, "live").unwrap();
            fs::write(tmp.path().join("pages-1.img"), b"p").unwrap();
            created.send(tmp.path().to_path_buf()).unwrap();
            done.recv().unwrap();
            drop(tmp);
        });
        let live = take.recv().unwrap();
        // Another pod's live checkpoint: its lock is held by another process. A day old, so
        // age alone would not keep it.
        let other = root.join(".tmp-other-x");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("pages-1.img"), b"p").unwrap();
        let mut holder = hold_lock_in_another_process(&other.join(TMP_LOCK_FILE));
        set_mtime(&other.join("pages-1.img"), Duration::from_secs(86_400));
        set_mtime(&other.join(TMP_LOCK_FILE), Duration::from_secs(86_400));
        set_mtime(&other, Duration::from_secs(86_400));
        // A killed checkpoint's: its lock file is there and nobody holds it. Just written.
        let dead = root.join(".tmp-dead-x");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join(TMP_LOCK_FILE), b"").unwrap();
        fs::write(dead.join("pages-1.img"), vec![0u8; 1 << 20]).unwrap();
        // Without a lock file (an older agent's): kept until unchanged for the given age.
        let fresh_unlocked = root.join(".tmp-older-fresh");
        fs::create_dir(&fresh_unlocked).unwrap();
        fs::write(fresh_unlocked.join("pages-1.img"), b"p").unwrap();
        let stale_unlocked = root.join(".tmp-older-stale");
        fs::create_dir(&stale_unlocked).unwrap();
        fs::write(stale_unlocked.join("pages-1.img"), b"p").unwrap();
        set_mtime(
            &stale_unlocked.join("pages-1.img"),
            Duration::from_secs(700),
        );
        set_mtime(&stale_unlocked, Duration::from_secs(700));
        // Unchanged for 5 minutes, but a file in it changed 10 s ago: still being written.
        let written_unlocked = root.join(".tmp-older-writing");
        fs::create_dir(&written_unlocked).unwrap();
        fs::write(written_unlocked.join("pages-1.img"), b"p").unwrap();
        set_mtime(
            &written_unlocked.join("pages-1.img"),
            Duration::from_secs(10),
        );
        set_mtime(&written_unlocked, Duration::from_secs(300));

        let r = prune(&root, 5, "one", 0, Duration::from_secs(600));
        let mut removed = r.removed_tmp.clone();
        removed.sort();
        assert_eq!(removed, vec![".tmp-dead-x", ".tmp-older-stale"]);
        let left = names(&root);
        assert!(
            !left.contains(".tmp-dead-x"),
            "an unlocked tmp dir goes at once: {left:?}"
        );
        assert!(!left.contains(".tmp-older-stale"), "{left:?}");
        for kept in [
            live.file_name().unwrap().to_str().unwrap(),
            ".tmp-other-x",
            ".tmp-older-fresh",
            ".tmp-older-writing",
            "one",
        ] {
            assert!(left.contains(kept), "{kept} kept: {left:?}");
        }
        assert!(live.join(TMP_LOCK_FILE).exists() && live.join("pages-1.img").exists());
        assert_eq!(
            fs::read(root.join("one/metadata.json")).unwrap(),
            published_before
        );
        verify_files(
            &root.join("one"),
            &parse_metadata(&published_before).unwrap(),
        )
        .unwrap();

        // The other pod's checkpoint is killed: its lock goes with it, and so does the dir.
        holder.kill().unwrap();
        holder.wait().unwrap();
        let r = prune(&root, 5, "one", 0, Duration::from_secs(600));
        assert_eq!(r.removed_tmp, vec![".tmp-other-x"]);
        // This process's checkpoint ends (failed): it removes its own dir.
        release.send(()).unwrap();
        writer.join().unwrap();
        assert!(!live.exists());
        let left = names(&root);
        assert_eq!(
            left,
            BTreeSet::from(["one", ".tmp-older-fresh", ".tmp-older-writing"].map(String::from))
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
