//! The daemon's named D-Bus errors (`org.minisam.Segmenter1.Error.<Name>`, fixed in the
//! cross-crate contract). Every way a request can fail maps to one of them, so a client can
//! branch on the name and show the message; nothing a client sends may crash the daemon.

use zbus::DBusError;

#[derive(Debug, DBusError)]
#[zbus(prefix = "org.minisam.Segmenter1.Error")]
pub enum Error {
    /// Transport-level failure inside zbus (never produced by request validation).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The frame fd, its seals, its size or its layout are wrong, or a cached frame is gone.
    InvalidFrame(String),
    /// A prompt is NaN, out of the frame, inverted, or there are too many.
    InvalidPrompt(String),
    /// An adapter file failed validation or does not fit the loaded base model.
    AdapterRejected(String),
    /// No adapter with that name or modality is installed.
    UnknownAdapter(String),
    /// The request queue is full; retry later (back-pressure, not a fault).
    Busy(String),
    /// The request waited or ran past its deadline.
    DeadlineExceeded(String),
    /// A fault of the daemon itself (I/O, engine); logged with details.
    Internal(String),
}

impl Error {
    /// The error's short name as it appears after the prefix, for logs and `LastError`.
    pub fn short_name(&self) -> &'static str {
        match self {
            Error::ZBus(_) => "ZBus",
            Error::InvalidFrame(_) => "InvalidFrame",
            Error::InvalidPrompt(_) => "InvalidPrompt",
            Error::AdapterRejected(_) => "AdapterRejected",
            Error::UnknownAdapter(_) => "UnknownAdapter",
            Error::Busy(_) => "Busy",
            Error::DeadlineExceeded(_) => "DeadlineExceeded",
            Error::Internal(_) => "Internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Error::ZBus(e) => e.to_string(),
            Error::InvalidFrame(m)
            | Error::InvalidPrompt(m)
            | Error::AdapterRejected(m)
            | Error::UnknownAdapter(m)
            | Error::Busy(m)
            | Error::DeadlineExceeded(m)
            | Error::Internal(m) => m.clone(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A string a client sent, quoted for an error message: at most 64 bytes of it, so no error
/// grows with what a client sends (a 16 MiB option name must not become a 16 MiB message).
pub fn quoted(s: &str) -> String {
    const SHOWN: usize = 64;
    if s.len() <= SHOWN {
        format!("{s:?}")
    } else {
        format!("{:?}… ({} bytes)", truncate(s, SHOWN), s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_input_is_bounded() {
        assert_eq!(quoted("gray9"), "\"gray9\"");
        let q = quoted(&"é".repeat(1 << 20));
        assert!(q.len() < 100 && q.ends_with("(2097152 bytes)"), "{q}");
    }
}
