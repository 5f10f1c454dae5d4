//! The gateway as a shared cache people can trust (RFC 9111 §3.5 and
//! friends), against a backend whose answers depend on the request's
//! headers: private answers never leak, headers that change the answer are
//! in the key or checked through `Vary`, tenants come from API keys, purge
//! needs the admin token, paths cannot climb above the backend's base, and
//! large answers are streamed and not stored.
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use costmesh_cache_gateway::{proxy, tenants::hash_key, Config, RouteConfig, TenantConfig};

/// Answers with what the request asked for; `x-test-*` headers pick the
/// response's caching headers. Every answer carries the call number.
async fn backend() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().fallback(move |uri: axum::http::Uri, h: HeaderMap, body: String| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let mut headers = vec![];
            for (test, real) in [
                ("x-test-cc", "cache-control"),
                ("x-test-set-cookie", "set-cookie"),
                ("x-test-vary", "vary"),
                ("x-test-etag", "etag"),
            ] {
                if !get(test).is_empty() {
                    headers.push((real.to_string(), get(test)));
                }
            }
            let who = get("authorization");
            let lang = get("accept-language");
            let text = if get("accept").contains("text/html") {
                headers.push(("content-type".into(), "text/html".into()));
                format!("<p>call {n} {lang} {who}</p>")
            } else {
                headers.push(("content-type".into(), "application/json".into()));
                format!(
                    r#"{{"call":{n},"lang":"{lang}","who":"{who}","path":"{}","region":"{}","ct":"{}","tenant":"{}","len":{}}}"#,
                    uri.path(),
                    get("x-region"),
                    get("content-type"),
                    get("x-tenant"),
                    body.len()
                )
            };
            let big: usize = get("x-test-big").parse().unwrap_or(0);
            let mut bytes = text.into_bytes();
            if big > 0 {
                bytes = vec![b'x'; big];
            }
            if get("accept-encoding").contains("gzip") {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&bytes).unwrap();
                bytes = e.finish().unwrap();
                headers.push(("content-encoding".into(), "gzip".into()));
            }
            let mut r = axum::response::Response::builder().status(200);
            for (k, v) in headers {
                r = r.header(k, v);
            }
            r.body(axum::body::Body::from(bytes)).unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

