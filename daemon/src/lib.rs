//! minisamd: the QLoRA-MiniSAM segmentation daemon (D-Bus + sealed memfds) and its client.
//!
//! Module map: `service` is the D-Bus interface; `worker` the inference thread and its queue;
//! `memfd`, `frame`, `prompts`, `stream` check and convert what clients send; `callers` says
//! which Unix user a client is (per-user limits and errors); `fd_read` reads a client's fd with
//! a size cap and a deadline; `adapters` finds, validates and installs LoRA adapters; `state`
//! persists the active adapter across restarts; `notify`, `watchdog`, `signals`, `logging` are
//! the systemd integration; `config` the command line; `client` the proxy minisamctl and the
//! tests use.

pub mod adapters;
pub mod callers;
pub mod fd_read;
pub mod state;
pub mod error;
pub mod frame;
pub mod memfd;
pub mod prompts;
pub mod read_only;
pub mod reply;
pub mod service;
pub mod stream;
pub mod worker;
pub mod config;
pub mod logging;
pub mod notify;
pub mod signals;
pub mod watchdog;
pub mod daemon;
pub mod client;
