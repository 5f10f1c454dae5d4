//! Grid carbon intensity: a fixed figure from config, or a time line read
//! from a file or an HTTP source in the shape of the Electricity Maps API
//! (`/v3/carbon-intensity/latest`: one object with `carbonIntensity` and
//! `datetime`; `/v3/carbon-intensity/history`: `{"history": [...]}` of the
//! same objects). The intensity of a moment is the newest point at or
//! before it, so a sample is weighed by the grid it ran on.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The `[cost_watcher.carbon]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CarbonConfig {
    /// gCO2e per kWh when no source has a figure (Taiwan's 2023 grid
    /// emission factor, 0.494 kg CO2e/kWh, as the example).
    pub intensity_g_per_kwh: f64,
    /// A file or an `http(s)://` URL with Electricity Maps-shaped JSON;
    /// empty: the fixed figure only.
    pub source: String,
    /// How often an HTTP source is read again (a file is read at start).
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// A file holding the API token, sent as the `auth-token` header.
    pub auth_token_file: Option<PathBuf>,
}

impl Default for CarbonConfig {
    fn default() -> Self {
        Self {
            intensity_g_per_kwh: 494.0,
            source: String::new(),
            refresh: Duration::from_secs(900),
            auth_token_file: None,
        }
    }
}

/// One Electricity Maps data point.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Point {
    carbon_intensity: Option<f64>,
    datetime: DateTime<Utc>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Body {
    History { history: Vec<Point> },
    Latest(Point),
}

/// Parses Electricity Maps JSON (latest or history) into (time, g/kWh)
/// points; the error says what is wrong.
pub fn parse(json: &[u8]) -> Result<Vec<(DateTime<Utc>, f64)>, String> {
    let body: Body = serde_json::from_slice(json)
        .map_err(|e| format!("not Electricity Maps carbon-intensity JSON (carbonIntensity, datetime): {e}"))?;
    let points = match body {
        Body::History { history } => history,
        Body::Latest(p) => vec![p],
    };
    let mut out = Vec::new();
    for p in points {
        // A point without a figure (the API's gaps) is skipped.
        let Some(g) = p.carbon_intensity else { continue };
        if !(g.is_finite() && g >= 0.0) {
            return Err(format!("carbonIntensity {g} at {} is not an intensity", p.datetime));
        }
        out.push((p.datetime, g));
    }
    Ok(out)
}

/// The intensity time line, shared by the sample handler and the reader.
#[derive(Clone, Debug)]
pub struct Intensity {
    fixed_g_per_kwh: f64,
    points: Arc<RwLock<BTreeMap<DateTime<Utc>, f64>>>,
}

impl Intensity {
    pub fn fixed(g_per_kwh: f64) -> Self {
        Self { fixed_g_per_kwh: g_per_kwh, points: Default::default() }
    }

    /// Adds points (newer figures for the same time replace older ones).
    pub fn extend(&self, points: impl IntoIterator<Item = (DateTime<Utc>, f64)>) {
        let mut p = self.points.write().expect("intensity lock");
        p.extend(points);
        // A year of hourly points is plenty.
        while p.len() > 24 * 400 {
            p.pop_first();
        }
    }

    /// gCO2e per kWh at `t`: the newest point at or before it; before the
    /// first point, the first; with none, the fixed figure.
    pub fn at(&self, t: DateTime<Utc>) -> f64 {
        let p = self.points.read().expect("intensity lock");
        p.range(..=t).next_back().or_else(|| p.iter().next()).map_or(self.fixed_g_per_kwh, |(_, g)| *g)
    }

    /// The same in integer mg per kWh, as the ledger books it.
    pub fn mg_per_kwh_at(&self, t: DateTime<Utc>) -> u64 {
        (self.at(t) * 1000.0).round() as u64
    }
}

