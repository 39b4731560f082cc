//! Recycled activation buffers for the CPU backend.
//!
//! Every operation returns a new tensor, and a SAM forward pass makes hundreds of them, most of
//! the same few sizes. Instead of asking the allocator each time, a tensor's buffer goes back to
//! the pool when the tensor is dropped and the next operation needing that many elements takes it
//! again. After the first frame (which sizes the pool, like an arena sized at load time) a frame
//! of the same geometry allocates no activation memory at all; `fresh_allocations` counts the
//! misses so tests can hold that true.
//!
//! The pool is bounded (at most [`MAX_POOLED`] large and [`MAX_POOLED_SMALL`] small buffers) so
//! memory stays bounded whatever a caller does. The lock is taken once per operation by the
//! thread driving the network, never by the kernel threads, so it is uncontended on the
//! per-frame path.
//!
//! Small buffers (the decoder's token tensors, vectors) and large ones (activation maps) are
//! pooled apart. Mixed, a 7-token tensor took whichever large buffer was free, and the next
//! activation map given that buffer had to be zero-filled back to length: 3-4% of a LiteMedSAM
//! decode went to `memset` (`perf`, 2026-12-03).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Large buffers kept at most; more than a SAM forward pass holds alive at once.
pub const MAX_POOLED: usize = 64;
/// Small buffers kept at most (at most 16 MiB of them).
pub const MAX_POOLED_SMALL: usize = 256;
/// Requests of at most this many elements (64 KiB) are served from the small buffers.
const SMALL_LEN: usize = 1 << 14;

/// The idle buffers of one size class.
type Free = Vec<Vec<f32>>;

#[derive(Debug, Default)]
pub struct BufferPool {
    /// `[small, large]`.
    free: Mutex<[Free; 2]>,
    fresh: AtomicUsize,
}

/// The class of a request or buffer of `len` elements (index into `BufferPool::free`) and
/// how many of that class are kept.
fn class(len: usize) -> (usize, usize) {
    if len <= SMALL_LEN {
        (0, MAX_POOLED_SMALL)
    } else {
        (1, MAX_POOLED)
    }
}

impl BufferPool {
    /// A zero-filled buffer of `len` elements: the smallest pooled one that fits, else a new one.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut buffer = self.reuse_or_allocate(len);
        buffer.clear();
        buffer.resize(len, 0.0);
        buffer
    }

    /// A buffer of `len` elements for an operation that writes every one of them: a reused
    /// buffer keeps whatever its last user left (initialised, stale values) instead of being
    /// zeroed first. The zeroing ran single-threaded over every activation of the frame and
    /// was 7% of LiteMedSAM's encode (`perf`, 2026-12-03).
    ///
    /// Only a buffer's length counts as written (what lies between its length and its capacity
    /// is not ours to read), so a buffer that last held fewer elements is zero-filled up to
    /// `len`; the small/large split keeps that rare.
    pub fn take_for_overwrite(&self, len: usize) -> Vec<f32> {
        let mut buffer = self.reuse_or_allocate(len);
        buffer.truncate(len);
        // Only the part beyond the buffer's previous length is written here.
        buffer.resize(len, 0.0);
        buffer
    }

    /// The smallest pooled buffer of `len`'s class whose capacity holds `len`, else a new empty
    /// one. (Preferring a buffer whose written length covers `len` zeroed less but took larger
    /// buffers than needed, and a second frame then had to allocate.)
    fn reuse_or_allocate(&self, len: usize) -> Vec<f32> {
        let reused = {
            let mut classes = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let free = &mut classes[class(len).0];
            let best = free.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        reused.unwrap_or_else(|| {
            self.fresh.fetch_add(1, Ordering::Relaxed);
            Vec::with_capacity(len)
        })
    }

    /// Returns a buffer for reuse; beyond its class's limit the smallest one is let go.
    pub fn give(&self, buffer: Vec<f32>) {
        if buffer.capacity() == 0 {
            return;
        }
        let (index, limit) = class(buffer.capacity());
        let mut classes = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let free = &mut classes[index];
        free.push(buffer);
        if free.len() > limit {
            let smallest = free.iter().enumerate().min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
            if let Some(i) = smallest {
                free.swap_remove(i);
            }
        }
    }

    /// Buffers that had to be allocated because none in the pool fitted.
    pub fn fresh_allocations(&self) -> usize {
        self.fresh.load(Ordering::Relaxed)
    }

    /// Bytes held by idle pooled buffers.
    pub fn pooled_bytes(&self) -> usize {
        let classes = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        classes.iter().flatten().map(|v| v.capacity() * std::mem::size_of::<f32>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle buffers per class, `[small, large]`.
    fn counts(pool: &BufferPool) -> [usize; 2] {
        let classes = pool.free.lock().unwrap();
        [classes[0].len(), classes[1].len()]
    }

    #[test]
    fn buffers_are_reused_zeroed_and_bounded() {
        let pool = BufferPool::default();
        let mut a = pool.take(100);
        a.iter_mut().for_each(|v| *v = 7.0);
        pool.give(a);
        let b = pool.take(80);
        assert_eq!(pool.fresh_allocations(), 1, "the 100-element buffer serves an 80-element request");
        assert!(b.iter().all(|&v| v == 0.0) && b.len() == 80);
        pool.give(b);
        let _big = pool.take(1000);
        assert_eq!(pool.fresh_allocations(), 2);
        for n in 0..2 * MAX_POOLED_SMALL {
            pool.give(vec![0.0; n + 1]);
        }
        for n in 0..2 * MAX_POOLED {
            pool.give(vec![0.0; SMALL_LEN + 1 + n]);
        }
        assert_eq!(counts(&pool), [MAX_POOLED_SMALL, MAX_POOLED], "each class keeps at most its limit");
    }

    /// A small request never takes a large buffer, whose next large user would then have to
    /// zero-fill it back.
    #[test]
    fn small_requests_keep_off_large_buffers() {
        let pool = BufferPool::default();
        pool.give(vec![7.0; 4 * SMALL_LEN]);
        let small = pool.take_for_overwrite(100);
        assert_eq!((pool.fresh_allocations(), small.capacity()), (1, 100), "a small request gets a small buffer");
        assert_eq!(counts(&pool), [0, 1]);
        assert!(pool.take_for_overwrite(4 * SMALL_LEN).iter().all(|&v| v == 7.0), "the large buffer kept its length");
    }

    /// `take_for_overwrite` hands a reused buffer over without a zeroing pass (its stale values
    /// show), zero-fills only what lies past the old length, and leaves `take` zeroing.
    #[test]
    fn overwrite_buffers_skip_the_zeroing() {
        let pool = BufferPool::default();
        pool.give(vec![7.0; 100]);
        let a = pool.take_for_overwrite(60);
        assert_eq!(pool.fresh_allocations(), 0);
        assert!(a.len() == 60 && a.iter().all(|&v| v == 7.0), "a reused buffer is not zeroed again");
        pool.give(a);
        let b = pool.take_for_overwrite(90);
        assert_eq!(b.len(), 90);
        assert!(b[..60].iter().all(|&v| v == 7.0) && b[60..].iter().all(|&v| v == 0.0));
        pool.give(b);
        assert!(pool.take(90).iter().all(|&v| v == 0.0), "take still zeroes");
        let fresh = pool.take_for_overwrite(10);
        assert!(fresh.len() == 10 && fresh.iter().all(|&v| v == 0.0));
    }
}
