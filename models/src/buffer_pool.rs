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
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let best = free.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        let mut buffer = reused.unwrap_or_else(|| {
            self.fresh.fetch_add(1, Ordering::Relaxed);
            Vec::with_capacity(len)
        });
        buffer.clear();
        buffer.resize(len, 0.0);
        buffer
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
}
