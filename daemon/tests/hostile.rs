//! minisamd against hostile and careless clients, one test per defect found when the daemon was
//! tried that way: an install from a pipe whose writer stays open must not stall other calls or
//! the watchdog; frame ids answer only their own client; errors stay per user and bounded; stream
//! limits are per user and in bytes; frames are capped in bytes; a late encode is kept; the
//! active adapter survives a kill. Each test starts its own bus and daemon (tiny SAM, 1 thread).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::OwnedFd as StdFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use minisamd::client::{error_name, Segmenter1Proxy};
use minisamd::memfd;
use zbus::{OwnedFd, OwnedVariant};

const W: usize = 160;
const H: usize = 120;
const BOX: (f64, f64, f64, f64) = (30.0, 20.0, 110.0, 90.0);

fn gray8() -> (u32, u32, u32, String) {
    (W as u32, H as u32, W as u32, "gray8".to_string())
}

fn segment(p: &Segmenter1Proxy<'_>, seed: u64) -> zbus::Result<minisamd::service::SegmentReply> {
    let fd = OwnedFd::from(memfd::sealed_frame_from(&grey_frame(W, H, seed)).unwrap());
    zbus::block_on(p.segment(fd, &gray8(), &[BOX], &[], HashMap::new()))
}

/// The error's D-Bus name suffix and message.
fn error_of<T: std::fmt::Debug>(r: zbus::Result<T>) -> (String, String) {
    let e = r.expect_err("call should fail");
    let name = error_name(&e).unwrap_or_default().rsplit('.').next().unwrap_or_default().to_string();
    let message = match &e {
        zbus::Error::MethodError(_, m, _) => m.clone().unwrap_or_default(),
        other => other.to_string(),
    };
    (name, message)
}

