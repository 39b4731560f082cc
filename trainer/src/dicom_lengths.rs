//! A bounds pass over a DICOM file before dicom-rs parses it: every element's declared value
//! length must fit in the bytes that follow it.
//!
//! Why: dicom-object reserves and zero-fills a value's declared length *before* reading it
//! (`try_reserve_exact(len)` + `resize(len, 0)`, in both the file meta group and the data set), so
//! a 210-byte file that declares a 3 GiB string makes it touch 3 GiB and spend seconds before the
//! read fails (found by `benches/fuzz`, target `dicom_reader`; the input is
//! `benches/fuzz/regressions/dicom_reader/meta_length_3gib`). A complete file never declares more
//! than it holds, so refusing such a length refuses only damaged or hostile files, and bounds what
//! dicom-rs can allocate per value by the file's own size.
//!
//! The pass walks headers with dicom-rs's own decoders (the file-meta header decoder, then the
//! lazy data set reader for the file's transfer syntax, which skips values without reading them
//! into memory), so it sees the same structure the real parse will. A deflated data set is
//! inflated first, up to [`MAX_INFLATED`], and its lengths are checked against the inflated size.

use std::io::{Cursor, Read};

use anyhow::{anyhow, bail, Result};
use dicom_encoding::decode::{file_header_decoder, Decode};
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_parser::dataset::lazy_read::LazyDataSetReader;
use dicom_parser::dataset::LazyDataToken;
use dicom_parser::StatefulDecode;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Largest inflated data set of a deflated file we read (a deflated DICOM file holds a few
/// frames of images at most; this is far above any the engine can use).
pub const MAX_INFLATED: u64 = 1 << 30;

/// Checks `bytes` (a whole file: 128-byte preamble, `DICM`, meta group, data set). Returns the
/// first element whose declared length runs past the end of its stream, as an error that names
/// its tag, its declared length and what was left.
pub fn check(bytes: &[u8]) -> Result<()> {
    let Some(after_magic) = bytes.get(132..) else {
        bail!("not a DICOM file (shorter than its 132-byte preamble)");
    };
    let (ts_uid, meta_len) = check_meta(after_magic)?;
    let data_set = &after_magic[meta_len..];
    let Some(ts) = TransferSyntaxRegistry.get(&ts_uid) else {
        // dicom-object refuses an unknown transfer syntax before reading the data set.
        return Ok(());
    };
    match ts.codec() {
        Codec::Dataset(Some(adapter)) => {
            let mut inflated = Vec::new();
            adapter
                .adapt_reader(Box::new(data_set))
                .take(MAX_INFLATED + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| anyhow!("the deflated data set does not inflate ({e})"))?;
            if inflated.len() as u64 > MAX_INFLATED {
                bail!("the deflated data set inflates past {} MiB", MAX_INFLATED >> 20);
            }
            check_data_set(&inflated, ts)
        }
        // Nothing dicom-object can parse: it refuses the file itself.
        Codec::Dataset(None) => Ok(()),
        _ => check_data_set(data_set, ts),
    }
}

/// The file meta group exactly as dicom-object reads it: (0002,0000) with a 4-byte group length,
/// then elements until that many bytes are consumed. Returns the transfer syntax UID and the
/// group's length in bytes, header included.
fn check_meta(after_magic: &[u8]) -> Result<(String, usize)> {
    let decoder = file_header_decoder();
    let mut cursor = Cursor::new(after_magic);
    let bad = |e: &dyn std::fmt::Display| anyhow!("not a readable DICOM file meta group ({e})");
    let (first, _) = decoder.decode_header(&mut cursor).map_err(|e| bad(&e))?;
    if first.len.get() != Some(4) {
        // dicom-object refuses this itself, without allocating.
        return Ok((String::new(), after_magic.len()));
    }
    let mut group_length = [0u8; 4];
    cursor.read_exact(&mut group_length).map_err(|e| bad(&e))?;
    let group_length = u32::from_le_bytes(group_length);
    let mut consumed: u32 = 0;
    let mut ts_uid = String::new();
    while consumed < group_length {
        let (header, header_len) = decoder.decode_header(&mut cursor).map_err(|e| bad(&e))?;
        let Some(len) = header.len.get() else {
            return Ok((ts_uid, after_magic.len())); // undefined length: refused by dicom-object
        };
        let at = cursor.position() as usize;
        let left = after_magic.len() - at;
        if len as usize > left {
            bail!(
                "file meta element {} declares {len} bytes but only {left} follow: the file is damaged",
                header.tag
            );
        }
        if header.tag == dicom_dictionary_std::tags::TRANSFER_SYNTAX_UID {
            ts_uid = String::from_utf8_lossy(&after_magic[at..at + len as usize])
                .trim_end_matches(['\0', ' '])
                .to_string();
        }
        cursor.set_position((at + len as usize) as u64);
        consumed = consumed.saturating_add(header_len as u32).saturating_add(len);
    }
    Ok((ts_uid, cursor.position() as usize))
}

/// Every element and item of the data set, nested sequences included, against the stream's end.
fn check_data_set(data_set: &[u8], ts: &dicom_encoding::TransferSyntax) -> Result<()> {
    let end = data_set.len() as u64;
    let mut reader = LazyDataSetReader::new_with_ts(Cursor::new(data_set), ts)
        .map_err(|e| anyhow!("not a readable DICOM data set ({e})"))?;
    while let Some(token) = reader.advance() {
        let token = token.map_err(|e| anyhow!("not a readable DICOM data set ({e})"))?;
        let (what, len, decoder) = match token {
            LazyDataToken::LazyValue { header, decoder } => {
                let unit = binary_unit(header.vr);
                if header.len.is_defined() && header.len.0 % unit != 0 {
                    bail!(
                        "data set element {} ({}) declares {} bytes, not a whole number of its {unit}-byte values: the file is damaged",
                        header.tag,
                        header.vr,
                        header.len.0
                    );
                }
                (format!("element {}", header.tag), header.len.0, decoder)
            }
            LazyDataToken::LazyItemValue { len, decoder } => ("pixel data fragment".to_string(), len, decoder),
            _ => continue,
        };
        let left = end.saturating_sub(decoder.position());
        if u64::from(len) > left {
            bail!("data set {what} declares {len} bytes but only {left} follow: the file is damaged");
        }
        decoder
            .skip_bytes(len)
            .map_err(|e| anyhow!("not a readable DICOM data set ({e})"))?;
    }
    Ok(())
}

/// Bytes per value of a binary VR (1 for the rest). dicom-parser reads `len / unit` values of
/// such an element, so a length that is not a multiple leaves the last `len % unit` bytes unread
/// and the next header is decoded from inside this value: the real parse then walks a different
/// structure from the one this pass checked (fuzz finding `ul_length_not_multiple_of_4`: a UL of
/// 122 bytes, after which dicom-object met a 4 GiB length this pass never saw). PS3.5 requires
/// these lengths to be multiples, so only damaged files are refused.
fn binary_unit(vr: dicom_core::VR) -> u32 {
    use dicom_core::VR;
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::FL | VR::AT | VR::OL | VR::OF => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Preamble, magic, and a file meta group naming explicit VR little endian.
    fn head() -> Vec<u8> {
        let ts = b"1.2.840.10008.1.2.1\0";
        let mut elem = Vec::new();
        elem.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        elem.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        elem.extend_from_slice(ts);
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        f.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        f.extend_from_slice(&(elem.len() as u32).to_le_bytes());
        f.extend_from_slice(&elem);
        f
    }

    /// An explicit VR OB element with a 4-byte length.
    fn ob(group: u16, element: u16, declared: u32, value: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&group.to_le_bytes());
        e.extend_from_slice(&element.to_le_bytes());
        e.extend_from_slice(b"OB\0\0");
        e.extend_from_slice(&declared.to_le_bytes());
        e.extend_from_slice(value);
        e
    }

    #[test]
    fn fuzz_finding_with_a_3_gib_meta_string_is_refused_before_dicom_rs_allocates() {
        let bytes = include_bytes!("../../benches/fuzz/regressions/dicom_reader/meta_length_3gib");
        let err = check(bytes).unwrap_err().to_string();
        assert!(err.contains("declares") && err.contains("damaged"), "{err}");
    }

    #[test]
    fn a_data_set_value_longer_than_the_file_is_refused_naming_the_element() {
        let mut f = head();
        f.extend_from_slice(&ob(0x7FE0, 0x0010, 0xF000_0000, &[1, 2, 3, 4]));
        let err = check(&f).unwrap_err().to_string();
        assert!(err.contains("(7FE0,0010)") && err.contains("4026531840") && err.contains("only 4 follow"), "{err}");
    }

    #[test]
    fn values_that_fit_exactly_pass() {
        let mut f = head();
        f.extend_from_slice(&ob(0x0009, 0x0010, 4, &[1, 2, 3, 4]));
        f.extend_from_slice(&ob(0x7FE0, 0x0010, 6, &[0; 6]));
        check(&f).unwrap();
        // One byte short of what the last element declares.
        f.pop();
        assert!(check(&f).is_err());
    }

    #[test]
    fn fuzz_finding_a_ul_of_122_bytes_is_refused_before_the_parses_diverge() {
        let bytes = include_bytes!("../../benches/fuzz/regressions/dicom_reader/ul_length_not_multiple_of_4");
        let err = check(bytes).unwrap_err().to_string();
        assert!(err.contains("(UL) declares 122 bytes, not a whole number of its 4-byte values"), "{err}");
    }

    #[test]
    fn binary_values_must_be_whole() {
        let us = |declared: u32, value: &[u8]| {
            let mut f = head();
            f.extend_from_slice(&[0x28, 0x00, 0x10, 0x00, b'U', b'S']);
            f.extend_from_slice(&(declared as u16).to_le_bytes());
            f.extend_from_slice(value);
            f
        };
        check(&us(2, &[32, 0])).unwrap();
        let err = check(&us(3, &[32, 0, 0])).unwrap_err().to_string();
        assert!(err.contains("(0028,0010) (US) declares 3 bytes"), "{err}");
    }
}
