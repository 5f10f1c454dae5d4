//! The thermal guard: keeps a GPU below its target temperature by stepping
//! its power ceiling down while it is too hot and back up, with hysteresis,
//! once it has cooled. Pure logic; the agent applies what it decides.

/// The guard's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardSettings {
    pub target_c: f64,
    /// Step up again only below `target_c - hysteresis_c`.
    pub hysteresis_c: f64,
    /// Size of one step.
    pub step_mw: u32,
}

/// A change of the guard's ceiling.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardStep {
    pub from_mw: u32,
    /// None: the guard let go (the profile's limit applies again).
    pub to_mw: Option<u32>,
    pub reason: String,
}

/// One GPU's guard state.
#[derive(Clone, Debug, Default)]
pub struct ThermalGuard {
    ceiling_mw: Option<u32>,
}

impl ThermalGuard {
    /// The ceiling the guard imposes, if engaged.
    pub fn ceiling_mw(&self) -> Option<u32> {
        self.ceiling_mw
    }

    /// Looks at one reading. `limit_mw` is the limit otherwise in force,
    /// `min_mw` the device's floor.
    pub fn observe(&mut self, s: &GuardSettings, temp_c: f64, limit_mw: u32, min_mw: u32) -> Option<GuardStep> {
        // Start stepping a little before the target: the heat already in
        // the card keeps the temperature rising for a while.
        let engage_at = s.target_c - 0.5;
        let current = self.ceiling_mw.unwrap_or(limit_mw).min(limit_mw);
        if temp_c > engage_at {
            // Bigger steps the further over we are.
            let over = (temp_c - engage_at).max(0.0);
            let steps = 1 + over.floor() as u32;
            let to = current.saturating_sub(s.step_mw * steps).max(min_mw);
            if to < current {
                self.ceiling_mw = Some(to);
                return Some(GuardStep {
                    from_mw: current,
                    to_mw: Some(to),
                    reason: format!("{temp_c:.1} °C is above {:.1} °C", engage_at),
                });
            }
            return None;
        }
        if let Some(c) = self.ceiling_mw {
            if temp_c < s.target_c - s.hysteresis_c {
                let up = c + s.step_mw;
                let reason = format!("{temp_c:.1} °C is below {:.1} °C", s.target_c - s.hysteresis_c);
                if up >= limit_mw {
                    self.ceiling_mw = None;
                    return Some(GuardStep { from_mw: c, to_mw: None, reason });
                }
                self.ceiling_mw = Some(up);
                return Some(GuardStep { from_mw: c, to_mw: Some(up), reason });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: GuardSettings = GuardSettings { target_c: 75.0, hysteresis_c: 3.0, step_mw: 10_000 };

    #[test]
    fn steps_down_when_hot_up_when_cool_and_lets_go() {
        let mut g = ThermalGuard::default();
        assert_eq!(g.observe(&S, 70.0, 300_000, 100_000), None);
        let s = g.observe(&S, 75.2, 300_000, 100_000).unwrap();
        assert_eq!(s.to_mw, Some(290_000));
        // Far over (3.1 °C past the engage point): four steps at once.
        assert_eq!(g.observe(&S, 77.6, 300_000, 100_000).unwrap().to_mw, Some(250_000));
        // Inside the band: hold.
        assert_eq!(g.observe(&S, 73.0, 300_000, 100_000), None);
        assert_eq!(g.observe(&S, 71.0, 300_000, 100_000).unwrap().to_mw, Some(260_000));
        for _ in 0..3 {
            g.observe(&S, 71.0, 300_000, 100_000);
        }
        let last = g.observe(&S, 71.0, 300_000, 100_000).unwrap();
        assert_eq!(last.to_mw, None, "released at the profile limit");
        assert_eq!(g.ceiling_mw(), None);
    }

    #[test]
    fn never_below_the_device_floor() {
        let mut g = ThermalGuard::default();
        for _ in 0..100 {
            g.observe(&S, 95.0, 200_000, 100_000);
        }
        assert_eq!(g.ceiling_mw(), Some(100_000));
    }
}
