//! The serving core: one inference thread owns the `Segmenter` (any `Backend`: CPU now, CUDA
//! through the same trait) and takes jobs from a bounded queue. Everything that touches the
//! networks happens here, one job at a time, so adapter swaps land between frames and never
//! under a running request.
//!
//! - Back-pressure: the queue is a `sync_channel(queue_depth)`; a full queue answers `Busy` at
//!   once instead of letting latency grow without bound.
//! - Deadlines: a job that waited past its deadline is answered `DeadlineExceeded` without
//!   running; one whose encoder ran past it is answered the same before decoding.
//! - Embedding cache: the last `CACHE_SLOTS` encoded frames are kept with the adapter they were
//!   encoded under and the client (unique bus name) that sent them; re-prompting one
//!   (`Reprompt`, or the same stream slot and sequence number) runs only the prompt encoder and
//!   mask decoder. Frame ids are unpredictable (a keyed hash of a counter) and a cached frame
//!   answers only its own client: another client cannot guess an id and read masks of a frame
//!   it never sent. A frame whose encoder finished past the deadline stays cached, and the
//!   error names its id, so the work is not lost.
//! - Steady state: the RGB conversion buffer and the prompt lists are reused; the engine's own
//!   activation pool makes a second same-sized frame allocate no activations.
//! - Liveness: the thread bumps a heartbeat between phases and while idle; the watchdog pings
//!   systemd only while it moves (see `crate::watchdog`).

use std::hash::BuildHasher;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use minisam_models::backend::Backend;
use minisam_models::image::RgbImage;
use minisam_models::prompt::Prompts;
use minisam_models::sam::{ImageEmbedding, Segmenter};

use crate::adapters::AdapterEntry;
use crate::error::{Error, Result};
use crate::frame::{self, Layout};
use crate::prompts::PromptSet;
use crate::reply;
use crate::state::{ActiveAdapter, StateFile};
use crate::stream::Ring;

/// Encoded frames kept for re-prompting. A LiteMedSAM embedding is 4 MiB, a ViT one 4 MiB too
/// (256×64×64 f32): eight cover a few interactive clients at 32 MiB.
pub const CACHE_SLOTS: usize = 8;
/// How often an idle worker wakes to beat and look at controls.
const TICK: Duration = Duration::from_millis(100);

/// The deadline when `--deadline-ms` is not given, from the time the warm-up frame (encoder and
/// a three-mask decode, on an idle machine) took: a cart whose other software keeps the cores
/// busy takes at least twice as long per frame, and one frame may be queued ahead of this one,
/// so 4x; never under one second, so scheduling noise on a fast GPU does not fail frames (a
/// client that wants less sets the `deadline_ms` option).
pub fn auto_deadline(warm_up: Duration) -> Duration {
    (warm_up * 4).max(Duration::from_secs(1))
}

/// Liveness and counters the rest of the daemon reads.
#[derive(Default)]
pub struct Shared {
    /// The default adapter as the worker holds it (published for properties and listings).
    active: std::sync::Mutex<Option<Arc<AdapterEntry>>>,
    beats: AtomicU64,
    busy: AtomicBool,
    pub frames_served: AtomicU64,
    /// Set on SIGTERM: the worker finishes what is queued, then exits.
    pub draining: AtomicBool,
}

impl Shared {
    fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
    }
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }
    pub fn active_adapter(&self) -> Option<Arc<AdapterEntry>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn publish(&self, a: &Option<Arc<AdapterEntry>>) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = a.clone();
    }
}

/// Where the pixels of a job come from.
pub enum FrameSource {
    /// A client's sealed memfd, already checked and mapped.
    Sealed { map: Mmap, layout: Layout },
    /// A slot of a streaming ring; `seq` is the client's frame number for that slot.
    Slot { ring: Arc<Ring>, slot: usize, seq: u64 },
    /// A frame encoded earlier, by the `frame_id` its first answer carried.
    Cached(u64),
}

