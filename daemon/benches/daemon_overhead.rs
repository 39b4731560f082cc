//! What the daemon costs beyond compute, on the committed tiny SAM fixture (small enough that the
//! overhead is visible): for each request, the client's round trip minus the encoder+decoder time
//! the daemon reports, so the figure is D-Bus + memfd + queue + conversion overhead. Also the
//! re-prompt round trip (decoder only) and streaming throughput over a ring. The "transport"
//! rows subtract everything the daemon measured itself (`total_us`: queue, conversion, compute,
//! mask memfd): what is left is D-Bus through the bus daemon, fd passing, the frame's seal check
//! and mapping, and the client's own memfd work.
//!
//! `cargo bench -p minisamd --bench daemon_overhead [-- FRAMES]` (default 40 frames per row).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Instant;

use common::*;
use zbus::OwnedFd;

const W: usize = 320;
const H: usize = 240;
const BOX: (f64, f64, f64, f64) = (60.0, 40.0, 220.0, 180.0);

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn row(name: &str, v: &mut [f64]) {
    println!("| {name:<44} | {:>9.3} | {:>9.3} | {:>5} |", pct(v, 0.5), pct(v, 0.99), v.len());
}

fn main() {
    let frames: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(40);
    let Some(bus) = Bus::start() else { return };
    let _d = Daemon::start(&bus, &["--queue-depth", "8"]);
    let conn = bus.connect();
    let p = proxy(&conn);
    let grey = grey_frame(W, H, 1);
    let layout = (W as u32, H as u32, W as u32, "gray8".to_string());
    let none = || HashMap::new();

    let (direct, _) = direct();
    let mut compute = Vec::new();
    for _ in 0..frames {
        let t = Instant::now();
        reference_masks(&direct, W, H, &grey, BOX, false);
        compute.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // The floor under every call: a method the bus daemon answers itself (one hop pair), and
    // `Peer.Ping`, which zbus answers inside minisamd without our code (two hop pairs).
    let bus_proxy = zbus::fdo::DBusProxy::new(&conn);
    let bus_proxy = zbus::block_on(bus_proxy).unwrap();
    let peer = zbus::block_on(zbus::fdo::PeerProxy::builder(&conn).destination(minisamd::service::BUS_NAME).path(minisamd::service::OBJECT_PATH).build()).unwrap();
    let (mut bus_rt, mut ping_rt, mut list_rt) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..frames + 3 {
        let t = Instant::now();
        zbus::block_on(bus_proxy.get_id()).unwrap();
        let a = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        zbus::block_on(peer.ping()).unwrap();
        let b = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        zbus::block_on(p.list_adapters()).unwrap();
        let c = t.elapsed().as_secs_f64() * 1e3;
        if i >= 3 {
            bus_rt.push(a);
            ping_rt.push(b);
            list_rt.push(c);
        }
    }

    let (mut total, mut overhead, mut re_total, mut re_overhead) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut transport, mut re_transport) = (Vec::new(), Vec::new());
    let (mut re_call, mut re_read) = (Vec::new(), Vec::new());
    for i in 0..frames + 3 {
        let t = Instant::now();
        let fd = OwnedFd::from(minisamd::memfd::sealed_frame_from(&grey).unwrap());
        let (masks, _, frame_id, _, _, timings) = zbus::block_on(p.segment(fd, &layout, &[BOX], &[], none())).unwrap();
        let _ = minisamd::memfd::read_all(&masks.into()).unwrap();
        let rt = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let (masks, _, _, _, _, re) = zbus::block_on(p.reprompt(frame_id, &[BOX], &[], none())).unwrap();
        let call = t.elapsed().as_secs_f64() * 1e3;
        let _ = minisamd::memfd::read_all(&masks.into()).unwrap();
        let re_rt = t.elapsed().as_secs_f64() * 1e3;
        if i < 3 {
            continue; // warm-up: pools sized, pages faulted
        }
        let ms = |k: &str| timings[k] as f64 / 1e3;
        total.push(rt);
        overhead.push(rt - ms("encode_us") - ms("decode_us"));
        transport.push(rt - ms("total_us"));
        re_total.push(re_rt);
        re_overhead.push(re_rt - re["decode_us"] as f64 / 1e3);
        re_transport.push(re_rt - re["total_us"] as f64 / 1e3);
        re_call.push(call - re["total_us"] as f64 / 1e3);
        re_read.push(re_rt - call);
    }

    let (stream, ring, frame_slot, ..) = zbus::block_on(p.open_stream(2, W as u32, H as u32, "gray8")).unwrap();
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(ring));
    // SAFETY: we write a slot only while no call for it is in flight.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    let t0 = Instant::now();
    let mut slot_overhead = Vec::new();
    for i in 0..frames {
        let slot = i % 2;
        let t = Instant::now();
        map[slot * frame_slot as usize..][..W * H].copy_from_slice(&grey);
        let (_, _, _, _, _, timings) = zbus::block_on(p.segment_slot(stream, slot as u32, i as u64, &[BOX], &[], none())).unwrap();
        slot_overhead.push(t.elapsed().as_secs_f64() * 1e3 - (timings["encode_us"] + timings["decode_us"]) as f64 / 1e3);
    }
    let fps = frames as f64 / t0.elapsed().as_secs_f64();

    println!("\nminisamd overhead, tiny SAM fixture, {W}x{H} gray8, 1 compute thread ({frames} frames per row)\n");
    println!("| {:<44} | {:>9} | {:>9} | {:>5} |", "ms per frame", "p50", "p99", "n");
    println!("|{:-<46}|{:->11}|{:->11}|{:->7}|", "", "", "", "");
    row("bus daemon GetId round trip (1 hop pair)", &mut bus_rt);
    row("Peer.Ping to minisamd round trip (floor)", &mut ping_rt);
    row("ListAdapters round trip (our dispatch, no worker)", &mut list_rt);
    row("in-process encode + decode (compute)", &mut compute);
    row("Segment round trip (memfd in, memfd out)", &mut total);
    row("Segment overhead beyond compute", &mut overhead);
    row("Reprompt round trip (decoder only)", &mut re_total);
    row("Reprompt overhead beyond decode", &mut re_overhead);
    row("Segment transport (round trip - total_us)", &mut transport);
    row("Reprompt transport (round trip - total_us)", &mut re_transport);
    row("  of which: the call until its reply", &mut re_call);
    row("  of which: client maps and copies the mask", &mut re_read);
    row("SegmentSlot overhead beyond compute (ring)", &mut slot_overhead);
    println!("\nstreaming over a 2-slot ring: {fps:.1} frames/s (sequential client, encode every frame)");
}
