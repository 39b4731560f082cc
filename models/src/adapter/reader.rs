//! Opening an adapter file: read it whole (adapters are megabytes at most, and a copy cannot be
//! changed underneath us the way a memory map can), validate every field, range, checksum and
//! value, then decode the factors to f32.

use std::collections::BTreeSet;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;
use crate::format::glob_match;
use crate::{Error, Result};

/// A validated adapter: its manifest, its decoded factors and its identity.
#[derive(Clone, Debug)]
pub struct AdapterFile {
    bytes: Vec<u8>,
    manifest: AdapterManifest,
    factors: Vec<LoraFactors>,
    sha256: String,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Adapter(msg.into())
}

impl AdapterFile {
    /// Reads and validates `path`; errors name the file and what is wrong with it.
    pub fn open(path: &Path) -> Result<AdapterFile> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::from_bytes(bytes).map_err(|e| match e {
            Error::Adapter(m) => Error::Adapter(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Validates an adapter held in memory (e.g. received over D-Bus).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<AdapterFile> {
        let (manifest, data_start) = parse_head(&bytes)?;
        check_fields(&manifest)?;
        let factors = check_tensors(&manifest, &bytes[data_start..])?;
        let sha256 = crate::import::hex(&Sha256::digest(&bytes));
        Ok(AdapterFile { bytes, manifest, factors, sha256 })
    }

    pub fn manifest(&self) -> &AdapterManifest {
        &self.manifest
    }

    /// Lower-case hex SHA-256 of the whole file: the adapter's identity.
    pub fn sha256_hex(&self) -> &str {
        &self.sha256
    }

    /// The factors, in the manifest's order.
    pub fn factors(&self) -> &[LoraFactors] {
        &self.factors
    }

    /// The file's bytes, exactly as validated (to install or send it elsewhere).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Checks the fixed header, decodes the manifest, and checks the file's length and the padding
/// before the data section. Returns the manifest and the data section's start.
fn parse_head(file: &[u8]) -> Result<(AdapterManifest, usize)> {
    if file.len() < HEADER_LEN {
        return Err(bad(format!("{} bytes is shorter than the {HEADER_LEN}-byte header", file.len())));
    }
    if &file[..8] != MAGIC {
        return Err(bad("wrong magic: not a MSAMLORA adapter file"));
    }
    let u32_at = |at: usize| u32::from_le_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad(format!("adapter format version {version}; this build reads version {VERSION}")));
    }
    let m_len = u32_at(12) as usize;
    let m_end = HEADER_LEN
        .checked_add(m_len)
        .filter(|&e| e <= file.len())
        .ok_or_else(|| bad(format!("manifest of {m_len} bytes runs past the end of the {}-byte file", file.len())))?;
    let m = &file[HEADER_LEN..m_end];
    if crc32fast::hash(m) != u32_at(16) {
        return Err(bad("manifest checksum mismatch (file corrupted)"));
    }
    let (manifest, rest): (AdapterManifest, &[u8]) = postcard::take_from_bytes(m).map_err(|e| bad(format!("manifest does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} stray bytes after the manifest", rest.len())));
    }
    let data_start = crate::format::align_up(m_end as u64).ok_or_else(|| bad("data start overflows"))?;
    let expected = data_start.checked_add(manifest.data_len).ok_or_else(|| bad("data length overflows"))?;
    if expected != file.len() as u64 {
        return Err(bad(format!("file is {} bytes, header and manifest say {expected}", file.len())));
    }
    let data_start = data_start as usize;
    if file[m_end..data_start].iter().any(|&b| b != 0) {
        return Err(bad("non-zero padding after the manifest"));
    }
    Ok((manifest, data_start))
}

/// A SHA-256 as this format writes it: 64 lower-case hex digits.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Whether `s` is 1..=max characters, each allowed by `ok`.
fn is_token(s: &str, max: usize, ok: impl Fn(u8) -> bool) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(ok)
}

/// Printable ASCII without spaces: names and patterns end up in logs and D-Bus replies.
fn is_printable(c: u8) -> bool {
    c.is_ascii_graphic()
}

