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
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::AsyncWriteExt;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits on client connections, and how many threads serve them.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Serving threads (at least one).
    pub workers: usize,
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

/// An accepted connection on its way to a serving thread, holding its
/// connection slot and counted in that thread's load until it closes.
struct Open {
    /// Taken by the serving thread.
    stream: Option<std::net::TcpStream>,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    load: Arc<AtomicUsize>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shard {
    tx: mpsc::UnboundedSender<Open>,
    load: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections
/// finish their request.
///
/// Connections are accepted here and handed to `workers` threads, each a
/// single-threaded runtime that serves its connections start to end (the
/// one with the fewest open connections gets the next). No request hops
/// between threads and no worker wakes another to steal work: on a machine
/// whose cores are shared (with a load generator, the backend, Redis) a
/// multi-threaded runtime's workers contend for the same cores and a
/// request parked on a descheduled worker waits a whole time slice
/// (BENCHMARKS.md measures both). The rest of the gateway (bus, Redis,
/// health checks) stays on the service's runtime.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let mut shards = Vec::new();
    for i in 0..limits.workers.max(1) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        let (app, builder, shutdown) = (app.clone(), builder.clone(), shutdown.clone());
        std::thread::Builder::new().name(format!("gateway-http-{i}")).spawn(move || {
            rt.block_on(shard(rx, app, builder, shutdown));
            let _ = done_tx.send(());
        })?;
        shards.push(Shard { tx, load: Arc::new(AtomicUsize::new(0)), done });
    }
    let tracker = tokio_util::task::TaskTracker::new();
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
        let Ok(stream) = stream.into_std() else { continue };
        let Some(to) = shards.iter().filter(|s| !s.tx.is_closed()).min_by_key(|s| s.load.load(Ordering::Relaxed))
        else {
            tracing::error!("every serving thread has stopped");
            break;
        };
        to.load.fetch_add(1, Ordering::Relaxed);
        let _ = to.tx.send(Open { stream: Some(stream), peer, _slot: slot, load: to.load.clone() });
    }
    tracker.close();
    for s in shards {
        drop(s.tx);
        let _ = s.done.await;
    }
    tracker.wait().await;
    Ok(())
}

/// One serving thread: its connections, until the acceptor stops and they
/// have finished.
async fn shard(
    mut rx: mpsc::UnboundedReceiver<Open>,
    app: axum::Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    while let Some(mut open) = rx.recv().await {
        let Some(stream) = open.stream.take() else { continue };
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "registering a handed-over connection failed");
                continue;
            }
        };
        let (app, builder, shutdown, peer) = (app.clone(), builder.clone(), shutdown.clone(), open.peer);
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
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
            drop(open);
        });
    }
    tracker.close();
    tracker.wait().await;
}
