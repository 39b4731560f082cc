//! minisamctl: command-line client of minisamd (segment a PNG, manage adapters, show status).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use minisamd::client::{error_name, Segmenter1Proxy};
use minisamd::memfd;
use zbus::{OwnedFd, OwnedVariant};

#[derive(Parser)]
#[command(name = "minisamctl", version, about = "Client of the minisamd segmentation daemon")]
struct Cli {
    /// Use the session bus instead of the system bus.
    #[arg(long, global = true)]
    session: bool,
    /// Connect to this bus address instead (tests, containers).
    #[arg(long, global = true)]
    bus_address: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment a PNG image (other formats: `minisam convert IN -o OUT.png` first); writes the
    /// mask as PNG (0/255).
    Segment {
        image: PathBuf,
        /// x0,y0,x1,y1 in pixels.
        #[arg(long = "box", value_parser = parse_box)]
        boxes: Vec<(f64, f64, f64, f64)>,
        /// x,y[,label] in pixels; label 1 (foreground, default) or 0.
        #[arg(long = "point", value_parser = parse_point)]
        points: Vec<(f64, f64, u32)>,
        #[arg(short, long, default_value = "mask.png")]
        output: PathBuf,
        /// Adapter name or modality for this request.
        #[arg(long)]
        adapter: Option<String>,
    },
    /// Manage LoRA adapters.
    Adapters {
        #[command(subcommand)]
        action: AdapterAction,
    },
    /// Model, backend, adapter, memory and counters of the running daemon.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Waits until minisamd owns its bus name (it does after its warm-up frame, seconds after
    /// start), e.g. `minisamd ... & minisamctl --session wait && minisamctl --session segment ...`.
    Wait {
        /// Give up after this many seconds (exit status 1).
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum AdapterAction {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Validate locally, then install into the daemon's adapter directory.
    Install {
        file: PathBuf,
        #[arg(long)]
        activate: bool,
    },
    /// Make an adapter (name or modality; `none` for the base model) the default.
    Activate { name_or_modality: String },
    /// Return to the adapter active before the last change.
    Rollback,
    /// Check an adapter file offline (format, checksums) and print its manifest.
    Verify { file: PathBuf },
}

fn parse_box(s: &str) -> Result<(f64, f64, f64, f64), String> {
    let v: Vec<f64> = s.split(',').map(|p| p.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|e| format!("{s:?}: {e}"))?;
    match v.as_slice() {
        [a, b, c, d] => Ok((*a, *b, *c, *d)),
        _ => Err(format!("{s:?}: expected x0,y0,x1,y1")),
    }
}

fn parse_point(s: &str) -> Result<(f64, f64, u32), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let num = |p: &str| p.parse::<f64>().map_err(|e| format!("{s:?}: {e}"));
    match parts.as_slice() {
        [x, y] => Ok((num(x)?, num(y)?, 1)),
        [x, y, l] => Ok((num(x)?, num(y)?, l.parse().map_err(|e| format!("{s:?}: {e}"))?)),
        _ => Err(format!("{s:?}: expected x,y[,label]")),
    }
}

/// A call's error as the user should read it: the D-Bus error name's last part and message.
fn explain(e: zbus::Error) -> anyhow::Error {
    match (&e, error_name(&e)) {
        (zbus::Error::MethodError(_, Some(msg), _), Some(name)) => anyhow::anyhow!("{}: {msg}", name.rsplit('.').next().unwrap_or(&name)),
        _ => anyhow::anyhow!("{e}"),
    }
}

/// Polls `NameHasOwner` every 100 ms: simpler than a `NameOwnerChanged` subscription, and a
/// daemon that owned the name before we asked is seen at once.
async fn wait_for_daemon(conn: &zbus::Connection, timeout: std::time::Duration) -> Result<()> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let name = zbus::names::BusName::try_from(minisamd::service::BUS_NAME)?;
    let t0 = std::time::Instant::now();
    loop {
        if dbus.name_has_owner(name.clone()).await? {
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            bail!("{} has no owner after {} s: is minisamd running on this bus? (its log says why it did not start)", minisamd::service::BUS_NAME, timeout.as_secs());
        }
        // No async timer in our dependencies; a blocking 100 ms sleep is fine in this one-task CLI.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

async fn connect(cli: &Cli) -> Result<zbus::Connection> {
    let builder = match (&cli.bus_address, cli.session) {
        (Some(a), _) => zbus::connection::Builder::address(a.as_str()),
        (None, true) => zbus::connection::Builder::session(),
        (None, false) => zbus::connection::Builder::system(),
    };
    builder.build().await.context("connecting to the bus (is minisamd's bus reachable? try --session)")
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Adapters { action: AdapterAction::Verify { file } } = &cli.command {
        let a = minisam_models::adapter::AdapterFile::open(file).with_context(|| format!("{} is not a valid adapter", file.display()))?;
        let m = a.manifest();
        println!("valid adapter {}", file.display());
        println!("  name        {}\n  modality    {}\n  sha256      {}\n  base model  {}", m.name, m.modality, a.sha256_hex(), m.base_model_sha256);
        println!("  rank        {} (alpha {})\n  tensors     {}\n  created     {}", m.rank, m.alpha, m.tensors.len(), m.created);
        if let Some(d) = m.val_dice {
            println!("  val dice    {d:.4}");
        }
        return Ok(());
    }
    let conn = connect(&cli).await?;
    if let Command::Wait { timeout } = cli.command {
        return wait_for_daemon(&conn, std::time::Duration::from_secs(timeout)).await;
    }
    let proxy = Segmenter1Proxy::new(&conn).await?;
    match cli.command {
        Command::Wait { .. } => unreachable!("handled above"),
        Command::Segment { image, boxes, points, output, adapter } => {
            let img = minisamd::client::png_io::read_rgb(&image)?;
            let fd = memfd::sealed_frame_from(&img.data).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            let layout = (img.width as u32, img.height as u32, (img.width * 3) as u32, "rgb8".to_string());
            let mut options: HashMap<&str, OwnedVariant> = HashMap::new();
            if let Some(a) = &adapter {
                options.insert("adapter", OwnedVariant::try_from(zbus::Variant::from(a.as_str()))?);
            }
            let (masks, iou, frame_id, model, adapter_sha, timings) =
                proxy.segment(OwnedFd::from(fd), &layout, &boxes, &points, options).await.map_err(explain)?;
            let bytes = memfd::read_all(&masks.into()).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            let plane = img.width * img.height;
            if bytes.len() < plane {
                bail!("daemon returned {} mask bytes for a {}x{} image", bytes.len(), img.width, img.height);
            }
            let mask = minisam_models::image::Mask { width: img.width, height: img.height, data: bytes[..plane].iter().map(|&v| u8::from(v != 0)).collect() };
            minisamd::client::png_io::write_mask(&output, &mask)?;
            println!("mask {} written ({} px inside), IoU {:.3}, frame {frame_id}", output.display(), mask.area(), iou.first().copied().unwrap_or(f64::NAN));
            println!("model {}  adapter {}", &model[..model.len().min(12)], if adapter_sha.is_empty() { "-" } else { &adapter_sha[..adapter_sha.len().min(12)] });
            let t = |k: &str| timings.get(k).copied().unwrap_or(0) as f64 / 1000.0;
            println!("encode {:.1} ms, decode {:.1} ms, total {:.1} ms", t("encode_us"), t("decode_us"), t("total_us"));
        }
        Command::Adapters { action } => match action {
            AdapterAction::List { json } => {
                let rows = proxy.list_adapters().await.map_err(explain)?;
                if json {
                    let v: Vec<_> = rows
                        .iter()
                        .map(|(n, m, s, p, fits, active)| serde_json::json!({"name": n, "modality": m, "sha256": s, "path": p, "fits_model": fits, "active": active}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{:<1} {:<24} {:<10} {:<14} {:<5} path", "", "name", "modality", "sha256", "fits");
                    for (n, m, s, p, fits, active) in rows {
                        println!("{:<1} {:<24} {:<10} {:<14} {:<5} {p}", if active { "*" } else { "" }, n, m, &s[..s.len().min(12)], if fits { "yes" } else { "NO" });
                    }
                }
            }
            AdapterAction::Install { file, activate } => {
                // Validate here first: a field engineer learns about a damaged file before it
                // travels; the daemon validates again (it trusts no client).
                minisam_models::adapter::AdapterFile::open(&file).with_context(|| format!("{} is not a valid adapter", file.display()))?;
                let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                let (name, sha) = proxy.install_adapter(OwnedFd::from(std::os::fd::OwnedFd::from(f)), activate).await.map_err(explain)?;
                println!("installed {name} (sha256 {sha}){}", if activate { ", active" } else { "" });
            }
            AdapterAction::Activate { name_or_modality } => {
                let (name, sha) = proxy.activate_adapter(&name_or_modality).await.map_err(explain)?;
                println!("active adapter: {}", if name.is_empty() { "none (base model)".to_string() } else { format!("{name} (sha256 {sha})") });
            }
            AdapterAction::Rollback => {
                let (name, sha) = proxy.rollback_adapter().await.map_err(explain)?;
                println!("rolled back to: {}", if name.is_empty() { "none (base model)".to_string() } else { format!("{name} (sha256 {sha})") });
            }
            AdapterAction::Verify { .. } => unreachable!("handled before connecting"),
        },
        Command::Status { json } => {
            let model = proxy.active_model().await?;
            let adapter = proxy.active_adapter().await?;
            let backend = proxy.backend().await?;
            let memory = proxy.memory_use().await?;
            let frames = proxy.frames_served().await?;
            let last_error = proxy.last_error().await?;
            if json {
                let v = serde_json::json!({"model": model, "adapter": adapter, "backend": backend, "memory_bytes": memory, "frames_served": frames, "last_error": last_error});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("model          {model}");
                println!("adapter        {}", if adapter.is_empty() { "none (base model)" } else { &adapter });
                println!("backend        {backend}");
                println!("memory         {:.1} MiB", memory as f64 / (1 << 20) as f64);
                println!("frames served  {frames}");
                println!("last error     {}", if last_error.is_empty() { "-" } else { &last_error });
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match zbus::block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("minisamctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
