//! What may enter the frontier: normalized http(s) URLs that pass the trap guards. Counting
//! (dedup, depth, budgets) is the store's job, done atomically there.

use engines::Candidate;
use protocol::urls;

use crate::config::ApiConfig;

/// Normalize `raw` and check it against the trap guards; the reason when it is refused.
pub fn candidate(raw: &str, cfg: &ApiConfig) -> Result<Candidate, String> {
    if raw.len() > cfg.max_url_len {
        return Err(format!("URL longer than {} characters", cfg.max_url_len));
    }
    let url = urls::normalize(raw).map_err(|e| e.to_string())?;
    let s = url.as_str();
    if s.len() > cfg.max_url_len {
        return Err(format!("URL longer than {} characters", cfg.max_url_len));
    }
    let segments: Vec<&str> = url
        .path_segments()
        .map(|s| s.filter(|seg| !seg.is_empty()).collect())
        .unwrap_or_default();
    if segments.len() > cfg.max_path_segments {
        return Err(format!(
            "trap guard: more than {} path segments",
            cfg.max_path_segments
        ));
    }
    let mut counts = std::collections::HashMap::new();
    for seg in &segments {
        let n = counts.entry(*seg).or_insert(0usize);
        *n += 1;
        if *n > cfg.max_repeated_segments {
            return Err(format!(
                "trap guard: path segment {seg:?} repeats more than {} times",
                cfg.max_repeated_segments
            ));
        }
    }
    Ok(Candidate {
        host: urls::host_of(&url),
        url: url.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards() {
        let cfg = ApiConfig::default();
        assert_eq!(
            candidate("HTTP://A.test/x/../y#f", &cfg).expect("ok").url,
            "http://a.test/y"
        );
        assert!(candidate("ftp://a.test/", &cfg)
            .expect_err("scheme")
            .contains("ftp"));
        let trap = "http://a.test/cal/cal/cal/cal/x";
        assert!(candidate(trap, &cfg).expect_err("trap").contains("repeats"));
        let long = format!("http://a.test/{}", "x".repeat(3000));
        assert!(candidate(&long, &cfg).expect_err("long").contains("longer"));
        let deep = format!(
            "http://a.test/{}",
            (0..40).map(|i| format!("d{i}/")).collect::<String>()
        );
        assert!(candidate(&deep, &cfg)
            .expect_err("deep")
            .contains("segments"));
    }
}