/// The descriptive fields: identifiers well-formed, numbers in range.
fn check_fields(m: &AdapterManifest) -> Result<()> {
    let name_char = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
    if !is_token(&m.name, 64, name_char) || m.name.starts_with(['.', '-']) {
        return Err(bad(format!("name {:?} must be 1-64 of A-Z a-z 0-9 . _ - and not start with . or -", m.name)));
    }
    if !is_token(&m.modality, 32, |c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-')) {
        return Err(bad(format!("modality {:?} must be 1-32 of A-Z a-z 0-9 _ -", m.modality)));
    }
    if !is_sha256_hex(&m.base_model_sha256) {
        return Err(bad(format!("base_model_sha256 {:?} is not 64 lower-case hex digits", m.base_model_sha256)));
    }
    if !is_sha256_hex(&m.training_set_sha256) {
        return Err(bad(format!("training_set_sha256 {:?} is not 64 lower-case hex digits", m.training_set_sha256)));
    }
    if m.rank == 0 || m.rank > MAX_RANK {
        return Err(bad(format!("rank {} outside 1..={MAX_RANK}", m.rank)));
    }
    if !m.alpha.is_finite() || m.alpha <= 0.0 {
        return Err(bad(format!("alpha {} must be finite and positive", m.alpha)));
    }
    if m.targets.is_empty() || m.targets.len() > 64 || m.targets.iter().any(|t| !is_token(t, 256, is_printable)) {
        return Err(bad(format!("targets {:?} must be 1-64 patterns of 1-256 printable characters", m.targets)));
    }
    if !time::is_rfc3339_utc(&m.created) {
        return Err(bad(format!("created {:?} is not an RFC 3339 UTC timestamp (YYYY-MM-DDTHH:MM:SSZ)", m.created)));
    }
    if let Some(d) = m.val_dice.filter(|d| !(0.0..=1.0).contains(d)) {
        return Err(bad(format!("val_dice {d} outside [0, 1]")));
    }
    if !is_token(&m.trainer_version, 64, |c| c == b' ' || is_printable(c)) {
        return Err(bad(format!("trainer_version {:?} must be 1-64 printable characters", m.trainer_version)));
    }
    Ok(())
}

/// The tensor table against the data section: names unique and targeted, shapes in range, every
/// range sized for the rank, aligned, in bounds and disjoint, padding zero, CRCs right, values
/// finite. Returns the decoded factors.
fn check_tensors(m: &AdapterManifest, data: &[u8]) -> Result<Vec<LoraFactors>> {
    if m.tensors.is_empty() || m.tensors.len() > MAX_TENSORS {
        return Err(bad(format!("{} tensors; an adapter holds 1..={MAX_TENSORS}", m.tensors.len())));
    }
    let rank = u64::from(m.rank);
    let mut names = BTreeSet::new();
    let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(2 * m.tensors.len());
    let mut factors = Vec::with_capacity(m.tensors.len());
    for (i, t) in m.tensors.iter().enumerate() {
        if !is_token(&t.name, 256, is_printable) {
            return Err(bad(format!("tensor {i}: name {:?} must be 1-256 printable characters", t.name)));
        }
        if !names.insert(t.name.as_str()) {
            return Err(bad(format!("tensor {} listed twice", t.name)));
        }
        if !m.targets.iter().any(|p| glob_match(p, &t.name)) {
            return Err(bad(format!("tensor {} matches none of the targets {:?}", t.name, m.targets)));
        }
        for (what, v) in [("in_features", t.in_features), ("out_features", t.out_features)] {
            if v == 0 || v > MAX_FEATURES {
                return Err(bad(format!("tensor {}: {what} {v} outside 1..={MAX_FEATURES}", t.name)));
            }
        }
        // Bounded above, so these products cannot overflow.
        let want = [("A", t.a, 4 * rank * t.in_features), ("B", t.b, 4 * t.out_features * rank)];
        let mut crc = crc32fast::Hasher::new();
        for (what, r, len) in want {
            if r.len != len {
                return Err(bad(format!("tensor {}: {what} has {} bytes, rank {rank} needs {len}", t.name, r.len)));
            }
            if r.offset % ALIGN as u64 != 0 {
                return Err(bad(format!("tensor {}: {what} at {} is not {ALIGN}-byte aligned", t.name, r.offset)));
            }
            let end = r.offset.checked_add(r.len).filter(|&e| e <= data.len() as u64);
            let end = end.ok_or_else(|| bad(format!("tensor {}: {what} at {}+{} outside the {}-byte data section", t.name, r.offset, r.len, data.len())))?;
            crc.update(&data[r.offset as usize..end as usize]);
            spans.push((r.offset, end, i));
        }
        if crc.finalize() != t.crc32 {
            return Err(bad(format!("tensor {}: checksum mismatch (file corrupted)", t.name)));
        }
        let decode = |what: &str, r: &ByteRange| -> Result<Vec<f32>> {
            let bytes = &data[r.offset as usize..(r.offset + r.len) as usize];
            let values: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            match values.iter().position(|v| !v.is_finite()) {
                Some(j) => Err(bad(format!("tensor {}: {what} holds a non-finite value ({}) at element {j}", t.name, values[j]))),
                None => Ok(values),
            }
        };
        factors.push(LoraFactors {
            name: t.name.clone(),
            in_features: t.in_features as usize,
            out_features: t.out_features as usize,
            a: decode("A", &t.a)?,
            b: decode("B", &t.b)?,
        });
    }
    spans.sort_unstable();
    let mut cursor = 0u64;
    for &(start, end, i) in &spans {
        if start < cursor {
            return Err(bad(format!("tensor {}: factor at {start} overlaps the previous one", m.tensors[i].name)));
        }
        if data[cursor as usize..start as usize].iter().any(|&b| b != 0) {
            return Err(bad(format!("non-zero padding before tensor {}", m.tensors[i].name)));
        }
        cursor = end;
    }
    if data[cursor as usize..].iter().any(|&b| b != 0) {
        return Err(bad("non-zero bytes after the last factor"));
    }
    Ok(factors)
}
