//! Process events: SIGHUP (systemd's reload for `Type=notify-reload`) and changes in the adapter
//! directories both rescan the adapters; SIGTERM/SIGINT start the drain.

use std::path::PathBuf;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::reply::Mailbox;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: reload (systemd expects RELOADING=1 … READY=1 around it).
    Reload,
    /// An adapter directory changed (inotify).
    AdaptersChanged,
    /// SIGTERM / SIGINT.
    Terminate,
    /// The worker finished the queued jobs after `Terminate`.
    Drained,
    /// Time to flush replies has passed.
    Flushed,
}

/// Forwards SIGHUP, SIGTERM and SIGINT as events (signal-hook's self-pipe, so nothing but an
/// async-signal-safe write happens in the handler).
pub fn spawn_signal_thread(events: Mailbox<Event>) -> std::io::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let handle = signals.handle();
    std::thread::Builder::new().name("minisam-signals".into()).spawn(move || {
        for sig in signals.forever() {
            events.post(if sig == SIGHUP { Event::Reload } else { Event::Terminate });
        }
    })?;
    Ok(handle)
}

/// Watches the adapter directories for files appearing, being replaced or removed. Events are
/// coalesced by the receiver (one rescan per burst). Directories that do not exist are skipped.
pub fn spawn_dir_watch(dirs: &[PathBuf], events: Mailbox<Event>) -> nix::Result<()> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CREATE;
    let mut watched = 0;
    for dir in dirs {
        match inotify.add_watch(dir.as_path(), mask) {
            Ok(_) => watched += 1,
            Err(e) => tracing::info!("not watching {}: {e}", dir.display()),
        }
    }
    if watched == 0 {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("minisam-inotify".into())
        .spawn(move || loop {
            match inotify.read_events() {
                Ok(evs) => {
                    // Our own install temp files come and go inside one install; the final
                    // rename (IN_MOVED_TO) is the event that matters.
                    let relevant = evs.iter().any(|e| e.name.as_ref().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.')));
                    if relevant {
                        events.post(Event::AdaptersChanged);
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("adapter directory watch stopped: {e}");
                    break;
                }
            }
        })
        .map_err(|_| nix::errno::Errno::EAGAIN)?;
    Ok(())
}
