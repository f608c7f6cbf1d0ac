//! Killing one cell of a role with SIGKILL and following its death and its replacement in the
//! health checkers' events and registry.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protocol::control::{CellRecord, CellState, CellsResponse};

use super::matching::{self, Death};
use super::report::{self, KillRecord};
use super::watch::Watch;
use super::{unix_ms, Bench, ROLES};

pub(super) struct Killer<'a> {
    pub(super) bench: &'a Bench<'a>,
    pub(super) http: &'a reqwest::Client,
    pub(super) hcs: &'a [String],
    pub(super) watch: &'a Watch,
}

/// Cells of `role` that count toward its minimum (as the health checkers count them).
fn counted<'a>(cells: &'a CellsResponse, role: &str) -> Vec<&'a CellRecord> {
    cells
        .roles
        .get(role)
        .map(|v| {
            v.iter()
                .filter(|c| {
                    !matches!(
                        c.state,
                        CellState::Draining | CellState::Retired | CellState::Dead
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Killer<'_> {
    fn min(&self, role: &str) -> usize {
        self.bench
            .minimums
            .iter()
            .find(|(r, _)| r == role)
            .map_or(0, |(_, m)| *m as usize)
    }

    /// `GET /cells` from the first health checker in `order` that answers.
    async fn registry(&self, order: &[usize]) -> Option<(usize, CellsResponse)> {
        let reader = protocol::client::CellsClient::with_http(self.http.clone(), Vec::new(), None);
        for &i in order {
            if let Ok(cells) = reader.fetch(&self.hcs[i]).await {
                return Some((i, cells));
            }
        }
        None
    }

    /// Health checkers with a connected stream first.
    fn order(&self, avoid: Option<usize>) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.hcs.len()).filter(|i| Some(*i) != avoid).collect();
        v.sort_by_key(|i| !self.watch.connected[*i].load(Ordering::Relaxed));
        if let Some(a) = avoid {
            v.push(a);
        }
        v
    }

    /// Wait until every role is at its minimum and the streams that must see the next kill are
    /// connected.
    async fn wait_ready(&self, need_stream: &[usize]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let streams = need_stream
                .iter()
                .all(|i| self.watch.connected[*i].load(Ordering::Relaxed));
            let short = match self.registry(&self.order(None)).await {
                Some((_, cells)) => ROLES
                    .iter()
                    .filter(|r| counted(&cells, r).len() < self.min(r))
                    .map(|r| format!("{r} {}/{}", counted(&cells, r).len(), self.min(r)))
                    .collect::<Vec<_>>(),
                None => vec!["no health checker answered GET /cells".to_string()],
            };
            if streams && short.is_empty() {
                return Ok(());
            }
            if self.bench.interrupt.is_cancelled() {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!(
                    "the organism was not back at its minimums with its event streams within \
                     90 s (short: {short:?}; streams connected: {:?})",
                    self.watch
                        .connected
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kill one cell of `role` and follow its death and replacement.
    pub(super) async fn kill_one(&self, role: &str, index: usize) -> anyhow::Result<KillRecord> {
        let min = self.min(role);
        // For a health checker: alternate the two, and measure from the other's stream.
        let target_hc = (role == "healthchecker").then(|| (index - 1) % self.hcs.len());
        let need: Vec<usize> = match target_hc {
            Some(t) => (0..self.hcs.len()).filter(|i| *i != t).collect(),
            None => (0..self.hcs.len()).collect(),
        };
        self.wait_ready(&need).await?;
        let (_, cells) = self
            .registry(&self.order(target_hc))
            .await
            .context("no health checker answered GET /cells")?;
        let mut candidates: Vec<&CellRecord> = counted(&cells, role)
            .into_iter()
            .filter(|c| c.pid.is_some() && c.state == CellState::Serving)
            .collect();
        if let Some(t) = target_hc {
            let at: Vec<&CellRecord> = candidates
                .iter()
                .copied()
                .filter(|c| report::same_addr(&c.addr, &self.hcs[t]))
                .collect();
            if !at.is_empty() {
                candidates = at;
            }
        }
        // The oldest: over the kills, every slot's cell is replaced in turn.
        let victim = candidates
            .iter()
            .max_by_key(|c| (c.age_ms, c.cell_id.clone()))
            .copied()
            .cloned()
            .with_context(|| format!("no serving {role} cell with a pid to kill"))?;
        let pid = victim.pid.unwrap_or_default();
        let raw = i32::try_from(pid).context("pid out of range")?;
        let kill_ms = unix_ms();
        kill(Pid::from_raw(raw), Signal::SIGKILL)
            .with_context(|| format!("kill -9 {pid} ({})", victim.cell_id))?;

        let mut record = KillRecord {
            role: role.to_string(),
            index,
            victim: victim.cell_id.clone(),
            pid,
            victim_addr: victim.addr.clone(),
            kill_ms,
            ..KillRecord::default()
        };
        let death = Death {
            victim: &victim.cell_id,
            role,
            kill_ms,
        };
        let deadline = Instant::now() + Duration::from_secs(self.bench.args.replace_timeout_secs);
        let mut next_poll = Instant::now();
        let mut matched;
        loop {
            matched = matching::match_death(&death, self.watch.book().events());
            if Instant::now() >= next_poll {
                next_poll = Instant::now() + Duration::from_millis(50);
                if let Some((_, cells)) = self.registry(&self.order(target_hc)).await {
                    let now = unix_ms();
                    let live = counted(&cells, role);
                    if record.replacement_in_cells_ms.is_none()
                        && live.iter().any(|c| {
                            c.parent.as_deref() == Some(victim.cell_id.as_str())
                                && c.cell_id != victim.cell_id
                        })
                    {
                        record.replacement_in_cells_ms = Some(now - kill_ms);
                    }
                    let back =
                        live.len() >= min && live.iter().all(|c| c.cell_id != victim.cell_id);
                    if back && record.back_at_minimum_ms.is_none() {
                        record.back_at_minimum_ms = Some(now - kill_ms);
                    } else if !back {
                        record.back_at_minimum_ms = None;
                    }
                }
            }
            let serving = matched
                .replacement
                .as_ref()
                .is_some_and(|r| r.serving_at_ms.is_some());
            if matched.dead_at_ms.is_some() && serving && record.back_at_minimum_ms.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let mut missing = Vec::new();
                if matched.dead_at_ms.is_none() {
                    missing.push("no dead event");
                }
                if !serving {
                    missing.push("no serving event of a replacement");
                }
                if record.back_at_minimum_ms.is_none() {
                    missing.push("not back at its minimum");
                }
                record.note = Some(format!(
                    "after {} s: {}",
                    self.bench.args.replace_timeout_secs,
                    missing.join(", ")
                ));
                break;
            }
            if self.bench.interrupt.is_cancelled() {
                record.note = Some("interrupted".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        record.detection_ms = matched.dead_at_ms.map(|t| t - kill_ms);
        record.detected_by = matched.dead_source.and_then(|s| self.hcs.get(s).cloned());
        record.requested_ms = matched.requested_at_ms.map(|t| t - kill_ms);
        if matched.candidates > 1 {
            let note = format!(
                "{} cells name {} as parent",
                matched.candidates, victim.cell_id
            );
            record.note = Some(match record.note.take() {
                Some(n) => format!("{n}; {note}"),
                None => note,
            });
        }
        if let Some(r) = matched.replacement {
            record.replacement_born_ms = r.born_at_ms.map(|t| t - kill_ms);
            record.replacement_serving_ms = r.serving_at_ms.map(|t| t - kill_ms);
            record.replacement = Some(r.cell_id);
        }
        tokio::time::sleep(Duration::from_millis(self.bench.args.settle_ms)).await;
        record.window_end_ms = unix_ms();
        Ok(record)
    }
}
