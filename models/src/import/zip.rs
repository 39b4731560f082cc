//! The smallest zip reader/writer a PyTorch checkpoint needs.
//!
//! `torch.save` (≥ 1.6) writes an uncompressed ("stored") zip whose entries are the pickle and
//! one raw byte blob per storage. We only locate entries through the central directory and
//! hand out byte ranges into the caller's buffer: no decompression, no ZIP64 (files ≥ 4 GiB are
//! refused with a clear error), and every offset read from the file is bounds-checked.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::{Error, Result};

const EOCD_SIG: u32 = 0x0605_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// Entry data is aligned like torch's writer does, so a reader may map it in place.
const DATA_ALIGN: usize = 64;

fn bad(msg: impl Into<String>) -> Error {
    Error::Import(format!("zip: {}", msg.into()))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    let s = at.checked_add(2).and_then(|end| b.get(at..end)).ok_or_else(|| bad(format!("truncated at byte {at}")))?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    let s = at.checked_add(4).and_then(|end| b.get(at..end)).ok_or_else(|| bad(format!("truncated at byte {at}")))?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Name → byte range of the entry's (stored) data inside `bytes`.
pub fn entries(bytes: &[u8]) -> Result<BTreeMap<String, Range<usize>>> {
    let eocd = find_eocd(bytes)?;
    let count = u16_at(bytes, eocd + 10)? as usize;
    let cd_size = u32_at(bytes, eocd + 12)?;
    let cd_offset = u32_at(bytes, eocd + 16)?;
    if count == 0xffff || cd_size == u32::MAX || cd_offset == u32::MAX {
        return Err(bad("ZIP64 archives (checkpoints of 4 GiB or more) are not supported"));
    }
    let mut at = cd_offset as usize;
    let mut out = BTreeMap::new();
    for _ in 0..count {
        if u32_at(bytes, at)? != CENTRAL_SIG {
            return Err(bad(format!("no central directory entry at byte {at}")));
        }
        let method = u16_at(bytes, at + 10)?;
        let comp_size = u32_at(bytes, at + 20)? as usize;
        let size = u32_at(bytes, at + 24)? as usize;
        let name_len = u16_at(bytes, at + 28)? as usize;
        let extra_len = u16_at(bytes, at + 30)? as usize;
        let comment_len = u16_at(bytes, at + 32)? as usize;
        let local = u32_at(bytes, at + 42)? as usize;
        let name_start = at + 46;
        let name_bytes = name_start
            .checked_add(name_len)
            .and_then(|end| bytes.get(name_start..end))
            .ok_or_else(|| bad("entry name past the end of the file"))?;
        let name = String::from_utf8(name_bytes.to_vec()).map_err(|_| bad("entry name is not UTF-8"))?;
        if method != 0 || comp_size != size {
            return Err(bad(format!("entry {name} is compressed (method {method}); torch.save writes stored entries")));
        }
        let data = local_data(bytes, local, size).map_err(|e| bad(format!("entry {name}: {e}")))?;
        out.insert(name, data);
        at = name_start + name_len + extra_len + comment_len;
    }
    Ok(out)
}

fn find_eocd(bytes: &[u8]) -> Result<usize> {
    if bytes.len() < 22 {
        return Err(bad("file too short for a zip archive"));
    }
    // The end record is 22 bytes plus a comment of at most 65535 bytes.
    let lowest = bytes.len().saturating_sub(22 + 0xffff);
    let mut at = bytes.len() - 22;
    loop {
        if u32_at(bytes, at)? == EOCD_SIG {
            return Ok(at);
        }
        if at == lowest {
            return Err(bad("no end-of-central-directory record (not a zip, or truncated)"));
        }
        at -= 1;
    }
}

fn local_data(bytes: &[u8], local: usize, size: usize) -> std::result::Result<Range<usize>, String> {
    let e = |_| "local header truncated".to_string();
    if u32_at(bytes, local).map_err(e)? != LOCAL_SIG {
        return Err(format!("no local header at byte {local}"));
    }
    let name_len = u16_at(bytes, local + 26).map_err(e)? as usize;
    let extra_len = u16_at(bytes, local + 28).map_err(e)? as usize;
    let start = local + 30 + name_len + extra_len;
    let end = start.checked_add(size).ok_or("size overflows")?;
    if end > bytes.len() {
        return Err(format!("data {start}..{end} past the end of a {}-byte file", bytes.len()));
    }
    Ok(start..end)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = ZipWriter::default();
        w.add("a/data.pkl", b"hello").unwrap();
        w.add("a/data/0", &[7u8; 100]).unwrap();
        w.finish()
    }

    #[test]
    fn round_trip_and_alignment() {
        let z = sample();
        let e = entries(&z).unwrap();
        assert_eq!(&z[e["a/data.pkl"].clone()], b"hello");
        assert_eq!(e["a/data/0"].start % DATA_ALIGN, 0);
        assert_eq!(&z[e["a/data/0"].clone()], &[7u8; 100][..]);
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
        let mut z = sample();
        let eocd = find_eocd(&z).unwrap();
        let cd = u32_at(&z, eocd + 16).unwrap() as usize;
        // Local header offset of the first entry far past the end.
        z[cd + 42..cd + 46].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(entries(&z).is_err());
        let mut z = sample();
        z[cd + 24..cd + 28].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        z[cd + 20..cd + 24].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        assert!(entries(&z).is_err());
    }
}
