//! minisamd under a simulated systemd: the sd_notify sequence (READY=1 only once the name is
//! owned, WATCHDOG=1 pings, RELOADING=1 + MONOTONIC_USEC … READY=1 on SIGHUP, STOPPING=1 and a
//! drained exit on SIGTERM), the adapter directory watch, and minisamctl against the daemon.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use minisamd::client::error_name;
use zbus::OwnedFd;

/// Collects notify datagrams until one satisfies `want` (or panics after `limit`).
fn wait_for(sock: &UnixDatagram, limit: Duration, seen: &mut Vec<String>, want: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        assert!(t0.elapsed() < limit, "no matching notify message within {limit:?}; got {seen:?}");
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(msg.clone());
            if want(&msg) {
                return msg;
            }
        }
    }
}

#[test]
fn notify_watchdog_reload_watch_and_drain() {
    let Some(bus) = Bus::start() else { return };
    let dir = TempDir::new("notify");
    let sock_path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let adapters = TempDir::new("adapters");
    let adapters_path = adapters.0.clone();
    let mut d = Daemon::start_env(
        &bus,
        adapters,
        &["--queue-depth", "8", "--max-frame-pixels", "20000000"],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "200000"), ("MINISAMD_LOG", "minisamd=debug,info")],
    );
    let mut seen = Vec::new();
    let ready = wait_for(&sock, Duration::from_secs(30), &mut seen, |m| m.contains("READY=1"));
    assert!(ready.contains("STATUS=serving on org.minisam.Segmenter1"), "{ready}");
    assert!(seen.iter().any(|m| m.contains("STATUS=loading model")), "a loading status comes first: {seen:?}");
    // Readiness was announced after the name was owned (start_env already waited for it).
    wait_for(&sock, Duration::from_secs(5), &mut seen, |m| m == "WATCHDOG=1");

    // SIGHUP: RELOADING=1 with a plausible monotonic time, then READY=1 again.
    let before = minisamd::notify::monotonic_usec();
    nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = wait_for(&sock, Duration::from_secs(5), &mut seen, |m| m.starts_with("RELOADING=1"));
    let usec: u64 = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC").parse().unwrap();
    assert!(usec >= before && usec <= minisamd::notify::monotonic_usec(), "MONOTONIC_USEC {usec} not from CLOCK_MONOTONIC");
    wait_for(&sock, Duration::from_secs(5), &mut seen, |m| m.starts_with("READY=1"));

    // A new adapter file is picked up by the directory watch, without SIGHUP.
    let conn = bus.connect();
    let p = proxy(&conn);
    let (direct, sha) = direct();
    let a = minisam_models::adapter::synth::random_adapter(direct.linear_shapes(), &minisam_models::adapter::default_targets(), &sha, 4, 8.0, 42).unwrap();
    std::fs::write(adapters_path.join("x.tmp"), a.bytes()).unwrap();
    std::fs::rename(adapters_path.join("x.tmp"), adapters_path.join("random-42.lora")).unwrap();
    let t0 = Instant::now();
    while !zbus::block_on(p.list_adapters()).unwrap().iter().any(|r| r.0 == "random-42") {
        assert!(t0.elapsed() < Duration::from_secs(10), "directory watch did not pick up the new adapter");
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGTERM with requests in flight: every request already accepted is answered, later ones
    // get Busy, STOPPING=1 is sent and the daemon exits 0. Large frames keep the worker busy.
    let (w, h) = (4000usize, 3000usize);
    let grey = grey_frame(w, h, 7);
    let layout = (w as u32, h as u32, w as u32, "gray8".to_string());
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let (bus, grey, layout) = (&bus, &grey, &layout);
                s.spawn(move || {
                    let conn = bus.connect();
                    let p = proxy(&conn);
                    let fd = OwnedFd::from(minisamd::memfd::sealed_frame_from(grey).unwrap());
                    zbus::block_on(p.segment(fd, layout, &[(100.0, 100.0, 3000.0, 2500.0)], &[], Default::default()))
                        .map(|_| ())
                        .map_err(|e| error_name(&e).unwrap_or_else(|| e.to_string()))
                })
            })
            .collect();
        // Terminate once the daemon has accepted at least one of them (it logs each queued job).
        let t0 = Instant::now();
        while d.log_text().matches("request queued").count() == 0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "no request reached the daemon:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(5));
        }
        nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    wait_for(&sock, Duration::from_secs(5), &mut seen, |m| m.starts_with("STOPPING=1"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "daemon did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}; log:\n{}", d.log_text());
    let queued = d.log_text().matches("request queued").count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(queued >= 1 && ok == queued, "every accepted request must be answered: {queued} queued, {results:?}");
    assert!(results.iter().all(|r| r.is_ok() || r.as_ref().err().is_some_and(|e| e.ends_with(".Busy"))), "{results:?}");
}

#[test]
fn minisamctl_segments_installs_and_reports_status() {
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &[]);
    let dir = TempDir::new("ctl");
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_minisamctl")).arg("--bus-address").arg(&bus.address).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/samples/us-hc18-000_HC.png");
    let mask = dir.0.join("mask.png");
    let (ok, out, err) = ctl(&["segment", image.to_str().unwrap(), "--box", "330,288,489,467", "-o", mask.to_str().unwrap()]);
    assert!(ok, "segment failed: {err}");
    assert!(out.contains("written"), "{out}");
    let written = minisam::image_io::read_labels(&mask).unwrap();
    let input = minisam::image_io::read_rgb(&image).unwrap();
    assert_eq!((written.width, written.height), (input.width, input.height));
    assert!(written.labels.iter().all(|&v| v == 0 || v == 255));

    let (ok, _, err) = ctl(&["segment", image.to_str().unwrap(), "--box", "nan,1,2,3", "-o", mask.to_str().unwrap()]);
    assert!(!ok && err.contains("InvalidPrompt"), "a NaN box must be refused by name: {err}");

    let (direct, sha) = direct();
    let a = minisam_models::adapter::synth::random_adapter(direct.linear_shapes(), &minisam_models::adapter::default_targets(), &sha, 4, 8.0, 7).unwrap();
    let file = dir.0.join("a.lora");
    std::fs::write(&file, a.bytes()).unwrap();
    let (ok, out, err) = ctl(&["adapters", "verify", file.to_str().unwrap()]);
    assert!(ok && out.contains("random-7") && out.contains(a.sha256_hex()), "{out}{err}");
    let (ok, out, err) = ctl(&["adapters", "install", file.to_str().unwrap(), "--activate"]);
    assert!(ok && out.contains("installed random-7"), "{out}{err}");
    let (ok, out, _) = ctl(&["adapters", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && list[0]["name"] == "random-7" && list[0]["active"] == true, "{out}");
    let (ok, out, err) = ctl(&["adapters", "rollback"]);
    assert!(ok && out.contains("base model"), "{out}{err}");
    let (ok, _, err) = ctl(&["adapters", "activate", "nope"]);
    assert!(!ok && err.contains("UnknownAdapter"), "{err}");

    let (ok, out, _) = ctl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && status["frames_served"] == 1 && status["backend"] == "cpu", "{out}");
    assert!(status["last_error"].as_str().unwrap().starts_with("UnknownAdapter"), "{out}");
    let (ok, out, _) = ctl(&["status"]);
    assert!(ok && out.contains("frames served  1"), "{out}");
}
