//! Returns the memory the allocator keeps after a burst of traffic to the kernel.
//!
//! glibc's malloc keeps freed memory inside its per-thread arenas and only gives back what sits at the top of a
//! heap. Large bodies leave TLS records, HTTP/2 frames and hyper buffers scattered through the worker arenas, so
//! after one burst a waypoint would keep the burst's footprint for its lifetime (measured: 12 MiB of free arena
//! memory after the rig's 1 MiB shape, 2.8 MiB once trimmed). `malloc_trim(0)` releases every free page of every
//! arena, which is what tcmalloc's background release does for Envoy. Other allocators and C libraries return
//! memory on their own, so there this is a no-op.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Give free allocator pages back to the kernel; true when the allocator released something.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release() -> bool {
    // SAFETY: malloc_trim takes a plain integer, touches only the allocator's own state under its arena locks, and
    // is documented as safe to call from any thread at any time (glibc malloc(3)).
    #[allow(unsafe_code)]
    let released = unsafe { libc::malloc_trim(0) };
    released != 0
}

/// Give free allocator pages back to the kernel; true when the allocator released something.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release() -> bool {
    false
}

/// Every `interval()` (read again each round, so a config reload applies), release free allocator memory; an
/// interval of zero pauses the loop until it changes. Ends when `stop` is cancelled.
pub async fn release_loop(interval: impl Fn() -> Duration, stop: CancellationToken) {
    // A paused loop re-reads its interval this often.
    const PAUSED_POLL: Duration = Duration::from_secs(5);
    loop {
        let every = interval();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(if every.is_zero() { PAUSED_POLL } else { every }) => {}
        }
        if every.is_zero() {
            continue;
        }
        // The walk over the arenas takes each arena's lock in turn; a worker that allocates meanwhile waits for
        // at most one arena's trim, well below a millisecond at a waypoint's heap sizes.
        let released = release();
        tracing::trace!(released, "allocator trim");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn release_returns_freed_arena_pages() {
        // Blocks below the mmap threshold come from the arena; keeping the last one pins the heap top, so only a
        // trim through the middle of the heap can hand the freed ones back.
        let mut blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 * 1024]).collect();
        let pin = blocks.pop();
        drop(blocks);
        assert!(release(), "4 MiB freed inside the arena, yet nothing was released");
        assert_eq!(pin.map(|p| p.len()), Some(64 * 1024));
    }

    #[tokio::test(start_paused = true)]
    async fn loop_follows_the_interval_and_stops_on_cancel() {
        let reads = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let r = reads.clone();
        let task = tokio::spawn(release_loop(
            move || {
                r.fetch_add(1, Ordering::SeqCst);
                Duration::from_secs(10)
            },
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(35)).await;
        // Rounds at 0, 10, 20 and 30 s each read the interval once.
        assert_eq!(reads.load(Ordering::SeqCst), 4);
        stop.cancel();
        task.await.expect("loop ends on cancel");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_interval_pauses_until_changed() {
        let every = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (e, r) = (every.clone(), reads.clone());
        let task = tokio::spawn(release_loop(
            move || {
                r.fetch_add(1, Ordering::SeqCst);
                Duration::from_secs(e.load(Ordering::SeqCst) as u64)
            },
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(11)).await;
        // Paused: re-read every 5 s (0, 5, 10).
        assert_eq!(reads.load(Ordering::SeqCst), 3);
        every.store(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        // The read at 15 s saw 1 s; from then one round per second (15..=20 s at least).
        assert!(
            reads.load(Ordering::SeqCst) >= 3 + 6,
            "reads {}",
            reads.load(Ordering::SeqCst)
        );
        stop.cancel();
        task.await.expect("loop ends on cancel");
    }
}
