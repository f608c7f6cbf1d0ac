//! Idempotency keys: one holder per key, the first answer for every repeat, conflicts seen,
//! leases taken over, keys expire.

use std::sync::Arc;
use std::time::Duration;

use engines::idempotency::{Claim, IdempotencyStore, KeyClaim};

const SCOPE: &str = "POST /crawl";
const T0: i64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(24 * 3600);

fn claim<'a>(key: &'a str, fingerprint: &'a str, holder: &'a str, now_ms: i64) -> KeyClaim<'a> {
    KeyClaim {
        scope: SCOPE,
        key,
        fingerprint,
        holder,
        now_ms,
        lease: LEASE,
        ttl: TTL,
    }
}

pub async fn idempotency_keys(store: &dyn IdempotencyStore) {
    let first = store
        .claim(&claim("k1", "fp-a", "h1", T0))
        .await
        .expect("claim");
    assert_eq!(first, Claim::Serve);
    // While it is served: the same request, or another, learns it is in progress.
    for (fp, holder) in [("fp-a", "h2"), ("fp-b", "h3")] {
        assert_eq!(
            store
                .claim(&claim("k1", fp, holder, T0 + 5))
                .await
                .expect("claim"),
            Claim::InProgress {
                fingerprint: "fp-a".into()
            }
        );
    }
    // Only the holder completes it.
    assert!(!store
        .complete(SCOPE, "k1", "h2", 202, "{\"other\":1}")
        .await
        .expect("complete"));
    assert!(store
        .complete(SCOPE, "k1", "h1", 202, "{\"crawl_id\":1}")
        .await
        .expect("complete"));
    assert!(
        !store
            .complete(SCOPE, "k1", "h1", 500, "later")
            .await
            .expect("complete"),
        "an answer is stored once"
    );
    // Every repeat gets the first answer, with the fingerprint to compare, even after the lease.
    for (fp, at) in [("fp-a", T0 + 10), ("fp-b", T0 + 60_000)] {
        assert_eq!(
            store
                .claim(&claim("k1", fp, "h4", at))
                .await
                .expect("claim"),
            Claim::Answered {
                fingerprint: "fp-a".into(),
                status: 202,
                body: "{\"crawl_id\":1}".into()
            }
        );
    }
    // The same key on another endpoint is another key.
    let other_scope = KeyClaim {
        scope: "POST /other",
        ..claim("k1", "fp-z", "h5", T0)
    };
    assert_eq!(
        store.claim(&other_scope).await.expect("claim"),
        Claim::Serve
    );

    // A holder that dies: after its lease the same request takes the key over, another does not.
    assert_eq!(
        store
            .claim(&claim("k2", "fp-a", "dead", T0))
            .await
            .expect("claim"),
        Claim::Serve
    );
    let after_lease = T0 + LEASE.as_millis() as i64 + 1;
    assert_eq!(
        store
            .claim(&claim("k2", "fp-b", "h6", after_lease))
            .await
            .expect("claim"),
        Claim::InProgress {
            fingerprint: "fp-a".into()
        }
    );
    assert_eq!(
        store
            .claim(&claim("k2", "fp-a", "h7", after_lease))
            .await
            .expect("claim"),
        Claim::Serve
    );
    assert!(
        !store
            .complete(SCOPE, "k2", "dead", 202, "late")
            .await
            .expect("complete"),
        "the dead holder's late answer is not stored"
    );
    assert!(store
        .complete(SCOPE, "k2", "h7", 202, "taken over")
        .await
        .expect("complete"));

    // Released unanswered: the next request serves it.
    assert_eq!(
        store
            .claim(&claim("k3", "fp-a", "h8", T0))
            .await
            .expect("claim"),
        Claim::Serve
    );
    store
        .release(SCOPE, "k3", "someone else")
        .await
        .expect("release");
    assert!(matches!(
        store
            .claim(&claim("k3", "fp-a", "h9", T0 + 1))
            .await
            .expect("claim"),
        Claim::InProgress { .. }
    ));
    store.release(SCOPE, "k3", "h8").await.expect("release");
    assert_eq!(
        store
            .claim(&claim("k3", "fp-b", "h9", T0 + 2))
            .await
            .expect("claim"),
        Claim::Serve
    );

    // Expired: the key is free again, for any request; purging forgets it.
    let expired = T0 + TTL.as_millis() as i64;
    assert_eq!(
        store
            .claim(&claim("k1", "fp-new", "h10", expired))
            .await
            .expect("claim"),
        Claim::Serve
    );
    let purged = store
        .purge_expired(expired + TTL.as_millis() as i64 + 1)
        .await
        .expect("purge");
    assert!(purged >= 4, "every key of this test expired: {purged}");
    assert_eq!(
        store
            .claim(&claim("k2", "fp-x", "h11", T0))
            .await
            .expect("claim"),
        Claim::Serve,
        "purged keys are gone"
    );
}

/// Many api cells racing on one key: exactly one serves it.
pub async fn idempotency_one_holder(store: Arc<dyn IdempotencyStore>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.spawn(async move {
            let holder = format!("cell-{i}");
            store
                .claim(&claim("race", "fp", &holder, T0))
                .await
                .expect("claim")
        });
    }
    let mut serving = 0;
    while let Some(done) = tasks.join_next().await {
        match done.expect("task") {
            Claim::Serve => serving += 1,
            Claim::InProgress { fingerprint } => assert_eq!(fingerprint, "fp"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(serving, 1, "one holder per key");
}
