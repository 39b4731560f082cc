//! systemd's watchdog, fed by the serving loop itself: a thread wakes every half
//! `WATCHDOG_USEC` and sends `WATCHDOG=1` only if the inference worker's heartbeat moved since
//! the last wake or the worker is idle. A stuck inference stops the pings and systemd restarts
//! the service; a merely busy one beats between its phases.

use std::sync::atomic::{AtomicBool, Ordering};
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

/// The decision of one wake: ping when the worker is idle or made progress.
pub fn should_ping(last_beats: u64, beats: u64, busy: bool) -> bool {
    !busy || beats != last_beats
}

pub fn spawn(notifier: Arc<Notifier>, shared: Arc<Shared>, watchdog: Duration, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("minisam-watchdog".into()).spawn(move || {
        let mut last = shared.beats();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(watchdog / 2);
            let beats = shared.beats();
            if should_ping(last, beats, shared.busy()) {
                notifier.watchdog();
            } else {
                tracing::error!("inference worker made no progress for {:?}; withholding the watchdog ping", watchdog / 2);
            }
            last = beats;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_busy_worker_gets_no_ping() {
        assert!(should_ping(5, 5, false), "idle");
        assert!(should_ping(5, 6, true), "busy but progressing");
        assert!(!should_ping(5, 5, true), "busy and stuck");
    }
}