/// The gateway over `backend` on route `llm`, served with peer addresses.
async fn gateway(backend: &str, tune: impl FnOnce(&mut Config)) -> String {
    let mut cfg = Config {
        routes: vec![RouteConfig {
            name: "llm".into(),
            backends: vec![backend.to_string().into()],
            ..Default::default()
        }],
        tenants: vec![TenantConfig { name: "tenant-a".into(), key_sha256: hash_key("key-a") }],
        ..Default::default()
    };
    tune(&mut cfg);
    let gw = costmesh_cache_gateway::gateway(&cfg, None, Default::default()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let app = proxy::router(gw, cfg.max_body_bytes).into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Reply {
    status: u16,
    cache: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

async fn get(gw: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(reqwest::Method::GET, gw, path, headers, "").await
}

async fn send(method: reqwest::Method, gw: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut req = reqwest::Client::new().request(method, format!("{gw}{path}")).body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let cache = headers.get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    Reply { status, cache, headers, body: r.bytes().await.unwrap().to_vec() }
}

/// A GET with exactly this request target: (status, body).
async fn raw_get(gw: &str, target: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gw.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[tokio::test]
async fn answers_to_credentials_are_not_shared_unless_the_response_allows_it() {
    let (b, calls) = backend().await;
    let gw = gateway(&b, |_| ()).await;
    let u1 = get(&gw, "/llm/me", &[("authorization", "Bearer user-1")]).await;
    assert!(u1.text().contains("user-1") && u1.cache.contains("detail=credentials"), "{} {}", u1.cache, u1.text());
    for h in [vec![], vec![("authorization", "Bearer user-2")]] {
        let other = get(&gw, "/llm/me", &h).await;
        assert!(!other.text().contains("user-1"), "user 1's answer leaked: {}", other.text());
        assert!(!other.cache.contains("hit"), "{}", other.cache);
    }
    // An anonymous answer is not served to a request with credentials either.
    let anon = get(&gw, "/llm/open", &[]).await;
    assert!(anon.cache.contains("stored"), "{}", anon.cache);
    let authed = get(&gw, "/llm/open", &[("authorization", "Bearer user-1")]).await;
    assert!(!authed.cache.contains("hit"), "an entry without public served a request with credentials");
    // Cookies count as credentials unless the route opts in.
    let c1 = get(&gw, "/llm/c", &[("cookie", "session=1")]).await;
    assert!(c1.cache.contains("detail=credentials"), "{}", c1.cache);
    // `public` lets the answer be shared, with other users too.
    let p = [("authorization", "Bearer user-1"), ("x-test-cc", "public, max-age=60")];
    assert!(get(&gw, "/llm/pub", &p).await.cache.contains("stored"));
    let p2 = get(&gw, "/llm/pub", &[("authorization", "Bearer user-2")]).await;
    assert!(p2.cache.contains("hit"), "{}", p2.cache);
    let before = calls.load(Ordering::SeqCst);
    // private, no-store and Set-Cookie answers are never shared.
    for h in [("x-test-cc", "private"), ("x-test-cc", "no-store"), ("x-test-set-cookie", "s=1")] {
        let path = format!("/llm/never-{}", h.1.replace([' ', '='], ""));
        let first = get(&gw, &path, &[h]).await;
        assert!(!first.cache.contains("stored"), "{h:?}: {}", first.cache);
        assert!(!get(&gw, &path, &[]).await.cache.contains("hit"), "{h:?} was shared");
    }
    assert_eq!(calls.load(Ordering::SeqCst), before + 6);
}

#[tokio::test]
async fn headers_that_change_the_answer_are_in_the_key_or_checked_by_vary() {
    let (b, _) = backend().await;
    let gw = gateway(&b, |_| ()).await;
    let html = get(&gw, "/llm/page", &[("accept", "text/html")]).await;
    assert_eq!(html.headers["content-type"], "text/html");
    let json = get(&gw, "/llm/page", &[("accept", "application/json")]).await;
    assert_eq!(json.headers["content-type"], "application/json", "the HTML answer was served to a JSON client");
    let fr = get(&gw, "/llm/hello", &[("accept-language", "fr")]).await;
    let en = get(&gw, "/llm/hello", &[("accept-language", "en")]).await;
    assert!(fr.text().contains("\"lang\":\"fr\"") && en.text().contains("\"lang\":\"en\""), "{}", en.text());
    // The same bytes as text/plain and as JSON are different requests.
    let plain = send(reqwest::Method::POST, &gw, "/llm/gen", &[("content-type", "text/plain")], r#"{"a":1}"#).await;
    let asjson =
        send(reqwest::Method::POST, &gw, "/llm/gen", &[("content-type", "application/json")], r#"{"a":1}"#).await;
    assert!(!asjson.cache.contains("hit") && asjson.text().contains("application/json"), "{}", asjson.text());
    assert!(plain.text().contains("text/plain"));
    // gzip is stored with its Content-Encoding, and not given to clients that did not ask for it.
    let gz = get(&gw, "/llm/z", &[("accept-encoding", "gzip")]).await;
    assert_eq!(gz.headers["content-encoding"], "gzip");
    let gz_hit = get(&gw, "/llm/z", &[("accept-encoding", "gzip")]).await;
    assert!(gz_hit.cache.contains("hit") && gz_hit.headers["content-encoding"] == "gzip", "{}", gz_hit.cache);
    let identity = get(&gw, "/llm/z", &[]).await;
    assert!(
        identity.headers.get("content-encoding").is_none() && identity.text().starts_with('{'),
        "{}",
        identity.text()
    );
    // A header the response varies on beyond the key must match.
    let tw = get(&gw, "/llm/r", &[("x-region", "tw"), ("x-test-vary", "X-Region")]).await;
    assert!(tw.cache.contains("stored"), "{}", tw.cache);
    assert!(get(&gw, "/llm/r", &[("x-region", "tw")]).await.cache.contains("hit"));
    let us = get(&gw, "/llm/r", &[("x-region", "us")]).await;
    assert!(us.text().contains("\"region\":\"us\""), "the tw answer was served to us: {}", us.text());
    assert!(!get(&gw, "/llm/star", &[("x-test-vary", "*")]).await.cache.contains("stored"), "Vary: * stored");
}

#[tokio::test]
async fn a_conditional_request_gets_304_from_a_fresh_entry() {
    let (b, calls) = backend().await;
    let gw = gateway(&b, |_| ()).await;
    let first = get(&gw, "/llm/e", &[("x-test-etag", "\"v7\""), ("x-test-cc", "max-age=600")]).await;
    assert_eq!(first.headers["etag"], "\"v7\"");
    let nm = get(&gw, "/llm/e", &[("if-none-match", "W/\"v7\"")]).await;
    assert_eq!(nm.status, 304, "{}", nm.cache);
    assert!(nm.body.is_empty() && nm.headers["etag"] == "\"v7\"");
    let changed = get(&gw, "/llm/e", &[("if-none-match", "\"v6\"")]).await;
    assert_eq!((changed.status, changed.headers["cache-control"].to_str().unwrap()), (200, "max-age=600"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn tenants_come_from_api_keys_not_from_x_tenant() {
    let (b, _) = backend().await;
    let gw = gateway(&b, |c| c.routes[0].require_tenant = false).await;
    let a = get(&gw, "/llm/t", &[("x-api-key", "key-a")]).await;
    assert!(a.text().contains("\"tenant\":\"tenant-a\""), "{}", a.text());
    // A client naming tenant A is not tenant A (and the backend is not told so).
    let spoof = get(&gw, "/llm/t", &[("x-tenant", "tenant-a")]).await;
    assert!(!spoof.cache.contains("hit"), "tenant A's entry served to a spoofer: {}", spoof.cache);
    assert!(spoof.text().contains("\"tenant\":\"\""), "{}", spoof.text());
    assert_eq!(get(&gw, "/llm/t", &[("x-api-key", "wrong")]).await.status, 401);
    let locked = gateway(&b, |c| c.routes[0].require_tenant = true).await;
    let r = get(&locked, "/llm/t", &[]).await;
    assert!(r.status == 401 && r.text().contains("x-api-key"), "{}", r.text());
    assert_eq!(get(&locked, "/llm/t", &[("x-api-key", "key-a")]).await.status, 200);
    // From a trusted proxy, x-tenant is believed.
    let behind = gateway(&b, |c| c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]).await;
    let t = get(&behind, "/llm/t", &[("x-tenant", "tenant-b")]).await;
    assert!(t.text().contains("\"tenant\":\"tenant-b\""), "{}", t.text());
}

#[tokio::test]
async fn purge_needs_the_admin_token() {
    let (b, _) = backend().await;
    let open = gateway(&b, |_| ()).await;
    let r = send(reqwest::Method::POST, &open, "/_costmesh/purge", &[], r#"{"all":true}"#).await;
    assert!(r.status == 403 && r.text().contains("admin_token_file"), "{}", r.text());
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "s3cret-admin\n").unwrap();
    let path = token.path().to_path_buf();
    let gw = gateway(&b, move |c| c.admin_token_file = Some(path)).await;
    for auth in [vec![], vec![("authorization", "Bearer wrong")]] {
        let r = send(reqwest::Method::POST, &gw, "/_costmesh/purge", &auth, r#"{"all":true}"#).await;
        assert_eq!(r.status, 401, "{}", r.text());
    }
    let r = send(
        reqwest::Method::POST,
        &gw,
        "/_costmesh/purge",
        &[("authorization", "Bearer s3cret-admin")],
        r#"{"all":true}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn paths_stay_under_the_backend_base_and_only_allowed_methods_pass() {
    let (b, calls) = backend().await;
    let gw = gateway(&b, |_| ()).await;
    let ok = get(&gw, "/llm/v1/a%20b?x=1", &[]).await;
    assert!(ok.text().contains("\"path\":\"/api/v1/v1/a%20b\""), "{}", ok.text());
    // Sent as raw bytes: an HTTP client library would resolve some of these itself.
    for bad in
        ["/llm/..%2f..%2fadmin/delete-all", "/llm/%2e%2e/%2e%2e/admin", "/llm/a%3Fb", "/llm/a%23b", "/llm/a%5c..%5cb"]
    {
        let (status, body) = raw_get(&gw, bad).await;
        assert!(status == 400 && body.contains("bad path"), "{bad}: {status} {body}");
    }
    for m in ["FOO", "TRACE"] {
        let r = send(reqwest::Method::from_bytes(m.as_bytes()).unwrap(), &gw, "/llm/x", &[], "").await;
        assert_eq!(r.status, 405, "{m}");
        assert!(r.headers["allow"].to_str().unwrap().contains("GET"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a refused request reached the backend");
}

#[tokio::test]
async fn answers_larger_than_max_object_bytes_are_streamed_not_stored() {
    let (b, calls) = backend().await;
    let gw = gateway(&b, |c| c.max_object_bytes = 64 * 1024).await;
    for _ in 0..2 {
        let r = get(&gw, "/llm/big", &[("x-test-big", "300000")]).await;
        assert_eq!((r.status, r.body.len()), (200, 300_000), "{}", r.cache);
        assert!(r.cache.contains("too-large"), "{}", r.cache);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a large answer was served from the cache");
    assert_eq!(StatusCode::OK.as_u16(), get(&gw, "/llm/small", &[]).await.status);
}
