//! Cooler drift: compares the temperature a GPU reaches at a given power
//! now with what it reached when the agent first watched it. Dust in the
//! cooler shows up as a rising temperature at the same power; the seed asks
//! for monthly cleaning, and this says when the data calls for it.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// Settings of the drift check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriftSettings {
    /// Days of readings that form the baseline.
    pub baseline_days: i64,
    /// Raise the event when the last day runs this much hotter.
    pub threshold_c: f64,
    /// Samples a power band needs, in the baseline and in the last day.
    pub min_samples: u32,
    /// Width of a power band.
    pub band_w: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Mean {
    sum: f64,
    n: u32,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.sum += x;
        self.n += 1;
    }
    fn get(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }
}

/// One GPU's drift tracker.
#[derive(Clone, Debug)]
pub struct CoolerDrift {
    started: DateTime<Utc>,
    baseline: BTreeMap<u32, Mean>,
    /// (day index, band) -> mean; only the last two days are kept.
    recent: BTreeMap<(i64, u32), Mean>,
    last_alert_day: Option<i64>,
}

impl CoolerDrift {
    pub fn new(started: DateTime<Utc>) -> Self {
        Self { started, baseline: BTreeMap::new(), recent: BTreeMap::new(), last_alert_day: None }
    }

    /// Records a reading under load; returns a reason when the cooler needs
    /// cleaning (at most once a week).
    pub fn observe(&mut self, s: &DriftSettings, now: DateTime<Utc>, power_w: f64, temp_c: f64) -> Option<String> {
        let day = (now - self.started).num_days();
        let band = (power_w / s.band_w as f64).floor() as u32;
        if day < s.baseline_days {
            self.baseline.entry(band).or_default().add(temp_c);
            return None;
        }
        self.recent.entry((day, band)).or_default().add(temp_c);
        self.recent.retain(|(d, _), _| *d >= day - 1);
        if self.last_alert_day.is_some_and(|d| day - d < 7) {
            return None;
        }
        let today = self.recent.get(&(day, band))?;
        let base = self.baseline.get(&band)?;
        if today.n < s.min_samples || base.n < s.min_samples {
            return None;
        }
        let rise = today.get() - base.get();
        if rise >= s.threshold_c {
            self.last_alert_day = Some(day);
            return Some(format!(
                "at {}-{} W the GPU now runs {:.1} °C hotter than in its first {} days ({:.1} °C vs {:.1} °C): clean the cooler",
                band * s.band_w,
                (band + 1) * s.band_w,
                rise,
                s.baseline_days,
                today.get(),
                base.get()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: DriftSettings = DriftSettings { baseline_days: 7, threshold_c: 5.0, min_samples: 10, band_w: 25 };

    #[test]
    fn rising_temperature_at_the_same_power_raises_one_event() {
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut d = CoolerDrift::new(t0);
        let mut alerts = Vec::new();
        for hour in 0..(30 * 24) {
            let now = t0 + chrono::Duration::hours(hour);
            let days = hour as f64 / 24.0;
            // 0.3 °C hotter each day at 250 W.
            if let Some(r) = d.observe(&S, now, 250.0, 70.0 + 0.3 * days) {
                alerts.push((hour / 24, r));
            }
        }
        assert!(!alerts.is_empty());
        let first_day = alerts[0].0;
        assert!((20..=26).contains(&first_day), "first alert on day {first_day}: {alerts:?}");
        assert!(alerts.windows(2).all(|w| w[1].0 - w[0].0 >= 7), "at most weekly: {alerts:?}");
        assert!(alerts[0].1.contains("clean the cooler"));
    }

    #[test]
    fn a_steady_cooler_raises_nothing() {
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut d = CoolerDrift::new(t0);
        for hour in 0..(60 * 24) {
            let now = t0 + chrono::Duration::hours(hour);
            assert_eq!(d.observe(&S, now, 250.0, 70.0 + (hour % 5) as f64 * 0.2), None);
        }
    }
}
