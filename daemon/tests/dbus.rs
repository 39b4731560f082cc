//! minisamd end to end on a private bus: introspection against the committed XML, frames and
//! masks through sealed memfds, every error case by name, concurrent clients against the
//! in-process segmenter, streaming and re-prompting, adapters swapped under load, and an install
//! killed with SIGKILL. Each test starts its own bus and daemon (tiny SAM fixture, 1 thread).

mod common;

use std::collections::HashMap;
use std::os::fd::OwnedFd as StdFd;
use std::time::Duration;

use common::*;
use minisamd::client::{error_name, Segmenter1Proxy};
use minisamd::memfd;
use zbus::{OwnedFd, OwnedVariant, Str};

const W: usize = 160;
const H: usize = 120;
const BOX: (f64, f64, f64, f64) = (30.0, 20.0, 110.0, 90.0);

fn sealed(bytes: &[u8]) -> OwnedFd {
    OwnedFd::from(memfd::sealed_frame_from(bytes).unwrap())
}

fn gray8(w: usize, h: usize) -> (u32, u32, u32, String) {
    (w as u32, h as u32, w as u32, "gray8".to_string())
}

fn no_options() -> HashMap<&'static str, OwnedVariant> {
    HashMap::new()
}

fn segment(p: &Segmenter1Proxy<'_>, grey: &[u8], b: (f64, f64, f64, f64), options: HashMap<&str, OwnedVariant>) -> zbus::Result<minisamd::service::SegmentReply> {
    zbus::block_on(p.segment(sealed(grey), &gray8(W, H), &[b], &[], options))
}

fn masks_of(fd: OwnedFd) -> Vec<u8> {
    memfd::read_all(&StdFd::from(fd)).unwrap()
}

fn expect_error<T: std::fmt::Debug>(r: zbus::Result<T>, name: &str) {
    let e = r.expect_err("call should fail");
    assert_eq!(error_name(&e).as_deref(), Some(format!("org.minisam.Segmenter1.Error.{name}").as_str()), "{e}");
}

/// Lines of the `<interface name="org.minisam.Segmenter1">` element, trimmed.
fn interface_lines(xml: &str) -> Vec<String> {
    let start = xml.find("<interface name=\"org.minisam.Segmenter1\">").expect("interface in introspection");
    let end = start + xml[start..].find("</interface>").expect("end of interface") + "</interface>".len();
    xml[start..end].lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[test]
fn introspection_matches_the_committed_xml() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &[]);
    let conn = bus.connect();
    let intro = zbus::block_on(async {
        zbus::fdo::IntrospectableProxy::builder(&conn)
            .destination(minisamd::service::BUS_NAME)
            .path(minisamd::service::OBJECT_PATH)
            .build()
            .await?
            .introspect()
            .await
    })
    .unwrap();
    let committed_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("org.minisam.Segmenter1.xml");
    let live = interface_lines(&intro);
    if std::env::var_os("MINISAMD_BLESS").is_some() {
        let body = format!(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<!-- Generated from the running minisamd (MINISAMD_BLESS=1 cargo test -p minisamd --test dbus introspection); tests/dbus.rs checks it. -->\n<node name=\"/org/minisam/Segmenter1\">\n{}\n</node>\n",
            indent(&live)
        );
        std::fs::write(&committed_path, body).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).expect("daemon/org.minisam.Segmenter1.xml");
    assert_eq!(interface_lines(&committed), live, "the running service's interface differs from the committed XML");
}

/// Indents the interface element for the committed file (the comparison ignores indentation).
fn indent(lines: &[String]) -> String {
    let mut depth = 1usize;
    let mut out = Vec::new();
    for l in lines {
        if l.starts_with("</") {
            depth = depth.saturating_sub(1);
        }
        out.push(format!("{}{l}", "  ".repeat(depth)));
        if l.starts_with('<') && !l.starts_with("</") && !l.ends_with("/>") && !l.starts_with("<!--") && !l.contains("</") {
            depth += 1;
        }
    }
    out.join("\n")
}

