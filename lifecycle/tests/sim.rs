//! Properties of the homeostasis controller, checked in the deterministic simulation over many
//! seeds per load profile and fault storm: no reversal under steady noisy load, the capacity a
//! step needs is reached, never above a role's maximum or the budget cap, back to the minimum
//! once the load ends. The runs are sized to keep the whole file well under a minute in a
//! debug build (quarter-second ticks, a few hundred virtual seconds, tens of cells; the
//! ten-thousand-cell runs use one-second ticks).

use std::time::Duration;

use lifecycle::homeostasis::{Bounds, FatigueParams};
use lifecycle::sim::{run, Load, Marks, Report, Scenario, Storm};

const SEEDS: u64 = 50;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The properties every run must keep, whatever its profile.
fn always(r: &Report, what: &str) {
    assert_eq!(r.over_cap, 0.0, "{what} seed {}: over the cap", r.seed);
    for f in &r.roles {
        assert_eq!(
            f.over_max, 0,
            "{what} seed {}: {} over its maximum",
            r.seed, f.role
        );
    }
}

/// A role of 4..=60 cells of capacity 1: steady at 3 cells' worth (0.75 each in 4), a step to
/// 24 at 20 s, the load gone at 150 s.
fn step(seed: u64) -> Scenario {
    let mut sc = Scenario::one_role(
        seed,
        "crawler",
        Bounds { min: 4, max: 60 },
        5,
        Load::Step {
            before: 2.5,
            after: 24.0,
            at: secs(20),
        },
    );
    sc.roles[0].end = Some(secs(150));
    sc.duration = secs(260);
    sc.marks = Marks {
        step: Some(secs(20)),
        steady: Some((secs(80), secs(150))),
        load_end: Some(secs(150)),
    };
    sc
}

#[test]
fn a_step_is_served_without_reversal_and_the_role_returns_to_its_minimum() {
    for seed in 0..SEEDS {
        let r = run(&step(seed));
        always(&r, "step");
        let f = &r.roles[0];
        let first = f.first_divide_ms.expect("divides after the step");
        assert!(
            first <= 3_000,
            "seed {seed}: first division after {first} ms"
        );
        let cap = f.capacity_ms.expect("reaches capacity");
        assert!(cap <= 25_000, "seed {seed}: capacity after {cap} ms");
        assert_eq!(f.reversals, 0, "seed {seed}: {}", r.summary());
        let back = f.back_to_min_ms.expect("back to the minimum");
        assert!(back <= 90_000, "seed {seed}: back to min after {back} ms");
        // Sized for the load, not for the number of askers: 24 at 0.6 is 40 cells.
        assert!(f.peak_cells <= 44, "seed {seed}: peak {}", f.peak_cells);
    }
}

#[test]
fn noisy_steady_load_causes_no_decision_at_all() {
    for seed in 0..SEEDS {
        // 12 cells' worth in 20 cells: 0.6 each, +-10% per reading.
        let mut sc = Scenario::one_role(
            seed,
            "api",
            Bounds { min: 2, max: 40 },
            20,
            Load::Steady(12.0),
        );
        sc.duration = secs(200);
        sc.marks.steady = Some((Duration::ZERO, sc.duration));
        let r = run(&sc);
        always(&r, "steady");
        let f = &r.roles[0];
        assert_eq!(f.reversals, 0, "seed {seed}");
        assert_eq!(
            (f.divisions, f.retirements),
            (0, 0),
            "seed {seed}: {:?}",
            r.events.first()
        );
    }
}

#[test]
fn ramp_spike_and_square_wave_stay_within_bounds_and_return_to_the_minimum() {
    let profiles: Vec<(&str, Load)> = vec![
        (
            "ramp",
            Load::Ramp {
                from: 1.0,
                to: 20.0,
                start: secs(10),
                end: secs(70),
            },
        ),
        (
            "spike",
            Load::Spike {
                base: 2.0,
                peak: 30.0,
                at: secs(20),
                len: secs(15),
            },
        ),
        (
            "square",
            Load::Square {
                low: 2.0,
                high: 16.0,
                period: secs(40),
            },
        ),
    ];
    for (name, load) in profiles {
        for seed in 0..SEEDS {
            let mut sc =
                Scenario::one_role(seed, "api", Bounds { min: 3, max: 30 }, 3, load.clone());
            sc.roles[0].end = Some(secs(120));
            sc.duration = secs(220);
            sc.marks.load_end = Some(secs(120));
            let r = run(&sc);
            always(&r, name);
            let f = &r.roles[0];
            assert!(f.divisions > 0, "{name} seed {seed}: never grew");
            let back = f.back_to_min_ms.expect("back to the minimum");
            assert!(back <= 90_000, "{name} seed {seed}: back after {back} ms");
            assert!(f.peak_cells <= 30);
        }
    }
}

