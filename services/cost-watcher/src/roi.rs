//! Owning GPUs against renting cloud GPUs: the seed's worked numbers,
//! computed from its inputs, with the formulas shown.
//!
//! The seed rounds the daily electricity cost to 0.1 before multiplying
//! (17.5 x 30 = 525 a month, x 12 = 6,300 a year); the report prints those
//! figures and the exact ones beside them. The seed gives two payback
//! periods that disagree ("about 6 months" and "2.3 months"); neither follows
//! from its inputs, so the report prints the figure the inputs give and the
//! formula.
use serde::{Deserialize, Serialize};

/// ROI inputs (the seed's by default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoiInputs {
    /// Purchase price of the local GPU (RTX 4070: about 20,000).
    pub gpu_price: f64,
    /// Average draw while training (280 W).
    pub average_power_w: f64,
    /// Hours a day the local GPU trains (24).
    pub local_hours_per_day: f64,
    pub electricity_price_per_kwh: f64,
    /// Upkeep a year (2,000).
    pub upkeep_per_year: f64,
    /// Cloud GPU price an hour in USD (GCP T4: 1.35).
    pub cloud_gpu_per_hour_usd: f64,
    /// Exchange rate (1.35 USD is about 43 TWD).
    pub usd_rate: f64,
    /// Cloud GPU cost a year, 8 hours a day (125,000).
    pub cloud_gpu_per_year: f64,
    pub cloud_storage_per_year: f64,
    pub cloud_network_per_year: f64,
    pub days_per_month: f64,
}

impl Default for RoiInputs {
    fn default() -> Self {
        Self {
            gpu_price: 20_000.0,
            average_power_w: 280.0,
            local_hours_per_day: 24.0,
            electricity_price_per_kwh: 2.6,
            upkeep_per_year: 2_000.0,
            cloud_gpu_per_hour_usd: 1.35,
            usd_rate: 43.0 / 1.35,
            cloud_gpu_per_year: 125_000.0,
            cloud_storage_per_year: 12_000.0,
            cloud_network_per_year: 8_000.0,
            days_per_month: 30.0,
        }
    }
}

