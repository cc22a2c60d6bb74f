//! Fetching `jwksUri` key sets over HTTP and HTTPS and keeping them fresh.
//!
//! One task per URI (however many rules and snapshots name it) owns a [`JwksHandle`]; the verifier reads the
//! handle, the task writes it:
//! - fetch at start, then every `refresh_interval`;
//! - fetch early when the verifier reports a `kid` the set lacks (the issuer rotated), but never more often
//!   than `min_refresh_gap`, so a flood of forged kids costs one fetch per gap;
//! - each fetch is bounded by the rule's `timeout` (default `fetch_timeout`) and by `max_body_bytes`;
//! - a failed fetch (network, status, JSON, no usable key) keeps the last good keys and is retried after
//!   `min_refresh_gap`.
//!
//! HTTPS trusts only the roots given in [`FetcherConfig::roots`]: the tree has no system trust store or
//! `webpki-roots`, so an HTTPS `jwksUri` needs its CA in the WaypointConfig (without roots, HTTPS fetches fail
//! with [`JwksError::NoRoots`] and the keys stay empty).
//!
//! The task holds the handle only while fetching and polls it weakly between waits: when every snapshot that
//! named the URI is gone, the task ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use waypoint_filters::jwt::{JwkSet, JwksHandle, KeySet};

use crate::config::security::JwksSource;

#[derive(Debug, Clone)]
pub struct FetcherConfig {
    pub refresh_interval: Duration,
    pub min_refresh_gap: Duration,
    /// Used when the rule sets no `timeout` (Istio's default is 5 s).
    pub fetch_timeout: Duration,
    pub max_body_bytes: usize,
    /// CAs trusted for HTTPS `jwksUri`.
    pub roots: Vec<CertificateDer<'static>>,
}

