//! Graceful drain: one signal that every accept loop and connection watches, and a tracker that tells when the
//! last tracked task has finished.
//!
//! On SIGTERM the listeners stop accepting, every HBONE connection sends GOAWAY (streams in flight continue),
//! every inner HTTP connection stops keep-alive after its current request, and the process exits when the
//! tracker is empty or the drain timeout passes, whichever is first.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Drain {
    signal: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn start(&self) {
        self.signal.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Resolves once a drain has started.
    pub async fn signaled(&self) {
        self.signal.cancelled().await
    }

    pub fn token(&self) -> CancellationToken {
        self.signal.clone()
    }

    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// [`Drain::spawn`] on another runtime (a worker's).
    pub fn spawn_on<F>(&self, fut: F, handle: &tokio::runtime::Handle) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn_on(fut, handle)
    }

    /// Wait for tracked work to finish, at most `timeout`. Returns whether everything finished in time.
    pub async fn wait(&self, timeout: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait()).await.is_ok()
    }

    pub fn active(&self) -> usize {
        self.tracker.len()
    }
}
