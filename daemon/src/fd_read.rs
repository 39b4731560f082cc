//! Reading a client's file descriptor without trusting it: `InstallAdapter` takes "an adapter file
//! as an fd", and the fd may be a regular file, a memfd, a pipe or a socket, positioned anywhere,
//! with a writer that never closes.
//!
//! - Files and memfds (`S_IFREG`) are read with `pread` from offset 0: the result does not depend
//!   on where the sender left the file offset (a memfd filled with `write()` and not rewound is
//!   read whole), and a size above the limit is refused from `fstat` before a byte is read.
//! - Anything else is a stream: read with `poll` against a deadline, at most `limit + 1` bytes. A
//!   writer that stalls or never closes gets a clear error when the deadline passes.
//!
//! The caller runs this off the bus thread (see `service::install_adapter`): even a bounded wait
//! must not hold up other clients' calls.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Why a read failed, in words for the client.
pub type ReadError = String;

/// Reads the whole content of `fd`: at most `limit` bytes, within `deadline` for streams.
pub fn read_all_bounded(fd: OwnedFd, limit: u64, deadline: Duration) -> Result<Vec<u8>, ReadError> {
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| format!("cannot stat the fd: {e}"))?;
    let kind = meta.file_type();
    if kind.is_file() {
        return pread_whole(&file, meta.len(), limit);
    }
    if kind.is_dir() {
        return Err("the fd is a directory, not an adapter file".into());
    }
    if kind.is_block_device() {
        return Err("the fd is a block device, not an adapter file".into());
    }
    read_stream(file, limit, deadline)
}

fn pread_whole(file: &File, len: u64, limit: u64) -> Result<Vec<u8>, ReadError> {
    if len > limit {
        return Err(format!("the file holds {len} bytes; adapters are at most {limit} bytes"));
    }
    let mut bytes = vec![0u8; len as usize];
    let mut done = 0usize;
    while done < bytes.len() {
        match file.read_at(&mut bytes[done..], done as u64) {
            // Shorter than fstat said (a file truncated meanwhile): what was read is the file.
            Ok(0) => {
                bytes.truncate(done);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the file at offset {done}: {e}")),
        }
    }
    Ok(bytes)
}

fn read_stream(mut file: File, limit: u64, deadline: Duration) -> Result<Vec<u8>, ReadError> {
    let until = Instant::now() + deadline;
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the stream sent {} bytes and did not reach its end within {} s (a writer that stays open?); \
                 pass a file or memfd instead",
                bytes.len(),
                deadline.as_secs()
            ));
        }
        let timeout = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waiting for the stream: {e}")),
        }
        // POLLIN or POLLHUP: a read now returns data, 0 at the end, or an error; it does not block
        // on a pipe or socket.
        match file.read(&mut chunk) {
            Ok(0) => return Ok(bytes),
            Ok(n) => {
                if bytes.len() as u64 + n as u64 > limit {
                    return Err(format!("the stream holds more than {limit} bytes; adapters are at most {limit} bytes"));
                }
                bytes.extend_from_slice(&chunk[..n]);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {}
            Err(e) => return Err(format!("reading the stream: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::net::UnixStream;

    fn memfd_with(bytes: &[u8]) -> File {
        let fd = nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let mut f = File::from(fd);
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn a_memfd_is_read_from_offset_zero_whatever_its_position() {
        // Written with write() and not rewound: the offset is at the end.
        let f = memfd_with(b"adapter bytes");
        let got = read_all_bounded(OwnedFd::from(f), 1 << 20, Duration::from_secs(1)).unwrap();
        assert_eq!(got, b"adapter bytes");
        let mut f = memfd_with(b"0123456789");
        f.seek(SeekFrom::Start(4)).unwrap();
        assert_eq!(read_all_bounded(OwnedFd::from(f), 1 << 20, Duration::from_secs(1)).unwrap(), b"0123456789");
    }

    #[test]
    fn files_over_the_limit_are_refused_before_reading() {
        let f = memfd_with(&[7u8; 100]);
        let e = read_all_bounded(OwnedFd::from(f), 99, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("100 bytes") && e.contains("at most 99"), "{e}");
    }

    #[test]
    fn a_stream_whose_writer_stays_open_fails_at_the_deadline() {
        let (mut writer, reader) = UnixStream::pair().unwrap();
        writer.write_all(b"partial").unwrap();
        let t0 = Instant::now();
        let e = read_all_bounded(OwnedFd::from(reader), 1 << 20, Duration::from_millis(300)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
        assert!(e.contains("7 bytes") && e.contains("did not reach its end"), "{e}");
        drop(writer);
    }

    #[test]
    fn a_closed_stream_is_read_whole_and_a_long_one_refused() {
        let (mut writer, reader) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            writer.write_all(&[1u8; 200_000]).unwrap();
        });
        let got = read_all_bounded(OwnedFd::from(reader), 1 << 20, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert_eq!(got.len(), 200_000);

        let (mut writer, reader) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let _ = writer.write_all(&[1u8; 200_000]);
        });
        let e = read_all_bounded(OwnedFd::from(reader), 100_000, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("more than 100000"), "{e}");
        t.join().unwrap();
    }
}
