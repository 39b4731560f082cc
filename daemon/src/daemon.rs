//! minisamd's life: load the model, bring up the backend and worker, own the bus name, then
//! tell systemd READY=1 — in that order, so "ready" means frames can be served. Afterwards the
//! main loop handles reloads (SIGHUP: RELOADING=1 … READY=1 around an adapter rescan),
//! directory changes, clients leaving the bus (their streams are freed) and SIGTERM (stop
//! taking requests, finish the queued ones, exit).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_core::Stream;
use minisam_models::backend::Backend;
use minisam_models::cpu::CpuBackend;
use minisam_models::cuda::{self, CudaBackend, SelectedBackend};
use minisam_models::image::RgbImage;
use minisam_models::load::ModelFile;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;

use crate::adapters::{self, AdapterEntry, Registry};
use crate::callers::Callers;
use crate::config::{Args, BackendChoice, Bus};
use crate::notify::Notifier;
use crate::read_only::ReadOnlyProperties;
use crate::reply::Mailbox;
use crate::service::{Limits, ModelInfo, Segmenter1, StreamLimits, Streams, BUS_NAME, OBJECT_PATH};
use crate::signals::{self, Event};
use crate::state::{start_choice, StartChoice, StateFile};
use crate::watchdog::BusProbe;
use crate::{watchdog, worker};

/// How long in-flight replies get to leave the socket after the worker drained.
const FLUSH_GRACE: Duration = Duration::from_millis(200);

/// Rereads the adapter directories. The files are read and validated without holding the
/// registry, which bus methods lock: a rescan of large adapters must not hold up their calls.
fn rescan(registry: &Mutex<Registry>) -> usize {
    let dirs = registry.lock().unwrap_or_else(|p| p.into_inner()).dirs().to_vec();
    let (entries, rejected) = adapters::scan_dirs(&dirs);
    for bad in rejected {
        tracing::warn!(path = %bad.path.display(), "skipping adapter: {}", bad.reason);
    }
    let n = entries.len();
    registry.lock().unwrap_or_else(|p| p.into_inner()).replace(entries);
    n
}

/// The adapter to activate at start: the persisted one (`crate::state`) unless `--adapter`
/// changed since it was written, else `--adapter`, else the base model. Says in the journal
/// what it restored, and why it did not when it could not.
fn initial_adapter(registry: &Registry, flag: Option<&str>, state: Option<&StateFile>) -> Result<Option<Arc<AdapterEntry>>> {
    let from_flag = || -> Result<Option<Arc<AdapterEntry>>> {
        let Some(key) = flag else { return Ok(None) };
        let e = registry.resolve(key).map_err(|e| anyhow::anyhow!("--adapter {key}: {}", e.message()))?;
        registry.check_fits(&e).map_err(|e| anyhow::anyhow!("--adapter {key}: {}", e.message()))?;
        Ok(Some(e))
    };
    let Some(state) = state else {
        tracing::info!("no state directory (--state-dir or systemd's StateDirectory=): the active adapter will not survive a restart");
        return from_flag();
    };
    let persisted = state.load().unwrap_or_else(|e| {
        tracing::warn!("ignoring the persisted adapter choice: {e}");
        None
    });
    match start_choice(flag, persisted) {
        StartChoice::Flag => from_flag(),
        StartChoice::Restore(p) if p.sha256.is_empty() => {
            tracing::info!(path = %state.path().display(), "restored from the state file: the base model (no adapter) is active");
            Ok(None)
        }
        StartChoice::Restore(p) => match registry.entries().iter().find(|e| e.sha256 == p.sha256 && e.fits(registry.model_sha256())) {
            Some(e) => {
                tracing::info!(adapter = %e.name, adapter_sha256 = %e.sha256, path = %state.path().display(), "restored the active adapter from the state file");
                Ok(Some(e.clone()))
            }
            None => {
                tracing::warn!(
                    adapter = %p.name, adapter_sha256 = %p.sha256,
                    "the persisted active adapter is no longer installed (or no longer fits the model); using --adapter or the base model"
                );
                from_flag()
            }
        },
    }
}

