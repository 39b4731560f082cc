//! Logs go to the journal with structured fields (model hash, adapter, latency become journal
//! fields such as `MODEL=`, `ADAPTER=`, `LATENCY_US=`) when journald's socket exists, else to
//! stderr as text. `MINISAMD_LOG` (tracing's env-filter syntax) sets the level; default `info`.

use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

pub fn init() {
    let filter = EnvFilter::try_from_env("MINISAMD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if Path::new(JOURNAL_SOCKET).exists() {
        match tracing_journald::layer() {
            Ok(journald) => {
                let journald = journald.with_syslog_identifier("minisamd".into());
                tracing_subscriber::registry().with(filter).with(journald).init();
                return;
            }
            Err(e) => eprintln!("minisamd: journald unusable ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::registry().with(filter).with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init();
}
