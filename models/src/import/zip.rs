//! Reading the zip container of PyTorch checkpoints, through the `zip` crate.
//!
//! `torch.save` (≥ 1.6) writes an uncompressed ("stored") zip whose entries are the pickle and
//! one raw byte blob per storage. The archive structure (end record, ZIP64, central directory,
//! local headers) is untrusted input, so it is parsed by the maintained, fuzzed `zip` crate
//! rather than by our own code. Stored entries are handed out as borrowed slices of the
//! caller's (memory-mapped) buffer, so a multi-GB ViT-H checkpoint is never copied whole;
//! deflated entries (a checkpoint re-zipped by hand) are inflated, with their CRC checked.
//!
//! The writer below stays ours: it only emits trusted data, and it reproduces torch's 64-byte
//! data alignment ("FB" padding field), which PyTorch's `mmap=True` loading relies on.

use std::borrow::Cow;
use std::collections::BTreeMap;
#[cfg(feature = "checkpoint-import")]
use std::io::{Cursor, Read};

#[cfg(feature = "checkpoint-import")]
use ::zip::{CompressionMethod, ZipArchive};

use crate::{Error, Result};

const EOCD_SIG: u32 = 0x0605_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// Entry data is aligned like torch's writer does, so a reader may map it in place.
const DATA_ALIGN: usize = 64;

#[cfg(feature = "checkpoint-import")]
fn bad(msg: impl Into<String>) -> Error {
    Error::Import(format!("zip: {}", msg.into()))
}

/// Name → contents of every file entry: a slice of `bytes` for stored entries, an owned buffer
/// for deflated ones. Any structural damage (truncation, offsets or sizes past the end, a bad
/// CRC in a deflated entry, encryption, an unsupported compression method) is an error.
#[cfg(feature = "checkpoint-import")]
pub fn entries(bytes: &[u8]) -> Result<BTreeMap<String, Cow<'_, [u8]>>> {
    let mut archive = ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| bad(format!("{e} (not a zip, or truncated: re-download or re-save the checkpoint)")))?;
    let mut out = BTreeMap::new();
    for i in 0..archive.len() {
        let (name, method, encrypted, start, size, comp_size) = {
            let f = archive.by_index_raw(i).map_err(|e| bad(format!("entry {i}: {e}")))?;
            let start = f.data_start().ok_or_else(|| bad(format!("entry {}: no local header", f.name())))?;
            (f.name().to_string(), f.compression(), f.encrypted(), start, f.size(), f.compressed_size())
        };
        if name.ends_with('/') {
            continue;
        }
        if encrypted {
            return Err(bad(format!("entry {name} is encrypted; torch.save never encrypts")));
        }
        // Bounds of the raw data, checked here because stored data is sliced without copying.
        let range = usize::try_from(start)
            .ok()
            .zip(usize::try_from(comp_size).ok())
            .and_then(|(s, n)| Some(s..s.checked_add(n)?))
            .filter(|r| r.end <= bytes.len())
            .ok_or_else(|| bad(format!("entry {name}: data at {start}+{comp_size} past the end of a {}-byte file", bytes.len())))?;
        let data = match method {
            CompressionMethod::Stored if comp_size == size => Cow::Borrowed(&bytes[range]),
            CompressionMethod::Stored => return Err(bad(format!("entry {name}: stored entry with two different sizes"))),
            CompressionMethod::Deflated => {
                let mut f = archive.by_index(i).map_err(|e| bad(format!("entry {name}: {e}")))?;
                // The declared size bounds the allocation; reading past it is caught below.
                let mut v = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 30));
                f.read_to_end(&mut v).map_err(|e| bad(format!("entry {name}: {e}")))?;
                if v.len() as u64 != size {
                    return Err(bad(format!("entry {name}: inflated to {} bytes, {size} declared", v.len())));
                }
                Cow::Owned(v)
            }
            other => return Err(bad(format!("entry {name} uses compression {other}; torch.save writes stored entries (deflate is also read)"))),
        };
        out.insert(name, data);
    }
    Ok(out)
}

/// Without the `checkpoint-import` feature no archive is parsed.
#[cfg(not(feature = "checkpoint-import"))]
pub fn entries(_bytes: &[u8]) -> Result<BTreeMap<String, Cow<'_, [u8]>>> {
    Err(Error::Import("this build reads packed models only (minisam-models without its `checkpoint-import` feature); pack the checkpoint with `minisam pack CKPT -o FILE.msam`".into()))
}

/// Builds a stored zip in memory, data of each entry 64-byte aligned (as torch's writer does).
#[derive(Default)]
pub struct ZipWriter {
    out: Vec<u8>,
    central: Vec<u8>,
    count: u16,
}

