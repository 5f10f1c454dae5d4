//! Electricity tariffs: flat, or time-of-use periods by month, day type and
//! time of day in the ledger's time zone. Shared by the cost-watcher (to
//! price energy) and the scheduler (to pick the cheapest start).
use chrono::{DateTime, Datelike, NaiveTime, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::config::{key, ConfigError};

/// Which days a period applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Days {
    All,
    Weekdays,
    Weekends,
}

/// One time-of-use period: `price` per kWh on `days` of `months`, from
/// `from` up to `to` (local time, `24:00` for midnight).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouPeriod {
    pub months: Vec<u32>,
    pub days: Days,
    pub from: String,
    pub to: String,
    pub price_per_kwh: f64,
}

/// The tariff: the first matching period wins; no match means the flat price.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tariff {
    pub periods: Vec<TouPeriod>,
}

fn minutes(s: &str) -> Option<u32> {
    if s == "24:00" {
        return Some(24 * 60);
    }
    // HH:MM, or HH:MM:SS (what `23:00` becomes when an environment value is read as TOML).
    NaiveTime::parse_from_str(s, "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M:%S"))
        .ok()
        .map(|t| t.hour() * 60 + t.minute())
}

impl Tariff {
    pub fn is_flat(&self) -> bool {
        self.periods.is_empty()
    }

    /// A Taipower-style two-period tariff (figures from a third-party
    /// compilation, not verified): summer weekdays 09:00-24:00 peak 5.16,
    /// otherwise 2.06; other months weekdays 06:00-11:00 and 14:00-24:00
    /// peak 4.93, otherwise 1.99; weekends off-peak all day.
    pub fn taipower_example() -> Self {
        let summer = vec![6, 7, 8, 9];
        let other = vec![1, 2, 3, 4, 5, 10, 11, 12];
        let p = |months: &Vec<u32>, days, from: &str, to: &str, price| TouPeriod {
            months: months.clone(),
            days,
            from: from.into(),
            to: to.into(),
            price_per_kwh: price,
        };
        Tariff {
            periods: vec![
                p(&summer, Days::Weekdays, "09:00", "24:00", 5.16),
                p(&summer, Days::All, "00:00", "24:00", 2.06),
                p(&other, Days::Weekdays, "06:00", "11:00", 4.93),
                p(&other, Days::Weekdays, "14:00", "24:00", 4.93),
                p(&other, Days::All, "00:00", "24:00", 1.99),
            ],
        }
    }

    /// The price per kWh at `t`.
    pub fn price_at(&self, t: DateTime<Utc>, tz: Tz, flat: f64) -> f64 {
        let l = t.with_timezone(&tz);
        let weekend = matches!(l.weekday(), Weekday::Sat | Weekday::Sun);
        let m = l.hour() * 60 + l.minute();
        self.periods
            .iter()
            .find(|p| {
                p.months.contains(&l.month())
                    && match p.days {
                        Days::All => true,
                        Days::Weekdays => !weekend,
                        Days::Weekends => weekend,
                    }
                    && minutes(&p.from).is_some_and(|f| m >= f)
                    && minutes(&p.to).is_some_and(|e| m < e)
            })
            .map_or(flat, |p| p.price_per_kwh)
    }

    pub fn validate(&self, p: &str) -> Result<(), ConfigError> {
        for (i, period) in self.periods.iter().enumerate() {
            let k = |f: &str| key(p, &format!("periods[{i}].{f}"));
            if period.months.is_empty() || period.months.iter().any(|m| !(1..=12).contains(m)) {
                return Err(ConfigError::new(k("months"), format!("{:?}", period.months), "must list months 1-12"));
            }
            let (Some(from), Some(to)) = (minutes(&period.from), minutes(&period.to)) else {
                return Err(ConfigError::new(
                    k("from"),
                    format!("{}-{}", period.from, period.to),
                    "times are HH:MM (24:00 for midnight)",
                ));
            };
            if from >= to {
                return Err(ConfigError::new(
                    k("to"),
                    &period.to,
                    "must be after `from` (split periods that cross midnight)",
                ));
            }
            if !(period.price_per_kwh.is_finite() && period.price_per_kwh >= 0.0) {
                return Err(ConfigError::new(
                    k("price_per_kwh"),
                    period.price_per_kwh,
                    "must be a price of zero or more",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taipower_periods() {
        let t = Tariff::taipower_example();
        let tz: Tz = "Asia/Taipei".parse().unwrap();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        // Wed 2026-07-15 10:00 Taipei = 02:00 UTC: summer weekday peak.
        assert_eq!(t.price_at(at("2026-07-15T02:00:00Z"), tz, 2.6), 5.16);
        // Wed 2026-07-15 08:00 Taipei: summer off-peak.
        assert_eq!(t.price_at(at("2026-07-15T00:00:00Z"), tz, 2.6), 2.06);
        // Sat 2026-07-18 12:00 Taipei: weekend off-peak.
        assert_eq!(t.price_at(at("2026-07-18T04:00:00Z"), tz, 2.6), 2.06);
        // Wed 2026-11-18 12:00 Taipei: between the two winter peaks.
        assert_eq!(t.price_at(at("2026-11-18T04:00:00Z"), tz, 2.6), 1.99);
        assert_eq!(t.price_at(at("2026-11-18T07:00:00Z"), tz, 2.6), 4.93);
        assert!(Tariff::default().is_flat());
        assert_eq!(Tariff::default().price_at(at("2026-11-18T07:00:00Z"), tz, 2.6), 2.6);
    }

    #[test]
    fn bad_periods_name_the_field() {
        let mut t = Tariff::taipower_example();
        t.periods[1].to = "25:00".into();
        assert!(t.validate("tariff").unwrap_err().key.contains("periods[1]"));
        let mut t = Tariff::taipower_example();
        t.periods[0].months = vec![13];
        assert_eq!(t.validate("tariff").unwrap_err().key, "tariff.periods[0].months");
    }
}
