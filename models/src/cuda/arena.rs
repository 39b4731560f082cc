//! The activation arena: one device allocation made once, carved into tensors by a host-side
//! first-fit free list. A frame's many short-lived activations then cost no `cuMemAlloc`, the
//! backend's VRAM use is fixed and known at start-up (the `--vram-budget` check happens once),
//! and the high-water mark is the activation part of the peak VRAM report.
//!
//! Reuse is safe without device synchronisation because the backend issues all work on one
//! stream: a block freed on the host while a queued kernel still reads it can only be written by
//! a kernel queued later, which the stream runs after.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Every block starts on this boundary (the widest vector access any kernel makes is 16 bytes;
/// 256 matches cudaMalloc's own alignment).
pub const ALIGN: usize = 256;

/// The bookkeeping of one arena of `capacity` bytes (device addresses are `base + offset`).
#[derive(Debug)]
pub struct FreeList {
    capacity: usize,
    /// offset → length of each free range, never adjacent (coalesced on free).
    free: BTreeMap<usize, usize>,
    in_use: usize,
    peak: usize,
    /// While a CUDA graph is being captured: the lowest start and highest end of every block
    /// allocated since (see [`FreeList::record_span`]).
    span: Option<(usize, usize)>,
}

impl FreeList {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity / ALIGN * ALIGN;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { capacity, free, in_use: 0, peak: 0, span: None }
    }

    /// The offset of a fresh block of at least `bytes` (rounded up to [`ALIGN`]), or `None` when
    /// no free range is large enough.
    pub fn alloc(&mut self, bytes: usize) -> Option<(usize, usize)> {
        let size = bytes.max(1).div_ceil(ALIGN) * ALIGN;
        let (&at, &len) = self.free.iter().find(|(_, &len)| len >= size)?;
        self.free.remove(&at);
        if len > size {
            self.free.insert(at + size, len - size);
        }
        self.in_use += size;
        self.peak = self.peak.max(self.in_use);
        if let Some((lo, hi)) = self.span.as_mut() {
            *lo = (*lo).min(at);
            *hi = (*hi).max(at + size);
        }
        Some((at, size))
    }

    /// Starts (`true`) or stops and returns (`false`) the span `[lo, hi)` covering every block
    /// allocated in between. A captured CUDA graph replays its kernels on exactly the addresses
    /// they were captured with, so the span its launches touched must stay out of other hands
    /// for as long as the graph may replay ([`FreeList::claim_free`]).
    pub fn record_span(&mut self, on: bool) -> Option<(usize, usize)> {
        let taken = self.span.take().filter(|(lo, hi)| lo < hi);
        if on {
            self.span = Some((usize::MAX, 0));
        }
        taken
    }

    /// Takes every free byte of `[start, end)` out of the free list and returns the pieces
    /// (each to be given back with [`FreeList::free`]). Blocks live inside the range are left
    /// to their owners.
    pub fn claim_free(&mut self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let overlapping: Vec<(usize, usize)> = self.free.iter().map(|(&at, &len)| (at, len)).filter(|&(at, len)| at < end && at + len > start).collect();
        let mut claimed = Vec::with_capacity(overlapping.len());
        for (at, len) in overlapping {
            self.free.remove(&at);
            let (lo, hi) = (at.max(start), (at + len).min(end));
            if at < lo {
                self.free.insert(at, lo - at);
            }
            if hi < at + len {
                self.free.insert(hi, at + len - hi);
            }
            claimed.push((lo, hi - lo));
            self.in_use += hi - lo;
        }
        self.peak = self.peak.max(self.in_use);
        claimed
    }

    /// Returns a block made by [`FreeList::alloc`], merging it with free neighbours.
    pub fn free(&mut self, at: usize, size: usize) {
        self.in_use -= size;
        let (mut start, mut len) = (at, size);
        if let Some((&prev, &plen)) = self.free.range(..at).next_back() {
            if prev + plen == at {
                self.free.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = self.free.get(&(at + size)) {
            self.free.remove(&(at + size));
            len += nlen;
        }
        self.free.insert(start, len);
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn in_use(&self) -> usize {
        self.in_use
    }
    pub fn peak(&self) -> usize {
        self.peak
    }
    /// The largest block that could be allocated now.
    pub fn largest_free(&self) -> usize {
        self.free.values().copied().max().unwrap_or(0)
    }
}

/// A free list behind a mutex, shared by the backend and every tensor (tensors free on drop).
#[derive(Debug)]
pub struct Arena {
    pub base: u64,
    pub list: Mutex<FreeList>,
}

impl Arena {
    pub fn new(base: u64, capacity: usize) -> Self {
        Self { base, list: Mutex::new(FreeList::new(capacity)) }
    }
    /// Locks the free list; a poisoned lock (a panic elsewhere while holding it) still holds
    /// consistent data, since no method panics halfway through an update.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FreeList> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn cuda_arena_blocks_never_overlap_and_coalesce_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let mut list = FreeList::new(1 << 20);
        let mut live: Vec<(usize, usize)> = Vec::new();
        for _ in 0..2000 {
            if rng.gen_bool(0.55) {
                if let Some(b) = list.alloc(rng.gen_range(1..40_000)) {
                    assert_eq!(b.0 % ALIGN, 0);
                    assert!(b.0 + b.1 <= list.capacity());
                    for &(o, s) in &live {
                        assert!(b.0 + b.1 <= o || o + s <= b.0, "block {b:?} overlaps ({o}, {s})");
                    }
                    live.push(b);
                }
            } else if !live.is_empty() {
                let (o, s) = live.swap_remove(rng.gen_range(0..live.len()));
                list.free(o, s);
            }
            assert_eq!(list.in_use(), live.iter().map(|b| b.1).sum::<usize>());
        }
        for (o, s) in live.drain(..) {
            list.free(o, s);
        }
        assert_eq!(list.in_use(), 0);
        assert_eq!(list.largest_free(), 1 << 20, "free ranges must merge back into one");
        assert!(list.peak() > 0);
    }

    #[test]
    fn cuda_arena_claimed_span_is_never_handed_out_until_given_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let mut list = FreeList::new(1 << 20);
        let before = list.alloc(3 * ALIGN).unwrap();
        // A "capture": blocks come and go, one (the output) stays live.
        assert_eq!(list.record_span(true), None);
        let mut scratch: Vec<(usize, usize)> = (0..20).filter_map(|_| list.alloc(rng.gen_range(1..20_000))).collect();
        let output = scratch.swap_remove(7);
        for (o, s) in scratch.drain(..) {
            list.free(o, s);
        }
        let (lo, hi) = list.record_span(false).expect("blocks were allocated");
        assert!(lo <= output.0 && output.0 + output.1 <= hi && lo >= before.0 + before.1);
        assert_eq!(list.record_span(false), None, "recording is off");
        let claimed = list.claim_free(lo, hi);
        assert_eq!(claimed.iter().map(|c| c.1).sum::<usize>() + output.1, hi - lo, "all of the span but the live output");
        for _ in 0..500 {
            if let Some((o, s)) = list.alloc(rng.gen_range(1..30_000)) {
                assert!(o + s <= lo || o >= hi, "block ({o}, {s}) inside the claimed span [{lo}, {hi})");
            }
        }
        assert_eq!(list.alloc(list.capacity()), None);
        // Everything back: the list merges into one range again.
        let mut list2 = FreeList::new(1 << 16);
        let a = list2.alloc(ALIGN).unwrap();
        list2.record_span(true);
        let b = list2.alloc(10 * ALIGN).unwrap();
        list2.free(b.0, b.1);
        let (lo, hi) = list2.record_span(false).unwrap();
        let pieces = list2.claim_free(lo, hi);
        assert_eq!(pieces, vec![(ALIGN, 10 * ALIGN)]);
        assert_eq!(list2.in_use(), 11 * ALIGN);
        pieces.into_iter().chain([a]).for_each(|(o, s)| list2.free(o, s));
        assert_eq!((list2.in_use(), list2.largest_free()), (0, 1 << 16));
    }

    #[test]
    fn cuda_arena_refuses_what_does_not_fit() {
        let mut list = FreeList::new(4 * ALIGN);
        let a = list.alloc(2 * ALIGN).unwrap();
        assert!(list.alloc(3 * ALIGN).is_none());
        let b = list.alloc(2 * ALIGN).unwrap();
        assert!(list.alloc(1).is_none());
        list.free(a.0, a.1);
        list.free(b.0, b.1);
        assert_eq!(list.alloc(4 * ALIGN), Some((0, 4 * ALIGN)));
    }
}
