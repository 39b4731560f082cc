//! The sd_notify protocol without libsystemd: datagrams of `KEY=VALUE` lines sent to the socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Outside systemd the
//! variable is unset and every call is a no-op.

use std::os::unix::net::UnixDatagram;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; an unusable value is logged and notification disabled (the
    /// daemon still serves; systemd will time the start out and say why).
    pub fn from_env() -> Self {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Notifier { socket: None },
            Some(path) => match Self::connect(path.as_encoded_bytes()) {
                Ok(s) => Notifier { socket: Some(s) },
                Err(e) => {
                    tracing::error!("NOTIFY_SOCKET={path:?} unusable: {e}");
                    Notifier { socket: None }
                }
            },
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    fn connect(path: &[u8]) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
        use std::os::unix::net::SocketAddr;
        let addr = match path.first() {
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&path[1..])?
            }
            Some(b'/') => {
                use std::os::unix::ffi::OsStrExt;
                SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))?
            }
            _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an absolute path or @abstract name")),
        };
        Ok((UnixDatagram::unbound()?, addr))
    }

    /// Sends one message (several lines allowed). Failures are logged, never fatal.
    pub fn send(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!("sd_notify {message:?} failed: {e}");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// `Type=notify-reload` wants RELOADING=1 with the CLOCK_MONOTONIC time of the reload.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading adapters", monotonic_usec()));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining in-flight requests");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd compares it.
pub fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC always exists on Linux");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("minisamd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier { socket: Some(Notifier::connect(path.as_os_str().as_encoded_bytes()).unwrap()) };
        n.ready("serving");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).ok();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("minisamd-test-{}", std::process::id());
        let server = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let n = Notifier { socket: Some(Notifier::connect(format!("@{name}").as_bytes()).unwrap()) };
        n.reloading();
        let len = server.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        let usec: u64 = msg.lines().nth(1).unwrap().trim_start_matches("MONOTONIC_USEC=").parse().unwrap();
        assert!(usec > 0 && usec <= monotonic_usec());
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(Notifier::connect(b"relative.sock").is_err());
    }
}