#[test]
fn an_install_from_a_pipe_that_never_closes_stalls_nothing() {
    let Some(bus) = Bus::start() else { return };
    let notify = TempDir::new("notify");
    let sock_path = notify.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let _d = Daemon::start_env(&bus, TempDir::new("adapters"), &[], &[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")]);
    let (direct, sha) = direct();
    let adapter = make_adapter(&direct, &sha, "us-pipe", "US", 3);

    // A pipe with a few bytes in it and a writer that stays open.
    let (reader, mut writer) = nix::unistd::pipe().unwrap();
    let mut writer_file = std::fs::File::from(writer.try_clone().unwrap());
    writer_file.write_all(&adapter.bytes()[..100]).unwrap();
    let address = bus.address.clone();
    let t0 = Instant::now();
    let install = std::thread::spawn(move || {
        zbus::block_on(async {
            let conn = zbus::connection::Builder::address(address.as_str()).build().await?;
            Segmenter1Proxy::new(&conn).await?.install_adapter(OwnedFd::from(reader), false).await
        })
    });
    std::thread::sleep(Duration::from_millis(300));

    // While it waits: Ping, a property, a frame and a second install all answer at once.
    let conn = bus.connect();
    let p = proxy(&conn);
    let peer = zbus::block_on(zbus::fdo::PeerProxy::builder(&conn).destination(minisamd::service::BUS_NAME).path(minisamd::service::OBJECT_PATH).build()).unwrap();
    for _ in 0..3 {
        let c0 = Instant::now();
        zbus::block_on(peer.ping()).expect("Ping during a stalled install");
        zbus::block_on(p.active_adapter()).expect("a property read during a stalled install");
        segment(&p, 1).expect("a frame during a stalled install");
        assert!(c0.elapsed() < Duration::from_secs(3), "calls took {:?} while an install was pending", c0.elapsed());
    }
    let second = zbus::block_on(p.install_adapter(OwnedFd::from(memfd::sealed_frame_from(adapter.bytes()).unwrap()), false));
    let (name, message) = error_of(second);
    assert_eq!(name, "Busy", "{message}");
    assert!(message.contains("another adapter install"), "{message}");
    // The watchdog keeps being fed: the bus side and the worker are both healthy.
    let mut pings = 0;
    let mut buf = [0u8; 512];
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let listen = Instant::now();
    while listen.elapsed() < Duration::from_secs(1) {
        if let Ok(n) = sock.recv(&mut buf) {
            pings += usize::from(&buf[..n] == b"WATCHDOG=1");
        }
    }
    assert!(pings >= 3, "only {pings} watchdog pings in 1 s with WATCHDOG_USEC=200 ms");

    // The install itself fails at its deadline, naming the cause; the writer is still open.
    let (name, message) = error_of(install.join().unwrap());
    assert_eq!(name, "AdapterRejected", "{message}");
    assert!(message.contains("100 bytes") && message.contains("did not reach its end"), "{message}");
    assert!(t0.elapsed() < Duration::from_secs(20), "the stalled install took {:?}", t0.elapsed());
    drop(writer_file);
    writer = nix::unistd::pipe().unwrap().1;
    drop(writer);

    // A memfd filled with write() and never rewound (its offset at the end) is read whole.
    let fd = nix::sys::memfd::memfd_create("adapter", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(adapter.bytes()).unwrap();
    let (name, sha256) = zbus::block_on(p.install_adapter(OwnedFd::from(StdFd::from(f)), false)).expect("a memfd written and not rewound");
    assert_eq!((name.as_str(), sha256.as_str()), ("us-pipe", adapter.sha256_hex()));
}

#[test]
fn frames_answer_only_the_client_that_sent_them() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &[]);
    let (conn_a, conn_b) = (bus.connect(), bus.connect());
    let (a, b) = (proxy(&conn_a), proxy(&conn_b));
    let (_, _, first, ..) = segment(&a, 1).unwrap();
    let (_, _, second, ..) = segment(&a, 2).unwrap();
    assert!(second.abs_diff(first) > 1_000_000, "frame ids {first} then {second}: guessable");
    // Another client holding a valid id gets what it would get for an id that never existed.
    let (name, message) = error_of(zbus::block_on(b.reprompt(first, &[BOX], &[], HashMap::new())));
    assert_eq!(name, "InvalidFrame", "{message}");
    assert!(message.contains("not cached for this client"), "{message}");
    let (_, _, again, _, _, timings) = zbus::block_on(a.reprompt(first, &[BOX], &[], HashMap::new())).expect("the owner re-prompts");
    assert_eq!((again, timings["encode_us"]), (first, 0));
}

#[test]
fn errors_are_bounded_and_kept_per_user() {
    let Some(bus) = Bus::start_multi_user() else { return };
    let _d = Daemon::start(&bus, &[]);
    let conn = bus.connect();
    let p = proxy(&conn);
    let huge = "k".repeat(16 << 20);
    let opts: HashMap<&str, OwnedVariant> = [(huge.as_str(), OwnedVariant::from(true))].into();
    let fd = OwnedFd::from(memfd::sealed_frame_from(&grey_frame(W, H, 1)).unwrap());
    let (name, message) = error_of(zbus::block_on(p.segment(fd, &gray8(), &[BOX], &[], opts)));
    assert_eq!(name, "InvalidPrompt");
    assert!(message.len() < 300 && message.contains("16777216 bytes"), "{} bytes: {}", message.len(), &message[..message.len().min(200)]);
    let last = zbus::block_on(p.last_error()).unwrap();
    // Writing a property is refused as the specification names it.
    let props = zbus::block_on(zbus::fdo::PropertiesProxy::builder(&conn).destination(minisamd::service::BUS_NAME).path(minisamd::service::OBJECT_PATH).build()).unwrap();
    let iface = zbus::names::InterfaceName::try_from(minisamd::service::INTERFACE).unwrap();
    let set = zbus::block_on(props.set(iface, "LastError", &zbus::Variant::from("forged")));
    assert!(matches!(&set, Err(zbus::fdo::Error::PropertyReadOnly(_))), "{set:?}");
    assert!(last.starts_with("InvalidPrompt: unknown option") && last.len() <= 512, "{last}");

    // Another Unix user on the same bus sees none of it (minisamctl status as nobody).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_minisamctl"))
        .args(["--bus-address", &bus.address, "status", "--json"])
        .uid(65534)
        .gid(65534)
        .output();
    use std::os::unix::process::CommandExt;
    match out {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["last_error"], "", "user nobody must not see root's error");
        }
        Ok(o) => eprintln!("SKIP (cross-user part): minisamctl as uid 65534 could not use the private bus: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => eprintln!("SKIP (cross-user part): cannot run a process as uid 65534: {e}"),
    }
}

