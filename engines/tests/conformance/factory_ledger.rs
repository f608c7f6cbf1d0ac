//! The factories' ledger: one suite for every engine. Each function starts from an empty ledger.
#![allow(dead_code)] // each backend's test binary uses the whole suite, but rustc checks per file

use std::sync::Arc;

use engines::factory_ledger::{Claim, ClaimOutcome, FactoryLedger};

pub fn claim(key: &str, role: &str, factory: &str, cell: &str, at_ms: i64) -> Claim {
    Claim {
        request_key: key.to_string(),
        role: role.to_string(),
        factory: factory.to_string(),
        cell_id: cell.to_string(),
        claimed_at_ms: at_ms,
        started_at_ms: None,
    }
}

/// A key claimed by one factory is held against its sibling, with the first cell's id, also
/// after the first one's cell started.
pub async fn second_factory_gets_the_first_cell(ledger: &dyn FactoryLedger) {
    let first = claim(
        "replace:crawler-1",
        "crawler",
        "factory-1",
        "crawler-a",
        1_000,
    );
    assert_eq!(
        ledger.claim(&first, 0).await.expect("claim"),
        ClaimOutcome::Claimed
    );
    ledger
        .mark_started("replace:crawler-1", "factory-1", 1_200)
        .await
        .expect("started");
    let second = claim(
        "replace:crawler-1",
        "crawler",
        "factory-2",
        "crawler-b",
        1_500,
    );
    match ledger.claim(&second, 0).await.expect("claim") {
        ClaimOutcome::Held(held) => {
            assert_eq!(held.factory, "factory-1");
            assert_eq!(held.cell_id, "crawler-a");
            assert_eq!(held.claimed_at_ms, 1_000);
            assert_eq!(held.started_at_ms, Some(1_200));
        }
        other => panic!("the sibling claimed a held key: {other:?}"),
    }
    // The same factory asking again is held too (a repeat of one request).
    assert!(matches!(
        ledger.claim(&first, 0).await.expect("claim"),
        ClaimOutcome::Held(_)
    ));
}

/// A failed start gives the key up, only for the claiming factory and only before it started.
pub async fn release_frees_only_an_unstarted_claim_of_its_owner(ledger: &dyn FactoryLedger) {
    let c = claim("grow:api:2", "api", "factory-1", "api-a", 10);
    assert_eq!(
        ledger.claim(&c, 0).await.expect("claim"),
        ClaimOutcome::Claimed
    );
    assert!(!ledger
        .release("grow:api:2", "factory-2")
        .await
        .expect("release"));
    assert!(ledger
        .release("grow:api:2", "factory-1")
        .await
        .expect("release"));
    let again = claim("grow:api:2", "api", "factory-2", "api-b", 20);
    assert_eq!(
        ledger.claim(&again, 0).await.expect("claim"),
        ClaimOutcome::Claimed
    );
    ledger
        .mark_started("grow:api:2", "factory-2", 30)
        .await
        .expect("started");
    assert!(!ledger
        .release("grow:api:2", "factory-2")
        .await
        .expect("release"));
    // mark_started by another factory changes nothing.
    let c3 = claim("grow:api:3", "api", "factory-1", "api-c", 40);
    ledger.claim(&c3, 0).await.expect("claim");
    ledger
        .mark_started("grow:api:3", "factory-2", 50)
        .await
        .expect("started");
    let claims = ledger.claims_of_role("api", 0).await.expect("claims");
    assert_eq!(claims.len(), 2);
    assert_eq!(claims[1].cell_id, "api-c");
    assert_eq!(claims[1].started_at_ms, None);
}

/// A claim older than the caller's memory no longer holds its key.
pub async fn expired_claims_are_replaced(ledger: &dyn FactoryLedger) {
    let old = claim(
        "grow:crawler:1",
        "crawler",
        "factory-1",
        "crawler-old",
        1_000,
    );
    ledger.claim(&old, 0).await.expect("claim");
    let new = claim(
        "grow:crawler:1",
        "crawler",
        "factory-2",
        "crawler-new",
        40_000,
    );
    // Within memory (expire before 900): held.
    assert!(matches!(
        ledger.claim(&new, 900).await.expect("claim"),
        ClaimOutcome::Held(_)
    ));
    // Beyond it (expire before 10 000): claimed anew.
    assert_eq!(
        ledger.claim(&new, 10_000).await.expect("claim"),
        ClaimOutcome::Claimed
    );
    let claims = ledger.claims_of_role("crawler", 0).await.expect("claims");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].cell_id, "crawler-new");
}

/// Claims are listed by role and time; old ones are forgotten.
pub async fn claims_by_role_and_forgetting(ledger: &dyn FactoryLedger) {
    for (key, role, at) in [
        ("k1", "api", 100),
        ("k2", "crawler", 200),
        ("k3", "api", 300),
        ("k4", "api", 400),
    ] {
        ledger
            .claim(
                &claim(key, role, "factory-1", &format!("cell-{key}"), at),
                0,
            )
            .await
            .expect("claim");
    }
    let api: Vec<String> = ledger
        .claims_of_role("api", 300)
        .await
        .expect("claims")
        .into_iter()
        .map(|c| c.request_key)
        .collect();
    assert_eq!(api, ["k3", "k4"]);
    assert_eq!(ledger.forget_before(300).await.expect("forget"), 2);
    assert!(ledger
        .claims_of_role("crawler", 0)
        .await
        .expect("claims")
        .is_empty());
    assert_eq!(
        ledger.claims_of_role("api", 0).await.expect("claims").len(),
        2
    );
}

/// Many factories claiming one key at once: exactly one wins, the others see its cell.
pub async fn concurrent_claims_have_one_winner(ledger: Arc<dyn FactoryLedger>) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let c = claim(
                "replace:api-1",
                "api",
                &format!("factory-{i}"),
                &format!("api-from-{i}"),
                5_000,
            );
            (i, ledger.claim(&c, 0).await.expect("claim"))
        }));
    }
    let mut winners = Vec::new();
    let mut held_cells = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (i, ClaimOutcome::Claimed) => winners.push(i),
            (_, ClaimOutcome::Held(h)) => held_cells.push(h.cell_id),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let winner_cell = format!("api-from-{}", winners[0]);
    assert!(
        held_cells.iter().all(|c| *c == winner_cell),
        "{held_cells:?}"
    );
}
