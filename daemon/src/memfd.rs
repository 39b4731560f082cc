//! Sealed memfds: the only way pixels cross the bus.
//!
//! A client's frame arrives as a memfd sealed with `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW`:
//! once those seals are on, nobody (the client included) can change or truncate the bytes, so the
//! daemon may map and read them without copying and without fearing `SIGBUS` from a shrinking
//! file or a frame changing under the encoder. Masks go back the same way, sealed by the daemon.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use memmap2::{Mmap, MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::error::{Error, Result};

/// The seals a frame memfd must carry.
pub fn required_frame_seals() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW
}

/// The seals on `fd`, or why it cannot be a sealed memfd.
pub fn seals(fd: impl AsFd) -> Result<SealFlag> {
    match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => Ok(SealFlag::from_bits_truncate(bits)),
        // EINVAL: the kernel only keeps seals on memfds (shmem); anything else is not one.
        Err(Errno::EINVAL) => Err(Error::InvalidFrame("frame fd is not a memfd (F_GET_SEALS refused)".into())),
        Err(e) => Err(Error::InvalidFrame(format!("cannot read the frame fd's seals: {e}"))),
    }
}

/// Size in bytes of the file behind `fd`.
pub fn size(fd: impl AsFd) -> Result<u64> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| Error::InvalidFrame(format!("fstat on the frame fd failed: {e}")))?;
    Ok(st.st_size as u64)
}

/// Checks that `fd` is a memfd sealed against writing and resizing and holding at least
/// `min_len` bytes, then maps its first `min_len` bytes read-only.
pub fn map_sealed_frame(fd: &OwnedFd, min_len: usize) -> Result<Mmap> {
    let have = seals(fd)?;
    let need = required_frame_seals();
    if !have.contains(need) {
        return Err(Error::InvalidFrame(format!(
            "frame memfd must be sealed with F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW; missing {:?}",
            need - have
        )));
    }
    let len = size(fd)?;
    if len < min_len as u64 {
        return Err(Error::InvalidFrame(format!("frame memfd holds {len} bytes; the layout needs {min_len}")));
    }
    if min_len == 0 {
        return Err(Error::InvalidFrame("empty frame".into()));
    }
    // SAFETY: the seals checked above make the mapped bytes immutable and the file unshrinkable
    // for as long as the mapping lives, which is what `Mmap`'s contract asks of the caller.
    unsafe { MmapOptions::new().len(min_len).map(fd) }
        .map_err(|e| Error::InvalidFrame(format!("cannot map the frame memfd: {e}")))
}

fn create(name: &str, len: usize) -> Result<File> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| Error::Internal(format!("memfd_create: {e}")))?;
    let file = File::from(fd);
    file.set_len(len as u64).map_err(|e| Error::Internal(format!("sizing a memfd to {len} bytes: {e}")))?;
    Ok(file)
}

fn add_seals(fd: impl AsFd, seals: SealFlag) -> Result<()> {
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals)).map(|_| ()).map_err(|e| Error::Internal(format!("sealing a memfd: {e}")))
}

/// A new memfd of `len` bytes filled by `fill`, then sealed against any change
/// (`WRITE | SHRINK | GROW | SEAL`): what the client receives cannot be altered by anyone.
pub fn sealed_with(name: &str, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<OwnedFd> {
    let file = create(name, len)?;
    if len > 0 {
        // SAFETY: the memfd was created just now and no one else holds it yet.
        let mut map = unsafe { MmapOptions::new().len(len).map_mut(&file) }
            .map_err(|e| Error::Internal(format!("mapping a new memfd: {e}")))?;
        fill(&mut map[..]);
        // F_SEAL_WRITE fails with EBUSY while a writable shared mapping exists: unmap first.
        drop(map);
    }
    add_seals(&file, required_frame_seals() | SealFlag::F_SEAL_SEAL)?;
    Ok(OwnedFd::from(file))
}

/// A shared, writable memfd of `len` bytes for a streaming ring. It is sealed against
/// resizing only (`SHRINK | GROW | SEAL`): the client must keep write access to fill frame
/// slots, but can never truncate the file under the daemon's mapping (no `SIGBUS`).
pub fn ring(name: &str, len: usize) -> Result<(OwnedFd, MmapRaw)> {
    let file = create(name, len)?;
    let map = MmapOptions::new().len(len).map_raw(&file).map_err(|e| Error::Internal(format!("mapping a ring memfd: {e}")))?;
    add_seals(&file, SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL)?;
    Ok((OwnedFd::from(file), map))
}

/// A memfd filled with `bytes` and sealed the way a frame must be; what clients (minisamctl,
/// tests, benches) send to `Segment`.
pub fn sealed_frame_from(bytes: &[u8]) -> Result<OwnedFd> {
    sealed_with("minisam-frame", bytes.len(), |dst| dst.copy_from_slice(bytes))
}

/// Reads the whole content of a (sealed) memfd, e.g. a returned mask.
pub fn read_all(fd: &OwnedFd) -> Result<Vec<u8>> {
    let len = size(fd)? as usize;
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: read-only view of a memfd; callers use it for daemon-sealed masks.
    let map = unsafe { MmapOptions::new().len(len).map(fd) }.map_err(|e| Error::Internal(format!("mapping a memfd: {e}")))?;
    Ok(map.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sealed_memfd_round_trips_and_cannot_be_written() {
        let fd = sealed_frame_from(&[1, 2, 3, 4]).unwrap();
        let map = map_sealed_frame(&fd, 4).unwrap();
        assert_eq!(&map[..], &[1, 2, 3, 4]);
        let mut f = File::from(fd.try_clone().unwrap());
        assert!(f.write_all(&[9]).is_err(), "F_SEAL_WRITE must refuse writes");
        assert!(f.set_len(2).is_err(), "F_SEAL_SHRINK must refuse truncation");
    }

    #[test]
    fn unsealed_short_and_non_memfds_are_refused() {
        let f = create("t", 16).unwrap();
        let fd = OwnedFd::from(f);
        assert!(matches!(map_sealed_frame(&fd, 16), Err(Error::InvalidFrame(m)) if m.contains("missing")));
        let sealed = sealed_frame_from(&[0; 8]).unwrap();
        assert!(matches!(map_sealed_frame(&sealed, 9), Err(Error::InvalidFrame(m)) if m.contains("holds 8")));
        let tmp = std::env::temp_dir().join(format!("minisamd-memfd-test-{}", std::process::id()));
        std::fs::write(&tmp, [0u8; 8]).unwrap();
        let plain = OwnedFd::from(File::open(&tmp).unwrap());
        std::fs::remove_file(&tmp).ok();
        // A file on disk is refused as "not a memfd"; one on tmpfs reports only F_SEAL_SEAL and
        // is refused for its missing seals: either way it never gets mapped.
        assert!(matches!(map_sealed_frame(&plain, 8), Err(Error::InvalidFrame(_))));
    }

    #[test]
    fn ring_cannot_be_resized_but_stays_writable() {
        let (fd, map) = ring("r", 64).unwrap();
        let mut f = File::from(fd);
        assert!(f.set_len(8).is_err());
        f.write_all(&[7]).unwrap();
        // SAFETY: the test holds the only references to the mapping.
        assert_eq!(unsafe { *map.as_ptr() }, 7);
    }
}
