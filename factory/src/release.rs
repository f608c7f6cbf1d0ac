//! The organism's release, as pool machines receive it.
//!
//! A pool machine boots whatever `cell` its disk holds. When it joins, the factory names the
//! organism's current release in the join reply ([`ReleaseRef`]: its SHA-256 and the factory's
//! `GET /release/{sha256}`); a machine whose own executable differs downloads the release
//! (with the organism's read token, which the join reply's cluster key gives it), checks every
//! byte against the SHA-256 and runs it (`cell boot`). So a live upgrade reaches the pool's
//! roles the way it reaches the rest: new machines join running the new build, and old ones
//! retire.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// The release a joining machine is to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    /// The executable's SHA-256, hex (64 digits).
    pub sha256: String,
    /// Where to download it: a factory's `GET /release/{sha256}` (read token).
    pub url: String,
}

/// The SHA-256 of the release file, computed once per version of the file (path, length,
/// modification time): a debug executable is hundreds of megabytes.
#[derive(Default)]
pub struct Releases {
    known: Mutex<Option<(PathBuf, u64, SystemTime, String)>>,
}

impl Releases {
    /// The SHA-256 (hex) of the executable at `path`.
    pub async fn sha256_of(&self, path: &Path) -> std::io::Result<String> {
        let meta = tokio::fs::metadata(path).await?;
        let (len, modified) = (meta.len(), meta.modified()?);
        let mut known = self.known.lock().await;
        if let Some((p, l, m, sha)) = known.as_ref() {
            if p == path && *l == len && *m == modified {
                return Ok(sha.clone());
            }
        }
        let owned = path.to_path_buf();
        let sha = tokio::task::spawn_blocking(move || control::build::sha256_of_file(&owned))
            .await
            .map_err(std::io::Error::other)??;
        *known = Some((path.to_path_buf(), len, modified, sha.clone()));
        Ok(sha)
    }

    /// The reference a joining machine receives for the release at `path`, served by the
    /// factory at `factory_url`.
    pub async fn reference(&self, path: &Path, factory_url: &str) -> std::io::Result<ReleaseRef> {
        let sha256 = self.sha256_of(path).await?;
        Ok(ReleaseRef {
            url: format!("{}/release/{sha256}", factory_url.trim_end_matches('/')),
            sha256,
        })
    }
}

/// Whether `text` is a SHA-256 in hex (what `GET /release/{sha256}` accepts).
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_is_named_by_its_bytes_and_renamed_when_they_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("cell");
        std::fs::write(&exe, b"\x7fELF one").expect("write");
        let releases = Releases::default();
        let one = releases
            .reference(&exe, "http://127.0.0.1:9/")
            .await
            .expect("reference");
        assert!(is_sha256(&one.sha256), "{one:?}");
        assert_eq!(
            one.url,
            format!("http://127.0.0.1:9/release/{}", one.sha256)
        );
        assert_eq!(
            one.sha256,
            control::build::sha256_of_file(&exe).expect("sha")
        );
        std::fs::write(&exe, b"\x7fELF two, longer").expect("rewrite");
        let two = releases.sha256_of(&exe).await.expect("sha");
        assert_ne!(two, one.sha256, "a changed file is another release");
        assert!(!is_sha256("abc") && !is_sha256(&"g".repeat(64)));
    }
}
