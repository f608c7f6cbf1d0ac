//! Reading the organism's registry: `GET /cells` from the first health checker that answers.

use std::time::Duration;

use protocol::control::CellsResponse;

/// A client for registry reads: short timeouts, a health checker that hangs is skipped.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("a plain HTTP client always builds")
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