#[test]
fn a_frame_round_trips_through_sealed_memfds_and_matches_the_engine() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &[]);
    let conn = bus.connect();
    let p = proxy(&conn);
    let (direct, model_sha) = direct();
    let grey = grey_frame(W, H, 1);
    for multimask in [false, true] {
        let opts: HashMap<&str, OwnedVariant> = [("multimask", OwnedVariant::from(multimask))].into();
        let (fd, iou, frame_id, model, adapter, timings) = segment(&p, &grey, BOX, opts).unwrap();
        let seals = memfd::seals(&fd).unwrap();
        assert!(seals.contains(memfd::required_frame_seals()), "returned mask memfd must be sealed, got {seals:?}");
        let got = planes(&masks_of(fd), W, H);
        let (want, want_iou) = reference_masks(&direct, W, H, &grey, BOX, multimask);
        assert_eq!(got.len(), if multimask { 3 } else { 1 });
        assert_eq!(got, want, "daemon masks must equal the engine's (multimask {multimask})");
        assert_eq!(iou, want_iou.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
        assert!(frame_id > 0);
        assert_eq!(model, model_sha);
        assert_eq!(adapter, "");
        assert!(timings["encode_us"] > 0 && timings["total_us"] >= timings["encode_us"] + timings["decode_us"]);
    }
    // Re-prompting the frame runs only the decoder and answers like the engine would.
    let grey = grey_frame(W, H, 2);
    let (_, _, frame_id, ..) = segment(&p, &grey, BOX, no_options()).unwrap();
    let b2 = bx(10.0, 10.0, 80.0, 70.0);
    let (fd, _, same_id, _, _, timings) = zbus::block_on(p.reprompt(frame_id, &[b2], &[], no_options())).unwrap();
    assert_eq!(same_id, frame_id);
    assert_eq!(timings["encode_us"], 0, "a cached frame is not encoded again");
    assert_eq!(planes(&masks_of(fd), W, H), reference_masks(&direct, W, H, &grey, b2, false).0);
    assert!(zbus::block_on(p.frames_served()).unwrap() >= 3);
}