/// Which adapter a job runs under.
pub enum AdapterChoice {
    /// Whatever `ActivateAdapter` last set.
    Default,
    /// The base model, no adapter.
    Base,
    Use(Arc<AdapterEntry>),
}

pub struct Request {
    /// Unique bus name of the caller: cached frames answer only the client that sent them.
    pub client: String,
    pub source: FrameSource,
    pub prompts: PromptSet,
    pub multimask: bool,
    pub adapter: AdapterChoice,
    pub deadline: Instant,
    pub enqueued: Instant,
}

pub struct SegmentJob {
    pub request: Request,
    pub reply: reply::Sender<Result<SegmentOutput>>,
}

/// Microseconds spent in each phase of one job.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub queue_us: u64,
    pub convert_us: u64,
    pub encode_us: u64,
    pub decode_us: u64,
    pub output_us: u64,
    pub total_us: u64,
}

impl Timings {
    pub fn as_pairs(&self) -> [(&'static str, u64); 6] {
        [
            ("queue_us", self.queue_us),
            ("convert_us", self.convert_us),
            ("encode_us", self.encode_us),
            ("decode_us", self.decode_us),
            ("output_us", self.output_us),
            ("total_us", self.total_us),
        ]
    }
}

pub struct SegmentOutput {
    /// A new sealed memfd with the masks (`Sealed`/`Cached` sources); `None` for stream jobs,
    /// whose masks are in the ring's mask slot.
    pub masks: Option<OwnedFd>,
    pub n_masks: usize,
    pub iou: Vec<f64>,
    pub frame_id: u64,
    /// SHA-256 of the adapter the masks were computed with; empty for the base model.
    pub adapter_sha256: String,
    pub adapter_name: String,
    pub reused_embedding: bool,
    pub timings: Timings,
}

/// Adapter changes, applied by the worker between two jobs. Each replies with the adapter that
/// is the default afterwards (`None`: base model) once the engine holds it, or with the reason
/// it refused, in which case the previous adapter stays active.
pub enum Control {
    /// Makes `adapter` (or the base model) the default; the previous default goes on the
    /// rollback history.
    SetDefault { adapter: Option<Arc<AdapterEntry>>, reply: reply::Sender<Result<Option<Arc<AdapterEntry>>>> },
    /// Returns to the default before the last `SetDefault`.
    Rollback { reply: reply::Sender<Result<Option<Arc<AdapterEntry>>>> },
}

/// Rollback depth: enough to walk back a morning of field swaps, bounded so it cannot grow.
const HISTORY: usize = 16;

enum Job {
    Segment(Box<SegmentJob>),
    /// Nudges the worker to look at the control channel now.
    Wake,
}

/// The service's side of the worker.
pub struct Handle {
    jobs: SyncSender<Job>,
    controls: Sender<Control>,
    pub shared: Arc<Shared>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    /// Queues a job or refuses at once (`Busy`) when `queue_depth` jobs are already waiting.
    pub fn submit(&self, job: SegmentJob) -> Result<()> {
        if self.shared.draining.load(Ordering::Relaxed) {
            return Err(Error::Busy("the daemon is shutting down".into()));
        }
        match self.jobs.try_send(Job::Segment(Box::new(job))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::Busy("request queue is full; retry shortly".into())),
            Err(TrySendError::Disconnected(_)) => Err(Error::Internal("inference worker has stopped".into())),
        }
    }

    pub fn control(&self, c: Control) -> Result<()> {
        self.controls.send(c).map_err(|_| Error::Internal("inference worker has stopped".into()))?;
        // If the queue is full the worker is busy and reads controls after its current job.
        let _ = self.jobs.try_send(Job::Wake);
        Ok(())
    }

