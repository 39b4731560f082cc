//! CUDA graphs for the steady-state frame: the image encoder's few hundred launches are captured
//! once, on the first frame of a given computation (`Backend::run_frame`'s key) and input shape,
//! and every later frame is one input upload, one graph launch and one copy of the output.
//!
//! A graph replays its kernels on the very addresses it was captured with, so a [`FrameGraph`]
//! owns its input and output blocks, and holds the whole arena span its launches touched (every
//! intermediate block came and went inside it during capture) out of the free list for as long
//! as it lives. Each frame's result is copied into a fresh block, so callers may keep
//! embeddings across frames (the daemon's embedding cache does) without the next replay
//! overwriting them.
//!
//! Only one graph is kept: a new key (another adapter, another segmenter on this backend) or
//! shape replaces it, giving its span back first. If capturing fails where running eagerly
//! works (an operation that cannot be captured, an old driver), the backend logs why once and
//! runs every later frame eagerly.

use std::sync::{Arc, Mutex, MutexGuard};

use super::backend::{CudaBackend, CudaTensor};
use super::device::ArenaBacking;
use super::driver::DeviceGraph;
use crate::backend::FrameFn;
use crate::{Error, Result};

/// A captured graph; access is serialised by [`FrameGraphs`]'s mutex (as `DeviceGraph` asks).
struct Graph(Box<dyn DeviceGraph>);

/// Arena bytes kept out of the free list while a graph may replay on them.
struct Reservation {
    backing: Arc<ArenaBacking>,
    pieces: Vec<(usize, usize)>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut list = self.backing.arena.lock();
        for &(at, size) in &self.pieces {
            list.free(at, size);
        }
    }
}

/// One captured frame. Field order is drop order: the graph goes before the memory it uses.
struct FrameGraph {
    graph: Graph,
    key: u64,
    input: CudaTensor,
    output: CudaTensor,
    _span: Reservation,
}

enum Slot {
    Empty,
    Ready(FrameGraph),
    /// Capturing failed where the eager frame worked; the reason, as logged.
    Disabled(String),
}

/// The backend's graph state.
pub struct FrameGraphs {
    enabled: bool,
    slot: Mutex<Slot>,
}

impl FrameGraphs {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, slot: Mutex::new(Slot::Empty) }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the captured graph (and gives its arena span back); the next frame captures anew.
    /// A failed capture's verdict stays.
    pub fn release(&self) {
        let mut slot = self.lock();
        if matches!(*slot, Slot::Ready(_)) {
            *slot = Slot::Empty;
        }
    }

    /// For logs and checks: whether frames replay a graph, and if not, why.
    pub fn status(&self) -> String {
        if !self.enabled {
            return "CUDA graphs off".into();
        }
        match &*self.lock() {
            Slot::Empty => "CUDA graphs on (nothing captured yet)".into(),
            Slot::Ready(g) => format!("CUDA graphs on (encoder captured for input {:?})", g.input.shape()),
            Slot::Disabled(why) => format!("CUDA graphs off after a failed capture: {why}"),
        }
    }
}

impl CudaBackend {
    /// `Backend::run_frame` on the GPU (see the module docs).
    pub(super) fn run_frame_graphed(&self, key: u64, shape: &[usize], input: &[f32], f: FrameFn<'_, CudaBackend>) -> Result<CudaTensor> {
        let graphs = self.graphs();
        // A profile times launch by launch, which a graph replay has none of (and a capture
        // refuses the profile's timing events).
        if !graphs.enabled || self.device().profiling() {
            return self.run_eager(shape, input, f);
        }
        // Held for the whole frame: one frame at a time may use (or replace) the graph.
        let mut slot = graphs.lock();
        match &*slot {
            Slot::Disabled(_) => return self.run_eager(shape, input, f),
            Slot::Ready(g) if g.key == key && g.input.shape() == shape => return self.replay(g, input),
            _ => {}
        }
        // Give the old graph's span back before capturing a new one.
        *slot = Slot::Empty;
        match self.capture(key, shape, f) {
            Ok(g) => {
                let out = self.replay(&g, input)?;
                *slot = Slot::Ready(g);
                Ok(out)
            }
            Err(capture_error) => {
                // The eager frame tells a graph-only failure from an error of the computation
                // itself, which the caller gets as usual (and graphs stay on).
                let out = self.run_eager(shape, input, f)?;
                let why = capture_error.to_string();
                // Once per backend; stderr is the journal under systemd, as for the CPU fallback.
                eprintln!("minisam: CUDA graph capture failed, running frames kernel by kernel from now on: {why}");
                *slot = Slot::Disabled(why);
                Ok(out)
            }
        }
    }

    fn run_eager(&self, shape: &[usize], input: &[f32], f: FrameFn<'_, CudaBackend>) -> Result<CudaTensor> {
        let x = crate::backend::Backend::from_host(self, shape, input)?;
        f(self, &x)
    }

    /// Records `f` on a graph-owned input block. Nothing runs: the launches are recorded with
    /// their arguments, the arena's bookkeeping happens on the host as in any frame.
    fn capture(&self, key: u64, shape: &[usize], f: FrameFn<'_, CudaBackend>) -> Result<FrameGraph> {
        let dev = self.device();
        let input = self.tensor(shape.to_vec())?;
        let backing = dev.arena()?;
        backing.arena.lock().record_span(true);
        if let Err(e) = dev.begin_capture() {
            backing.arena.lock().record_span(false);
            return Err(e);
        }
        let output = f(self, &input);
        // End the capture whatever happened: the stream must leave capture mode.
        let graph = dev.end_capture();
        let span = backing.arena.lock().record_span(false);
        let (output, graph) = (output?, Graph(graph?));
        let pieces = span.map(|(lo, hi)| backing.arena.lock().claim_free(lo, hi)).unwrap_or_default();
        let span = Reservation { backing, pieces };
        graph.0.upload().map_err(|e| Error::Backend(format!("uploading the encoder graph: {e}")))?;
        Ok(FrameGraph { graph, key, input, output, _span: span })
    }

    /// One frame on a captured graph; the result is a copy the caller owns.
    fn replay(&self, g: &FrameGraph, input: &[f32]) -> Result<CudaTensor> {
        let dev = self.device();
        if input.len() != g.input.numel() {
            return Err(Error::Shape(format!("frame input of {} values for a graph captured on {:?}", input.len(), g.input.shape())));
        }
        dev.upload_f32(g.input.ptr(), input)?;
        g.graph.0.launch().map_err(|e| Error::Backend(format!("launching the encoder graph: {e}")))?;
        let out = self.tensor(g.output.shape().to_vec())?;
        dev.copy_d2d(out.ptr(), g.output.ptr(), out.numel())?;
        Ok(out)
    }
}
