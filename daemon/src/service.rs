//! The D-Bus interface `org.minisam.Segmenter1` at `/org/minisam/Segmenter1`, written to read
//! like its introspection XML (committed as `daemon/org.minisam.Segmenter1.xml`, checked against
//! the running service by `tests/dbus.rs`). Methods validate everything they are given, hand the
//! work to the inference worker, and answer with a named error (`crate::error`) when anything is
//! wrong. Pixels never travel in messages: frames and masks are sealed memfds, streams share a
//! ring memfd.

use std::collections::HashMap;
use std::os::fd::OwnedFd as StdOwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedFd, OwnedVariant};

use crate::adapters::{AdapterEntry, Registry, MAX_ADAPTER_BYTES};
use crate::error::{Error, Result};
use crate::frame::Layout;
use crate::prompts::{PromptSet, WireBox, WirePoint};
use crate::reply;
use crate::stream::Ring;
use crate::worker::{self, AdapterChoice, FrameSource, Request, SegmentJob, SegmentOutput};

pub const BUS_NAME: &str = "org.minisam.Segmenter1";
pub const OBJECT_PATH: &str = "/org/minisam/Segmenter1";
pub const INTERFACE: &str = "org.minisam.Segmenter1";

/// Streams one client may hold open, and in total: each pins a ring of frames in memory.
pub const MAX_STREAMS_PER_CLIENT: usize = 4;
pub const MAX_STREAMS: usize = 64;

/// `(width, height, stride, format)`; format is `gray8`, `gray16` (little-endian) or `rgb8`.
pub type WireLayout = (u32, u32, u32, String);
/// `Segment`/`Reprompt` answer (the interface spells these tuples out: the macro makes one
/// out argument per element only of a literal tuple): masks memfd, IoU per mask, frame id, model and adapter SHA-256,
/// timings in microseconds.
pub type SegmentReply = (OwnedFd, Vec<f64>, u64, String, String, HashMap<String, u64>);
/// `SegmentSlot` answer: like `SegmentReply` but the masks are in the ring's mask slot.
pub type SlotReply = (u32, Vec<f64>, u64, String, String, HashMap<String, u64>);
/// `ListAdapters` row: name, modality, SHA-256, path, fits the loaded model, is the default.
pub type AdapterRow = (String, String, String, String, bool, bool);
/// `OpenStream` answer: stream id, ring memfd, frame slot bytes, mask area offset, mask slot bytes.
pub type StreamReply = (u32, OwnedFd, u64, u64, u64);

/// Facts fixed at startup.
pub struct ModelInfo {
    pub path: String,
    pub description: String,
    pub sha256: String,
    pub backend: String,
}

pub struct Limits {
    pub max_frame_pixels: u64,
    pub deadline: Duration,
}

/// Open streams by id; shared with the main loop, which drops those of clients that leave.
#[derive(Default)]
pub struct Streams(Mutex<HashMap<u32, Arc<Ring>>>);

impl Streams {
    /// Drops the streams of a client that left the bus (each ring is freed once no queued job
    /// holds it). Returns how many were dropped.
    pub fn forget_client(&self, unique_name: &str) -> usize {
        let mut streams = lock(&self.0);
        let before = streams.len();
        streams.retain(|_, r| r.owner != unique_name);
        before - streams.len()
    }
}

