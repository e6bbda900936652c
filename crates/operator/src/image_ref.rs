//! The app container's image pinned by digest: restore pods run exactly the bytes the
//! checkpoint pod ran, not whatever a tag names by the time they start.
//!
//! The digest comes from the checkpoint pod's status (`containerStatuses[].imageID`), which
//! anyone with `pods/status` rights can write, and whose format depends on the runtime:
//!
//! | runtime | `imageID` |
//! | --- | --- |
//! | containerd, pulled | `docker.io/library/x@sha256:<hex>` |
//! | cri-dockerd | `docker-pullable://x@sha256:<hex>` |
//! | an image with no repository digest (imported, built on the node) | `sha256:<hex>`, its config's digest: not pullable |
//!
//! So nothing but a well-formed digest is taken from it, and only one that follows an `@`
//! (a repository digest, the manifest's); the repository is always the spec's own.

use crate::checkpoint_pod::valid_digest;

/// The repository digest in an image reference or a kubelet's `imageID`: the
/// `sha256:<64 lower-case hex>` after its one `@`, exactly; else `None` (a bare config digest,
/// another algorithm, anything malformed).
pub fn repo_digest(reference: &str) -> Option<&str> {
    let (name, digest) = reference.split_once('@')?;
    (!name.is_empty() && !digest.contains('@') && valid_digest(digest)).then_some(digest)
}

/// The repository of an image reference: without its tag and digest
/// (`reg:5000/team/x:1` → `reg:5000/team/x`). `None` when nothing is left or it holds
/// characters no reference does.
fn repository(image: &str) -> Option<&str> {
    let name = image.split_once('@').map_or(image, |(name, _)| name);
    // A tag is the text after a `:` in the last path segment; a `:` before a `/` is a port.
    let last_segment = name.rfind('/').map_or(0, |slash| slash + 1);
    let repo = match name[last_segment..].find(':') {
        Some(colon) => &name[..last_segment + colon],
        None => name,
    };
    let well_formed = !repo.is_empty()
        && !repo.ends_with('/')
        && repo.bytes().all(|b| b.is_ascii_graphic() && b != b'@');
    well_formed.then_some(repo)
}

/// The image restore pods run for a checkpoint taken of `spec_image`, given the digest
/// `reported` for it (the checkpoint pod's `imageID`, or the reference recorded in the status):
///
/// - a spec that pins a digest itself keeps its own reference, whatever was reported;
/// - else the spec's repository, tag dropped, `@` the reported repository digest;
/// - `None` when there is no usable repository digest (the pods run the spec's tag).
pub fn pinned(spec_image: &str, reported: &str) -> Option<String> {
    if spec_image.contains('@') {
        return repo_digest(spec_image)
            .and(repository(spec_image))
            .map(|_| spec_image.to_string());
    }
    let digest = repo_digest(reported)?;
    Some(format!("{}@{digest}", repository(spec_image)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn a_repository_digest_is_taken_from_every_runtimes_format_and_nothing_else() {
        let digest = format!("sha256:{}", hex('a'));
        for id in [
            format!("docker.io/library/hello@{digest}"),
            format!("docker-pullable://reg:5000/team/hello@{digest}"),
            format!("crac.dev/test/hello-app@{digest}"),
        ] {
            assert_eq!(repo_digest(&id), Some(digest.as_str()), "{id}");
        }
        for id in [
            // A config digest: the image has no repository digest, nothing to pull by.
            digest.clone(),
            format!("docker://{digest}"),
            format!("@{digest}"),
            format!("x@sha256:{}", hex('A')),
            format!("x@sha256:{}", "a".repeat(63)),
            format!("x@sha256:{}0", hex('a')),
            format!("x@sha512:{}", "a".repeat(128)),
            format!("x@{digest}\n"),
            format!("x@{digest} --privileged"),
            format!("a@b@{digest}"),
            String::new(),
            "garbage".into(),
        ] {
            assert_eq!(repo_digest(&id), None, "{id:?}");
        }
    }

    #[test]
    fn the_pinned_reference_is_the_specs_repository_at_the_reported_digest() {
        let digest = format!("sha256:{}", hex('0'));
        let containerd = format!("docker.io/library/hello@{digest}");
        for (spec, want) in [
            ("hello:1.0", "hello"),
            ("hello", "hello"),
            ("hello:latest", "hello"),
            ("reg:5000/x:1", "reg:5000/x"),
            ("reg:5000/x", "reg:5000/x"),
            ("reg.example/team/app:2026-11-30", "reg.example/team/app"),
        ] {
            assert_eq!(
                pinned(spec, &containerd),
                Some(format!("{want}@{digest}")),
                "{spec}"
            );
        }
        // The reported repository is never used: a pod status naming another one still
        // yields the spec's.
        assert_eq!(
            pinned("hello:1", &format!("evil.example/other@{digest}")),
            Some(format!("hello@{digest}"))
        );
        // A recorded reference pins again to the same one (deployments are built from it).
        let recorded = pinned("reg:5000/x:1", &containerd).unwrap();
        assert_eq!(pinned("reg:5000/x:1", &recorded), Some(recorded.clone()));
    }

    #[test]
    fn a_spec_that_pins_a_digest_keeps_it() {
        let own = format!("sha256:{}", hex('1'));
        let reported = format!("docker.io/library/x@sha256:{}", hex('2'));
        for spec in [format!("x@{own}"), format!("reg:5000/x:1@{own}")] {
            assert_eq!(pinned(&spec, &reported), Some(spec.clone()), "{spec}");
            assert_eq!(pinned(&spec, "garbage"), Some(spec.clone()), "{spec}");
        }
        // A spec digest the operator cannot read is left to the kubelet to refuse, unchanged.
        assert_eq!(pinned(&format!("x@sha256:{}", hex('F')), &reported), None);
    }

    #[test]
    fn without_a_usable_repository_digest_the_tag_stays() {
        let config_digest = format!("sha256:{}", hex('b'));
        for reported in [
            config_digest.as_str(),
            "",
            "garbage",
            &format!("x@sha256:{}", hex('B')),
        ] {
            assert_eq!(pinned("hello:1", reported), None, "{reported:?}");
        }
        let digest = format!("x@sha256:{}", hex('c'));
        for spec in ["", ":1", "reg:5000/", "bad name:1"] {
            assert_eq!(pinned(spec, &digest), None, "{spec:?}");
        }
    }
}
