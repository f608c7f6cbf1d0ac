//! Which api cell gets the next attempt: a weighted random choice among the live cells that
//! are not ejected, and the outlier detector that ejects a cell after consecutive failures.
//!
//! A cell's weight is its base weight (1.0 until the cell asks for another with a signed
//! `WeightRequest`) times a factor of its reported pressure, `1 / (1 + pressure)`: a cell at
//! capacity gets half the share of an idle one. The random generator is seeded, so a test
//! with a fixed seed sees the same choices every run.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::backends::Backend;

/// Per-cell state kept longer than this after the cell left the registry is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// What the balancer knows of one api cell beyond the registry's record.
#[derive(Debug, Clone)]
struct CellHealth {
    /// 0.0 ..= 1.0, set by the cell's weight requests.
    base_weight: f64,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// (timestamp ms, sequence) of the weight request that set `base_weight`: an older request
    /// arriving late does not undo a newer one.
    weight_stamp: Option<(i64, u64)>,
    /// Last time the cell was routed to, reported on or given a weight.
    touched: Instant,
}

impl CellHealth {
    fn new(now: Instant) -> Self {
        Self {
            base_weight: 1.0,
            consecutive_failures: 0,
            ejected_until: None,
            weight_stamp: None,
            touched: now,
        }
    }
}

/// How one api cell looks to the router now (for logs, tests and operators).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStatus {
    pub cell_id: String,
    pub base_weight: f64,
    pub consecutive_failures: u32,
    pub ejected: bool,
}

struct Inner {
    rng: ChaCha8Rng,
    cells: HashMap<String, CellHealth>,
}

/// The weighted chooser and outlier detector, shared by every request.
pub struct Balancer {
    inner: Mutex<Inner>,
    eject_after: u32,
    eject_for: Duration,
}

/// The pressure factor of a cell's weight: 1 when idle, 1/2 at capacity, toward 0 beyond.
pub fn pressure_factor(pressure: f64) -> f64 {
    if pressure.is_finite() && pressure > 0.0 {
        1.0 / (1.0 + pressure)
    } else {
        1.0
    }
}