#[test]
fn a_tight_budget_is_never_exceeded_and_the_role_still_uses_it() {
    for seed in 0..SEEDS {
        let mut sc = step(seed);
        // Room for 20 cells only, where the load would want 40.
        sc.factory.cap = 20.0;
        let r = run(&sc);
        always(&r, "budget");
        let f = &r.roles[0];
        assert_eq!(f.peak_cells, 20, "seed {seed}: {}", r.summary());
        assert!(r.refused > 0);
    }
}

#[test]
fn fault_storms_a_role_dying_together_a_frozen_checker_a_slow_factory_and_lossy_links() {
    for seed in 0..SEEDS {
        let mut sc = step(seed);
        sc.faults.link_loss = 0.05;
        sc.faults.crash_per_hour = 20.0;
        sc.faults.storms = vec![
            // Half the role dies during the growth, then again in the steady phase.
            Storm::Kill {
                at: secs(30),
                role: 0,
                fraction: 0.5,
            },
            Storm::Kill {
                at: secs(100),
                role: 0,
                fraction: 0.5,
            },
            Storm::FreezeChecker {
                at: secs(40),
                index: 0,
                len: secs(30),
            },
            Storm::SlowFactory {
                at: secs(25),
                len: secs(30),
                boot: secs(20),
            },
        ];
        let r = run(&sc);
        always(&r, "storm");
        let f = &r.roles[0];
        assert!(f.deaths > 0);
        assert!(f.capacity_ms.is_some(), "seed {seed}: {}", r.summary());
        // After the second storm (100 s) the role is back under high water within 20 s, and
        // then, whatever the steady trickle of crashes takes, never saturated again.
        let after = |from: u64, to: u64| {
            r.timeline
                .iter()
                .filter(move |s| (from..to).contains(&s.t_ms))
        };
        assert!(
            after(100_000, 120_000).any(|s| s.pressure[0] <= 0.8),
            "seed {seed}: {}",
            r.summary()
        );
        assert!(
            after(120_000, 150_000).all(|s| s.pressure[0] < 1.0),
            "seed {seed}: {}",
            r.summary()
        );
        let back = f.back_to_min_ms.expect("back to the minimum");
        assert!(back <= 100_000, "seed {seed}: back after {back} ms");
        // Never left below the minimum for long: at 20 crashes per cell-hour a role at its
        // minimum of 4 loses a cell every 45 s, and the replacement is asked as soon as the
        // death is detected (a booting cell counts). At most 10 s in all (40 ticks). Seed 16
        // found a checker re-asking an outstanding slot instead of the free one below it (52 s
        // under the minimum); seeds 1, 4 and 33 found pending slots held by deaths and a
        // machine that crashed before its first heartbeat kept on the books forever.
        assert!(
            f.under_min_ticks <= 40,
            "seed {seed}: {} ticks under min",
            f.under_min_ticks
        );
    }
}

#[test]
fn tired_cells_are_replaced_and_the_role_keeps_its_size() {
    for seed in 0..10 {
        let mut sc = Scenario::one_role(
            seed,
            "crawler",
            Bounds { min: 6, max: 20 },
            10,
            Load::Steady(6.0),
        );
        sc.params.fatigue = Some(FatigueParams::default());
        sc.faults.sick_per_hour = 30.0;
        sc.duration = secs(300);
        let r = run(&sc);
        always(&r, "fatigue");
        let f = &r.roles[0];
        assert!(f.replacements > 0, "seed {seed}: {}", r.summary());
        assert!(f.cells_at_end >= 6);
    }
}

/// The organism at ten thousand cells: 9 cells' worth of work to 6,000 (10,000 cells at 0.6),
/// with one-second ticks, lossy links and a trickle of crashes. One seed here (about nine
/// seconds in a debug build); the example `homeostasis_figures` runs more in release.
#[test]
fn ten_thousand_cells_step_and_return() {
    let seed = 0;
    let mut sc = Scenario::ten_thousand_step(seed);
    sc.faults.link_loss = 0.05;
    sc.faults.crash_per_hour = 2.0;
    // Back at the minimum about 95 s after the load ends at 130 s; the idle tail is not run.
    sc.duration = Duration::from_secs(240);
    let r = run(&sc);
    always(&r, "big");
    let f = &r.roles[0];
    println!("seed {seed}: {}", r.summary());
    assert!(f.peak_cells >= 10_000, "{}", r.summary());
    assert!(
        f.first_divide_ms.is_some_and(|d| d <= 3_000),
        "{}",
        r.summary()
    );
    assert!(
        f.capacity_ms.is_some_and(|c| c <= 45_000),
        "{}",
        r.summary()
    );
    assert_eq!(f.reversals, 0, "{}", r.summary());
    assert!(
        f.back_to_min_ms.is_some_and(|b| b <= 150_000),
        "{}",
        r.summary()
    );
}
