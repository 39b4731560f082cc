//! Recycled activation buffers for the CPU backend.
//!
//! Every operation returns a new tensor, and a SAM forward pass makes hundreds of them, most of
//! the same few sizes. Instead of asking the allocator each time, a tensor's buffer goes back to
//! the pool when the tensor is dropped and the next operation needing that many elements takes it
//! again. After the first frame (which sizes the pool, like an arena sized at load time) a frame
//! of the same geometry allocates no activation memory at all; `fresh_allocations` counts the
//! misses so tests can hold that true.
//!
//! The pool is bounded ([`MAX_POOLED`] buffers) so memory stays bounded whatever a caller does.
//! The lock is taken once per operation by the thread driving the network, never by the kernel
//! threads, so it is uncontended on the per-frame path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Buffers kept at most; more than a SAM forward pass holds alive at once.
pub const MAX_POOLED: usize = 64;

#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
    fresh: AtomicUsize,
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
    pub fn take_for_overwrite(&self, len: usize) -> Vec<f32> {
        let mut buffer = self.reuse_or_allocate(len);
        buffer.truncate(len);
        // Only the part beyond the buffer's previous length is written here.
        buffer.resize(len, 0.0);
        buffer
    }

    /// The smallest pooled buffer whose capacity holds `len`, else a new empty one.
    fn reuse_or_allocate(&self, len: usize) -> Vec<f32> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let best = free.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        reused.unwrap_or_else(|| {
            self.fresh.fetch_add(1, Ordering::Relaxed);
            Vec::with_capacity(len)
        })
    }

    /// Returns a buffer for reuse; beyond [`MAX_POOLED`] the smallest one is let go.
    pub fn give(&self, buffer: Vec<f32>) {
        if buffer.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        free.push(buffer);
        if free.len() > MAX_POOLED {
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
        let free = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        free.iter().map(|v| v.capacity() * std::mem::size_of::<f32>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for n in 0..2 * MAX_POOLED {
            pool.give(vec![0.0; n + 1]);
        }
        assert!(pool.pooled_bytes() <= MAX_POOLED * 2 * MAX_POOLED * 4, "at most MAX_POOLED buffers are kept");
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