impl Balancer {
    pub fn new(seed: u64, eject_after: u32, eject_for: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rng: ChaCha8Rng::seed_from_u64(seed),
                cells: HashMap::new(),
            }),
            eject_after: eject_after.max(1),
            eject_for,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under this lock can leave the map half-updated; a panic elsewhere while it
        // was held does not make the data wrong.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Choose a backend among `live`, leaving out the cell ids in `exclude` (the ones this
    /// request already tried). Ejected cells are left out too, unless every candidate is
    /// ejected: then they are all tried anyway (a detector that ejected everyone is more
    /// likely wrong than the whole tier dead). When every candidate has weight 0 (all asked
    /// for no traffic) they are chosen uniformly: a weight of 0 means "last resort", not "off".
    pub fn pick(&self, live: &[Backend], exclude: &[String]) -> Option<Backend> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Inner { rng, cells } = &mut *inner;
        let candidates: Vec<&Backend> = live
            .iter()
            .filter(|b| !exclude.contains(&b.cell_id))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let healthy: Vec<&Backend> = candidates
            .iter()
            .copied()
            .filter(|b| match cells.get_mut(&b.cell_id) {
                Some(h) => match h.ejected_until {
                    Some(until) if until > now => false,
                    Some(_) => {
                        h.ejected_until = None;
                        tracing::info!(cell_id = %b.cell_id, "api cell back from ejection");
                        true
                    }
                    None => true,
                },
                None => true,
            })
            .collect();
        let pool = if healthy.is_empty() {
            candidates
        } else {
            healthy
        };
        let weights: Vec<f64> = pool
            .iter()
            .map(|b| {
                let base = cells.get(&b.cell_id).map_or(1.0, |h| h.base_weight);
                base * pressure_factor(b.pressure)
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let chosen = if total > 0.0 && total.is_finite() {
            let mut point = rng.random::<f64>() * total;
            let mut chosen = pool.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if *w > 0.0 && point < *w {
                    chosen = i;
                    break;
                }
                point -= w;
            }
            // Rounding can run past the end: the last backend with a weight takes it.
            if weights[chosen] <= 0.0 {
                chosen = weights.iter().rposition(|w| *w > 0.0).unwrap_or(chosen);
            }
            chosen
        } else {
            rng.random_range(0..pool.len())
        };
        let backend = pool[chosen].clone();
        cells
            .entry(backend.cell_id.clone())
            .or_insert_with(|| CellHealth::new(now))
            .touched = now;
        Some(backend)
    }

    /// The cell answered (anything but a 5xx): its failure streak ends.
    pub fn success(&self, cell_id: &str) {
        let now = Instant::now();
        let mut inner = self.lock();
        let h = inner
            .cells
            .entry(cell_id.to_string())
            .or_insert_with(|| CellHealth::new(now));
        h.consecutive_failures = 0;
        h.touched = now;
    }

    /// The cell failed an attempt. Returns true when this failure ejected it.
    pub fn failure(&self, cell_id: &str) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        let h = inner
            .cells
            .entry(cell_id.to_string())
            .or_insert_with(|| CellHealth::new(now));
        h.touched = now;
        if h.ejected_until.is_some_and(|until| until > now) {
            // Already out (tried in the all-ejected fallback): no new ejection.
            return false;
        }
        h.consecutive_failures += 1;
        if h.consecutive_failures >= self.eject_after {
            h.consecutive_failures = 0;
            h.ejected_until = Some(now + self.eject_for);
            return true;
        }
        false
    }

    /// Set a cell's base weight (clamped to 0.0 ..= 1.0) as asked by a request stamped
    /// `stamp` = (timestamp ms, sequence). Returns false, changing nothing, when a newer request
    /// was already applied. Kept for a cell not seen yet: its request may arrive before the
    /// registry lists it.
    pub fn set_weight(&self, cell_id: &str, weight: f64, stamp: (i64, u64)) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        let h = inner
            .cells
            .entry(cell_id.to_string())
            .or_insert_with(|| CellHealth::new(now));
        h.touched = now;
        if h.weight_stamp.is_some_and(|applied| applied > stamp) {
            return false;
        }
        h.weight_stamp = Some(stamp);
        h.base_weight = if weight.is_nan() {
            1.0
        } else {
            weight.clamp(0.0, 1.0)
        };
        true
    }

    /// Forget cells that are not `live` and were not touched for a long while, so a churning
    /// organism does not grow this map for ever.
    pub fn forget_departed(&self, live: &[Backend]) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.cells.retain(|id, h| {
            live.iter().any(|b| &b.cell_id == id) || now.duration_since(h.touched) < FORGET_AFTER
        });
    }

    /// The balancer's view of one cell.
    pub fn status(&self, cell_id: &str) -> BackendStatus {
        let now = Instant::now();
        let inner = self.lock();
        let h = inner.cells.get(cell_id);
        BackendStatus {
            cell_id: cell_id.to_string(),
            base_weight: h.map_or(1.0, |h| h.base_weight),
            consecutive_failures: h.map_or(0, |h| h.consecutive_failures),
            ejected: h.and_then(|h| h.ejected_until).is_some_and(|u| u > now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Vec<Backend> {
        vec![Backend::new("a", "http://a"), Backend::new("b", "http://b")]
    }

    fn share_of_a(b: &Balancer, live: &[Backend], n: usize) -> f64 {
        let hits = (0..n)
            .filter(|_| b.pick(live, &[]).expect("a backend").cell_id == "a")
            .count();
        hits as f64 / n as f64
    }

    #[test]
    fn equal_weights_share_evenly_and_deterministically() {
        let live = backends();
        let one = share_of_a(&Balancer::new(7, 3, Duration::from_secs(5)), &live, 4000);
        let two = share_of_a(&Balancer::new(7, 3, Duration::from_secs(5)), &live, 4000);
        assert_eq!(one, two, "same seed, same choices");
        assert!((0.45..0.55).contains(&one), "{one}");
    }

    #[test]
    fn pressure_and_base_weight_shift_the_share() {
        let mut live = backends();
        live[1].pressure = 1.0; // b gets half of a's weight: a's share is 2/3
        let b = Balancer::new(1, 3, Duration::from_secs(5));
        let share = share_of_a(&b, &live, 6000);
        assert!((0.62..0.71).contains(&share), "{share}");
        assert!(b.set_weight("a", 0.0, (10, 1)));
        assert_eq!(share_of_a(&b, &live, 500), 0.0);
        assert!(b.set_weight("a", 7.0, (11, 2)), "clamped to 1.0");
        assert_eq!(b.status("a").base_weight, 1.0);
        assert!(
            !b.set_weight("a", 0.0, (10, 1)),
            "an older request arriving late"
        );
        assert_eq!(b.status("a").base_weight, 1.0);
    }

    #[test]
    fn weight_zero_is_a_last_resort() {
        let live = backends();
        let b = Balancer::new(1, 3, Duration::from_secs(5));
        b.set_weight("a", 0.0, (1, 1));
        b.set_weight("b", 0.0, (1, 1));
        assert!(b.pick(&live, &[]).is_some());
        assert_eq!(
            b.pick(&live, &["b".to_string()])
                .expect("a remains")
                .cell_id,
            "a"
        );
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let live = backends();
        let b = Balancer::new(1, 3, Duration::from_secs(60));
        assert!(!b.failure("a"));
        assert!(!b.failure("a"));
        b.success("a");
        assert!(!b.failure("a"));
        assert!(!b.failure("a"));
        assert!(b.failure("a"), "third consecutive failure ejects");
        assert!(b.status("a").ejected);
        for _ in 0..200 {
            assert_eq!(b.pick(&live, &[]).expect("b").cell_id, "b");
        }
        // Every candidate ejected: they are tried anyway.
        assert_eq!(b.pick(&live, &["b".to_string()]).expect("a").cell_id, "a");
        assert!(b.pick(&live, &["a".to_string(), "b".to_string()]).is_none());
    }

    #[test]
    fn ejection_ends() {
        let live = backends();
        let b = Balancer::new(1, 1, Duration::from_millis(1));
        assert!(b.failure("a"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!b.status("a").ejected);
        assert!((0..200).any(|_| b.pick(&live, &[]).expect("some").cell_id == "a"));
    }
}