/// The computed figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Roi {
    pub power_per_hour: f64,
    pub power_per_day_exact: f64,
    /// Rounded to 0.1, as the seed does.
    pub power_per_day: f64,
    pub power_per_month: f64,
    pub power_per_year: f64,
    pub power_per_month_exact: f64,
    pub power_per_year_exact: f64,
    pub cloud_per_hour: f64,
    /// 1 - local/cloud, per hour of GPU time.
    pub hourly_saving_ratio: f64,
    pub local_first_year: f64,
    pub cloud_first_year: f64,
    pub first_year_saving: f64,
    pub first_year_saving_ratio: f64,
    /// Months until the purchase is paid back by the lower running cost.
    pub payback_months: f64,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn compute(i: &RoiInputs) -> Roi {
    let kw = i.average_power_w / 1000.0;
    let power_per_hour = kw * i.electricity_price_per_kwh;
    let power_per_day_exact = power_per_hour * i.local_hours_per_day;
    let power_per_day = round1(power_per_day_exact);
    let power_per_month = power_per_day * i.days_per_month;
    let power_per_year = power_per_month * 12.0;
    let cloud_per_hour = i.cloud_gpu_per_hour_usd * i.usd_rate;
    let local_operating = power_per_year + i.upkeep_per_year;
    let cloud_first_year = i.cloud_gpu_per_year + i.cloud_storage_per_year + i.cloud_network_per_year;
    let local_first_year = i.gpu_price + local_operating;
    let first_year_saving = cloud_first_year - local_first_year;
    let monthly_operating_saving = (cloud_first_year - local_operating) / 12.0;
    Roi {
        power_per_hour,
        power_per_day_exact,
        power_per_day,
        power_per_month,
        power_per_year,
        power_per_month_exact: power_per_day_exact * i.days_per_month,
        power_per_year_exact: power_per_day_exact * i.days_per_month * 12.0,
        cloud_per_hour,
        hourly_saving_ratio: 1.0 - round2(power_per_hour) / cloud_per_hour,
        local_first_year,
        cloud_first_year,
        first_year_saving,
        first_year_saving_ratio: first_year_saving / cloud_first_year,
        payback_months: if monthly_operating_saving > 0.0 {
            i.gpu_price / monthly_operating_saving
        } else {
            f64::INFINITY
        },
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (k, c) in s.chars().enumerate() {
        if k > 0 && (s.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The report `costmesh roi` prints.
pub fn render(i: &RoiInputs, r: &Roi, currency: &str) -> String {
    let c = currency;
    let mut s = String::new();
    s += &format!(
        "Electricity for the local GPU ({} W average, {} h/day, {} {c}/kWh)\n",
        i.average_power_w, i.local_hours_per_day, i.electricity_price_per_kwh
    );
    s += &format!(
        "  per hour   {:>10.2} {c}   = {} kW x {} {c}/kWh\n",
        r.power_per_hour,
        i.average_power_w / 1000.0,
        i.electricity_price_per_kwh
    );
    s += &format!("  per day    {:>10.1} {c}   (exact {:.3})\n", r.power_per_day, r.power_per_day_exact);
    s += &format!(
        "  per month  {:>10} {c}   = {:.1} x {} days (exact {:.2})\n",
        thousands(r.power_per_month),
        r.power_per_day,
        i.days_per_month,
        r.power_per_month_exact
    );
    s += &format!(
        "  per year   {:>10} {c}   = month x 12 (exact {:.2})\n",
        thousands(r.power_per_year),
        r.power_per_year_exact
    );
    s += &format!(
        "Cloud GPU per hour {:>6.0} {c}   = {} USD x {:.2}\n",
        r.cloud_per_hour, i.cloud_gpu_per_hour_usd, i.usd_rate
    );
    s += &format!(
        "Saving per GPU hour {:>5.1} %     = 1 - {:.2} / {:.0}\n",
        r.hourly_saving_ratio * 100.0,
        round2(r.power_per_hour),
        r.cloud_per_hour
    );
    s += "First year\n";
    s += &format!(
        "  local      {:>10} {c}   = GPU {} + power {} + upkeep {}\n",
        thousands(r.local_first_year),
        thousands(i.gpu_price),
        thousands(r.power_per_year),
        thousands(i.upkeep_per_year)
    );
    s += &format!(
        "  cloud      {:>10} {c}   = GPU {} + storage {} + network {}\n",
        thousands(r.cloud_first_year),
        thousands(i.cloud_gpu_per_year),
        thousands(i.cloud_storage_per_year),
        thousands(i.cloud_network_per_year)
    );
    s += &format!(
        "  saved      {:>10} {c}   ({:.1} % of the cloud cost)\n",
        thousands(r.first_year_saving),
        r.first_year_saving_ratio * 100.0
    );
    s += &format!(
        "Payback {:.2} months = GPU price / ((cloud a year - local running cost a year) / 12) = {} / (({} - {}) / 12)\n",
        r.payback_months,
        thousands(i.gpu_price),
        thousands(r.cloud_first_year),
        thousands(r.power_per_year + i.upkeep_per_year)
    );
    s += "  (the seed gives both \"about 6 months\" and \"2.3 months\"; its own inputs give the figure above)\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_the_seeds_worked_numbers() {
        let r = compute(&RoiInputs::default());
        assert_eq!(r.power_per_day, 17.5);
        assert!((r.power_per_day_exact - 17.472).abs() < 1e-9);
        assert_eq!(r.power_per_month, 525.0);
        assert_eq!(r.power_per_year, 6_300.0);
        assert_eq!(round2(r.power_per_hour), 0.73);
        assert!((r.cloud_per_hour - 43.0).abs() < 1e-9);
        assert_eq!((r.hourly_saving_ratio * 1000.0).round() / 10.0, 98.3);
        assert_eq!(r.first_year_saving, 116_700.0);
        assert_eq!((r.first_year_saving_ratio * 1000.0).round() / 10.0, 80.5);
        // 20,000 / ((145,000 - 8,300) / 12) = 1.76 months.
        assert!((r.payback_months - 1.7557).abs() < 1e-3, "{}", r.payback_months);
    }

    #[test]
    fn the_report_shows_the_figures_and_the_formula() {
        let i = RoiInputs::default();
        let text = render(&i, &compute(&i), "TWD");
        for needle in [
            "17.5 TWD",
            "525 TWD",
            "6,300 TWD",
            "0.73 TWD",
            "98.3 %",
            "116,700 TWD",
            "80.5 %",
            "Payback 1.76 months",
            "20,000 / ((145,000 - 8,300) / 12)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
