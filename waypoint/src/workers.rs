//! Thread-per-core workers: each worker thread runs its own single-threaded Tokio runtime, and an accepted
//! HBONE connection lives on one worker for its whole life, with every CONNECT stream, inner HTTP connection and
//! upstream connection it opens (Envoy's worker model).
//!
//! Why not one work-stealing runtime: on the rig (benches/RESULTS.md) a request through the waypoint wakes
//! about six tasks (inbound HTTP/2 connection, tunnel, upstream HTTP/1.1 connection, outbound HTTP/2
//! connection, and back). Under work stealing those hops land on different threads, and each one costs a futex
//! wake-up and cache misses; the waypoint spent 12–30 % more CPU per request that way. Keeping a connection's
//! tasks on one thread makes every hop a local queue push. The cost is that one very hot HBONE connection is
//! served by one core; `--work-stealing` brings the shared runtime back for deployments where that matters.
//!
//! Upstream pools are keyed by [`current`] as well, so a worker reuses the connections its own tasks drive.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker the calling thread belongs to (0 outside worker threads: the main runtime, tests, and every
/// thread of a work-stealing runtime, which then share one set of pools).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

struct Worker {
    handle: Handle,
    /// Connections currently assigned.
    load: AtomicUsize,
}

/// The set of worker runtimes. Their threads run until the process exits.
#[derive(Clone)]
pub struct Workers {
    workers: Arc<[Worker]>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("count", &self.workers.len()).finish()
    }
}

impl Workers {
    /// Start `n` (at least one) worker threads.
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(n.max(1));
        for index in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name(format!("waypoint-worker-{index}"))
                .spawn(move || {
                    // Pool keys start at 1 so worker threads never share pools with the main runtime (0).
                    WORKER.with(|w| w.set(index + 1));
                    rt.block_on(std::future::pending::<()>());
                })?;
            workers.push(Worker {
                handle,
                load: AtomicUsize::new(0),
            });
        }
        Ok(Workers {
            workers: workers.into(),
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Connections assigned to each worker right now.
    pub fn loads(&self) -> Vec<usize> {
        self.workers.iter().map(|w| w.load.load(Ordering::Relaxed)).collect()
    }

    /// Chooses the worker with the fewest connections for a new connection (connections differ in length, so
    /// counting live ones spreads better than round robin). Returns the future with its load accounting
    /// attached, and the runtime to spawn it on (the caller spawns, so it can track the task).
    pub fn assign<F: Future>(&self, fut: F) -> (impl Future<Output = F::Output> + use<F>, &Handle) {
        let (index, worker) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.load.load(Ordering::Relaxed))
            .unwrap_or_else(|| unreachable!("at least one worker is started"));
        worker.load.fetch_add(1, Ordering::Relaxed);
        let guard = LoadGuard {
            workers: self.clone(),
            index,
        };
        let fut = async move {
            let _guard = guard;
            fut.await
        };
        (fut, &worker.handle)
    }
}

/// Gives the worker's connection slot back when the connection ends (or its task is dropped).
struct LoadGuard {
    workers: Workers,
    index: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some(w) = self.workers.workers.get(self.index) {
            w.load.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_worker_and_run_on_its_thread() {
        let workers = Workers::start(2).unwrap();
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
        // A long-lived connection on one worker…
        let (fut, handle) = workers.assign(async move {
            let _ = hold_rx.await;
            (current(), std::thread::current().name().map(str::to_string))
        });
        let first = handle.spawn(fut);
        assert_eq!(workers.loads().iter().sum::<usize>(), 1);
        // …so the next one goes to the other worker.
        let (fut, handle) = workers.assign(async { (current(), std::thread::current().name().map(str::to_string)) });
        let second = handle.spawn(fut);
        let (second_worker, second_thread) = second.await.unwrap();
        hold_tx.send(()).unwrap();
        let (first_worker, first_thread) = first.await.unwrap();
        assert_ne!(first_worker, second_worker);
        assert!(
            first_worker >= 1 && second_worker >= 1,
            "worker threads are numbered from 1"
        );
        assert_ne!(first_thread, second_thread);
        assert!(first_thread.unwrap().starts_with("waypoint-worker-"));
        assert_eq!(workers.loads(), vec![0, 0], "finished connections give their slot back");
        assert_eq!(current(), 0, "the test's own thread is not a worker");
    }

    #[tokio::test]
    async fn tasks_a_connection_spawns_stay_on_its_worker() {
        let workers = Workers::start(2).unwrap();
        let (fut, handle) = workers.assign(async {
            let outer = std::thread::current().id();
            let inner = tokio::spawn(async { std::thread::current().id() }).await.unwrap();
            (outer, inner)
        });
        let (outer, inner) = handle.spawn(fut).await.unwrap();
        assert_eq!(outer, inner);
    }
}
