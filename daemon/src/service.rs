//! The D-Bus interface `org.minisam.Segmenter1` at `/org/minisam/Segmenter1`, written to read
//! like its introspection XML (committed as `daemon/org.minisam.Segmenter1.xml`, checked against
//! the running service by `tests/dbus.rs`). Methods validate everything they are given, hand the
//! work to the inference worker, and answer with a named error (`crate::error`) when anything is
//! wrong. Pixels never travel in messages: frames and masks are sealed memfds, streams share a
//! ring memfd.

use std::collections::HashMap;
use std::os::fd::OwnedFd as StdOwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedFd, OwnedVariant};

use crate::adapters::{AdapterEntry, Registry, MAX_ADAPTER_BYTES};
use crate::callers::Callers;
use crate::error::{quoted, Error, Result};
use crate::frame::Layout;
use crate::prompts::{PromptSet, WireBox, WirePoint};
use crate::reply;
use crate::stream::Ring;
use crate::worker::{self, AdapterChoice, FrameSource, Request, SegmentJob, SegmentOutput};

pub const BUS_NAME: &str = "org.minisam.Segmenter1";
pub const OBJECT_PATH: &str = "/org/minisam/Segmenter1";
pub const INTERFACE: &str = "org.minisam.Segmenter1";

/// Streams open at once over all users: each is a memfd, a mapping and a record.
pub const MAX_STREAMS: usize = 64;
/// How long `InstallAdapter` waits for a pipe or socket to deliver the whole file. A file or
/// memfd is read at once; a stream that has not ended by then has a writer that stays open.
pub const INSTALL_READ_DEADLINE: Duration = Duration::from_secs(10);

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
    /// stride × height, so a huge stride cannot make a small frame map terabytes.
    pub max_frame_bytes: u64,
    pub deadline: Duration,
    pub streams: StreamLimits,
}

/// Streams pin ring memory in the daemon, so they are limited per Unix user (over all of that
/// user's connections) in count and bytes, and in total bytes; each refusal names the limit.
pub struct StreamLimits {
    pub per_user: usize,
    pub bytes_per_user: u64,
    pub total_bytes: u64,
}

impl StreamLimits {
    /// Whether user `uid` may open one more ring of `bytes` next to the `open` ones.
    pub fn admit(&self, open: &HashMap<u32, Arc<Ring>>, uid: u32, bytes: u64) -> Result<()> {
        const MIB: f64 = 1024.0 * 1024.0;
        let (mut user_count, mut user_bytes, mut total) = (0usize, 0u64, 0u64);
        for r in open.values() {
            total += r.bytes();
            if r.uid == uid {
                user_count += 1;
                user_bytes += r.bytes();
            }
        }
        if open.len() >= MAX_STREAMS {
            return Err(Error::Busy(format!("{} streams are open on this daemon, the most it keeps; retry after some close", open.len())));
        }
        if user_count >= self.per_user {
            return Err(Error::Busy(format!(
                "user {uid} has {user_count} open streams over all its connections; at most {} per user (--max-streams-per-user)",
                self.per_user
            )));
        }
        let within = |held: u64, limit: u64, holders: &str, which: &str| -> Result<()> {
            if held + bytes <= limit {
                return Ok(());
            }
            Err(Error::Busy(format!(
                "this ring needs {:.1} MiB and {holders} hold {:.1} MiB; at most {:.1} MiB {which}",
                bytes as f64 / MIB,
                held as f64 / MIB,
                limit as f64 / MIB
            )))
        };
        within(user_bytes, self.bytes_per_user, &format!("user {uid}'s open streams"), "per user (--max-stream-bytes-per-user)")?;
        within(total, self.total_bytes, "open streams", "in all (--max-stream-bytes)")
    }
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
    callers: Arc<Callers>,
    next_stream: AtomicU32,
    /// Set while an `InstallAdapter` reads and validates off the bus thread: one at a time, so
    /// installs cannot pile up threads or memory.
    installing: AtomicBool,
    model: ModelInfo,
    limits: Limits,
}

/// Clears `installing` when the install ends, however it ends.
struct InstallSlot<'a>(&'a AtomicBool);