fn after(delay: Duration, events: &Mailbox<Event>, ev: Event) {
    let events = events.clone();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        events.post(ev);
    });
}

/// One synthetic frame through encoder and decoder (three masks, the largest decode) before the
/// bus name is taken: a frame that cannot run (an activation arena too small for the VRAM budget,
/// a backend fault) stops start-up here with the reason, instead of failing the first client. On
/// a GPU it also records the encoder's CUDA graph; on any backend it faults the mapped weights in.
fn warm_up<B: Backend>(segmenter: &Segmenter<B>) -> Result<Duration> {
    let s = segmenter.config().image_size;
    // A ramp, not a constant: min-max normalisation (LiteMedSAM) needs a range.
    let grey: Vec<u8> = (0..s * s).map(|i| ((i % s + i / s) % 256) as u8).collect();
    let image = RgbImage::from_grey(s, s, &grey)?;
    let quarter = s as f32 / 4.0;
    let prompts = Prompts::with_box(BoxPrompt { x0: quarter, y0: quarter, x1: 3.0 * quarter, y1: 3.0 * quarter });
    let t0 = Instant::now();
    let embedding = segmenter.encode(&image)?;
    segmenter.decode(&embedding, &prompts, true)?;
    Ok(t0.elapsed())
}

/// What start-up needs from a backend beyond `Backend`.
trait Serving: Backend {
    /// After the first warm-up frame, with no tensor alive: give back memory that frame showed
    /// to be unneeded, keeping `keep` bytes for what the worker holds across frames. `Some(line)`
    /// when something changed (the warm-up then runs again, on the new memory).
    fn settle(&self, _keep: u64) -> minisam_models::Result<Option<String>> {
        Ok(None)
    }
    /// What the backend holds, for the log.
    fn memory_line(&self) -> Option<String> {
        None
    }
}

impl Serving for CpuBackend {}

impl Serving for CudaBackend {
    fn settle(&self, keep: u64) -> minisam_models::Result<Option<String>> {
        let (before, after) = self.fit_arena(keep)?;
        const MIB: f64 = 1024.0 * 1024.0;
        Ok((after < before).then(|| format!("activation arena sized to the warm-up frame: {:.1} -> {:.1} MiB", before as f64 / MIB, after as f64 / MIB)))
    }
    fn memory_line(&self) -> Option<String> {
        Some(format!("{}; {}", self.vram_report(), self.graph_status()))
    }
}

/// Builds the networks on `backend`, applies the initial adapter (`initial_adapter`), runs the
/// warm-up frame (then lets the backend settle its memory and, if it did, warms up again on it),
/// and starts the inference thread. Also returns how long the last warm-up frame took.
fn start_worker<B: Serving + 'static>(backend: B, file: &ModelFile, registry: &Registry, args: &Args, state: Option<StateFile>) -> Result<(Arc<worker::Handle>, String, Duration)> {
    let name = backend.name().to_string();
    let mut segmenter = Segmenter::load(backend, file.store(), file.config()).with_context(|| format!("building the networks from {}", args.model.display()))?;
    let initial = initial_adapter(registry, args.adapter.as_deref(), state.as_ref())?;
    if let Some(e) = &initial {
        segmenter.set_adapter(Some(&e.file)).with_context(|| format!("applying adapter {}", e.name))?;
        tracing::info!(adapter = %e.name, adapter_sha256 = %e.sha256, "initial adapter");
    }
    let mut took = warm_up(&segmenter).context("the warm-up frame failed, so no client frame could run either")?;
    let config = file.config();
    let embedding_bytes = (config.prompt_embed_dim * config.embedding_size * config.embedding_size * 4) as u64;
    match segmenter.backend().settle(worker::CACHE_SLOTS as u64 * embedding_bytes) {
        Ok(None) => {}
        Ok(Some(line)) => {
            tracing::info!("{line}");
            took = warm_up(&segmenter).context("the warm-up frame failed after the backend resized its memory")?;
        }
        // Nothing is lost: the backend still has (or re-creates) memory for frames.
        Err(e) => tracing::warn!("keeping the backend's start-up memory: {e}"),
    }
    match segmenter.backend().memory_line() {
        Some(line) => tracing::info!(warm_up_ms = took.as_millis() as u64, "warm-up frame done; {line}"),
        None => tracing::info!(warm_up_ms = took.as_millis() as u64, "warm-up frame done"),
    }
    let persist = state.map(|file| worker::Persist { file, adapter_flag: args.adapter.clone() });
    Ok((Arc::new(worker::spawn(segmenter, initial, args.queue_depth as usize, persist)?), name, took))
}

