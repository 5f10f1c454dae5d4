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
    /// How far ahead the guard extrapolates a rising temperature (the heat
    /// already in the card keeps it rising after the limit drops).
    pub lookahead_s: f64,
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
    /// The previous reading: (seconds, °C).
    last: Option<(f64, f64)>,
}

impl ThermalGuard {
    /// The ceiling the guard imposes, if engaged.
    pub fn ceiling_mw(&self) -> Option<u32> {
        self.ceiling_mw
    }

    /// Looks at one reading taken at `t_s` seconds (any fixed origin).
    /// `limit_mw` is the limit otherwise in force, `min_mw` the device's floor.
    pub fn observe(
        &mut self,
        s: &GuardSettings,
        t_s: f64,
        temp_c: f64,
        limit_mw: u32,
        min_mw: u32,
    ) -> Option<GuardStep> {
        // Where the temperature is heading: a rising trend is extrapolated.
        let slope = match self.last {
            Some((t0, c0)) if t_s > t0 => (temp_c - c0) / (t_s - t0),
            _ => 0.0,
        };
        self.last = Some((t_s, temp_c));
        // Only near the target: far below it a warming card is no concern,
        // and a long sample interval would make the trend look steeper.
        let near = temp_c >= s.target_c - 2.0 * s.hysteresis_c;
        let predicted = if near { temp_c + slope.max(0.0) * s.lookahead_s } else { temp_c };
        // Start stepping a little before the target.
        let engage_at = s.target_c - 0.5;
        let current = self.ceiling_mw.unwrap_or(limit_mw).min(limit_mw);
        if predicted > engage_at {
            // Bigger steps the further over we are (or are heading).
            let over = (predicted - engage_at).max(0.0);
            let steps = 1 + over.floor() as u32;
            let to = current.saturating_sub(s.step_mw * steps).max(min_mw);
            if to < current {
                self.ceiling_mw = Some(to);
                return Some(GuardStep {
                    from_mw: current,
                    to_mw: Some(to),
                    reason: if temp_c > engage_at {
                        format!("{temp_c:.1} °C is above {engage_at:.1} °C")
                    } else {
                        format!("{temp_c:.1} °C rising towards {predicted:.1} °C, above {engage_at:.1} °C")
                    },
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

    const S: GuardSettings = GuardSettings { target_c: 75.0, hysteresis_c: 3.0, step_mw: 10_000, lookahead_s: 0.0 };

    #[test]
    fn steps_down_when_hot_up_when_cool_and_lets_go() {
        let mut g = ThermalGuard::default();
        assert_eq!(g.observe(&S, 0.0, 70.0, 300_000, 100_000), None);
        let s = g.observe(&S, 0.0, 75.2, 300_000, 100_000).unwrap();
        assert_eq!(s.to_mw, Some(290_000));
        // Far over (3.1 °C past the engage point): four steps at once.
        assert_eq!(g.observe(&S, 0.0, 77.6, 300_000, 100_000).unwrap().to_mw, Some(250_000));
        // Inside the band: hold.
        assert_eq!(g.observe(&S, 0.0, 73.0, 300_000, 100_000), None);
        assert_eq!(g.observe(&S, 0.0, 71.0, 300_000, 100_000).unwrap().to_mw, Some(260_000));
        for _ in 0..3 {
            g.observe(&S, 0.0, 71.0, 300_000, 100_000);
        }
        let last = g.observe(&S, 0.0, 71.0, 300_000, 100_000).unwrap();
        assert_eq!(last.to_mw, None, "released at the profile limit");
        assert_eq!(g.ceiling_mw(), None);
    }

    #[test]
    fn a_fast_rise_is_met_before_the_target() {
        let s = GuardSettings { lookahead_s: 30.0, ..S };
        let mut g = ThermalGuard::default();
        assert_eq!(g.observe(&s, 0.0, 70.0, 300_000, 100_000), None);
        // 0.5 °C/s: 72 °C now, heading for 87 °C in 30 s.
        let step = g.observe(&s, 4.0, 72.0, 300_000, 100_000).unwrap();
        assert!(step.to_mw.unwrap() < 300_000);
        assert!(step.reason.contains("rising"), "{}", step.reason);
    }

    #[test]
    fn never_below_the_device_floor() {
        let mut g = ThermalGuard::default();
        for _ in 0..100 {
            g.observe(&S, 0.0, 95.0, 200_000, 100_000);
        }
        assert_eq!(g.ceiling_mw(), Some(100_000));
    }
}