impl Drop for InstallSlot<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Runs blocking work (reading a client's fd, validating and fsyncing an adapter) on a thread of
/// its own and awaits it: the bus thread keeps answering other calls meanwhile.
async fn off_the_bus_thread<T: Send + 'static>(name: &str, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let (tx, rx) = reply::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || tx.send(work()))
        .map_err(|e| Error::Internal(format!("starting a thread for {name}: {e}")))?;
    rx.await.ok_or_else(|| Error::Internal(format!("{name} stopped without an answer")))?
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
    pub fn new(worker: Arc<worker::Handle>, registry: Arc<Mutex<Registry>>, streams: Arc<Streams>, callers: Arc<Callers>, model: ModelInfo, limits: Limits) -> Self {
        Segmenter1 {
            worker,
            registry,
            streams,
            callers,
            next_stream: AtomicU32::new(1),
            installing: AtomicBool::new(false),
            model,
            limits,
        }
    }

    /// Records the error of a failed call in the journal and as the `LastError` of the caller's
    /// Unix user (no other user sees it).
    async fn record<T>(&self, method: &str, conn: &zbus::Connection, hdr: &Header<'_>, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let line = format!("{}: {}", e.short_name(), e.message());
            let client = sender(hdr);
            tracing::warn!(method, error = e.short_name(), client = %client, "{}", crate::error::truncate(&line, crate::callers::MAX_ERROR_BYTES));
            match self.callers.uid(conn, &client).await {
                Ok(uid) => self.callers.record_error(uid, &line),
                Err(e) => tracing::warn!("cannot attribute the error to a user: {}", e.message()),
            }
        }
        r
    }

    fn options(&self, options: &HashMap<String, OwnedVariant>) -> Result<Options> {
        let mut o = Options { multimask: false, adapter: AdapterChoice::Default, deadline: self.limits.deadline };
        for (key, value) in options {
            let wrong = |ty: &str| Error::InvalidPrompt(format!("option {} must be of type {ty}", quoted(key)));
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
                other => return Err(Error::InvalidPrompt(format!("unknown option {}; known: multimask, adapter, deadline_ms", quoted(other)))),
            }
        }
        Ok(o)
    }

    async fn run(&self, client: String, source: FrameSource, prompts: PromptSet, o: Options) -> Result<SegmentOutput> {
        let now = Instant::now();
        let (tx, rx) = reply::channel();
        let request = Request { client, source, prompts, multimask: o.multimask, adapter: o.adapter, deadline: now + o.deadline, enqueued: now };
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
    #[allow(clippy::too_many_arguments)]
    async fn segment(
        &self,
        frame: OwnedFd,
        layout: WireLayout,
        boxes: Vec<WireBox>,
        points: Vec<WirePoint>,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(OwnedFd, Vec<f64>, u64, String, String, HashMap<String, u64>)> {
        let result = async {
            let (w, h, stride, format) = layout;
            let layout = Layout::new(w, h, stride, &format, self.limits.max_frame_pixels)?.check_bytes(self.limits.max_frame_bytes)?;
            let prompts = PromptSet::from_wire(&boxes, &points, Some((layout.width, layout.height)))?;
            let o = self.options(&options)?;
            let fd: StdOwnedFd = frame.into();
            let map = crate::memfd::map_sealed_frame(&fd, layout.byte_len())?;
            let out = self.run(sender(&hdr), FrameSource::Sealed { map, layout }, prompts, o).await?;
            self.segment_reply(out)
        }
        .await;
        self.record("Segment", conn, &hdr, result).await
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
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(OwnedFd, Vec<f64>, u64, String, String, HashMap<String, u64>)> {
        let result = async {
            let prompts = PromptSet::from_wire(&boxes, &points, None)?;
            let o = self.options(&options)?;
            let out = self.run(sender(&hdr), FrameSource::Cached(frame_id), prompts, o).await?;
            self.segment_reply(out)
        }
        .await;
        self.record("Reprompt", conn, &hdr, result).await
    }

    /// OpenStream: creates a ring memfd of `slots` frame slots (stride = width * bytes per
    /// pixel) followed by `slots` mask slots (3 * width * height bytes each), sealed against
    /// resizing but writable (see the torn-read contract in daemon/README.md). Returns the
    /// stream id, the ring, the bytes per frame slot, the offset of mask slot 0 and the bytes
    /// per mask slot.
    #[zbus(out_args("stream", "ring", "frame_slot_bytes", "masks_offset", "mask_slot_bytes"))]
    #[allow(clippy::too_many_arguments)]
    async fn open_stream(
        &self,
        slots: u32,
        width: u32,
        height: u32,
        format: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(u32, OwnedFd, u64, u64, u64)> {
        let owner = sender(&hdr);
        let result = async {
            let bpp = crate::frame::PixelFormat::parse(&format)?.bytes_per_pixel() as u32;
            let stride = width.checked_mul(bpp).ok_or_else(|| Error::InvalidFrame("width too large".into()))?;
            let layout = Layout::new(width, height, stride, &format, self.limits.max_frame_pixels)?.check_bytes(self.limits.max_frame_bytes)?;
            Ring::check_slots(slots as usize)?;
            let uid = self.callers.uid(conn, &owner).await?;
            let mut streams = lock(&self.streams.0);
            self.limits.streams.admit(&streams, uid, Ring::len_for(slots as usize, &layout))?;
            let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
            let (ring, fd) = Ring::create(id, owner.clone(), uid, slots as usize, layout)?;
            let reply = (id, OwnedFd::from(fd), ring.frame_slot_len() as u64, ring.mask_offset(0) as u64, Ring::mask_slot_len(&layout) as u64);
            streams.insert(id, Arc::new(ring));
            Ok(reply)
        }
        .await;
        self.record("OpenStream", conn, &hdr, result).await
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
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(u32, Vec<f64>, u64, String, String, HashMap<String, u64>)> {
        let owner = sender(&hdr);
        let result = async {
            let ring = self.ring(stream, &owner)?;
            let slot = ring.check_slot(slot)?;
            let prompts = PromptSet::from_wire(&boxes, &points, Some((ring.layout.width, ring.layout.height)))?;
            let o = self.options(&options)?;
            let out = self.run(owner.clone(), FrameSource::Slot { ring, slot, seq }, prompts, o).await?;
            let timings = Self::timings(&out);
            Ok((out.n_masks as u32, out.iou, out.frame_id, self.model.sha256.clone(), out.adapter_sha256, timings))
        }
        .await;
        self.record("SegmentSlot", conn, &hdr, result).await
    }

    /// CloseStream: frees the ring once no request uses it.
    async fn close_stream(&self, stream: u32, #[zbus(header)] hdr: Header<'_>, #[zbus(connection)] conn: &zbus::Connection) -> Result<()> {
        let owner = sender(&hdr);
        let result = self.ring(stream, &owner).map(|_| {
            lock(&self.streams.0).remove(&stream);
        });
        self.record("CloseStream", conn, &hdr, result).await
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
    async fn activate_adapter(
        &self,
        name_or_modality: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(String, String)> {
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
        self.record("ActivateAdapter", conn, &hdr, result).await
    }

    /// InstallAdapter: reads an adapter file from `file` (a file or memfd, read whole from
    /// offset 0; or a pipe or socket whose writer closes within 10 s), validates it fully
    /// against the loaded model, stores it crash-safely in the writable adapters directory and,
    /// if `activate`, makes it the default. A rejected file changes nothing. One install runs at
    /// a time (another gets Busy), off the bus thread.
    #[zbus(out_args("name", "sha256"))]
    async fn install_adapter(
        &self,
        file: OwnedFd,
        activate: bool,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(String, String)> {
        let result = async {
            if self.installing.swap(true, Ordering::AcqRel) {
                return Err(Error::Busy("another adapter install is in progress; retry when it has finished".into()));
            }
            let _slot = InstallSlot(&self.installing);
            let target = lock(&self.registry).install_target()?;
            let fd: StdOwnedFd = file.into();
            let entry = off_the_bus_thread("minisam-install", move || {
                let bytes = crate::fd_read::read_all_bounded(fd, MAX_ADAPTER_BYTES, INSTALL_READ_DEADLINE)
                    .map_err(|e| Error::AdapterRejected(format!("cannot read the adapter fd: {e}")))?;
                target.install(bytes)
            })
            .await?;
            let entry = lock(&self.registry).insert(entry);
            tracing::info!(adapter = %entry.name, adapter_sha256 = %entry.sha256, path = %entry.path.display(), "adapter installed");
            if activate {
                self.control(|reply| worker::Control::SetDefault { adapter: Some(entry.clone()), reply }).await?;
                self.announce(&emitter, &entry.name, &entry.sha256).await;
            }
            Ok((entry.name.clone(), entry.sha256.clone()))
        }
        .await;
        self.record("InstallAdapter", conn, &hdr, result).await
    }

    /// RollbackAdapter: returns to the default adapter before the last change.
    #[zbus(out_args("name", "sha256"))]
    async fn rollback_adapter(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(String, String)> {
        let result = self.control(|reply| worker::Control::Rollback { reply }).await;
        if let Ok((name, sha)) = &result {
            self.announce(&emitter, name, sha).await;
        }
        self.record("RollbackAdapter", conn, &hdr, result).await
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

    /// The last error returned to a client of the caller's Unix user, as "Name: message" (at
    /// most 512 bytes); empty if none yet. Other users' errors are never shown.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn last_error(&self, #[zbus(header)] hdr: Option<Header<'_>>, #[zbus(connection)] conn: &zbus::Connection) -> String {
        let Some(hdr) = hdr else { return String::new() };
        match self.callers.uid(conn, &sender(&hdr)).await {
            Ok(uid) => self.callers.last_error(uid),
            Err(_) => String::new(),
        }
    }

    /// AdapterChanged: the default adapter is now `name` (empty: base model) with `sha256`.
    #[zbus(signal)]
    async fn adapter_changed(emitter: &SignalEmitter<'_>, name: &str, sha256: &str) -> zbus::Result<()>;
}

/// Resident set size from /proc/self/statm (pages × page size); 0 if unreadable.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    pages * page
}