impl Default for FetcherConfig {
    fn default() -> Self {
        FetcherConfig {
            // Envoy's remote_jwks default cache duration.
            refresh_interval: Duration::from_secs(300),
            min_refresh_gap: Duration::from_secs(1),
            fetch_timeout: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            roots: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{0:?} is not an http(s) URL with a host")]
    Uri(String),
    #[error("HTTPS jwksUri needs CA roots in the waypoint config (no system trust store is used)")]
    NoRoots,
    #[error("invalid CA roots: {0}")]
    Roots(String),
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("status {0}")]
    Status(StatusCode),
    #[error("response body: {0}")]
    Body(String),
    #[error("invalid JWKS: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no usable key in the JWKS")]
    NoKeys,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

struct Entry {
    handle: Weak<JwksHandle>,
}

struct Inner {
    cfg: FetcherConfig,
    tls: Option<TlsConnector>,
    handles: Mutex<HashMap<String, Entry>>,
    /// Handles created outside a runtime, started by [`JwksFetcher::start`].
    pending: Mutex<Vec<(String, Weak<JwksHandle>, Duration)>>,
}

/// The registry of remote key sets; cheap to clone.
#[derive(Clone)]
pub struct JwksFetcher {
    inner: Arc<Inner>,
}

impl JwksFetcher {
    pub fn new(cfg: FetcherConfig) -> Result<JwksFetcher, JwksError> {
        let tls = if cfg.roots.is_empty() {
            None
        } else {
            let mut store = RootCertStore::empty();
            for cert in &cfg.roots {
                store.add(cert.clone()).map_err(|e| JwksError::Roots(e.to_string()))?;
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| JwksError::Roots(e.to_string()))?
                .with_root_certificates(store)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(TlsConnector::from(Arc::new(config)))
        };
        Ok(JwksFetcher {
            inner: Arc::new(Inner {
                cfg,
                tls,
                handles: Mutex::new(HashMap::new()),
                pending: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The shared handle for `uri`, starting its refresh task the first time (or on [`Self::start`] when called
    /// outside a tokio runtime).
    pub fn handle(&self, uri: &str, timeout: Option<Duration>) -> Arc<JwksHandle> {
        let timeout = timeout.unwrap_or(self.inner.cfg.fetch_timeout);
        let mut handles = self.inner.handles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = handles.get(uri).and_then(|e| e.handle.upgrade()) {
            return h;
        }
        let handle = Arc::new(JwksHandle::remote(uri));
        handles.insert(
            uri.to_string(),
            Entry {
                handle: Arc::downgrade(&handle),
            },
        );
        drop(handles);
        let weak = Arc::downgrade(&handle);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(refresh_task(self.inner.clone(), uri.to_string(), weak, timeout));
            }
            Err(_) => {
                self.inner
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((uri.to_string(), weak, timeout))
            }
        }
        handle
    }

    /// Starts the tasks of handles created before a runtime existed. Call from within the runtime.
    pub fn start(&self) {
        let pending = std::mem::take(&mut *self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for (uri, weak, timeout) in pending {
            tokio::spawn(refresh_task(self.inner.clone(), uri, weak, timeout));
        }
    }

    /// Fetches and parses one key set (no caching): the task's unit of work, public for tests and tools.
    pub async fn fetch(&self, uri: &str, timeout: Duration) -> Result<JwkSet, JwksError> {
        fetch(&self.inner, uri, timeout).await
    }
}

impl JwksSource for JwksFetcher {
    fn remote(&self, uri: &str, timeout: Option<Duration>) -> Arc<JwksHandle> {
        self.handle(uri, timeout)
    }
}

/// How long the task sleeps between checks that someone still uses the handle.
const LIVENESS_CHECK: Duration = Duration::from_secs(30);

async fn refresh_task(inner: Arc<Inner>, uri: String, weak: Weak<JwksHandle>, timeout: Duration) {
    let Some(signal) = weak.upgrade().map(|h| h.refresh_signal()) else {
        return;
    };
    let mut next_fetch = Instant::now();
    let mut last_fetch: Option<Instant> = None;
    loop {
        let Some(handle) = weak.upgrade() else {
            tracing::debug!(%uri, "jwks no longer referenced; refresh task ends");
            return;
        };
        if Instant::now() >= next_fetch {
            last_fetch = Some(Instant::now());
            match fetch(&inner, &uri, timeout).await {
                Ok(set) => {
                    let n = handle.store(&set);
                    tracing::debug!(%uri, keys = n, "jwks fetched");
                    next_fetch = Instant::now() + inner.cfg.refresh_interval;
                }
                Err(e) => {
                    tracing::warn!(%uri, error = %e, "jwks fetch failed; keeping the last good keys");
                    next_fetch = Instant::now() + inner.cfg.min_refresh_gap.min(inner.cfg.refresh_interval);
                }
            }
        }
        // Wait without holding the handle, so dropping the last snapshot that uses it ends this task.
        drop(handle);
        let wait = next_fetch.saturating_duration_since(Instant::now()).min(LIVENESS_CHECK);
        tokio::select! {
            _ = signal.notified() => {
                // Rotation suspected: fetch now, but not sooner than the gap after the last fetch.
                let earliest = last_fetch.map_or_else(Instant::now, |t| t + inner.cfg.min_refresh_gap);
                next_fetch = next_fetch.min(earliest);
                tokio::time::sleep_until(earliest).await;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn fetch(inner: &Inner, uri: &str, timeout: Duration) -> Result<JwkSet, JwksError> {
    let parsed: Uri = uri.parse().map_err(|_| JwksError::Uri(uri.to_string()))?;
    let https = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(JwksError::Uri(uri.to_string())),
    };
    let host = parsed.host().ok_or_else(|| JwksError::Uri(uri.to_string()))?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = parsed
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|| host.to_string());
    let path = parsed.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let request = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|_| JwksError::Uri(uri.to_string()))?;
    let max = inner.cfg.max_body_bytes;
    let work = async {
        let tcp = TcpStream::connect((bare_host.as_str(), port)).await?;
        let body = if https {
            let connector = inner.tls.as_ref().ok_or(JwksError::NoRoots)?;
            let name = ServerName::try_from(bare_host.clone()).map_err(|_| JwksError::Uri(uri.to_string()))?;
            let tls = connector.connect(name, tcp).await?;
            get(tls, request, max).await?
        } else {
            get(tcp, request, max).await?
        };
        let set: JwkSet = serde_json::from_slice(&body)?;
        if KeySet::compile(&set).is_empty() {
            return Err(JwksError::NoKeys);
        }
        Ok(set)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| JwksError::Timeout(timeout))?
}

async fn get<IO>(io: IO, request: Request<Empty<Bytes>>, max: usize) -> Result<Bytes, JwksError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The connection future drives the socket; it ends when the sender is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        return Err(JwksError::Status(response.status()));
    }
    let body = Limited::new(response.into_body(), max)
        .collect()
        .await
        .map_err(|e| JwksError::Body(e.to_string()))?;
    Ok(body.to_bytes())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::Response;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use waypoint_filters::jwt::jsonwebtoken::jwk::Jwk;
    use waypoint_filters::jwt::jsonwebtoken::{Algorithm, EncodingKey, Header};
    use waypoint_filters::jwt::{JwtFailure, JwtPolicy, JwtRule};

    use super::*;

    /// What the loopback JWKS server answers.
    #[derive(Clone)]
    enum Mode {
        Keys(JwkSet),
        Status(u16),
        Hang,
    }

    struct Server {
        addr: SocketAddr,
        mode: Arc<Mutex<Mode>>,
        hits: Arc<AtomicUsize>,
    }

    impl Server {
        fn set(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Status(503)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (m, h) = (mode.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (m, h, tls) = (m.clone(), h.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let (m, h) = (m.clone(), h.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            let mode = m.lock().unwrap().clone();
                            let (status, body) = match mode {
                                Mode::Keys(set) => (200, serde_json::to_vec(&set).unwrap()),
                                Mode::Status(s) => (s, Vec::new()),
                                Mode::Hang => {
                                    tokio::time::sleep(Duration::from_secs(30)).await;
                                    (200, Vec::new())
                                }
                            };
                            let mut res = Response::new(Full::new(Bytes::from(body)));
                            *res.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Server { addr, mode, hits }
    }

    struct Key {
        enc: EncodingKey,
        jwk: Jwk,
        kid: String,
    }

    fn key(kid: &str) -> Key {
        let pair = rcgen::KeyPair::generate().unwrap();
        let enc = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        Key {
            enc,
            jwk,
            kid: kid.to_string(),
        }
    }

    fn token(k: &Key) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(k.kid.clone());
        let claims = serde_json::json!({"iss": "https://iss", "sub": "alice", "exp": 4_102_444_800u64});
        waypoint_filters::jwt::jsonwebtoken::encode(&h, &claims, &k.enc).unwrap()
    }

    fn verify(policy: &JwtPolicy, token: &str) -> Result<(), JwtFailure> {
        let req = Request::get("/")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        policy.verify_request(&req, 1_800_000_000).map(|_| ())
    }

    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..100 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn config() -> FetcherConfig {
        FetcherConfig {
            refresh_interval: Duration::from_secs(600),
            min_refresh_gap: Duration::from_millis(100),
            fetch_timeout: Duration::from_millis(300),
            ..FetcherConfig::default()
        }
    }

    #[tokio::test]
    async fn fetches_rotates_rate_limits_and_keeps_last_good_keys() {
        let server = serve(None).await;
        let (k1, k2, k3) = (key("k1"), key("k2"), key("k3"));
        server.set(Mode::Keys(JwkSet {
            keys: vec![k1.jwk.clone()],
        }));
        let fetcher = JwksFetcher::new(config()).unwrap();
        let uri = format!("http://{}/.well-known/jwks.json", server.addr);
        let handle = fetcher.handle(&uri, None);
        assert!(Arc::ptr_eq(&handle, &fetcher.handle(&uri, None)), "one handle per URI");
        let policy = JwtPolicy::new(vec![JwtRule::new("https://iss", handle.clone())]);
        assert!(eventually(|| verify(&policy, &token(&k1)).is_ok()).await, "first fetch");

        // The issuer rotates to k2: a k2 token fails once, triggers a refresh, then verifies.
        server.set(Mode::Keys(JwkSet {
            keys: vec![k2.jwk.clone()],
        }));
        assert_eq!(verify(&policy, &token(&k2)), Err(JwtFailure::NoMatchingKey));
        assert!(
            eventually(|| verify(&policy, &token(&k2)).is_ok()).await,
            "refresh on unknown kid"
        );
        assert_eq!(verify(&policy, &token(&k1)), Err(JwtFailure::NoMatchingKey));

        // A flood of unknown kids costs about one fetch per gap, not one per request.
        let before = server.hits.load(Ordering::SeqCst);
        for _ in 0..200 {
            let _ = verify(&policy, &token(&k3));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let fetches = server.hits.load(Ordering::SeqCst) - before;
        assert!(
            (1..=6).contains(&fetches),
            "{fetches} fetches for 200 unknown-kid tokens"
        );

        // Failures keep the last good keys: an error status, then a server that never answers (timeout).
        server.set(Mode::Status(500));
        handle.request_refresh();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(verify(&policy, &token(&k2)).is_ok());
        server.set(Mode::Hang);
        let start = Instant::now();
        assert!(matches!(
            fetcher.fetch(&uri, Duration::from_millis(200)).await,
            Err(JwksError::Timeout(_))
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(verify(&policy, &token(&k2)).is_ok());

        // Back to normal with k3.
        server.set(Mode::Keys(JwkSet {
            keys: vec![k3.jwk.clone()],
        }));
        assert!(eventually(|| verify(&policy, &token(&k3)).is_ok()).await);
    }

    #[tokio::test]
    async fn https_with_configured_roots() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&ca_key).unwrap();
        let der = cert.der().clone();
        let server_cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![der.clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(ca_key.serialize_der().into()),
                )
                .unwrap();
        let server = serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg)))).await;
        let k1 = key("k1");
        server.set(Mode::Keys(JwkSet {
            keys: vec![k1.jwk.clone()],
        }));
        let uri = format!("https://localhost:{}/jwks", server.addr.port());

        let trusted = JwksFetcher::new(FetcherConfig {
            roots: vec![der],
            ..config()
        })
        .unwrap();
        let set = trusted.fetch(&uri, Duration::from_secs(2)).await.unwrap();
        assert_eq!(set.keys.len(), 1);
        let untrusted = JwksFetcher::new(config()).unwrap();
        assert!(matches!(
            untrusted.fetch(&uri, Duration::from_secs(2)).await,
            Err(JwksError::NoRoots)
        ));
        assert!(matches!(
            untrusted.fetch("ftp://x/y", Duration::from_secs(1)).await,
            Err(JwksError::Uri(_))
        ));
    }

    #[tokio::test]
    async fn task_ends_when_handle_is_dropped() {
        let server = serve(None).await;
        server.set(Mode::Keys(JwkSet {
            keys: vec![key("k1").jwk],
        }));
        let fetcher = JwksFetcher::new(config()).unwrap();
        let uri = format!("http://{}/jwks", server.addr);
        let handle = fetcher.handle(&uri, None);
        assert!(eventually(|| !handle.load().is_empty()).await);
        let weak = Arc::downgrade(&handle);
        drop(handle);
        handle_gone(&weak).await;
        // A new handle for the same URI starts a new task.
        let again = fetcher.handle(&uri, None);
        assert!(eventually(|| !again.load().is_empty()).await);
    }

    async fn handle_gone(weak: &Weak<JwksHandle>) {
        // The task holds the handle only while fetching; the registry holds it weakly.
        assert!(eventually(|| weak.upgrade().is_none()).await);
    }
}
