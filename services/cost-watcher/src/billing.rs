//! Google Cloud Billing budget notifications, consumed from a Pub/Sub
//! subscription with `google-cloud-pubsub`.
//!
//! The body is Google's documented JSON (`budgetDisplayName`, `costAmount`,
//! `costIntervalStart`, `budgetAmount`, `budgetAmountType`, `currencyCode`,
//! optional `alertThresholdExceeded` and `forecastThresholdExceeded`); the
//! attributes carry `billingAccountId`, `budgetId` and `schemaVersion`
//! ("1.0"). Google sends a notification several times a day whether or not
//! a threshold was crossed, each with the running total of the interval, so
//! the ledger books only the growth of that total and repeats change nothing.
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use costmesh_contracts::v1::CloudBudgetNotification;
use serde::{Deserialize, Serialize};

/// Where the notifications come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    /// `projects/<project>/subscriptions/<subscription>`; empty: off.
    pub subscription: String,
    /// Pub/Sub endpoint; empty: Google's (`https://pubsub.googleapis.com`).
    pub endpoint: String,
    /// `default` (Application Default Credentials) or `anonymous` (emulators).
    pub credentials: String,
    /// Ledger-currency value of one unit of each billing currency
    /// (`USD = 31.85`); the ledger's own currency is 1.
    pub exchange_rates: HashMap<String, f64>,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            subscription: String::new(),
            endpoint: String::new(),
            credentials: "default".into(),
            exchange_rates: HashMap::from([("USD".to_string(), 43.0 / 1.35)]),
        }
    }
}

/// The notification body, as Google sends it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationBody {
    pub budget_display_name: String,
    pub cost_amount: f64,
    pub cost_interval_start: DateTime<Utc>,
    pub budget_amount: f64,
    #[serde(default)]
    pub budget_amount_type: String,
    pub currency_code: String,
    #[serde(default)]
    pub alert_threshold_exceeded: Option<f64>,
    #[serde(default)]
    pub forecast_threshold_exceeded: Option<f64>,
}

/// Parses and checks one Pub/Sub message; the error says what is wrong.
pub fn parse(
    data: &[u8],
    attributes: &HashMap<String, String>,
    message_id: &str,
) -> Result<CloudBudgetNotification, String> {
    match attributes.get("schemaVersion").map(String::as_str) {
        Some("1.0") => {}
        Some(v) => return Err(format!("attribute schemaVersion is {v:?}, expected \"1.0\"")),
        None => return Err("attribute schemaVersion is missing".into()),
    }
    let budget_id = attributes.get("budgetId").filter(|s| !s.is_empty()).ok_or("attribute budgetId is missing")?;
    let body: NotificationBody =
        serde_json::from_slice(data).map_err(|e| format!("body is not a budget notification: {e}"))?;
    if !(body.cost_amount.is_finite() && body.cost_amount >= 0.0) {
        return Err(format!("costAmount {} is not an amount", body.cost_amount));
    }
    if !(body.budget_amount.is_finite() && body.budget_amount > 0.0) {
        return Err(format!("budgetAmount {} is not a positive amount", body.budget_amount));
    }
    Ok(CloudBudgetNotification {
        billing_account_id: attributes.get("billingAccountId").cloned().unwrap_or_default(),
        budget_id: budget_id.clone(),
        budget_display_name: body.budget_display_name,
        cost_amount: body.cost_amount,
        cost_interval_start: Some(costmesh_contracts::timestamp(body.cost_interval_start)),
        budget_amount: body.budget_amount,
        budget_amount_type: body.budget_amount_type,
        currency_code: body.currency_code,
        alert_threshold_exceeded: body.alert_threshold_exceeded,
        forecast_threshold_exceeded: body.forecast_threshold_exceeded,
        schema_version: "1.0".into(),
        message_id: message_id.to_string(),
    })
}

/// Converts an amount to ledger micros.
pub fn to_micros(
    amount: f64,
    currency: &str,
    ledger_currency: &str,
    rates: &HashMap<String, f64>,
) -> Result<i64, String> {
    let rate = if currency == ledger_currency {
        1.0
    } else {
        *rates.get(currency).ok_or_else(|| {
            format!("no exchange rate for {currency} (set cost_watcher.billing.exchange_rates.{currency})")
        })?
    };
    Ok((amount * rate * 1e6).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> HashMap<String, String> {
        HashMap::from([
            ("schemaVersion".into(), "1.0".into()),
            ("budgetId".into(), "b-123".into()),
            ("billingAccountId".into(), "01D4EE-079462-DFD6EC".into()),
        ])
    }

    #[test]
    fn parses_googles_documented_example() {
        let body = br#"{"budgetDisplayName":"name-of-budget","alertThresholdExceeded":1.0,"costAmount":100.01,"costIntervalStart":"2019-01-01T00:00:00Z","budgetAmount":100.00,"budgetAmountType":"SPECIFIED_AMOUNT","currencyCode":"USD"}"#;
        let n = parse(body, &attrs(), "m1").unwrap();
        assert_eq!(n.budget_id, "b-123");
        assert_eq!(n.cost_amount, 100.01);
        assert_eq!(n.alert_threshold_exceeded, Some(1.0));
        assert_eq!(n.forecast_threshold_exceeded, None);
        assert_eq!(to_micros(1.35, "USD", "TWD", &BillingConfig::default().exchange_rates).unwrap(), 43_000_000);
    }

    #[test]
    fn bad_notifications_say_why() {
        let mut a = attrs();
        a.insert("schemaVersion".into(), "2.0".into());
        assert!(parse(b"{}", &a, "m").unwrap_err().contains("schemaVersion"));
        let mut a = attrs();
        a.remove("budgetId");
        assert!(parse(b"{}", &a, "m").unwrap_err().contains("budgetId"));
        assert!(parse(b"not json", &attrs(), "m").unwrap_err().contains("not a budget notification"));
        let neg = br#"{"budgetDisplayName":"x","costAmount":-1,"costIntervalStart":"2019-01-01T00:00:00Z","budgetAmount":1,"currencyCode":"USD"}"#;
        assert!(parse(neg, &attrs(), "m").unwrap_err().contains("costAmount"));
        assert!(to_micros(1.0, "EUR", "TWD", &HashMap::new()).unwrap_err().contains("EUR"));
    }
}