#[test]
fn stream_and_frame_limits_hold_per_user_and_in_bytes() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &[]);
    // 16 connections of one user, 4 small streams each: the user gets 8 in all.
    let conns: Vec<zbus::Connection> = (0..16).map(|_| bus.connect()).collect();
    let (mut opened, mut refusals) = (Vec::new(), Vec::new());
    for c in &conns {
        let p = proxy(c);
        for _ in 0..4 {
            match zbus::block_on(p.open_stream(1, 64, 64, "gray8")) {
                Ok(r) => opened.push(r),
                Err(e) => refusals.push(error_of::<()>(Err(e))),
            }
        }
    }
    assert_eq!(opened.len(), 8, "streams per user over all connections");
    assert!(refusals.iter().all(|(n, m)| n == "Busy" && m.contains("--max-streams-per-user")), "{:?}", refusals.first());
    drop(opened);
    drop(conns);

    let conn = bus.connect();
    let p = proxy(&conn);
    // 16 slots of 4096x4096 rgb8 is 1.5 GiB of ring: refused before anything is allocated.
    let (name, message) = error_of(zbus::block_on(p.open_stream(16, 4096, 4096, "rgb8")));
    assert_eq!(name, "Busy", "{message}");
    assert!(message.contains("--max-stream-bytes-per-user"), "{message}");

    // A frame whose stride makes a terabyte buffer (a sparse, sealed memfd) is refused by size.
    let stride = u32::MAX;
    let fd = nix::sys::memfd::memfd_create("sparse", nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(u64::from(stride) * 540).unwrap();
    let seals = nix::fcntl::SealFlag::F_SEAL_WRITE | nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_GROW;
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_ADD_SEALS(seals)).unwrap();
    let r = zbus::block_on(p.segment(OwnedFd::from(StdFd::from(f)), &(800, 540, stride, "gray8".into()), &[(10.0, 10.0, 100.0, 100.0)], &[], HashMap::new()));
    let (name, message) = error_of(r);
    assert_eq!(name, "InvalidFrame", "{message}");
    assert!(message.contains("--max-frame-bytes"), "{message}");

    // A box with no area.
    let fd = OwnedFd::from(memfd::sealed_frame_from(&grey_frame(W, H, 1)).unwrap());
    let (name, message) = error_of(zbus::block_on(p.segment(fd, &gray8(), &[(40.0, 20.0, 40.0, 90.0)], &[], HashMap::new())));
    assert_eq!(name, "InvalidPrompt", "{message}");
    assert!(message.contains("no area"), "{message}");
}

