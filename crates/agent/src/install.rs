//! `crac-agent install <dest>`: what the operator's init container runs. The agent image has no
//! shell or `cp`, so the agent copies itself to `dest` (mode 0755) and, when its image carries
//! one, the CRIU bundle (`/usr/local/lib/crac-agent/criu`) into `criu/` beside it, where the
//! agent looks for it at run time (config.rs `default_criu`).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::criu;

/// Where the agent image keeps the CRIU bundle, relative to the agent's own directory
/// (`/usr/local/bin`).
const IMAGE_BUNDLE: &str = "../lib/crac-agent/criu";

pub fn run(dest: Option<&str>) -> i32 {
    let Some(dest) = dest else {
        eprintln!("usage: crac-agent install <dest-path>");
        return 2;
    };
    let mut dest = PathBuf::from(dest);
    if dest.is_dir() {
        dest.push("crac-agent");
    }
    if let Err(e) = copy_file(Path::new("/proc/self/exe"), &dest, 0o755) {
        eprintln!("crac-agent: cannot install to {}: {e}", dest.display());
        return 1;
    }
    eprintln!("crac-agent: installed {}", dest.display());
    let bundle = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(IMAGE_BUNDLE)))
        .filter(|dir| criu::is_bundle(dir));
    let (Some(bundle), Some(dir)) = (bundle, dest.parent()) else {
        return 0;
    };
    let target = dir.join(criu::BUNDLE_DIR);
    match copy_bundle(&bundle, &target) {
        Ok(n) => {
            eprintln!(
                "crac-agent: installed CRIU ({n} files) in {}",
                target.display()
            );
            0
        }
        Err(e) => {
            eprintln!(
                "crac-agent: cannot install CRIU to {}: {e}",
                target.display()
            );
            1
        }
    }
}

/// Copies through a temporary name and renames, so a reader never sees half a file.
fn copy_file(src: &Path, dest: &Path, mode: u32) -> io::Result<()> {
    let tmp = dest.with_extension("tmp");
    let result = fs::copy(src, &tmp)
        .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
        .and_then(|_| fs::rename(&tmp, dest));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies a CRIU bundle (the loader, the binary, `lib/`) file by file, following symlinks so
/// the copy holds real files. Returns how many files it copied.
pub fn copy_bundle(src: &Path, dest: &Path) -> io::Result<usize> {
    fs::create_dir_all(dest.join(criu::BUNDLE_LIBS))?;
    let mut copied = 0;
    for name in [criu::BUNDLE_LOADER, criu::BUNDLE_BINARY] {
        copy_file(&src.join(name), &dest.join(name), 0o755)?;
        copied += 1;
    }
    for entry in fs::read_dir(src.join(criu::BUNDLE_LIBS))? {
        let entry = entry?;
        if fs::metadata(entry.path())?.is_file() {
            copy_file(
                &entry.path(),
                &dest.join(criu::BUNDLE_LIBS).join(entry.file_name()),
                0o644,
            )?;
            copied += 1;
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn copies_a_bundle_that_the_agent_then_recognises() {
        let base = std::env::temp_dir().join(format!("crac-install-test-{}", std::process::id()));
        let (src, dest) = (base.join("src"), base.join("dest"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir(src.join("lib")).unwrap();
        fs::write(src.join("criu"), "elf").unwrap();
        fs::write(src.join("ld-linux-x86-64.so.2"), "loader").unwrap();
        fs::write(src.join("lib/libnl-3.so.200"), "lib").unwrap();
        std::os::unix::fs::symlink("libnl-3.so.200", src.join("lib/libnl-3.so")).unwrap();
        let target = dest.join("criu");
        assert!(!criu::is_bundle(&target));
        assert_eq!(copy_bundle(&src, &target).unwrap(), 4);
        assert!(criu::is_bundle(&target));
        // Symlinks become real files: the copy does not point back into the agent image.
        assert!(
            !fs::symlink_metadata(target.join("lib/libnl-3.so"))
                .unwrap()
                .is_symlink()
        );
        let mode = fs::metadata(target.join("criu"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let cmd = criu::command(&target.to_string_lossy());
        assert_eq!(
            cmd.get_program(),
            target.join("ld-linux-x86-64.so.2").as_os_str()
        );
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args[0], "--library-path");
        assert_eq!(args[2], target.join("criu").as_os_str());
        fs::remove_dir_all(&base).unwrap();
    }
}
