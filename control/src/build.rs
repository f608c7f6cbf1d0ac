//! Which build a cell runs: the crate's version and a digest of the executable's own bytes
//! (`0.1.0+1a2b3c4d5e6f`). Two artifacts of one version (a rebuild, a patched copy) differ, so
//! a live upgrade can tell which cells already run the release it installs, and the registry
//! shows it (`GET /cells`, `cell status`).
//!
//! The digest of a debug executable takes a moment (hundreds of megabytes), so a cell computes
//! its own once, in a thread of its own, from the start ([`start`]); its heartbeats carry an
//! empty build until it is known. A process that starts another from the very file it runs
//! itself vouches for it ([`vouch_for`], [`BUILD_ENV`]): the child takes the build from its
//! environment when its executable is still that file (same device, inode, length and
//! modification time), and reads nothing. Ten cells hashing a 170 MB release binary at once took
//! about 1.5 s of CPU from an organism's first seconds.

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The wire versions (`v`) this build reads and writes.
pub fn wire_versions() -> Vec<u32> {
    (1..=protocol::WIRE_VERSION).collect()
}

/// The build of the executable at `path`: the version this binary was built as (a release of
/// another version names its own in its heartbeats; the upgrade compares digests) and the first
/// twelve hex digits of the SHA-256 of its bytes.
pub fn of_file(path: &Path) -> std::io::Result<String> {
    Ok(of_sha256(&sha256_of_file(path)?))
}

/// The build named by an executable's SHA-256 (hex; see [`of_file`]).
pub fn of_sha256(sha256: &str) -> String {
    format!(
        "{}+{}",
        env!("CARGO_PKG_VERSION"),
        sha256.get(..12).unwrap_or(sha256)
    )
}

/// The SHA-256 of the file at `path`, hex: what a pool machine checks a release it downloads
/// against (the build's twelve digits name an artifact; all 64 vouch for its bytes).
pub fn sha256_of_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The digest part of a build (`1a2b3c4d5e6f` of `0.1.0+1a2b3c4d5e6f`): what identifies the
/// artifact whatever version it calls itself.
pub fn digest(build: &str) -> &str {
    build.rsplit_once('+').map_or(build, |(_, d)| d)
}

static CURRENT: OnceLock<String> = OnceLock::new();

/// The environment variable a parent sets for a child started from its own executable:
/// `IDENTITY BUILD` (see [`vouch_for`]).
pub const BUILD_ENV: &str = "HOMEOSTAT_BUILD_OF";

/// What identifies an executable file's bytes without reading them: device, inode, length and
/// modification time (a rebuild or a copy changes one of them).
fn identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// The value of [`BUILD_ENV`] for a child started from `exe`, when `exe` is this process's own
/// executable file and its build is known.
pub fn vouch_for(exe: &Path) -> Option<String> {
    let build = current()?;
    let own = identity(Path::new("/proc/self/exe"))?;
    (identity(exe)? == own).then(|| format!("{own} {build}"))
}

/// The build a parent vouched for in `value`, if this process's executable is that file.
fn vouched(value: &str) -> Option<String> {
    let (file, build) = value.split_once(' ')?;
    let ok = !build.is_empty() && identity(Path::new("/proc/self/exe")).as_deref() == Some(file);
    ok.then(|| build.to_string())
}

/// Begin computing this process's own build (from `/proc/self/exe`) in a thread of its own.
/// Idempotent.
pub fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        if let Some(build) = std::env::var(BUILD_ENV).ok().as_deref().and_then(vouched) {
            let _ = CURRENT.set(build);
            return;
        }
        // `get_or_init`: a caller of [`current_blocking`] meanwhile waits for this digest
        // instead of computing a second one.
        let spawned = std::thread::Builder::new()
            .name("build-digest".into())
            .spawn(|| {
                CURRENT.get_or_init(|| {
                    of_file(Path::new("/proc/self/exe")).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot read this executable to name its build");
                        format!("{}+unknown", env!("CARGO_PKG_VERSION"))
                    })
                });
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the build digest thread");
        }
    });
}

/// This process's build, once known (see [`start`]).
pub fn current() -> Option<&'static str> {
    CURRENT.get().map(String::as_str)
}

/// This process's build, computed now if it is not known yet, or waited for if [`start`]'s
/// thread is computing it (for a command that needs it at once, such as `cell upgrade`).
pub fn current_blocking() -> String {
    CURRENT
        .get_or_init(|| {
            of_file(Path::new("/proc/self/exe"))
                .unwrap_or_else(|_| format!("{}+unknown", env!("CARGO_PKG_VERSION")))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_names_the_bytes_and_a_changed_copy_differs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"\x7fELF same bytes").expect("write");
        std::fs::write(&b, b"\x7fELF same bytes").expect("write");
        let (ba, bb) = (of_file(&a).expect("a"), of_file(&b).expect("b"));
        assert_eq!(
            ba, bb,
            "the same bytes are the same build wherever they lie"
        );
        assert!(
            ba.starts_with(concat!(env!("CARGO_PKG_VERSION"), "+")),
            "{ba}"
        );
        assert_eq!(digest(&ba).len(), 12);
        let sha = sha256_of_file(&a).expect("sha");
        assert_eq!(sha.len(), 64);
        assert!(sha.starts_with(digest(&ba)), "{sha} {ba}");
        assert_eq!(of_sha256(&sha), ba);
        std::fs::write(&b, b"\x7fELF same bytes and a tail").expect("append");
        assert_ne!(of_file(&b).expect("b"), ba);
    }

    /// A vouched build is taken only for the file it names: this test's own executable is
    /// vouched for, another file is not, and a mangled value is ignored.
    #[test]
    fn a_parent_vouches_only_for_its_own_file() {
        let own = identity(Path::new("/proc/self/exe")).expect("own identity");
        assert_eq!(
            vouched(&format!("{own} 0.1.0+abcdef123456")).as_deref(),
            Some("0.1.0+abcdef123456")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("other");
        std::fs::write(&other, b"\x7fELF other").expect("write");
        let theirs = identity(&other).expect("identity");
        assert_eq!(vouched(&format!("{theirs} 0.1.0+abcdef123456")), None);
        assert_eq!(vouched(&own), None, "no build named");
        assert_eq!(vouched(""), None);
        assert_eq!(vouch_for(&other), None, "another file is never vouched for");
    }
}
