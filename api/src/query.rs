//! Turning `GET /search` parameters into a checked [`SearchQuery`].

use engines::SearchQuery;
use serde::Deserialize;

use crate::config::ApiConfig;

/// `GET /search` parameters, read as text so that a bad number is a named 400, not a rejection.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// The query: words, all of which a hit contains.
    pub q: Option<String>,
    /// Hits per page (1 to the organism's `api.max_limit`; default 10).
    pub limit: Option<String>,
    /// Hits to skip.
    pub offset: Option<String>,
}

/// Check the parameters; the reason names the parameter when they are bad.
pub fn parse(params: &SearchParams, cfg: &ApiConfig) -> Result<SearchQuery, String> {
    let q = params.q.as_deref().unwrap_or("");
    if q.trim().is_empty() {
        return Err("q: the query is empty".into());
    }
    if q.chars().count() > cfg.max_query_chars {
        return Err(format!(
            "q: the query is longer than {} characters",
            cfg.max_query_chars
        ));
    }
    let terms = terms(q);
    if terms.is_empty() {
        return Err("q: the query has no searchable words".into());
    }
    if terms.len() > cfg.max_query_terms {
        return Err(format!("q: more than {} words", cfg.max_query_terms));
    }
    let limit = match params.limit.as_deref() {
        None | Some("") => 10,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=cfg.max_limit).contains(&n) => n,
            _ => {
                return Err(format!(
                    "limit: {s:?} is not a whole number from 1 to {}",
                    cfg.max_limit
                ))
            }
        },
    };
    let offset = match params.offset.as_deref() {
        None | Some("") => 0,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n <= cfg.max_offset => n,
            _ => {
                return Err(format!(
                    "offset: {s:?} is not a whole number from 0 to {}",
                    cfg.max_offset
                ))
            }
        },
    };
    Ok(SearchQuery {
        terms,
        limit,
        offset,
    })
}

/// Words of the query: runs of letters and digits, lowercased, deduplicated in order.
pub fn terms(q: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in q.split(|c: char| !c.is_alphanumeric()) {
        if word.is_empty() {
            continue;
        }
        let w = word.to_lowercase();
        if !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(q: &str, limit: Option<&str>, offset: Option<&str>) -> SearchParams {
        SearchParams {
            q: Some(q.into()),
            limit: limit.map(Into::into),
            offset: offset.map(Into::into),
        }
    }

    #[test]
    fn parses_and_names_bad_parameters() {
        let cfg = ApiConfig::default();
        let ok = parse(&p("Hello, World! hello", Some("5"), None), &cfg).expect("ok");
        assert_eq!(ok.terms, vec!["hello", "world"]);
        assert_eq!(ok.limit, 5);
        assert!(parse(&p("", None, None), &cfg)
            .expect_err("empty")
            .starts_with("q:"));
        assert!(parse(&p("!!!", None, None), &cfg)
            .expect_err("no words")
            .starts_with("q:"));
        assert!(parse(&p("a", Some("0"), None), &cfg)
            .expect_err("limit")
            .starts_with("limit:"));
        assert!(parse(&p("a", Some("x"), None), &cfg)
            .expect_err("limit")
            .starts_with("limit:"));
        assert!(parse(&p("a", None, Some("-1")), &cfg)
            .expect_err("offset")
            .starts_with("offset:"));
        let long = "a".repeat(600);
        assert!(parse(&p(&long, None, None), &cfg)
            .expect_err("long")
            .contains("longer"));
        assert_eq!(
            terms("café NEAR(x) \"or\""),
            vec!["café", "near", "x", "or"]
        );
    }
}
