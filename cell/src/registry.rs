//! Reading the organism's registry: `GET /cells` from the first health checker that answers.

use std::time::Duration;

use protocol::control::CellsResponse;

/// The cluster key of an organism this process started itself (`cell up`), when it is not in
/// the environment: registry reads present the read token derived from it.
static KEY: std::sync::OnceLock<control::ClusterKey> = std::sync::OnceLock::new();

/// Registry reads from this process use `key` for their read token.
pub fn use_key(key: &control::ClusterKey) {
    let _ = KEY.set(key.clone());
}

/// A client for registry reads: short timeouts, a health checker that hangs is skipped. It
/// presents the organism's read token (in cluster mode `/cells` answers nobody else) when this
/// process knows the cluster key.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .default_headers(read_headers())
        .build()
        .expect("a plain HTTP client always builds")
}

/// `Authorization: Bearer <read token>` when this process knows the cluster key.
pub fn read_headers() -> reqwest::header::HeaderMap {
    match KEY.get() {
        Some(key) => {
            let mut headers = reqwest::header::HeaderMap::new();
            if let Ok(value) = reqwest::header::HeaderValue::from_str(&key.read_authorization()) {
                headers.insert(reqwest::header::AUTHORIZATION, value);
            }
            headers
        }
        None => control::read_headers_from_env(),
    }
}

/// The live cells, from the first of `healthcheckers` that answers.
pub async fn read(client: &reqwest::Client, healthcheckers: &[String]) -> Option<CellsResponse> {
    for hc in healthcheckers {
        let Ok(resp) = client.get(format!("{hc}/cells")).send().await else {
            continue;
        };
        if let Ok(cells) = resp.json::<CellsResponse>().await {
            return Some(cells);
        }
    }
    None
}

/// Base URLs of the live cells of `role`, sorted.
pub fn addrs(cells: &CellsResponse, role: &str) -> Vec<String> {
    let mut out: Vec<String> = cells
        .roles
        .get(role)
        .map(|v| v.iter().map(|c| c.addr.clone()).collect())
        .unwrap_or_default();
    out.sort();
    out
}
