//! Print the homeostasis figures of the ten-thousand-cell step (decision latency, time to
//! capacity, reversals, time back to the minimum) for a few seeds, clean and then with 5% of
//! heartbeats and registry reads lost and two crashes per cell-hour:
//! `cargo run --release -p lifecycle --example homeostasis_figures [SEEDS]`.

use std::time::Instant;

use lifecycle::sim::{run, Scenario};

fn main() {
    let seeds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for faults in [false, true] {
        for seed in 0..seeds {
            let mut sc = Scenario::ten_thousand_step(seed);
            if faults {
                sc.faults.link_loss = 0.05;
                sc.faults.crash_per_hour = 2.0;
            }
            let started = Instant::now();
            let r = run(&sc);
            println!(
                "{} seed {seed} ({} ms wall): {}",
                if faults {
                    "lossy links, crashes"
                } else {
                    "clean"
                },
                started.elapsed().as_millis(),
                r.summary()
            );
        }
    }
}
