//! waypoint: an Envoy-free L7 waypoint proxy for Istio ambient mesh.
//!
//! [`App::start`] wires the pieces (see ARCHITECTURE.md): config store and watcher, certificate store and
//! watcher, the HBONE listener, readiness and admin listeners, and the drain that ties their shutdown together.

/// `AsyncWrite` for a wrapper that only changes the read side: every call goes to the wrapped stream's `inner`.
macro_rules! forward_async_write {
    ($wrapper:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod admin;
pub mod cli;
pub mod config;
pub mod drain;
pub mod ext_authz;
pub mod hbone;
pub mod identity;
pub mod jwks;
pub mod memory;
pub mod proxy;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use config::watch::ConfigStore;
use drain::Drain;
use proxy::Ctx;
use tls::reload::TlsStore;

pub use cli::cli_main;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // The cause is part of the message and deliberately not the error's `source`: callers print these with
    // `{}` (reports) and with `{:#}` (the CLI), and a source would be printed twice by the latter.
    #[error("invalid config:\n{0}")]
    Config(config::ConfigErrors),
    #[error("certificates: {0}")]
    Tls(tls::TlsError),
    #[error("JWKS fetcher: {0}")]
    Jwks(jwks::JwksError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl From<config::ConfigErrors> for StartError {
    fn from(e: config::ConfigErrors) -> Self {
        StartError::Config(e)
    }
}

impl From<tls::TlsError> for StartError {
    fn from(e: tls::TlsError) -> Self {
        StartError::Tls(e)
    }
}

impl From<jwks::JwksError> for StartError {
    fn from(e: jwks::JwksError) -> Self {
        StartError::Jwks(e)
    }
}

/// A running waypoint: every listener bound, config and certificates loaded.
pub struct App {
    pub hbone_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    ctx: Arc<Ctx>,
    drain_timeout: Duration,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

impl App {
    /// Load `config_path`, bind every listener and start serving on the current Tokio runtime.
    pub async fn start(config_path: PathBuf) -> Result<App, StartError> {
        Self::start_with(config_path, None).await
    }

    /// [`App::start`], with HBONE connections served by `workers` (thread-per-core) when given; listeners,
    /// config and certificate watching, and the admin endpoints stay on the current runtime.
    pub async fn start_with(config_path: PathBuf, workers: Option<workers::Workers>) -> Result<App, StartError> {
        // A first pass without network access yields the settings the JWKS fetcher needs (its HTTPS roots);
        // the second builds the snapshot whose `jwksUri` rules share the fetcher's keys.
        let settings = config::load_file(&config_path, 1)?.settings;
        let jwks = Arc::new(jwks::JwksFetcher::new(jwks::FetcherConfig {
            roots: match &settings.jwks_roots_file {
                Some(path) => tls::read_certs("JWKS roots", path)?,
                None => Vec::new(),
            },
            ..Default::default()
        })?);
        let snapshot = config::load_file_with(&config_path, 1, &*jwks)?;
        let tls = TlsStore::load(settings.tls.clone(), settings.trust_domain.clone())?;
        let hbone = bind("hbone", settings.hbone_addr).await?;
        let readiness = bind("readiness", settings.readiness_addr).await?;
        let admin = bind("admin", settings.admin_addr).await?;
        let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let (hbone_addr, readiness_addr, admin_addr) = (
            local(&hbone, settings.hbone_addr),
            local(&readiness, settings.readiness_addr),
            local(&admin, settings.admin_addr),
        );
        let config = ConfigStore::new(config_path, snapshot, jwks);
        let drain = Drain::new();
        let upstream = upstream::Upstream::new(tls.clone());
        let authz_counters = Arc::new(waypoint_filters::authz::DecisionCounters::default());
        let http_stack = proxy::l7::stack(upstream.clone(), authz_counters.clone());
        let ctx = Arc::new(Ctx {
            config: config.clone(),
            tls: tls.clone(),
            upstream,
            drain: drain.clone(),
            http_stack,
            authz_counters,
            workers,
        });

        let live = config.clone();
        tokio::spawn(config.watch(drain.token()));
        tokio::spawn(tls.clone().watch(settings.watch_interval, drain.token()));
        tokio::spawn(memory::release_loop(
            move || live.load().settings.memory_release_interval,
            drain.token(),
        ));
        drain.spawn(hbone::server::serve(hbone, ctx.clone()));
        tokio::spawn(admin::serve(readiness, ctx.clone(), admin::Role::Readiness));
        tokio::spawn(admin::serve(admin, ctx.clone(), admin::Role::Admin));
        tracing::info!(%hbone_addr, %readiness_addr, %admin_addr, identity = ?tls.current().material.identity, "waypoint ready");
        Ok(App {
            hbone_addr,
            readiness_addr,
            admin_addr,
            drain_timeout: settings.drain_timeout,
            ctx,
        })
    }

    /// Begin a graceful drain (what SIGTERM does): readiness turns 503, listeners stop accepting, every HBONE
    /// connection gets GOAWAY, in-flight requests continue.
    pub fn drain(&self) {
        if !self.ctx.drain.is_draining() {
            tracing::info!(timeout = ?self.drain_timeout, "drain started");
        }
        self.ctx.drain.start();
    }

    /// Resolves when the waypoint has stopped: after a drain, once in-flight work finished or the drain timeout
    /// passed. Returns whether everything finished in time.
    pub async fn wait(self) -> bool {
        self.ctx.drain.signaled().await;
        let clean = self.ctx.drain.wait(self.drain_timeout).await;
        if clean {
            tracing::info!("drain complete");
        } else {
            tracing::warn!(
                still_active = self.ctx.drain.active(),
                "drain timeout passed; closing what is left"
            );
        }
        clean
    }

    /// The live config store (tests and the admin endpoint read it).
    pub fn config(&self) -> &Arc<ConfigStore> {
        &self.ctx.config
    }

    /// The live certificate store.
    pub fn tls(&self) -> &Arc<TlsStore> {
        &self.ctx.tls
    }
}
