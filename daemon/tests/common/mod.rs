//! Test harness: a private `dbus-daemon`, a minisamd child process on it serving the committed
//! tiny SAM fixture, and the same model loaded in-process to compare answers with.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use minisam_models::cpu::CpuBackend;
use minisam_models::image::RgbImage;
use minisam_models::load::ModelFile;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;
use minisamd::client::Segmenter1Proxy;

pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth")
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("minisamd-{tag}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private session bus (`dbus-daemon --session --nofork --print-address`), killed on drop.
pub struct Bus {
    child: Child,
    pub address: String,
}

impl Bus {
    /// `None` (after printing why) when dbus-daemon is not installed.
    pub fn start() -> Option<Bus> {
        Self::spawn(&["--session"])
    }

    /// A bus that any Unix user may connect to (a session bus admits only its owner), for
    /// tests that need clients of two users. The config file lives as long as the test process.
    pub fn start_multi_user() -> Option<Bus> {
        let dir = std::env::temp_dir().join(format!("minisamd-bus-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.join("bus.sock").display()
            ),
        )
        .unwrap();
        // The socket must be reachable by the other user.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        Self::spawn(&[&format!("--config-file={}", config.display())])
    }

    fn spawn(args: &[&str]) -> Option<Bus> {
        let spawned = Command::new("dbus-daemon")
            .args(args)
            .args(["--nofork", "--print-address"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("SKIP: dbus-daemon is not installed (apt-get install dbus-daemon); D-Bus tests need a private bus");
                return None;
            }
            Err(e) => panic!("starting dbus-daemon: {e}"),
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:"), "dbus-daemon printed {address:?}");
        Some(Bus { child, address })
    }

    pub fn connect(&self) -> zbus::Connection {
        zbus::block_on(zbus::connection::Builder::address(self.address.as_str()).build()).expect("connecting to the private bus")
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minisamd process on a private bus.
pub struct Daemon {
    pub child: Child,
    pub adapters: TempDir,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(bus: &Bus, extra: &[&str]) -> Daemon {
        Self::start_with(bus, TempDir::new("adapters"), extra)
    }

    pub fn start_with(bus: &Bus, adapters: TempDir, extra: &[&str]) -> Daemon {
        Self::start_env(bus, adapters, extra, &[])
    }

    /// With extra environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, …).
    pub fn start_env(bus: &Bus, adapters: TempDir, extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let log = adapters.0.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_minisamd"))
            .arg("--bus-address")
            .arg(&bus.address)
            .arg("--model")
            .arg(tiny_model())
            .arg("--adapters-dir")
            .arg(&adapters.0)
            .args(["--threads", "1"])
            .args(extra)
            .env("MINISAMD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning minisamd");
        let mut d = Daemon { child, adapters, log };
        d.wait_for_name(bus);
        d
    }

    pub fn wait_for_name(&mut self, bus: &Bus) {
        let conn = bus.connect();
        let t0 = Instant::now();
        loop {
            let dbus = zbus::block_on(zbus::fdo::DBusProxy::new(&conn)).unwrap();
            let name = zbus::names::BusName::try_from(minisamd::service::BUS_NAME).unwrap();
            if zbus::block_on(dbus.name_has_owner(name)).unwrap_or(false) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("minisamd exited with {status} before owning its name:\n{}", self.log_text());
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "minisamd did not own its name in 120 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }
}

impl Daemon {
    /// Takes the adapter directory away from a stopped daemon, so dropping it does not remove
    /// the directory and the next daemon can start over it.
    pub fn keep_dir(&mut self) -> TempDir {
        std::mem::replace(&mut self.adapters, TempDir(PathBuf::new()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proxy(conn: &zbus::Connection) -> Segmenter1Proxy<'_> {
    zbus::block_on(Segmenter1Proxy::new(conn)).unwrap()
}

/// The same model, in this process, for reference answers.
pub fn direct() -> (Segmenter<CpuBackend>, String) {
    let file = ModelFile::open(&tiny_model()).unwrap();
    let sha = file.sha256_hex().to_string();
    (Segmenter::load(CpuBackend::new(1).unwrap(), file.store(), file.config()).unwrap(), sha)
}

/// A deterministic grey test frame with some structure (a bright disc on a gradient).
pub fn grey_frame(w: usize, h: usize, seed: u64) -> Vec<u8> {
    let (cx, cy, r) = ((w as u64 * (30 + seed % 40) / 100) as f64, (h as u64 * (30 + seed * 7 % 40) / 100) as f64, (w.min(h) / 4) as f64);
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| {
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            if d < r { 220 } else { ((x + y) as u64 * 3 + seed * 11) as u8 % 90 }
        })
        .collect()
}

pub fn bx(x0: f64, y0: f64, x1: f64, y1: f64) -> (f64, f64, f64, f64) {
    (x0, y0, x1, y1)
}

/// Masks (0/1 planes) the in-process segmenter gives for a grey frame and one box.
pub fn reference_masks(s: &Segmenter<CpuBackend>, w: usize, h: usize, grey: &[u8], b: (f64, f64, f64, f64), multimask: bool) -> (Vec<Vec<u8>>, Vec<f32>) {
    let img = RgbImage::from_grey(w, h, grey).unwrap();
    let emb = s.encode(&img).unwrap();
    let p = Prompts::with_box(BoxPrompt { x0: b.0 as f32, y0: b.1 as f32, x1: b.2 as f32, y1: b.3 as f32 });
    let seg = s.decode(&emb, &p, multimask).unwrap();
    (seg.masks.into_iter().map(|m| m.data).collect(), seg.iou)
}

/// 0/255 planes from the daemon as 0/1 planes.
pub fn planes(bytes: &[u8], w: usize, h: usize) -> Vec<Vec<u8>> {
    bytes.chunks_exact(w * h).map(|p| p.iter().map(|&v| u8::from(v != 0)).collect()).collect()
}

/// A random adapter for the tiny SAM with a chosen name and modality.
pub fn make_adapter(base: &Segmenter<CpuBackend>, sha: &str, name: &str, modality: &str, seed: u64) -> minisam_models::adapter::AdapterFile {
    use minisam_models::adapter::{encode_adapter, synth};
    let targets = minisam_models::adapter::default_targets();
    let factors = synth::random_factors(base.linear_shapes(), &targets, 4, seed).unwrap();
    let mut meta = synth::test_meta(&targets, sha, 4, 8.0, seed);
    meta.name = name.into();
    meta.modality = modality.into();
    encode_adapter(&meta, &factors).unwrap()
}