/// Reads the configured source once (a file) or every `refresh` (HTTP)
/// until shutdown. A failed read keeps what is known and says why.
pub async fn follow(cfg: CarbonConfig, intensity: Intensity, shutdown: tokio_util::sync::CancellationToken) {
    if cfg.source.is_empty() {
        return;
    }
    let http = cfg.source.starts_with("http://") || cfg.source.starts_with("https://");
    // TLS to the API needs a crypto provider; ring is already in the build.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let token = cfg.auth_token_file.as_ref().and_then(|f| {
        costmesh_runtime::config::read_secret_file(f)
            .map_err(|e| tracing::error!(error = %e, "carbon auth token not read"))
            .ok()
    });
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
    loop {
        let read = if http {
            let mut req = client.get(&cfg.source);
            if let Some(t) = &token {
                req = req.header("auth-token", t.as_str());
            }
            match req.send().await.and_then(|r| r.error_for_status()) {
                Ok(r) => r.bytes().await.map(|b| b.to_vec()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        } else {
            std::fs::read(&cfg.source).map_err(|e| e.to_string())
        };
        match read.and_then(|b| parse(&b)) {
            Ok(points) => {
                tracing::info!(source = %masked(&cfg.source), points = points.len(), "carbon intensity read");
                intensity.extend(points);
            }
            Err(e) => {
                tracing::warn!(source = %masked(&cfg.source), error = %e, "carbon intensity not read; keeping the figures known")
            }
        }
        if !http {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.refresh) => {}
        }
    }
}

/// The source without any query string (where an API key could sit).
fn masked(source: &str) -> &str {
    source.split('?').next().unwrap_or(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_and_history_shapes_parse_and_the_newest_point_applies() {
        let latest = br#"{"zone":"TW","carbonIntensity":549,"datetime":"2026-12-01T10:00:00.000Z","updatedAt":"2026-12-01T09:47:08.610Z","emissionFactorType":"lifecycle","isEstimated":true}"#;
        assert_eq!(parse(latest).unwrap(), vec![("2026-12-01T10:00:00Z".parse().unwrap(), 549.0)]);
        let history = br#"{"zone":"TW","history":[
            {"zone":"TW","carbonIntensity":500,"datetime":"2026-12-01T00:00:00.000Z"},
            {"zone":"TW","carbonIntensity":null,"datetime":"2026-12-01T01:00:00.000Z"},
            {"zone":"TW","carbonIntensity":400,"datetime":"2026-12-01T02:00:00.000Z"}]}"#;
        let i = Intensity::fixed(494.0);
        assert_eq!(i.at(Utc::now()), 494.0);
        i.extend(parse(history).unwrap());
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(i.at(t("2026-12-01T01:30:00Z")), 500.0, "the gap keeps the last figure");
        assert_eq!(i.at(t("2026-12-01T02:00:00Z")), 400.0);
        assert_eq!(i.at(t("2026-11-30T00:00:00Z")), 500.0, "before the first point: the first");
        assert_eq!(i.mg_per_kwh_at(t("2026-12-01T03:00:00Z")), 400_000);
        assert!(parse(br#"{"zone":"TW"}"#).unwrap_err().contains("carbonIntensity"));
        assert!(parse(br#"{"carbonIntensity":-1,"datetime":"2026-12-01T00:00:00Z"}"#).is_err());
    }

    /// The HTTP source as Electricity Maps serves it (a local server with
    /// the API's JSON), with the token header; and a file source.
    #[tokio::test]
    async fn an_http_and_a_file_source_are_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = c.read(&mut buf).await.unwrap_or(0);
                let _ = seen_tx.send(String::from_utf8_lossy(&buf[..n]).to_string());
                let body = r#"{"zone":"TW","carbonIntensity":612,"datetime":"2026-12-01T10:00:00.000Z"}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes()).await;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "secret-token\n").unwrap();
        let cfg = CarbonConfig {
            source: format!("http://{addr}/v3/carbon-intensity/latest?zone=TW"),
            auth_token_file: Some(token),
            ..Default::default()
        };
        let (i, stop) = (Intensity::fixed(494.0), tokio_util::sync::CancellationToken::new());
        let task = tokio::spawn(follow(cfg, i.clone(), stop.clone()));
        let request = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv()).await.unwrap().unwrap();
        assert!(request.starts_with("GET /v3/carbon-intensity/latest?zone=TW "), "{request}");
        assert!(request.to_ascii_lowercase().contains("auth-token: secret-token"), "{request}");
        let t: DateTime<Utc> = "2026-12-01T11:00:00Z".parse().unwrap();
        costmesh_testkit::eventually(Duration::from_secs(10), "the figure read", || async { i.at(t) == 612.0 }).await;
        stop.cancel();
        task.await.unwrap();

        let file = dir.path().join("history.json");
        std::fs::write(&file, r#"{"history":[{"carbonIntensity":300,"datetime":"2026-12-01T00:00:00Z"}]}"#).unwrap();
        let f = Intensity::fixed(494.0);
        follow(
            CarbonConfig { source: file.display().to_string(), ..Default::default() },
            f.clone(),
            Default::default(),
        )
        .await;
        assert_eq!(f.at(t), 300.0);
    }
}