#[test]
fn a_late_encode_is_kept_for_reprompt_and_the_default_deadline_fits_the_machine() {
    let Some(bus) = Bus::start() else { return };
    let d = Daemon::start(&bus, &[]);
    assert!(d.log_text().contains("request deadline"), "the default deadline is derived at start:\n{}", d.log_text());
    let conn = bus.connect();
    segment(&proxy(&conn), 1).expect("a frame within the default deadline");
    drop(d);

    // A 1 ms deadline: the encoder always finishes late. Its embedding must stay usable.
    let _d = Daemon::start(&bus, &["--deadline-ms", "1"]);
    let conn = bus.connect();
    let p = proxy(&conn);
    let mut kept = None;
    for seed in 0..10 {
        let (name, message) = error_of(segment(&p, seed));
        assert_eq!(name, "DeadlineExceeded", "{message}");
        // A job may also expire in the queue on a loaded machine; that one never ran.
        if let Some(id) = message.split("frame_id=").nth(1) {
            kept = Some(id.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap());
            break;
        }
    }
    let id = kept.expect("no late encode in 10 frames");
    // The re-prompt runs no encoder, so only a queue wait over 1 ms can fail it; a lost
    // embedding would be InvalidFrame.
    for _ in 0..20 {
        match zbus::block_on(p.reprompt(id, &[BOX], &[], HashMap::new())) {
            Ok((_, _, again, _, _, timings)) => {
                assert_eq!((again, timings["encode_us"]), (id, 0));
                return;
            }
            Err(e) => {
                let (name, message) = error_of::<()>(Err(e));
                assert_eq!(name, "DeadlineExceeded", "the late frame's embedding was not kept: {message}");
            }
        }
    }
    panic!("frame {id} could not be re-prompted within a 1 ms queue wait in 20 tries");
}

#[test]
fn the_active_adapter_survives_a_kill_and_a_changed_flag_wins() {
    let Some(bus) = Bus::start() else { return };
    let (direct, sha) = direct();
    let (a, b) = (make_adapter(&direct, &sha, "us-a", "US", 1), make_adapter(&direct, &sha, "ct-b", "CT", 2));
    let adapters = TempDir::new("adapters");
    std::fs::write(adapters.0.join("us-a.lora"), a.bytes()).unwrap();
    std::fs::write(adapters.0.join("ct-b.lora"), b.bytes()).unwrap();
    let state = TempDir::new("state");
    let state_dir = state.0.to_str().unwrap().to_string();
    let args = |flag: Option<&str>| -> Vec<String> {
        let mut v = vec!["--state-dir".to_string(), state_dir.clone()];
        if let Some(f) = flag {
            v.extend(["--adapter".to_string(), f.to_string()]);
        }
        v
    };
    // Starts a daemon over the kept directory, returns the adapter it serves (by the property and
    // by what a frame's answer names), then kills it with SIGKILL (no clean shutdown).
    let mut dir = Some(adapters);
    let mut cycle = |flag: Option<&str>, then_activate: Option<&str>| -> (String, String, String) {
        let a = args(flag);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut d = Daemon::start_with(&bus, dir.take().unwrap(), &a);
        let conn = bus.connect();
        let p = proxy(&conn);
        let (_, _, _, _, adapter_sha, _) = segment(&p, 1).unwrap();
        let name = zbus::block_on(p.active_adapter()).unwrap();
        if let Some(key) = then_activate {
            zbus::block_on(p.activate_adapter(key)).unwrap();
        }
        nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = d.child.wait();
        let log = d.log_text();
        dir = Some(d.keep_dir());
        (name, adapter_sha, log)
    };

    let (name, _, _) = cycle(None, Some("us-a"));
    assert_eq!(name, "", "a fresh daemon serves the base model");
    let (name, adapter_sha, log) = cycle(None, None);
    assert_eq!((name.as_str(), adapter_sha.as_str()), ("us-a", a.sha256_hex()), "restored after SIGKILL:\n{log}");
    assert!(log.contains("restored the active adapter"), "the journal says what was restored:\n{log}");
    // Someone edits the flag: it wins over the persisted choice.
    let (name, _, log) = cycle(Some("CT"), Some("none"));
    assert_eq!(name, "ct-b", "{log}");
    // Under the same flag, the later ActivateAdapter("none") wins.
    let (name, adapter_sha, log) = cycle(Some("CT"), None);
    assert_eq!((name.as_str(), adapter_sha.as_str()), ("", ""), "{log}");
    assert!(log.contains("base model (no adapter) is active"), "{log}");
    drop(dir);
}