    /// Stops taking jobs, lets the worker finish the queued ones, and waits for it.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.jobs.try_send(Job::Wake);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

struct CacheEntry<B: Backend> {
    frame_id: u64,
    /// Unique bus name of the client that sent the frame.
    owner: String,
    /// `(ring id, slot, seq)` for frames that came through a stream.
    stream_key: Option<(u32, usize, u64)>,
    adapter_sha256: String,
    embedding: ImageEmbedding<B>,
    last_used: u64,
}

struct Worker<B: Backend> {
    segmenter: Segmenter<B>,
    default_adapter: Option<Arc<AdapterEntry>>,
    loaded_adapter: Option<Arc<AdapterEntry>>,
    history: Vec<Option<Arc<AdapterEntry>>>,
    cache: Vec<CacheEntry<B>>,
    rgb: RgbImage,
    prompts: Prompts,
    clock: u64,
    frames_encoded: u64,
    /// Keys the frame-id hash; random per process, so ids cannot be predicted from earlier ones.
    frame_id_key: std::collections::hash_map::RandomState,
    persist: Option<Persist>,
    shared: Arc<Shared>,
}

/// Where the default adapter is written after each change, and the `--adapter` flag to record
/// with it (see `crate::state`).
pub struct Persist {
    pub file: StateFile,
    pub adapter_flag: Option<String>,
}

/// Starts the worker thread. `adapter` must already be set on `segmenter` (startup applies
/// `--adapter` before the service announces readiness).
pub fn spawn<B: Backend + 'static>(segmenter: Segmenter<B>, adapter: Option<Arc<AdapterEntry>>, queue_depth: usize, persist: Option<Persist>) -> Result<Handle> {
    let (jobs_tx, jobs_rx) = mpsc::sync_channel(queue_depth.max(1));
    let (ctl_tx, ctl_rx) = mpsc::channel();
    let shared = Arc::new(Shared::default());
    shared.publish(&adapter);
    let mut worker = Worker {
        segmenter,
        default_adapter: adapter.clone(),
        loaded_adapter: adapter,
        history: Vec::new(),
        cache: Vec::with_capacity(CACHE_SLOTS),
        rgb: RgbImage { width: 0, height: 0, data: Vec::new() },
        prompts: Prompts::default(),
        clock: 0,
        frames_encoded: 0,
        frame_id_key: std::collections::hash_map::RandomState::new(),
        persist,
        shared: shared.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("minisam-infer".into())
        .spawn(move || worker.run(jobs_rx, ctl_rx))
        .map_err(|e| Error::Internal(format!("starting the inference thread: {e}")))?;
    Ok(Handle { jobs: jobs_tx, controls: ctl_tx, shared, thread: std::sync::Mutex::new(Some(thread)) })
}

fn sha_of(a: &Option<Arc<AdapterEntry>>) -> &str {
    a.as_ref().map(|e| e.sha256.as_str()).unwrap_or("")
}

fn engine_error(e: minisam_models::Error, input: fn(String) -> Error) -> Error {
    match e {
        minisam_models::Error::Input(m) => input(m),
        other => Error::Internal(other.to_string()),
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl<B: Backend> Worker<B> {
    fn run(&mut self, jobs: Receiver<Job>, controls: Receiver<Control>) {
        loop {
            self.shared.beat();
            while let Ok(c) = controls.try_recv() {
                self.apply(c);
            }
            let job = if self.shared.draining.load(Ordering::Relaxed) {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match jobs.recv_timeout(TICK) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            if let Job::Segment(job) = job {
                self.shared.busy.store(true, Ordering::Relaxed);
                let SegmentJob { request, reply } = *job;
                let result = self.segment(request);
                if result.is_ok() {
                    self.shared.frames_served.fetch_add(1, Ordering::Relaxed);
                }
                reply.send(result);
                self.shared.busy.store(false, Ordering::Relaxed);
            }
        }
    }

    fn apply(&mut self, c: Control) {
        match c {
            Control::SetDefault { adapter, reply } => {
                let result = self.load_adapter(&adapter).map(|()| {
                    let previous = std::mem::replace(&mut self.default_adapter, adapter.clone());
                    if sha_of(&previous) != sha_of(&adapter) {
                        if self.history.len() == HISTORY {
                            self.history.remove(0);
                        }
                        self.history.push(previous);
                    }
                    adapter
                });
                self.shared.publish(&self.default_adapter);
                if result.is_ok() {
                    self.persist();
                }
                reply.send(result);
            }
            Control::Rollback { reply } => {
                let result = match self.history.last().cloned() {
                    None => Err(Error::UnknownAdapter("no earlier adapter to roll back to".into())),
                    Some(previous) => self.load_adapter(&previous).map(|()| {
                        self.history.pop();
                        self.default_adapter = previous.clone();
                        previous
                    }),
                };
                self.shared.publish(&self.default_adapter);
                if result.is_ok() {
                    self.persist();
                }
                reply.send(result);
            }
        }
    }

    /// Writes the default adapter to the state file, so a restart (crash, watchdog, OOM) serves
    /// the same one. A failed write is logged; the swap itself stands.
    fn persist(&self) {
        let Some(p) = &self.persist else { return };
        let a = &self.default_adapter;
        let state = ActiveAdapter {
            name: a.as_ref().map(|e| e.name.clone()).unwrap_or_default(),
            sha256: sha_of(a).to_string(),
            adapter_flag: p.adapter_flag.clone(),
        };
        if let Err(e) = p.file.store(&state) {
            tracing::error!(path = %p.file.path().display(), "cannot persist the active adapter ({e}); a restart will not restore it");
        }
    }

    /// Puts `want` into the engine unless it is already there. All-or-nothing: on refusal the
    /// engine keeps what it had.
    fn load_adapter(&mut self, want: &Option<Arc<AdapterEntry>>) -> Result<()> {
        if sha_of(want) == sha_of(&self.loaded_adapter) {
            return Ok(());
        }
        self.segmenter
            .set_adapter(want.as_ref().map(|e| &e.file))
            .map_err(|e| Error::AdapterRejected(e.to_string()))?;
        self.loaded_adapter = want.clone();
        Ok(())
    }

    /// A keyed hash (SipHash with a random per-process key) of a counter: unique in practice,
    /// never 0, and unpredictable from the ids a client has seen.
    fn next_frame_id(&mut self) -> u64 {
        self.frames_encoded += 1;
        self.frame_id_key.hash_one(self.frames_encoded).max(1)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn segment(&mut self, job: Request) -> Result<SegmentOutput> {
        let start = Instant::now();
        let mut t = Timings { queue_us: micros(start.saturating_duration_since(job.enqueued)), ..Timings::default() };
        if start > job.deadline {
            return Err(Error::DeadlineExceeded(format!("waited {} ms in the queue, past the deadline", t.queue_us / 1000)));
        }
        let want = match job.adapter {
            AdapterChoice::Default => self.default_adapter.clone(),
            AdapterChoice::Base => None,
            AdapterChoice::Use(e) => Some(e),
        };
        self.load_adapter(&want)?;
        let adapter_sha256 = sha_of(&want).to_string();

        let now = self.tick();
        let (index, reused, ring_out) = match job.source {
            FrameSource::Cached(id) => {
                // Another client's frame answers exactly like an evicted one: no oracle for ids.
                let i = self.cache.iter().position(|e| e.frame_id == id && e.owner == job.client).ok_or_else(|| {
                    Error::InvalidFrame(format!("frame {id} is not cached for this client; send the frame again"))
                })?;
                if self.cache[i].adapter_sha256 != adapter_sha256 {
                    return Err(Error::InvalidFrame(format!(
                        "frame {id} was encoded under another adapter; send the frame again to use this one"
                    )));
                }
                (i, true, None)
            }
            FrameSource::Sealed { map, layout } => {
                let c0 = Instant::now();
                frame::to_rgb(&map, &layout, &mut self.rgb)?;
                drop(map);
                t.convert_us = micros(c0.elapsed());
                (self.encode(None, &job.client, &adapter_sha256, &mut t)?, false, None)
            }
            FrameSource::Slot { ring, slot, seq } => {
                let key = (ring.id, slot, seq);
                match self.cache.iter().position(|e| e.stream_key == Some(key) && e.adapter_sha256 == adapter_sha256) {
                    Some(i) => (i, true, Some((ring, slot))),
                    None => {
                        let c0 = Instant::now();
                        frame::to_rgb(ring.frame(slot), &ring.layout, &mut self.rgb)?;
                        t.convert_us = micros(c0.elapsed());
                        (self.encode(Some(key), &job.client, &adapter_sha256, &mut t)?, false, Some((ring, slot)))
                    }
                }
            }
        };
        self.cache[index].last_used = now;
        self.shared.beat();
        // The deadline covers queue wait and encoder; a re-used embedding ran no encoder.
        if !reused && Instant::now() > job.deadline {
            // The embedding stays cached: a client that can still use the frame re-prompts it
            // (decoder only) instead of paying for the encoder again.
            let again = if ring_out.is_some() { "the same slot and seq re-use it" } else { "Reprompt it to decode" };
            return Err(Error::DeadlineExceeded(format!(
                "encoding took {} ms, past the deadline; the embedding is kept as frame_id={} ({again})",
                t.encode_us / 1000,
                self.cache[index].frame_id
            )));
        }

        let d0 = Instant::now();
        job.prompts.fill(&mut self.prompts);
        let entry = &self.cache[index];
        let seg = self
            .segmenter
            .decode(&entry.embedding, &self.prompts, job.multimask)
            .map_err(|e| engine_error(e, Error::InvalidPrompt))?;
        t.decode_us = micros(d0.elapsed());
        let frame_id = entry.frame_id;
        let (h, w) = entry.embedding.geometry.original;

        let o0 = Instant::now();
        let n = seg.masks.len();
        let fill = |dst: &mut [u8]| {
            for (plane, mask) in dst.chunks_exact_mut(w * h).zip(&seg.masks) {
                for (d, &m) in plane.iter_mut().zip(&mask.data) {
                    *d = if m != 0 { 255 } else { 0 };
                }
            }
        };
        let masks = match ring_out {
            Some((ring, slot)) => {
                fill(&mut ring.masks_mut(slot)[..n * w * h]);
                None
            }
            None => Some(crate::memfd::sealed_with("minisam-mask", n * w * h, fill)?),
        };
        t.output_us = micros(o0.elapsed());
        t.total_us = micros(job.enqueued.elapsed());
        Ok(SegmentOutput {
            masks,
            n_masks: n,
            iou: seg.iou.iter().map(|&v| f64::from(v)).collect(),
            frame_id,
            adapter_name: want.as_ref().map(|e| e.name.clone()).unwrap_or_default(),
            adapter_sha256,
            reused_embedding: reused,
            timings: t,
        })
    }

    /// Encodes `self.rgb` into a cache entry (evicting the least recently used) and returns its
    /// index.
    fn encode(&mut self, stream_key: Option<(u32, usize, u64)>, owner: &str, adapter_sha256: &str, t: &mut Timings) -> Result<usize> {
        self.shared.beat();
        let e0 = Instant::now();
        let embedding = self.segmenter.encode(&self.rgb).map_err(|e| engine_error(e, Error::InvalidFrame))?;
        t.encode_us = micros(e0.elapsed());
        let frame_id = self.next_frame_id();
        let entry = CacheEntry { frame_id, owner: owner.to_string(), stream_key, adapter_sha256: adapter_sha256.to_string(), embedding, last_used: self.clock };
        // A slot's older frame is dead once a newer sequence number arrives for it.
        if let Some((ring, slot, _)) = stream_key {
            self.cache.retain(|e| !matches!(e.stream_key, Some((r, s, _)) if r == ring && s == slot));
        }
        if self.cache.len() < CACHE_SLOTS {
            self.cache.push(entry);
            Ok(self.cache.len() - 1)
        } else {
            let lru = (0..self.cache.len()).min_by_key(|&i| self.cache[i].last_used).unwrap_or(0);
            self.cache[lru] = entry;
            Ok(lru)
        }
    }
}