#[test]
fn every_bad_request_gets_a_named_error_and_the_daemon_survives() {
    let Some(bus) = Bus::start() else { return };
    let d = Daemon::start(&bus, &["--max-frame-pixels", "40000"]);
    let conn = bus.connect();
    let p = proxy(&conn);
    let grey = grey_frame(W, H, 3);
    let call = |fd: OwnedFd, layout: (u32, u32, u32, String), boxes: &[(f64, f64, f64, f64)], points: &[(f64, f64, u32)]| {
        zbus::block_on(p.segment(fd, &layout, boxes, points, no_options()))
    };

    // Frames: unsealed memfd, too small, stride < width, unknown format, too many pixels, a pipe.
    let unsealed = nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).unwrap();
    std::fs::File::from(unsealed.try_clone().unwrap()).set_len((W * H) as u64).unwrap();
    expect_error(call(OwnedFd::from(unsealed), gray8(W, H), &[BOX], &[]), "InvalidFrame");
    expect_error(call(sealed(&grey[..W * H - 1]), gray8(W, H), &[BOX], &[]), "InvalidFrame");
    expect_error(call(sealed(&grey), (W as u32, H as u32, W as u32 - 1, "gray8".into()), &[BOX], &[]), "InvalidFrame");
    expect_error(call(sealed(&grey), (W as u32, H as u32, W as u32, "bgr8".into()), &[BOX], &[]), "InvalidFrame");
    expect_error(call(sealed(&grey), (W as u32, H as u32, 3 * W as u32 - 1, "rgb8".into()), &[BOX], &[]), "InvalidFrame");
    let big = vec![0u8; 400 * 200];
    expect_error(call(sealed(&big), gray8(400, 200), &[BOX], &[]), "InvalidFrame");
    let (r, _w) = nix::unistd::pipe().unwrap();
    expect_error(call(OwnedFd::from(r), gray8(W, H), &[BOX], &[]), "InvalidFrame");

    // Prompts: NaN, outside, inverted, two boxes, too many points, bad label, none at all.
    expect_error(call(sealed(&grey), gray8(W, H), &[bx(f64::NAN, 1.0, 5.0, 5.0)], &[]), "InvalidPrompt");
    expect_error(call(sealed(&grey), gray8(W, H), &[bx(500.0, 1.0, 600.0, 5.0)], &[]), "InvalidPrompt");
    expect_error(call(sealed(&grey), gray8(W, H), &[bx(50.0, 50.0, 10.0, 10.0)], &[]), "InvalidPrompt");
    expect_error(call(sealed(&grey), gray8(W, H), &[BOX, BOX], &[]), "InvalidPrompt");
    expect_error(call(sealed(&grey), gray8(W, H), &[], &vec![(5.0, 5.0, 1); 65]), "InvalidPrompt");
    expect_error(call(sealed(&grey), gray8(W, H), &[], &[(5.0, 5.0, 7)]), "InvalidPrompt");
    expect_error(call(sealed(&grey), gray8(W, H), &[], &[(f64::INFINITY, 5.0, 1)]), "InvalidPrompt");
    expect_error(call(sealed(&grey), gray8(W, H), &[], &[]), "InvalidPrompt");

    // Options, adapters, cached frames, deadlines.
    let opts = |k: &'static str, v: OwnedVariant| -> HashMap<&str, OwnedVariant> { [(k, v)].into() };
    expect_error(segment(&p, &grey, BOX, opts("adapter", OwnedVariant::from(Str::from("no-such")))), "UnknownAdapter");
    expect_error(segment(&p, &grey, BOX, opts("multimask", OwnedVariant::from(3u32))), "InvalidPrompt");
    expect_error(segment(&p, &grey, BOX, opts("colour", OwnedVariant::from(true))), "InvalidPrompt");
    expect_error(segment(&p, &grey, BOX, opts("deadline_ms", OwnedVariant::from(0u32))), "DeadlineExceeded");
    expect_error(zbus::block_on(p.reprompt(999_999, &[BOX], &[], no_options())), "InvalidFrame");
    expect_error(zbus::block_on(p.activate_adapter("no-such")), "UnknownAdapter");
    expect_error(zbus::block_on(p.rollback_adapter()), "UnknownAdapter");
    let junk = memfd::sealed_frame_from(b"MSAMLORA not really an adapter").unwrap();
    expect_error(zbus::block_on(p.install_adapter(OwnedFd::from(junk), true)), "AdapterRejected");
    expect_error(zbus::block_on(p.segment_slot(77, 0, 0, &[BOX], &[], no_options())), "InvalidFrame");

    // Still serving, and it remembers the last error.
    let (fd, ..) = segment(&p, &grey, BOX, no_options()).unwrap();
    assert_eq!(masks_of(fd).len(), W * H);
    assert!(zbus::block_on(p.last_error()).unwrap().starts_with("InvalidFrame"), "last error is the stream one");
    assert!(d.log_text().contains("InvalidPrompt"), "errors are logged");
}

