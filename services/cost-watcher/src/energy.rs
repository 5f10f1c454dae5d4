//! Energy accounting from cumulative counters.
//!
//! Each GPU reports energy since its boot id began. The ledger keeps, per
//! GPU, the boot id and the highest counter seen, and adds only the growth:
//! a lost sample is covered by the next one, a repeated or reordered one adds
//! nothing, and a new boot id starts a new counter from zero.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Seen {
    boot_id: String,
    energy_mj: u64,
}

/// Energy used by all GPUs since the ledger started, in millijoules.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EnergyLedger {
    /// "node/gpu" -> the last counter seen.
    gpus: BTreeMap<String, Seen>,
    /// Boot ids already finished, so a late sample of an old boot adds nothing.
    retired: BTreeMap<String, Vec<String>>,
    total_mj: u64,
}

/// What one sample did to the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Energy added (millijoules; zero for a repeat or a reordered sample).
    Growth(u64),
    /// A counter not seen before: a first baseline (nothing added) or a
    /// new boot's counter counted from zero.
    NewCounter(u64),
    /// A late sample of a boot already replaced: nothing added.
    Late,
}

impl Observed {
    pub fn added(self) -> u64 {
        match self {
            Observed::Growth(n) | Observed::NewCounter(n) => n,
            Observed::Late => 0,
        }
    }
}

impl EnergyLedger {
    /// Records a sample; returns the energy it adds (millijoules).
    pub fn observe(&mut self, node: &str, gpu: u32, boot_id: &str, energy_mj: u64) -> u64 {
        self.record(node, gpu, boot_id, energy_mj).added()
    }

    /// Records a sample and says what it did.
    pub fn record(&mut self, node: &str, gpu: u32, boot_id: &str, energy_mj: u64) -> Observed {
        let key = format!("{node}/{gpu}");
        if self.retired.get(&key).is_some_and(|r| r.iter().any(|b| b == boot_id)) {
            return Observed::Late;
        }
        let seen = match self.gpus.get_mut(&key) {
            Some(seen) if seen.boot_id == boot_id => {
                let d = energy_mj.saturating_sub(seen.energy_mj);
                seen.energy_mj = seen.energy_mj.max(energy_mj);
                Observed::Growth(d)
            }
            Some(seen) => {
                // A new boot: its counter started at zero.
                let old = std::mem::replace(seen, Seen { boot_id: boot_id.to_string(), energy_mj });
                let r = self.retired.entry(key).or_default();
                r.push(old.boot_id);
                if r.len() > 16 {
                    r.remove(0);
                }
                Observed::NewCounter(energy_mj)
            }
            None => {
                // First sight: the baseline; energy before we watched is not ours.
                self.gpus.insert(key, Seen { boot_id: boot_id.to_string(), energy_mj });
                Observed::NewCounter(0)
            }
        };
        self.total_mj += seen.added();
        seen
    }

    pub fn total_mj(&self) -> u64 {
        self.total_mj
    }

    pub fn total_kwh(&self) -> f64 {
        self.total_mj as f64 / 3.6e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_duplicates_and_restarts_count_exactly() {
        let mut l = EnergyLedger::default();
        l.observe("n", 0, "b1", 1_000); // baseline
        l.observe("n", 0, "b1", 2_000);
        l.observe("n", 0, "b1", 2_000); // duplicate
        l.observe("n", 0, "b1", 5_000); // after a gap
        l.observe("n", 0, "b1", 4_000); // late, out of order
        assert_eq!(l.total_mj(), 4_000);
        l.observe("n", 0, "b2", 700); // agent restarted: counter from zero
        l.observe("n", 0, "b1", 9_000); // stray sample of the old boot
        l.observe("n", 0, "b2", 1_000);
        assert_eq!(l.total_mj(), 5_000);
    }
}