impl ZipWriter {
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<()> {
        if self.count == u16::MAX - 1 || self.out.len() > u32::MAX as usize / 2 || data.len() > u32::MAX as usize / 2 {
            return Err(Error::Import("zip writer: archive too large (no ZIP64 support)".into()));
        }
        let offset = self.out.len();
        let crc = crc32fast::hash(data);
        let unpadded = offset + 30 + name.len() + 4;
        let pad = (DATA_ALIGN - unpadded % DATA_ALIGN) % DATA_ALIGN;
        let extra_len = 4 + pad;
        let o = &mut self.out;
        o.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        o.extend_from_slice(&20u16.to_le_bytes()); // version needed
        o.extend_from_slice(&0u16.to_le_bytes()); // flags
        o.extend_from_slice(&0u16.to_le_bytes()); // method: stored
        o.extend_from_slice(&0u32.to_le_bytes()); // mod time + date
        o.extend_from_slice(&crc.to_le_bytes());
        o.extend_from_slice(&(data.len() as u32).to_le_bytes());
        o.extend_from_slice(&(data.len() as u32).to_le_bytes());
        o.extend_from_slice(&(name.len() as u16).to_le_bytes());
        o.extend_from_slice(&(extra_len as u16).to_le_bytes());
        o.extend_from_slice(name.as_bytes());
        // Padding extra field with torch's id "FB".
        o.extend_from_slice(b"FB");
        o.extend_from_slice(&(pad as u16).to_le_bytes());
        o.resize(o.len() + pad, b'Z');
        o.extend_from_slice(data);

        let c = &mut self.central;
        c.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        c.extend_from_slice(&20u16.to_le_bytes()); // version made by
        c.extend_from_slice(&20u16.to_le_bytes()); // version needed
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&crc.to_le_bytes());
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(&(name.len() as u16).to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes()); // extra
        c.extend_from_slice(&0u16.to_le_bytes()); // comment
        c.extend_from_slice(&0u16.to_le_bytes()); // disk
        c.extend_from_slice(&0u16.to_le_bytes()); // internal attrs
        c.extend_from_slice(&0u32.to_le_bytes()); // external attrs
        c.extend_from_slice(&(offset as u32).to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.count += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Vec<u8> {
        let cd_offset = self.out.len() as u32;
        let cd_size = self.central.len() as u32;
        self.out.extend_from_slice(&self.central);
        let o = &mut self.out;
        o.extend_from_slice(&EOCD_SIG.to_le_bytes());
        o.extend_from_slice(&0u16.to_le_bytes());
        o.extend_from_slice(&0u16.to_le_bytes());
        o.extend_from_slice(&self.count.to_le_bytes());
        o.extend_from_slice(&self.count.to_le_bytes());
        o.extend_from_slice(&cd_size.to_le_bytes());
        o.extend_from_slice(&cd_offset.to_le_bytes());
        o.extend_from_slice(&0u16.to_le_bytes());
        self.out
    }
}

#[cfg(all(test, feature = "checkpoint-import"))]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = ZipWriter::default();
        w.add("a/data.pkl", b"hello").unwrap();
        w.add("a/data/0", &[7u8; 100]).unwrap();
        w.finish()
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn offset_in(whole: &[u8], part: &[u8]) -> usize {
        part.as_ptr() as usize - whole.as_ptr() as usize
    }

    #[test]
    fn round_trip_and_alignment() {
        let z = sample();
        let e = entries(&z).unwrap();
        assert_eq!(&e["a/data.pkl"][..], b"hello");
        assert!(matches!(e["a/data/0"], Cow::Borrowed(_)), "stored entries are not copied");
        assert_eq!(offset_in(&z, &e["a/data/0"]) % DATA_ALIGN, 0);
        assert_eq!(&e["a/data/0"][..], &[7u8; 100][..]);
    }

    #[test]
    fn truncated_archives_are_errors() {
        let z = sample();
        for cut in 0..z.len() {
            assert!(entries(&z[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn hostile_offsets_are_errors() {
        let z0 = sample();
        let eocd = z0.len() - 22;
        assert_eq!(u32_at(&z0, eocd), EOCD_SIG);
        let cd = u32_at(&z0, eocd + 16) as usize;
        // Local header offset of the first entry far past the end.
        let mut z = z0.clone();
        z[cd + 42..cd + 46].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(entries(&z).is_err());
        // Sizes far past the end.
        let mut z = z0.clone();
        z[cd + 24..cd + 28].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        z[cd + 20..cd + 24].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        assert!(entries(&z).is_err());
        // An unsupported compression method (bzip2 = 12).
        let mut z = z0.clone();
        z[cd + 10..cd + 12].copy_from_slice(&12u16.to_le_bytes());
        assert!(entries(&z).is_err());
    }
}
