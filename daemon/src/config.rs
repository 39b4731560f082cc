//! minisamd's command line (the flags fixed in the cross-crate contract; systemd passes them
//! through `MINISAMD_ARGS` from /etc/default/minisamd).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA when a GPU backend is built and a GPU is present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Bus {
    System,
    Session,
}

#[derive(Debug, Parser)]
#[command(name = "minisamd", version, about = "Segment Anything over D-Bus, frames and masks in sealed memfds")]
pub struct Args {
    /// Packed model (.msam); official checkpoints (.pth, .safetensors) only in a build with the
    /// `checkpoints` feature (daemon/README.md says why).
    #[arg(long, default_value = "/usr/share/minisam/models/default.msam")]
    pub model: PathBuf,
    /// Adapter directory; repeatable. The first is the writable install target.
    #[arg(long = "adapters-dir", default_values = ["/var/lib/minisam/adapters", "/usr/share/minisam/adapters"])]
    pub adapters_dirs: Vec<PathBuf>,
    /// Adapter (name or modality) active at start; default: the base model.
    #[arg(long)]
    pub adapter: Option<String>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// GPU memory the CUDA backend may use (bytes, or with KiB/MiB/GiB, or SI kB/MB/GB), parsed
    /// as the `minisam` CLI parses it.
    #[arg(long, default_value = "1GiB", value_parser = minisam_models::cuda::parse_bytes)]
    pub vram_budget: u64,
    /// Compute threads of the CPU backend; default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Requests that may wait for the worker; more are refused with Busy.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub queue_depth: u32,
    /// Per-request deadline in milliseconds (queue wait + encoder). Default: derived at start
    /// from the warm-up frame (`worker::auto_deadline`), so it fits the machine the daemon runs on.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline_ms: Option<u64>,
    #[arg(long, value_enum, default_value_t = Bus::System)]
    pub bus: Bus,
    /// Bus address to connect to instead of the system or session bus (tests, containers).
    #[arg(long)]
    pub bus_address: Option<String>,
    /// Largest frame accepted, in pixels (width × height).
    #[arg(long, default_value_t = 4096 * 4096)]
    pub max_frame_pixels: u64,
    /// Largest frame buffer accepted (stride × height), in bytes or with a unit: a 4096 x 4096
    /// rgb8 frame is 48 MiB.
    #[arg(long, default_value = "64MiB", value_parser = minisam_models::cuda::parse_bytes)]
    pub max_frame_bytes: u64,
    /// Open streams one Unix user may hold, over all of that user's connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_streams_per_user: u32,
    /// Ring memory one Unix user's open streams may pin (bytes or with a unit).
    #[arg(long, default_value = "128MiB", value_parser = minisam_models::cuda::parse_bytes)]
    pub max_stream_bytes_per_user: u64,
    /// Ring memory all open streams together may pin: rings live in the daemon's memory cgroup
    /// (the unit's MemoryMax=2G), beside the model.
    #[arg(long, default_value = "512MiB", value_parser = minisam_models::cuda::parse_bytes)]
    pub max_stream_bytes: u64,
    /// Where the active adapter is persisted across restarts; default: the first path of
    /// $STATE_DIRECTORY (systemd's StateDirectory=), else nowhere.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_flags_parse() {
        let a = Args::try_parse_from([
            "minisamd", "--model", "m.msam", "--adapters-dir", "/a", "--adapters-dir", "/b", "--adapter", "US",
            "--backend", "cpu", "--vram-budget", "2GiB", "--threads", "2", "--queue-depth", "8", "--deadline-ms", "500",
            "--bus", "session", "--max-frame-pixels", "1000000",
        ])
        .unwrap();
        assert_eq!(a.adapters_dirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!((a.queue_depth, a.deadline_ms, a.vram_budget), (8, Some(500), 2 << 30));
        let d = Args::try_parse_from(["minisamd"]).unwrap();
        assert_eq!(d.deadline_ms, None, "the deadline defaults to one measured at start");
        assert_eq!((d.max_frame_bytes, d.max_streams_per_user, d.max_stream_bytes_per_user), (64 << 20, 8, 128 << 20));
        assert_eq!(a.bus, Bus::Session);
        assert!(Args::try_parse_from(["minisamd", "--queue-depth", "0"]).is_err());
        assert!(Args::try_parse_from(["minisamd", "--vram-budget", "lots"]).is_err());
    }
}
