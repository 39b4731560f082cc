//! Streaming rings: one daemon-made memfd per stream holding `N` frame slots followed by `N`
//! mask slots, so a video client writes each frame once and only a slot index and prompts
//! cross the bus per frame.
//!
//! ```text
//! offset 0                       N*frame_slot                     N*(frame_slot+mask_slot)
//! | frame 0 | frame 1 | .. | frame N-1 | masks 0 | masks 1 | .. | masks N-1 |
//! frame slot = stride*height (stride = width*bytes per pixel); mask slot = 3*width*height
//! ```
//!
//! # Torn-read contract
//! The ring must stay writable by the client, so it cannot carry `F_SEAL_WRITE`; it is sealed
//! against resizing only (no `SIGBUS`). The daemon reads a frame slot in place (no copy) when
//! the worker converts it for the encoder, and writes the answer's masks into the matching mask
//! slot. A client therefore owns slot `i` again only when `SegmentSlot(.., i, ..)` has replied:
//! writing frame slot `i` while that call is in flight may give a mask of a half-old, half-new
//! frame ("torn read"), and reading mask slot `i` before the reply may show a half-written mask.
//! This is the client's own data race on its own frame; it cannot hurt the daemon or other
//! clients: the daemon takes nothing but pixel values from shared memory (sizes and offsets
//! come from its own records), every byte pattern is a valid pixel, and the ring cannot shrink.
//! Clients that want several frames in flight use several slots.

use std::os::fd::OwnedFd;

use memmap2::MmapRaw;

use crate::error::{Error, Result};
use crate::frame::Layout;

/// Up to three masks per answer (multimask).
pub const MAX_MASKS: usize = 3;
/// Slots per ring: enough to pipeline capture, transfer and inference.
pub const MAX_SLOTS: usize = 16;

pub struct Ring {
    pub id: u32,
    /// Unique bus name of the client that opened it; only it may use or close it.
    pub owner: String,
    /// The Unix user behind `owner`: stream limits are per user (`service::StreamLimits`).
    pub uid: u32,
    pub layout: Layout,
    pub slots: usize,
    map: MmapRaw,
}

// SAFETY: the mapping is shared memory that lives as long as the Ring; every access goes through
// the methods below, which take offsets from the Ring's own fields (see the torn-read contract).
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Creates the memfd and its mapping; returns the ring and the fd to hand to the client.
    pub fn create(id: u32, owner: String, uid: u32, slots: usize, layout: Layout) -> Result<(Ring, OwnedFd)> {
        Self::check_slots(slots)?;
        let len = Self::len_for(slots, &layout) as usize;
        let (fd, map) = crate::memfd::ring("minisam-ring", len)?;
        Ok((Ring { id, owner, uid, layout, slots, map }, fd))
    }

    pub fn check_slots(slots: usize) -> Result<()> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(Error::InvalidFrame(format!("{slots} slots requested; 1..={MAX_SLOTS}")));
        }
        Ok(())
    }

    /// Bytes of a ring of `slots` slots for `layout`: what it pins in memory, known before it
    /// is created so limits can refuse it first.
    pub fn len_for(slots: usize, layout: &Layout) -> u64 {
        slots as u64 * (layout.byte_len() as u64 + Self::mask_slot_len(layout) as u64)
    }

    /// Bytes this ring pins.
    pub fn bytes(&self) -> u64 {
        Self::len_for(self.slots, &self.layout)
    }

    pub fn frame_slot_len(&self) -> usize {
        self.layout.byte_len()
    }

    pub fn mask_slot_len(layout: &Layout) -> usize {
        MAX_MASKS * layout.width * layout.height
    }

    pub fn mask_offset(&self, slot: usize) -> usize {
        self.slots * self.frame_slot_len() + slot * Self::mask_slot_len(&self.layout)
    }

    pub fn frame_offset(&self, slot: usize) -> usize {
        slot * self.frame_slot_len()
    }

    pub fn check_slot(&self, slot: u32) -> Result<usize> {
        let s = slot as usize;
        if s >= self.slots {
            return Err(Error::InvalidFrame(format!("slot {slot} out of range; this stream has {} slots", self.slots)));
        }
        Ok(s)
    }

    /// The bytes of frame slot `slot` (checked by `check_slot`). See the torn-read contract:
    /// the client may be writing them; the caller only reads pixel values.
    pub fn frame(&self, slot: usize) -> &[u8] {
        assert!(slot < self.slots, "slot checked by check_slot");
        // SAFETY: in bounds of the mapping (len = slots*(frame+mask)), which cannot shrink.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.frame_offset(slot)), self.frame_slot_len()) }
    }

    /// Mask slot `slot` for writing the answer.
    #[allow(clippy::mut_from_ref)]
    pub fn masks_mut(&self, slot: usize) -> &mut [u8] {
        assert!(slot < self.slots, "slot checked by check_slot");
        // SAFETY: in bounds; only the single worker thread writes mask slots, one job at a time.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(self.mask_offset(slot)), Self::mask_slot_len(&self.layout)) }
    }
}
