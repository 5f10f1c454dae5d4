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
        format!(
            "budget-{name}-{}-{}",
            self.period,
            self.state().as_str_name().trim_start_matches("BUDGET_STATE_").to_lowercase()
        )
    }
}

/// The state `spent / budget` calls for.
pub fn state_for(spent_micros: i64, budget_micros: i64, warn_ratio: f64) -> (BudgetState, f64) {
    let ratio = spent_micros as f64 / budget_micros.max(1) as f64;
    if ratio >= 1.0 {
        (BudgetState::Exceeded, 1.0)
    } else if ratio >= warn_ratio {
        (BudgetState::Warning, warn_ratio)
    } else {
        (BudgetState::Ok, 0.0)
    }
}

/// Updates a budget for `period`; returns true when its state changed (a
/// new period always starts at OK, and says so if the last one was not).
pub fn evaluate(
    track: &mut Option<BudgetTrack>,
    period: &str,
    spent_micros: i64,
    budget_micros: i64,
    warn_ratio: f64,
) -> bool {
    let (state, threshold) = state_for(spent_micros, budget_micros, warn_ratio);
    match track {
        Some(t) if t.period == period => {
            t.spent_micros = spent_micros;
            t.budget_micros = budget_micros;
            // Spend only grows within a month: never step back down.
            if (state as i32) > t.state {
                t.previous = t.state;
                t.state = state as i32;
                t.threshold = threshold;
                t.pending = true;
                return true;
            }
            false
        }
        Some(t) => {
            let was = t.state;
            *t = BudgetTrack {
                period: period.into(),
                state: state as i32,
                previous: was,
                spent_micros,
                budget_micros,
                threshold,
                pending: false,
            };
            if state as i32 != was {
                t.pending = true;
                return true;
            }
            false
        }
        None => {
            let changed = state != BudgetState::Ok;
            *track = Some(BudgetTrack {
                period: period.into(),
                state: state as i32,
                previous: BudgetState::Ok as i32,
                spent_micros,
                budget_micros,
                threshold,
                pending: changed,
            });
            changed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_up_once_per_threshold_and_resets_with_the_month() {
        let mut t = None;
        assert!(!evaluate(&mut t, "2026-07", 100, 1000, 0.8));
        assert!(evaluate(&mut t, "2026-07", 800, 1000, 0.8));
        assert_eq!(t.as_ref().unwrap().state(), BudgetState::Warning);
        assert!(!evaluate(&mut t, "2026-07", 900, 1000, 0.8), "still warning: no new event");
        assert!(evaluate(&mut t, "2026-07", 1000, 1000, 0.8));
        assert_eq!(t.as_ref().unwrap().event_id("monthly"), "budget-monthly-2026-07-exceeded");
        assert!(!evaluate(&mut t, "2026-07", 5000, 1000, 0.8));
        assert!(evaluate(&mut t, "2026-08", 0, 1000, 0.8), "a new month resets to OK");
        let t = t.unwrap();
        assert_eq!(t.state(), BudgetState::Ok);
        assert_eq!(t.previous, BudgetState::Exceeded as i32);
    }
}
