//! Budget states. A budget moves between OK, WARNING (at the warn ratio)
//! and EXCEEDED (at 100 %); each change is one event, published exactly once:
//! the change is saved as pending with a deterministic event id, published
//! (JetStream de-duplicates a repeat of that id), then marked published. A
//! restart re-publishes only what was still pending.
use costmesh_contracts::v1::BudgetState;
use serde::{Deserialize, Serialize};

/// One budget's state in one period.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetTrack {
    pub period: String,
    /// `BudgetState` as i32.
    pub state: i32,
    pub previous: i32,
    pub spent_micros: i64,
    pub budget_micros: i64,
    pub threshold: f64,
    /// The change still has to be published.
    pub pending: bool,
}

impl BudgetTrack {
    pub fn state(&self) -> BudgetState {
        BudgetState::try_from(self.state).unwrap_or(BudgetState::Unspecified)
    }

    /// The event id of this change: the same after any restart.
    pub fn event_id(&self, name: &str) -> String {
        let state = self.state().as_str_name().trim_start_matches("BUDGET_STATE_").to_lowercase();
        if self.state() == BudgetState::Warning {
            // Each warning threshold is its own event.
            format!("budget-{name}-{}-{state}-{}", self.period, self.threshold)
        } else {
            format!("budget-{name}-{}-{state}", self.period)
        }
    }
}

/// The next threshold above `current` that `spent / budget` has reached:
/// the lowest warning threshold past `current`, else 1.0 (exceeded).
fn next_threshold(spent_micros: i64, budget_micros: i64, current: f64, warn: &[f64]) -> Option<f64> {
    let ratio = spent_micros as f64 / budget_micros.max(1) as f64;
    warn.iter()
        .copied()
        .filter(|t| *t < 1.0)
        .chain(std::iter::once(1.0))
        .filter(|t| *t > current && ratio >= *t)
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.min(t))))
}

/// Updates a budget for `period`; returns true when it has a change to
/// publish (`pending`). A budget moves up one threshold per change, so a
/// jump from OK past 100 % is a warning and then an exceeded event, in that
/// order: the caller publishes the pending change, marks it published and
/// evaluates again for the next one. A change still pending is kept as it
/// is (it goes out before anything newer). A new period starts at OK, and
/// says so if the last period was not OK.
pub fn evaluate(
    track: &mut Option<BudgetTrack>,
    period: &str,
    spent_micros: i64,
    budget_micros: i64,
    warn: &[f64],
) -> bool {
    let t = match track {
        Some(t) if t.period == period => t,
        Some(t) => {
            let was = t.state;
            *t = BudgetTrack {
                period: period.into(),
                state: BudgetState::Ok as i32,
                previous: was,
                spent_micros,
                budget_micros,
                threshold: 0.0,
                pending: was != BudgetState::Ok as i32,
            };
            t
        }
        None => track.insert(BudgetTrack {
            period: period.into(),
            state: BudgetState::Ok as i32,
            previous: BudgetState::Ok as i32,
            spent_micros,
            budget_micros,
            threshold: 0.0,
            pending: false,
        }),
    };
    if t.pending {
        return true;
    }
    t.spent_micros = spent_micros;
    t.budget_micros = budget_micros;
    // Spend only grows within a month: never step back down.
    match next_threshold(spent_micros, budget_micros, t.threshold, warn) {
        Some(next) => {
            t.previous = t.state;
            t.state = if next >= 1.0 { BudgetState::Exceeded } else { BudgetState::Warning } as i32;
            t.threshold = next;
            t.pending = true;
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_up_once_per_threshold_and_resets_with_the_month() {
        let mut t = None;
        let w = [0.8];
        assert!(!evaluate(&mut t, "2026-07", 100, 1000, &w));
        assert!(evaluate(&mut t, "2026-07", 800, 1000, &w));
        assert_eq!(t.as_ref().unwrap().state(), BudgetState::Warning);
        assert!(evaluate(&mut t, "2026-07", 900, 1000, &w), "unpublished: still pending");
        t.as_mut().unwrap().pending = false;
        assert!(!evaluate(&mut t, "2026-07", 900, 1000, &w), "still warning: no new event");
        t.as_mut().unwrap().pending = false;
        assert!(evaluate(&mut t, "2026-07", 1000, 1000, &w));
        assert_eq!(t.as_ref().unwrap().event_id("monthly"), "budget-monthly-2026-07-exceeded");
        t.as_mut().unwrap().pending = false;
        assert!(!evaluate(&mut t, "2026-07", 5000, 1000, &w));
        assert!(evaluate(&mut t, "2026-08", 0, 1000, &w), "a new month resets to OK");
        let t = t.unwrap();
        assert_eq!(t.state(), BudgetState::Ok);
        assert_eq!(t.previous, BudgetState::Exceeded as i32);
    }

    #[test]
    fn more_thresholds_each_raise_one_event() {
        let mut t = None;
        let w = [0.5, 0.8, 0.9];
        let mut events = Vec::new();
        for spent in [400, 500, 600, 850, 870, 950, 1200] {
            // As the watcher does: publish, mark published, evaluate again.
            while evaluate(&mut t, "2026-07", spent, 1000, &w) {
                let tr = t.as_mut().unwrap();
                events.push((tr.state(), tr.threshold, tr.event_id("m")));
                tr.pending = false;
            }
        }
        let thresholds: Vec<f64> = events.iter().map(|e| e.1).collect();
        assert_eq!(thresholds, vec![0.5, 0.8, 0.9, 1.0]);
        assert_eq!(events[1].2, "budget-m-2026-07-warning-0.8");
        assert_eq!(events[3].0, BudgetState::Exceeded);
    }

    #[test]
    fn a_jump_past_every_threshold_is_each_warning_then_exceeded_in_order() {
        let mut t = None;
        let w = [0.5, 0.8];
        let mut events = Vec::new();
        for spent in [0, 1500] {
            while evaluate(&mut t, "2026-07", spent, 1000, &w) {
                let tr = t.as_mut().unwrap();
                events.push((tr.state(), tr.previous, tr.threshold));
                tr.pending = false;
            }
        }
        let ok = BudgetState::Ok as i32;
        let warning = BudgetState::Warning as i32;
        assert_eq!(
            events,
            vec![
                (BudgetState::Warning, ok, 0.5),
                (BudgetState::Warning, warning, 0.8),
                (BudgetState::Exceeded, warning, 1.0)
            ]
        );
        // The next month: back to OK, announced once.
        assert!(evaluate(&mut t, "2026-08", 0, 1000, &w));
        assert_eq!(t.as_ref().unwrap().state(), BudgetState::Ok);
        t.as_mut().unwrap().pending = false;
        assert!(!evaluate(&mut t, "2026-08", 0, 1000, &w));
    }
}
