//! Who is calling: the Unix user behind a bus connection, and what that user may see of the
//! daemon's state. Limits that protect everyone (open streams, ring memory) are per user, because
//! one user can open as many connections as the bus allows; `LastError` is per user, because an
//! error message can quote what a client sent.
//!
//! The uid comes from the bus daemon (`GetConnectionUnixUser`, which it takes from the socket's
//! peer credentials, so a client cannot lie about it) and is cached per unique name: unique
//! names are never reused on a bus, and the cache forgets a name when its client leaves.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use zbus::fdo::DBusProxy;
use zbus::names::BusName;

use crate::error::{truncate, Error, Result};

/// Unique names remembered; past this the cache starts over (a lookup is one bus round trip).
const MAX_CACHED_NAMES: usize = 4096;
/// Users whose last error is kept; the oldest is forgotten first.
const MAX_ERROR_USERS: usize = 64;
/// Longest `LastError` kept: enough for every message the daemon writes, while a client's
/// 16 MiB option name cannot become 32 MiB of daemon memory.
pub const MAX_ERROR_BYTES: usize = 512;

#[derive(Default)]
pub struct Callers {
    uids: Mutex<HashMap<String, u32>>,
    last_errors: Mutex<VecDeque<(u32, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Callers {
    /// The uid of the connection `sender` (a unique name such as `:1.42`).
    pub async fn uid(&self, conn: &zbus::Connection, sender: &str) -> Result<u32> {
        if let Some(&uid) = lock(&self.uids).get(sender) {
            return Ok(uid);
        }
        let name = BusName::try_from(sender).map_err(|e| Error::Internal(format!("sender {sender:?}: {e}")))?;
        let dbus = DBusProxy::new(conn).await.map_err(|e| Error::Internal(format!("talking to the bus daemon: {e}")))?;
        let uid = dbus.get_connection_unix_user(name).await.map_err(|e| Error::Internal(format!("asking the bus for {sender}'s user: {e}")))?;
        let mut uids = lock(&self.uids);
        if uids.len() >= MAX_CACHED_NAMES {
            uids.clear();
        }
        uids.insert(sender.to_string(), uid);
        Ok(uid)
    }

    /// A client left the bus.
    pub fn forget(&self, sender: &str) {
        lock(&self.uids).remove(sender);
    }

    /// Keeps `line` (cut to [`MAX_ERROR_BYTES`]) as the last error of user `uid`.
    pub fn record_error(&self, uid: u32, line: &str) {
        let line = truncate(line, MAX_ERROR_BYTES).to_string();
        let mut errors = lock(&self.last_errors);
        errors.retain(|(u, _)| *u != uid);
        if errors.len() >= MAX_ERROR_USERS {
            errors.pop_front();
        }
        errors.push_back((uid, line));
    }

    /// The last error of user `uid`; empty if none.
    pub fn last_error(&self, uid: u32) -> String {
        lock(&self.last_errors).iter().find(|(u, _)| *u == uid).map(|(_, l)| l.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_errors_are_per_user_bounded_and_short() {
        let c = Callers::default();
        c.record_error(1000, "InvalidPrompt: mine");
        c.record_error(1001, &"x".repeat(1 << 20));
        assert_eq!(c.last_error(1000), "InvalidPrompt: mine");
        assert_eq!(c.last_error(1001).len(), MAX_ERROR_BYTES);
        assert_eq!(c.last_error(0), "", "a user with no error sees none, not another user's");
        for uid in 0..(2 * MAX_ERROR_USERS as u32) {
            c.record_error(5000 + uid, "e");
        }
        assert_eq!(lock(&c.last_errors).len(), MAX_ERROR_USERS);
        assert_eq!(truncate("aé", 2), "a", "cut on a character boundary");
    }
}
