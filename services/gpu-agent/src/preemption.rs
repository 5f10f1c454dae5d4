//! Watches the GCE metadata server for this VM's preemption notice and
//! publishes it on the durable `preemption.<node>` subject.
//!
//! `GET /computeMetadata/v1/instance/preempted?wait_for_change=true` with
//! `Metadata-Flavor: Google` answers `TRUE` once the VM has been told to stop
//! (about 30 s before power-off). The watcher long-polls with the last ETag
//! so it hears the change at once, retries a server that is down or answers
//! garbage with capped exponential backoff, and never stops the agent.
use std::time::Duration;

use costmesh_contracts::v1::PreemptionNotice;
use costmesh_runtime::events::EventBus;
use costmesh_runtime::Clock;
use tokio_util::sync::CancellationToken;

/// GCE gives about this long between the notice and power-off.
pub const GCE_NOTICE: Duration = Duration::from_secs(30);

/// What one poll learnt.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Preempted(bool, Option<String>),
    Bad(String),
}

async fn poll(client: &reqwest::Client, base: &str, etag: Option<&str>) -> Answer {
    let mut url = format!("{}/computeMetadata/v1/instance/preempted", base.trim_end_matches('/'));
    if let Some(e) = etag {
        url.push_str(&format!("?wait_for_change=true&last_etag={e}&timeout_sec=300"));
    }
    let resp = match client.get(&url).header("Metadata-Flavor", "Google").send().await {
        Ok(r) => r,
        Err(e) => return Answer::Bad(format!("request failed: {e}")),
    };
    let status = resp.status();
    let new_etag = resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
    let flavor_ok = resp.headers().get("metadata-flavor").and_then(|v| v.to_str().ok()) == Some("Google");
    let body = match resp.text().await {
        Ok(b) => b,
        Err(e) => return Answer::Bad(format!("reading body: {e}")),
    };
    if !status.is_success() {
        return Answer::Bad(format!("HTTP {status}: {}", body.chars().take(120).collect::<String>()));
    }
    if !flavor_ok {
        return Answer::Bad("response lacks `Metadata-Flavor: Google`: not a metadata server".into());
    }
    match body.trim() {
        "TRUE" => Answer::Preempted(true, new_etag),
        "FALSE" => Answer::Preempted(false, new_etag),
        other => Answer::Bad(format!("unexpected body {:?}", other.chars().take(60).collect::<String>())),
    }
}

/// Runs until shutdown.
pub async fn watch(base_url: String, node: String, events: EventBus, clock: Clock, shutdown: CancellationToken) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(330)).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the metadata client; preemption notices are off");
            return;
        }
    };
    let mut etag: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    let mut announced = false;
    tracing::info!(metadata = %base_url, "watching for preemption");
    loop {
        let answer = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = poll(&client, &base_url, etag.as_deref()) => a,
        };
        match answer {
            Answer::Preempted(preempted, tag) => {
                backoff = Duration::from_secs(1);
                etag = tag.or(etag);
                if preempted && !announced {
                    announced = true;
                    let now = clock.now();
                    let notice = PreemptionNotice {
                        node: node.clone(),
                        instance: node.clone(),
                        noticed_at: Some(costmesh_contracts::timestamp(now)),
                        deadline: Some(costmesh_contracts::timestamp(
                            now + chrono::Duration::from_std(GCE_NOTICE).unwrap_or_default(),
                        )),
                        source: "gce-metadata".into(),
                    };
                    let subject = events.subjects.preemption(&node);
                    // One id per preemption, so a retried publish is de-duplicated.
                    let id = format!("preempted-{node}-{}", etag.as_deref().unwrap_or("0"));
                    loop {
                        match events.publish_durable_with_id(&subject, &notice, &id).await {
                            Ok(_) => {
                                tracing::warn!(%node, "preemption notice received and published");
                                break;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "publishing the preemption notice failed; retrying");
                                tokio::select! {
                                    _ = shutdown.cancelled() => return,
                                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                                }
                            }
                        }
                    }
                } else if !preempted {
                    announced = false;
                }
                if etag.is_none() {
                    // A server without ETags cannot long-poll: pace the polls.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = clock.sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            Answer::Bad(why) => {
                tracing::warn!(reason = %why, retry_in = ?backoff, "metadata server poll failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = clock.sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
