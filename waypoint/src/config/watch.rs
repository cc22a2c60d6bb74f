//! Watches the config file and swaps the snapshot when a valid edit lands.
//!
//! Polling (content compared, not just mtime) rather than inotify: a Kubernetes ConfigMap mount updates by
//! swapping a symlink, which inotify on the file misses, and polling a small file every half second costs
//! nothing. A rejected edit is logged with every error and counted; the last good snapshot keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::security::JwksSource;
use super::{Snapshot, load_file_with};

/// The live config: what the data path reads, plus reload bookkeeping for the admin endpoint.
pub struct ConfigStore {
    pub path: PathBuf,
    current: ArcSwap<Snapshot>,
    rejected: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
    /// (generation applied, rejected edits so far): lets tests and tooling wait for a reload to land.
    changes: tokio::sync::watch::Sender<(u64, u64)>,
    /// Where `jwksUri` keys come from (the running fetcher), shared across reloads.
    jwks: Arc<dyn JwksSource + Send + Sync>,
}

impl ConfigStore {
    pub fn new(path: PathBuf, initial: Snapshot, jwks: Arc<dyn JwksSource + Send + Sync>) -> Arc<Self> {
        let generation = initial.generation;
        Arc::new(ConfigStore {
            path,
            changes: tokio::sync::watch::Sender::new((generation, 0)),
            jwks,
            current: ArcSwap::from_pointee(initial),
            rejected: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
        })
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Cheap per-request access (no refcount traffic).
    pub fn guard(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Notified after every applied or rejected edit with (generation, rejected count).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<(u64, u64)> {
        self.changes.subscribe()
    }

    pub fn rejected_count(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// Re-read the file now. Returns whether a new snapshot was published.
    pub fn reload(&self) -> bool {
        let current = self.current.load();
        match load_file_with(&self.path, current.generation + 1, &*self.jwks) {
            Ok(next) => {
                if next.settings.hbone_addr != current.settings.hbone_addr
                    || next.settings.readiness_addr != current.settings.readiness_addr
                    || next.settings.admin_addr != current.settings.admin_addr
                    || next.settings.tls != current.settings.tls
                    || next.settings.trust_domain != current.settings.trust_domain
                {
                    tracing::warn!(
                        file = %self.path.display(),
                        "listener addresses, trust domain and certificate paths apply at start-up only; restart to change them"
                    );
                }
                tracing::info!(
                    file = %self.path.display(),
                    generation = next.generation,
                    services = next.services.len(),
                    "config applied"
                );
                let generation = next.generation;
                self.current.store(Arc::new(next));
                self.changes.send_modify(|c| c.0 = generation);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                true
            }
            Err(errors) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                for e in &errors.0 {
                    tracing::error!(error = %e, "config rejected; the last good config keeps serving");
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(errors.to_string());
                }
                let rejected = self.rejected_count();
                self.changes.send_modify(|c| c.1 = rejected);
                false
            }
        }
    }

    /// Poll the file until `stop` fires.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut last = std::fs::read(&self.path).ok();
        loop {
            let interval = self.current.load().settings.watch_interval;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let now = match tokio::fs::read(&self.path).await {
                Ok(b) => Some(b),
                Err(e) => {
                    // A rename-based editor or a ConfigMap swap can leave the path briefly absent.
                    tracing::debug!(file = %self.path.display(), error = %e, "config file unreadable; will retry");
                    continue;
                }
            };
            if now != last {
                last = now;
                self.reload();
            }
        }
    }
}
