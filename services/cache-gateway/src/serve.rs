//! The client-facing HTTP server, hardened against slow and greedy clients:
//! a connection that has not sent a whole request head within
//! `header_read_timeout` is closed (a new connection, or a keep-alive one
//! sitting idle between requests); past `max_connections` open connections a
//! new one gets a 503 and is closed; request bodies have their own deadline
//! (in the proxy). On shutdown, connections finish their request in flight
//! and close.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits on client connections.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// The answer to a connection past `max_connections`.
fn busy() -> Vec<u8> {
    let body = r#"{"error":"too many open connections (cache_gateway.max_connections); retry shortly"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections
/// finish their request.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: ServeLimits, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let tracker = tokio_util::task::TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(limits.header_read_timeout);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracker.spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&busy())).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, shutdown) = (app.clone(), builder.clone(), shutdown.clone());
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer as SocketAddr));
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}
