//! systemd's watchdog, fed only while both halves of the daemon are healthy:
//!
//! - the inference worker: its heartbeat moved since the last wake, or it is idle;
//! - the bus side: a probe thread calls `org.freedesktop.DBus.Peer.Ping` on the daemon's own
//!   unique name every quarter interval, through the bus daemon and the same object server that
//!   dispatches clients' calls, and counts the answers. A method handler that blocks the
//!   dispatcher (or a dead bus connection) stops the answers.
//!
//! A thread wakes every half `WATCHDOG_USEC` and sends `WATCHDOG=1` only if both moved; otherwise
//! it says in the journal which half is stuck and withholds the ping, so systemd restarts the
//! service. A merely busy worker beats between its phases.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::notify::Notifier;
use crate::worker::Shared;

/// `WATCHDOG_USEC` if systemd asked for pings for this process (`WATCHDOG_PID` absent or ours).
pub fn interval_from_env() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The worker's half of one wake's decision: idle, or made progress.
pub fn worker_alive(last_beats: u64, beats: u64, busy: bool) -> bool {
    !busy || beats != last_beats
}

/// The bus half: at least one probe was answered since the last wake.
pub fn bus_alive(last_answers: u64, answers: u64) -> bool {
    answers != last_answers
}

/// Answers to the bus probe so far.
#[derive(Default)]
pub struct BusProbe {
    answers: AtomicU64,
}

impl BusProbe {
    pub fn answers(&self) -> u64 {
        self.answers.load(Ordering::Relaxed)
    }

    /// Pings the daemon's own unique name every `every` until `stop`. A call that never returns
    /// leaves the count where it is, which is the point.
    pub fn spawn(self: Arc<Self>, conn: zbus::Connection, every: Duration, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("minisam-bus-probe".into()).spawn(move || {
            let own = conn.unique_name().map(|n| n.to_string());
            while !stop.load(Ordering::Relaxed) {
                let answered = zbus::block_on(conn.call_method(
                    own.as_deref(),
                    crate::service::OBJECT_PATH,
                    Some("org.freedesktop.DBus.Peer"),
                    "Ping",
                    &(),
                ));
                match answered {
                    Ok(_) => {
                        self.answers.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!("the bus probe (Peer.Ping to ourselves) failed: {e}"),
                }
                std::thread::sleep(every);
            }
        })
    }
}

pub fn spawn(notifier: Arc<Notifier>, shared: Arc<Shared>, probe: Arc<BusProbe>, watchdog: Duration, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("minisam-watchdog".into()).spawn(move || {
        let (mut last_beats, mut last_answers) = (shared.beats(), probe.answers());
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(watchdog / 2);
            let (beats, answers) = (shared.beats(), probe.answers());
            let worker = worker_alive(last_beats, beats, shared.busy());
            let bus = bus_alive(last_answers, answers);
            if worker && bus {
                notifier.watchdog();
            } else if !worker {
                tracing::error!("inference worker made no progress for {:?}; withholding the watchdog ping", watchdog / 2);
            } else {
                tracing::error!("the D-Bus side answered no probe for {:?} (a stalled dispatcher?); withholding the watchdog ping", watchdog / 2);
            }
            (last_beats, last_answers) = (beats, answers);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_half_gets_no_ping() {
        assert!(worker_alive(5, 5, false), "idle");
        assert!(worker_alive(5, 6, true), "busy but progressing");
        assert!(!worker_alive(5, 5, true), "busy and stuck");
        assert!(bus_alive(3, 4), "a probe was answered");
        assert!(!bus_alive(4, 4), "no probe answered since the last wake");
    }
}