pub struct Segmenter1 {
    worker: Arc<worker::Handle>,
    registry: Arc<Mutex<Registry>>,
    streams: Arc<Streams>,
    next_stream: AtomicU32,
    model: ModelInfo,
    limits: Limits,
    last_error: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per-request options (`a{sv}`): `multimask` (b), `adapter` (s: name or modality; `none` for the
/// base model; absent or empty for the active default), `deadline_ms` (u, at most the daemon's).
struct Options {
    multimask: bool,
    adapter: AdapterChoice,
    deadline: Duration,
}

impl Segmenter1 {
    pub fn new(worker: Arc<worker::Handle>, registry: Arc<Mutex<Registry>>, streams: Arc<Streams>, model: ModelInfo, limits: Limits) -> Self {
        Segmenter1 {
            worker,
            registry,
            streams,
            next_stream: AtomicU32::new(1),
            model,
            limits,
            last_error: Mutex::new(String::new()),
        }
    }

    /// Records the error of a failed call for `LastError` and the journal.
    fn record<T>(&self, method: &str, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let line = format!("{}: {}", e.short_name(), e.message());
            tracing::warn!(method, error = e.short_name(), "{line}");
            *lock(&self.last_error) = line;
        }
        r
    }

    fn options(&self, options: &HashMap<String, OwnedVariant>) -> Result<Options> {
        let mut o = Options { multimask: false, adapter: AdapterChoice::Default, deadline: self.limits.deadline };
        for (key, value) in options {
            let wrong = |ty: &str| Error::InvalidPrompt(format!("option {key:?} must be of type {ty}"));
            match key.as_str() {
                "multimask" => o.multimask = bool::try_from(value).map_err(|_| wrong("b"))?,
                "adapter" => {
                    let name = <&str>::try_from(value).map_err(|_| wrong("s"))?;
                    o.adapter = match name {
                        "" => AdapterChoice::Default,
                        "none" => AdapterChoice::Base,
                        key => {
                            let entry = lock(&self.registry).resolve(key)?;
                            lock(&self.registry).check_fits(&entry)?;
                            AdapterChoice::Use(entry)
                        }
                    };
                }
                "deadline_ms" => {
                    let ms = u32::try_from(value).map_err(|_| wrong("u"))?;
                    o.deadline = o.deadline.min(Duration::from_millis(u64::from(ms)));
                }
                other => return Err(Error::InvalidPrompt(format!("unknown option {other:?}; known: multimask, adapter, deadline_ms"))),
            }
        }
        Ok(o)
    }

    async fn run(&self, source: FrameSource, prompts: PromptSet, o: Options) -> Result<SegmentOutput> {
        let now = Instant::now();
        let (tx, rx) = reply::channel();
        let request = Request { source, prompts, multimask: o.multimask, adapter: o.adapter, deadline: now + o.deadline, enqueued: now };
        self.worker.submit(SegmentJob { request, reply: tx })?;
        tracing::debug!("request queued");
        let out = rx.await.ok_or_else(|| Error::Internal("the inference worker stopped before answering".into()))??;
        tracing::debug!(
            model = %self.model.sha256,
            adapter = %out.adapter_name,
            latency_us = out.timings.total_us,
            encode_us = out.timings.encode_us,
            reused = out.reused_embedding,
            "frame served"
        );
        Ok(out)
    }

    fn timings(out: &SegmentOutput) -> HashMap<String, u64> {
        out.timings.as_pairs().iter().map(|&(k, v)| (k.to_string(), v)).collect()
    }

    fn segment_reply(&self, out: SegmentOutput) -> Result<SegmentReply> {
        let timings = Self::timings(&out);
        let fd: StdOwnedFd = out.masks.ok_or_else(|| Error::Internal("masks memfd missing".into()))?;
        Ok((OwnedFd::from(fd), out.iou, out.frame_id, self.model.sha256.clone(), out.adapter_sha256, timings))
    }

    fn ring(&self, stream: u32, sender: &str) -> Result<Arc<Ring>> {
        match lock(&self.streams.0).get(&stream) {
            Some(r) if r.owner == sender => Ok(r.clone()),
            _ => Err(Error::InvalidFrame(format!("no stream {stream} is open for this client"))),
        }
    }

    async fn control(&self, make: impl FnOnce(reply::Sender<Result<Option<Arc<AdapterEntry>>>>) -> worker::Control) -> Result<(String, String)> {
        let (tx, rx) = reply::channel();
        self.worker.control(make(tx))?;
        let active = rx.await.ok_or_else(|| Error::Internal("the inference worker stopped".into()))??;
        Ok(active.map(|e| (e.name.clone(), e.sha256.clone())).unwrap_or_default())
    }

    async fn announce(&self, emitter: &SignalEmitter<'_>, name: &str, sha256: &str) {
        tracing::info!(adapter = name, adapter_sha256 = sha256, model = %self.model.sha256, "default adapter changed");
        if let Err(e) = Self::adapter_changed(emitter, name, sha256).await {
            tracing::warn!("cannot emit AdapterChanged: {e}");
        }
        if let Err(e) = self.active_adapter_changed(emitter).await {
            tracing::warn!("cannot emit PropertiesChanged: {e}");
        }
    }
}

fn sender(hdr: &Header<'_>) -> String {
    hdr.sender().map(|s| s.to_string()).unwrap_or_default()
}

#[interface(name = "org.minisam.Segmenter1")]
impl Segmenter1 {
    /// Segment: one frame in a sealed memfd (F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW, at least
    /// stride*height bytes), layout (width, height, stride, format gray8|gray16|rgb8), at most
    /// one box (x0, y0, x1, y1) and 64 points (x, y, label 1=foreground 0=background) in pixels,
    /// options {multimask: b, adapter: s, deadline_ms: u}. Returns a new sealed memfd holding
    /// one width*height u8 plane per mask (0 or 255), the predicted IoU of each mask, the
    /// frame id for Reprompt, the model and adapter SHA-256 and timings in microseconds.
    #[zbus(out_args("masks", "iou", "frame_id", "model_sha256", "adapter_sha256", "timings_us"))]
    async fn segment(
        &self,
        frame: OwnedFd,
        layout: WireLayout,
        boxes: Vec<WireBox>,
        points: Vec<WirePoint>,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<(OwnedFd, Vec<f64>, u64, String, String, HashMap<String, u64>)> {
        let result = async {
            let (w, h, stride, format) = layout;
            let layout = Layout::new(w, h, stride, &format, self.limits.max_frame_pixels)?;
            let prompts = PromptSet::from_wire(&boxes, &points, Some((layout.width, layout.height)))?;
            let o = self.options(&options)?;
            let fd: StdOwnedFd = frame.into();
            let map = crate::memfd::map_sealed_frame(&fd, layout.byte_len())?;
            let out = self.run(FrameSource::Sealed { map, layout }, prompts, o).await?;
            self.segment_reply(out)
        }
        .await;
        self.record("Segment", result)
    }

    /// Reprompt: new prompts on a frame answered before (by its frame_id) while its image
    /// embedding is still cached; only the prompt encoder and mask decoder run.
    #[zbus(out_args("masks", "iou", "frame_id", "model_sha256", "adapter_sha256", "timings_us"))]
    async fn reprompt(
        &self,
        frame_id: u64,
        boxes: Vec<WireBox>,
        points: Vec<WirePoint>,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<(OwnedFd, Vec<f64>, u64, String, String, HashMap<String, u64>)> {
        let result = async {
            let prompts = PromptSet::from_wire(&boxes, &points, None)?;
            let o = self.options(&options)?;
            let out = self.run(FrameSource::Cached(frame_id), prompts, o).await?;
            self.segment_reply(out)
        }
        .await;
        self.record("Reprompt", result)
    }

    /// OpenStream: creates a ring memfd of `slots` frame slots (stride = width * bytes per
    /// pixel) followed by `slots` mask slots (3 * width * height bytes each), sealed against
    /// resizing but writable (see the torn-read contract in daemon/README.md). Returns the
    /// stream id, the ring, the bytes per frame slot, the offset of mask slot 0 and the bytes
    /// per mask slot.
    #[zbus(out_args("stream", "ring", "frame_slot_bytes", "masks_offset", "mask_slot_bytes"))]
    async fn open_stream(&self, slots: u32, width: u32, height: u32, format: String, #[zbus(header)] hdr: Header<'_>) -> Result<(u32, OwnedFd, u64, u64, u64)> {
        let owner = sender(&hdr);
        let result = (|| {
            let bpp = crate::frame::PixelFormat::parse(&format)?.bytes_per_pixel() as u32;
            let stride = width.checked_mul(bpp).ok_or_else(|| Error::InvalidFrame("width too large".into()))?;
            let layout = Layout::new(width, height, stride, &format, self.limits.max_frame_pixels)?;
            let mut streams = lock(&self.streams.0);
            if streams.len() >= MAX_STREAMS || streams.values().filter(|r| r.owner == owner).count() >= MAX_STREAMS_PER_CLIENT {
                return Err(Error::Busy(format!("too many open streams (at most {MAX_STREAMS_PER_CLIENT} per client)")));
            }
            let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
            let (ring, fd) = Ring::create(id, owner.clone(), slots as usize, layout)?;
            let reply = (id, OwnedFd::from(fd), ring.frame_slot_len() as u64, ring.mask_offset(0) as u64, Ring::mask_slot_len(&layout) as u64);
            streams.insert(id, Arc::new(ring));
            Ok(reply)
        })();
        self.record("OpenStream", result)
    }

    /// SegmentSlot: segments the frame the client wrote into `slot` of `stream`; `seq` is the
    /// client's frame number for that slot (the same slot and seq again re-uses the cached
    /// embedding). Masks go to the slot's mask area; the reply carries their count.
    #[zbus(out_args("n_masks", "iou", "frame_id", "model_sha256", "adapter_sha256", "timings_us"))]
    #[allow(clippy::too_many_arguments)]
    async fn segment_slot(
        &self,
        stream: u32,
        slot: u32,
        seq: u64,
        boxes: Vec<WireBox>,
        points: Vec<WirePoint>,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(u32, Vec<f64>, u64, String, String, HashMap<String, u64>)> {
        let owner = sender(&hdr);
        let result = async {
            let ring = self.ring(stream, &owner)?;
            let slot = ring.check_slot(slot)?;
            let prompts = PromptSet::from_wire(&boxes, &points, Some((ring.layout.width, ring.layout.height)))?;
            let o = self.options(&options)?;
            let out = self.run(FrameSource::Slot { ring, slot, seq }, prompts, o).await?;
            let timings = Self::timings(&out);
            Ok((out.n_masks as u32, out.iou, out.frame_id, self.model.sha256.clone(), out.adapter_sha256, timings))
        }
        .await;
        self.record("SegmentSlot", result)
    }

    /// CloseStream: frees the ring once no request uses it.
    async fn close_stream(&self, stream: u32, #[zbus(header)] hdr: Header<'_>) -> Result<()> {
        let owner = sender(&hdr);
        let result = self.ring(stream, &owner).map(|_| {
            lock(&self.streams.0).remove(&stream);
        });
        self.record("CloseStream", result)
    }

    /// ListAdapters: (name, modality, sha256, path, fits the loaded model, is the default).
    #[zbus(out_args("adapters"))]
    async fn list_adapters(&self) -> Vec<AdapterRow> {
        let active = self.worker.shared.active_adapter().map(|e| e.sha256.clone()).unwrap_or_default();
        let registry = lock(&self.registry);
        registry
            .entries()
            .iter()
            .map(|e| {
                (e.name.clone(), e.modality.clone(), e.sha256.clone(), e.path.display().to_string(), e.fits(registry.model_sha256()), e.sha256 == active)
            })
            .collect()
    }

    /// ActivateAdapter: makes an adapter (by name, else the best for a modality; `none` for the
    /// base model) the default, between two frames; returns its name and SHA-256.
    #[zbus(out_args("name", "sha256"))]
    async fn activate_adapter(&self, name_or_modality: String, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) -> Result<(String, String)> {
        let result = async {
            let entry = match name_or_modality.as_str() {
                "" | "none" => None,
                key => {
                    let registry = lock(&self.registry);
                    let e = registry.resolve(key)?;
                    registry.check_fits(&e)?;
                    Some(e)
                }
            };
            self.control(|reply| worker::Control::SetDefault { adapter: entry, reply }).await
        }
        .await;
        if let Ok((name, sha)) = &result {
            self.announce(&emitter, name, sha).await;
        }
        self.record("ActivateAdapter", result)
    }

    /// InstallAdapter: reads an adapter file from `file` (any readable fd), validates it fully
    /// against the loaded model, stores it crash-safely in the writable adapters directory and,
    /// if `activate`, makes it the default. A rejected file changes nothing.
    #[zbus(out_args("name", "sha256"))]
    async fn install_adapter(&self, file: OwnedFd, activate: bool, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) -> Result<(String, String)> {
        let result = async {
            let bytes = read_bounded(file.into(), MAX_ADAPTER_BYTES)?;
            let entry = lock(&self.registry).install(bytes)?;
            tracing::info!(adapter = %entry.name, adapter_sha256 = %entry.sha256, path = %entry.path.display(), "adapter installed");
            if activate {
                self.control(|reply| worker::Control::SetDefault { adapter: Some(entry.clone()), reply }).await?;
                self.announce(&emitter, &entry.name, &entry.sha256).await;
            }
            Ok((entry.name.clone(), entry.sha256.clone()))
        }
        .await;
        self.record("InstallAdapter", result)
    }

    /// RollbackAdapter: returns to the default adapter before the last change.
    #[zbus(out_args("name", "sha256"))]
    async fn rollback_adapter(&self, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) -> Result<(String, String)> {
        let result = self.control(|reply| worker::Control::Rollback { reply }).await;
        if let Ok((name, sha)) = &result {
            self.announce(&emitter, name, sha).await;
        }
        self.record("RollbackAdapter", result)
    }

    /// The model file served and its description (kind, architecture, SHA-256 prefix).
    #[zbus(property(emits_changed_signal = "const"))]
    fn active_model(&self) -> String {
        format!("{} ({})", self.model.path, self.model.description)
    }

    /// Name of the default adapter; empty for the base model.
    #[zbus(property)]
    fn active_adapter(&self) -> String {
        self.worker.shared.active_adapter().map(|e| e.name.clone()).unwrap_or_default()
    }

    /// Compute backend: cpu or cuda.
    #[zbus(property(emits_changed_signal = "const"))]
    fn backend(&self) -> String {
        self.model.backend.clone()
    }

    /// Resident memory of the daemon in bytes.
    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_use(&self) -> u64 {
        resident_bytes()
    }

    /// Frames answered successfully since start.
    #[zbus(property(emits_changed_signal = "false"))]
    fn frames_served(&self) -> u64 {
        self.worker.shared.frames_served.load(Ordering::Relaxed)
    }

    /// The last error returned to any client, as "Name: message"; empty if none yet.
    #[zbus(property(emits_changed_signal = "false"))]
    fn last_error(&self) -> String {
        lock(&self.last_error).clone()
    }

    /// AdapterChanged: the default adapter is now `name` (empty: base model) with `sha256`.
    #[zbus(signal)]
    async fn adapter_changed(emitter: &SignalEmitter<'_>, name: &str, sha256: &str) -> zbus::Result<()>;
}

/// Reads at most `limit` bytes from `fd` (refusing larger files).
fn read_bounded(fd: StdOwnedFd, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::AdapterRejected(format!("cannot read the adapter fd: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(Error::AdapterRejected(format!("adapter file is larger than {limit} bytes")));
    }
    Ok(bytes)
}

/// Resident set size from /proc/self/statm (pages × page size); 0 if unreadable.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    pages * page
}
