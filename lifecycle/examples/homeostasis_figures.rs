//! Print the homeostasis figures of the ten-thousand-cell step (decision latency, time to
//! capacity, reversals, time back to the minimum) for a few seeds:
//! `cargo run --release -p lifecycle --example homeostasis_figures [SEEDS]`.

use std::time::Instant;

use lifecycle::sim::{run, Scenario};

fn main() {
    let seeds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for seed in 0..seeds {
        let started = Instant::now();
        let r = run(&Scenario::ten_thousand_step(seed));
        println!(
            "seed {seed} ({} ms wall): {}",
            started.elapsed().as_millis(),
            r.summary()
        );
    }
}
