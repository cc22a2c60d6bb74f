//! Certificate rotation without restarts.
//!
//! The files are polled; when any of them changes and the new set loads, fresh server and client configs are
//! published. A handshake picks the config current at accept/connect time, so new connections use the new
//! certificate while established ones carry on with the one they negotiated. A broken rotation (half-written
//! file, key that does not match) is logged and the previous material keeps serving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::{Material, TlsError};
use crate::config::TlsPaths;
use crate::identity::SpiffeId;

pub struct TlsState {
    pub material: Material,
    pub server: Arc<rustls::ServerConfig>,
    /// Client configs per expected peer identity, built on first use.
    clients: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
}

impl TlsState {
    pub fn build(paths: &TlsPaths, trust_domain: &str) -> Result<TlsState, TlsError> {
        let material = Material::load(paths)?;
        let server = material.server_config(trust_domain)?;
        Ok(TlsState {
            material,
            server,
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn client_config(&self, expected: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        if let Ok(cache) = self.clients.lock()
            && let Some(c) = cache.get(expected)
        {
            return Ok(c.clone());
        }
        let cfg = self.material.client_config(expected)?;
        if let Ok(mut cache) = self.clients.lock() {
            cache.insert(expected.clone(), cfg.clone());
        }
        Ok(cfg)
    }
}

pub struct TlsStore {
    paths: TlsPaths,
    trust_domain: String,
    current: ArcSwap<TlsState>,
    /// Rotations applied so far: lets tests and tooling wait for a rotation to land.
    rotations: tokio::sync::watch::Sender<u64>,
}

impl TlsStore {
    pub fn load(paths: TlsPaths, trust_domain: String) -> Result<Arc<TlsStore>, TlsError> {
        let state = TlsState::build(&paths, &trust_domain)?;
        Ok(Arc::new(TlsStore {
            paths,
            trust_domain,
            current: ArcSwap::from_pointee(state),
            rotations: tokio::sync::watch::Sender::new(0),
        }))
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rotations.subscribe()
    }

    pub fn current(&self) -> Arc<TlsState> {
        self.current.load_full()
    }

    fn fingerprint(&self) -> Option<Vec<Vec<u8>>> {
        [&self.paths.cert_file, &self.paths.key_file, &self.paths.roots_file]
            .iter()
            .map(|p| std::fs::read(p).ok())
            .collect()
    }

    pub async fn watch(self: Arc<Self>, interval: std::time::Duration, stop: CancellationToken) {
        let mut last = self.fingerprint();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let now = self.fingerprint();
            if now.is_none() || now == last {
                continue;
            }
            last = now;
            match TlsState::build(&self.paths, &self.trust_domain) {
                Ok(state) => {
                    tracing::info!(identity = ?state.material.identity, "certificates rotated; new connections use them");
                    self.current.store(Arc::new(state));
                    self.rotations.send_modify(|n| *n += 1);
                }
                Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the previous certificate"),
            }
        }
    }
}