#[test]
fn a_full_queue_answers_busy() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &["--queue-depth", "1"]);
    let grey = grey_frame(W, H, 4);
    // Twelve simultaneous callers against one worker and one queue place: some must be refused.
    let results: Vec<Result<(), Option<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                let (bus, grey) = (&bus, &grey);
                s.spawn(move || {
                    let conn = bus.connect();
                    let p = proxy(&conn);
                    segment(&p, grey, BOX, no_options()).map(|_| ()).map_err(|e| error_name(&e))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy = results.iter().filter(|r| matches!(r, Err(Some(n)) if n.ends_with(".Busy"))).count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(busy + ok, results.len(), "only Busy is an acceptable failure: {results:?}");
    assert!(ok >= 1 && busy >= 1, "expected both served and Busy answers, got {ok} ok / {busy} busy");
}

#[test]
fn eight_concurrent_clients_get_the_engines_masks() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &["--queue-depth", "16"]);
    let (direct, _) = direct();
    const FRAMES: u64 = 3;
    let answers: Vec<Vec<(u64, Vec<Vec<u8>>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u64)
            .map(|client| {
                let bus = &bus;
                s.spawn(move || {
                    let conn = bus.connect();
                    let p = proxy(&conn);
                    (0..FRAMES)
                        .map(|f| {
                            let seed = client * 10 + f;
                            let grey = grey_frame(W, H, seed);
                            let (fd, ..) = segment(&p, &grey, BOX, no_options()).unwrap();
                            (seed, planes(&masks_of(fd), W, H))
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (seed, got) in answers.into_iter().flatten() {
        let want = reference_masks(&direct, W, H, &grey_frame(W, H, seed), BOX, false).0;
        assert_eq!(got, want, "frame {seed}");
    }
}

#[test]
fn a_stream_ring_carries_frames_and_masks_and_reuses_embeddings() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &[]);
    let conn = bus.connect();
    let p = proxy(&conn);
    let (direct, _) = direct();
    let (stream, ring, frame_slot, masks_offset, mask_slot) = zbus::block_on(p.open_stream(2, W as u32, H as u32, "gray8")).unwrap();
    assert_eq!(frame_slot as usize, W * H);
    let ring = StdFd::from(ring);
    let file = std::fs::File::from(ring.try_clone().unwrap());
    assert!(file.set_len(1).is_err(), "the ring cannot be shrunk under the daemon");
    // SAFETY: the ring is ours to write between calls (torn-read contract).
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    for (slot, seed) in [(0u32, 20u64), (1, 21)] {
        let grey = grey_frame(W, H, seed);
        map[slot as usize * W * H..][..W * H].copy_from_slice(&grey);
        let (n, _, _, _, _, t) = zbus::block_on(p.segment_slot(stream, slot, 1, &[BOX], &[], no_options())).unwrap();
        assert_eq!(n, 1);
        assert!(t["encode_us"] > 0);
        let off = masks_offset as usize + slot as usize * mask_slot as usize;
        assert_eq!(planes(&map[off..off + W * H], W, H), reference_masks(&direct, W, H, &grey, BOX, false).0);
        // Same slot and sequence number: decoder only.
        let b2 = bx(5.0, 5.0, 60.0, 60.0);
        let (_, _, _, _, _, t) = zbus::block_on(p.segment_slot(stream, slot, 1, &[b2], &[], no_options())).unwrap();
        assert_eq!(t["encode_us"], 0, "same slot and seq must reuse the embedding");
        assert_eq!(planes(&map[off..off + W * H], W, H), reference_masks(&direct, W, H, &grey, b2, false).0);
    }
    // A new sequence number means a new frame.
    let grey = grey_frame(W, H, 22);
    map[..W * H].copy_from_slice(&grey);
    let (_, _, _, _, _, t) = zbus::block_on(p.segment_slot(stream, 0, 2, &[BOX], &[], no_options())).unwrap();
    assert!(t["encode_us"] > 0);
    expect_error(zbus::block_on(p.segment_slot(stream, 2, 0, &[BOX], &[], no_options())), "InvalidFrame");
    // Another client cannot use or close it.
    let other = bus.connect();
    expect_error(zbus::block_on(proxy(&other).segment_slot(stream, 0, 2, &[BOX], &[], no_options())), "InvalidFrame");
    zbus::block_on(p.close_stream(stream)).unwrap();
    expect_error(zbus::block_on(p.segment_slot(stream, 0, 2, &[BOX], &[], no_options())), "InvalidFrame");
}

mod adapters {
    use super::*;
    use minisam_models::adapter::{encode_adapter, synth, AdapterFile};

    use common::make_adapter as make;

    #[test]
    fn adapters_install_activate_roll_back_and_swap_under_load_without_failures() {
        let Some(bus) = Bus::start() else { return };
        let (mut direct, sha) = direct();
        let a = make(&direct, &sha, "us-a", "US", 1);
        let b = make(&direct, &sha, "ct-b", "CT", 2);
        let foreign = make(&direct, &"0".repeat(64), "foreign", "MR", 3);
        let dir = TempDir::new("adapters");
        std::fs::write(dir.0.join("us-a.lora"), a.bytes()).unwrap();
        std::fs::write(dir.0.join("foreign.lora"), foreign.bytes()).unwrap();
        std::fs::write(dir.0.join("broken.lora"), &a.bytes()[..a.bytes().len() / 2]).unwrap();
        let d = Daemon::start_with(&bus, dir, &["--queue-depth", "16"]);
        let conn = bus.connect();
        let p = proxy(&conn);

        let rows = zbus::block_on(p.list_adapters()).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["foreign", "us-a"], "the truncated file is skipped");
        assert!(rows.iter().any(|r| r.0 == "foreign" && !r.4) && rows.iter().any(|r| r.0 == "us-a" && r.4));
        expect_error(zbus::block_on(p.activate_adapter("foreign")), "AdapterRejected");
        expect_error(zbus::block_on(p.install_adapter(OwnedFd::from(memfd::sealed_frame_from(foreign.bytes()).unwrap()), false)), "AdapterRejected");

        // Install b from a plain file fd; it lands crash-safely in the adapters dir.
        let b_path = d.adapters.0.with_extension("b.lora");
        std::fs::write(&b_path, b.bytes()).unwrap();
        let f = std::fs::File::open(&b_path).unwrap();
        let (name, b_sha) = zbus::block_on(p.install_adapter(OwnedFd::from(StdFd::from(f)), false)).unwrap();
        assert_eq!((name.as_str(), b_sha.as_str()), ("ct-b", b.sha256_hex()));
        assert_eq!(std::fs::read(d.adapters.0.join("ct-b.lora")).unwrap(), b.bytes());

        // Activation by modality picks the adapter for it; rollback returns to the base model.
        let (name, _) = zbus::block_on(p.activate_adapter("US")).unwrap();
        assert_eq!(name, "us-a");
        assert_eq!(zbus::block_on(p.active_adapter()).unwrap(), "us-a");
        let (name, _) = zbus::block_on(p.rollback_adapter()).unwrap();
        assert_eq!(name, "");

        // Under load: four clients stream frames while the default adapter flips; no request may
        // fail, and every answer must equal the engine's under the adapter the answer names.
        let grey = grey_frame(W, H, 5);
        let mut want: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        want.insert(String::new(), reference_masks(&direct, W, H, &grey, BOX, false).0);
        for adapter in [&a, &b] {
            direct.set_adapter(Some(adapter)).unwrap();
            want.insert(adapter.sha256_hex().to_string(), reference_masks(&direct, W, H, &grey, BOX, false).0);
        }
        assert_ne!(want[""], want[a.sha256_hex()], "the test adapter must change the answer");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let answers: Vec<(String, Vec<Vec<u8>>)> = std::thread::scope(|s| {
            let clients: Vec<_> = (0..4)
                .map(|_| {
                    let (bus, grey, stop) = (&bus, &grey, &stop);
                    s.spawn(move || {
                        let conn = bus.connect();
                        let p = proxy(&conn);
                        let mut got = Vec::new();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) || got.len() < 3 {
                            let (fd, _, _, _, adapter, _) = segment(&p, grey, BOX, no_options()).expect("no request may fail during swaps");
                            got.push((adapter, planes(&masks_of(fd), W, H)));
                        }
                        got
                    })
                })
                .collect();
            for key in ["us-a", "ct-b", "none", "US", "CT"] {
                zbus::block_on(p.activate_adapter(key)).unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
            zbus::block_on(p.rollback_adapter()).unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
        });
        let mut seen = std::collections::HashSet::new();
        for (adapter, masks) in &answers {
            assert_eq!(masks, &want[adapter], "answer under adapter {adapter:?} differs from the engine's");
            seen.insert(adapter.clone());
        }
        assert!(seen.len() >= 2, "the load must have spanned a swap; saw {seen:?}");
        // A per-request adapter overrides the default for that request only.
        let opts: HashMap<&str, OwnedVariant> = [("adapter", OwnedVariant::from(Str::from("ct-b")))].into();
        let (fd, _, _, _, adapter, _) = segment(&p, &grey, BOX, opts).unwrap();
        assert_eq!(adapter, b.sha256_hex());
        assert_eq!(planes(&masks_of(fd), W, H), want[b.sha256_hex()]);
    }

    #[test]
    fn sigkill_during_installs_never_leaves_a_partial_adapter() {
        let Some(bus) = Bus::start() else { return };
        let (direct, sha) = direct();
        // Rank 64 over every attention projection: a file big enough for a kill to land mid-write.
        let targets = minisam_models::adapter::default_targets();
        let factors = synth::random_factors(direct.linear_shapes(), &targets, 64, 9).unwrap();
        let big = encode_adapter(&synth::test_meta(&targets, &sha, 64, 128.0, 9), &factors).unwrap();
        let dir = TempDir::new("kill");
        let path = dir.0.clone();
        let mut adapters = Some(dir);
        for round in 0..6u64 {
            let d = Daemon::start_with(&bus, adapters.take().unwrap(), &[]);
            let installer = {
                let (bus, bytes) = (&bus, big.bytes().to_vec());
                std::thread::spawn({
                    let address = bus.address.clone();
                    move || {
                        let _ = zbus::block_on(async {
                            let conn = zbus::connection::Builder::address(address.as_str()).build().await?;
                            let p = Segmenter1Proxy::new(&conn).await?;
                            p.install_adapter(OwnedFd::from(memfd::sealed_frame_from(&bytes).unwrap()), false).await
                        });
                    }
                })
            };
            std::thread::sleep(Duration::from_millis(2 + round * 3));
            nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
            let _ = installer.join();
            for entry in std::fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap().path();
                let name = entry.file_name().unwrap().to_string_lossy().to_string();
                if name.starts_with('.') {
                    continue; // an interrupted temp file: hidden, never served, removed at scan
                }
                let opened = AdapterFile::open(&entry);
                assert!(opened.is_ok(), "round {round}: visible file {name} is not a whole adapter: {:?}", opened.err());
                assert_eq!(opened.unwrap().sha256_hex(), big.sha256_hex());
            }
            adapters = Some({ d }.keep_dir());
        }
        // A daemon starting over the directory removes interrupted temp files and serves the adapter
        // if an install completed.
        let d = Daemon::start_with(&bus, adapters.take().unwrap(), &[]);
        let leftovers: Vec<_> = std::fs::read_dir(&path).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
        assert!(leftovers.is_empty(), "temp files left after restart: {leftovers:?}");
        let conn = bus.connect();
        let rows = zbus::block_on(proxy(&conn).list_adapters()).unwrap();
        assert!(rows.iter().all(|r| r.2 == big.sha256_hex()));
        drop(d);
    }
}

/// The README's Python client (jeepney, sealed memfd) against a real daemon.
#[test]
fn the_python_example_client_segments_through_a_sealed_memfd() {
    let has_jeepney = std::process::Command::new("python3").args(["-c", "import jeepney"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !has_jeepney {
        eprintln!("SKIP: python3 with jeepney is not installed (pip install jeepney); the Python example is not run");
        return;
    }
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &[]);
    let work = TempDir::new("pyclient");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/segment.py");
    let out = std::process::Command::new("python3")
        .arg(&example)
        .args(["--address", &bus.address, "--box", "60,40,260,200"])
        .current_dir(&work.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("mask.pgm written"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let pgm = std::fs::read(work.0.join("mask.pgm")).unwrap();
    assert!(pgm.starts_with(b"P5\n320 240\n255\n") && pgm.len() == 15 + 320 * 240);
}