pub fn run(args: Args) -> Result<()> {
    let notifier = Arc::new(Notifier::from_env());
    let events: Mailbox<Event> = Mailbox::default();
    // Signals first: a SIGTERM during a slow model load must not kill us half-initialised
    // without a log line; it is handled once the loop runs.
    let _signals = signals::spawn_signal_thread(events.clone()).context("installing signal handlers")?;

    notifier.status("loading model");
    let t0 = Instant::now();
    let file = ModelFile::open(&args.model).with_context(|| format!("cannot open model {}", args.model.display()))?;
    let model_sha256 = file.sha256_hex().to_string();
    let description = file.describe();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let choice = match args.backend {
        BackendChoice::Auto => cuda::BackendChoice::Auto,
        BackendChoice::Cpu => cuda::BackendChoice::Cpu,
        BackendChoice::Cuda => cuda::BackendChoice::Cuda,
    };
    let options = cuda::CudaOptions { vram_budget: args.vram_budget, ..cuda::CudaOptions::default() };
    let selected = cuda::select_backend(choice, threads, options).context("bringing up the compute backend")?;
    let mut registry = Registry::new(args.adapters_dirs.clone(), model_sha256.clone());
    for bad in registry.scan() {
        tracing::warn!(path = %bad.path.display(), "skipping adapter: {}", bad.reason);
    }
    let state = StateFile::locate(args.state_dir.as_deref());
    // The worker is generic over the backend; everything after this point is not.
    let (worker, backend_name, warm_up_took) = match selected {
        SelectedBackend::Cpu(b) => start_worker(b, &file, &registry, &args, state)?,
        SelectedBackend::Cuda(b) => {
            tracing::info!("CUDA backend: {}", b.describe());
            match start_worker(*b, &file, &registry, &args, state.clone()) {
                Ok(started) => started,
                // `auto` promises a working daemon: a model or frame that does not fit the VRAM
                // budget (or any other CUDA fault at start) means the CPU, said once.
                Err(e) if args.backend == BackendChoice::Auto => {
                    tracing::warn!("the CUDA backend cannot serve this model ({e:#}); --backend auto falls back to the CPU");
                    let cpu = CpuBackend::new(threads).context("bringing up the CPU backend after the CUDA one failed")?;
                    start_worker(cpu, &file, &registry, &args, state)?
                }
                Err(e) => return Err(e),
            }
        }
    };
    let deadline = match args.deadline_ms {
        Some(ms) => Duration::from_millis(ms),
        None => {
            let d = worker::auto_deadline(warm_up_took);
            tracing::info!(deadline_ms = d.as_millis() as u64, "request deadline {} ms: 4x the warm-up frame's {} ms, at least 1 s (--deadline-ms sets it)", d.as_millis(), warm_up_took.as_millis());
            d
        }
    };
    drop(file);
    tracing::info!(model = %model_sha256, backend = %backend_name, threads, load_ms = t0.elapsed().as_millis() as u64, "model loaded: {description}");

    let registry = Arc::new(Mutex::new(registry));
    let streams = Arc::new(Streams::default());
    let callers = Arc::new(Callers::default());
    let service = Segmenter1::new(
        worker.clone(),
        registry.clone(),
        streams.clone(),
        callers.clone(),
        ModelInfo { path: args.model.display().to_string(), description, sha256: model_sha256.clone(), backend: backend_name.clone() },
        Limits {
            max_frame_pixels: args.max_frame_pixels,
            max_frame_bytes: args.max_frame_bytes,
            deadline,
            streams: StreamLimits {
                per_user: args.max_streams_per_user as usize,
                bytes_per_user: args.max_stream_bytes_per_user,
                total_bytes: args.max_stream_bytes,
            },
        },
    );
    if let Err(e) = signals::spawn_dir_watch(&args.adapters_dirs, events.clone()) {
        tracing::warn!("cannot watch the adapter directories ({e}); SIGHUP rescans them");
    }

    zbus::block_on(async {
        let builder = match (&args.bus_address, args.bus) {
            (Some(addr), _) => zbus::connection::Builder::address(addr.as_str()),
            (None, Bus::System) => zbus::connection::Builder::system(),
            (None, Bus::Session) => zbus::connection::Builder::session(),
        };
        let conn = builder
            .name(BUS_NAME)
            .serve_at(OBJECT_PATH, ReadOnlyProperties(service))
            .build()
            .await
            .with_context(|| format!("connecting to the {:?} bus and owning {BUS_NAME}", args.bus))?;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.context("talking to the bus daemon")?;
        let mut left = dbus.receive_name_owner_changed().await.context("subscribing to NameOwnerChanged")?;

        let stop_watchdog = Arc::new(AtomicBool::new(false));
        if let Some(interval) = watchdog::interval_from_env() {
            let probe = Arc::new(BusProbe::default());
            probe.clone().spawn(conn.clone(), interval / 4, stop_watchdog.clone()).context("starting the bus probe thread")?;
            watchdog::spawn(notifier.clone(), worker.shared.clone(), probe, interval, stop_watchdog.clone()).context("starting the watchdog thread")?;
        }
        let status = format!("serving on {BUS_NAME} ({backend_name}, model {})", &model_sha256[..12]);
        notifier.ready(&status);
        tracing::info!(model = %model_sha256, "{status}");

        let mut draining = false;
        loop {
            let next = poll_fn(|cx| {
                if let Poll::Ready(ev) = events.poll_next(cx) {
                    return Poll::Ready(Some(ev));
                }
                match Pin::new(&mut left).poll_next(cx) {
                    Poll::Ready(Some(sig)) => {
                        if let Ok(a) = sig.args() {
                            if a.name().as_str().starts_with(':') && a.new_owner().is_none() {
                                callers.forget(a.name().as_str());
                                let n = streams.forget_client(a.name().as_str());
                                if n > 0 {
                                    tracing::info!("client {} left; closed its {n} stream(s)", a.name());
                                }
                            }
                        }
                        Poll::Ready(None)
                    }
                    _ => Poll::Pending,
                }
            })
            .await;
            match next {
                None => {}
                Some(Event::Reload) => {
                    notifier.reloading();
                    let n = rescan(&registry);
                    tracing::info!("reloaded: {n} adapter(s)");
                    notifier.ready(&format!("{status}; {n} adapter(s)"));
                }
                Some(Event::AdaptersChanged) => {
                    // A burst of directory events (copy, rename) gives one rescan.
                    while let Some(Event::AdaptersChanged) = events.try_next() {}
                    let n = rescan(&registry);
                    tracing::info!("adapter directory changed: {n} adapter(s)");
                }
                Some(Event::Terminate) if !draining => {
                    draining = true;
                    notifier.stopping();
                    tracing::info!("SIGTERM: finishing queued requests");
                    let (w, ev) = (worker.clone(), events.clone());
                    std::thread::spawn(move || {
                        w.drain();
                        ev.post(Event::Drained);
                    });
                }
                Some(Event::Terminate) => {}
                Some(Event::Drained) => after(FLUSH_GRACE, &events, Event::Flushed),
                Some(Event::Flushed) => break,
            }
        }
        stop_watchdog.store(true, std::sync::atomic::Ordering::Relaxed);
        let served = worker.shared.frames_served.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(frames_served = served, "stopped");
        drop(conn);
        Ok(())
    })
}
