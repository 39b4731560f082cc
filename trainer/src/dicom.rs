//! Minimal DICOM reader for single-frame, uncompressed, little-endian MONOCHROME2 images (8 or
//! 16 bits), the form most PACS exports of a CT/MR slice take. Anything else (compressed
//! transfer syntaxes, big endian, colour, multi-frame) is refused with a message saying to
//! convert to PNG: decoding JPEG-in-DICOM is out of scope and guessing would corrupt pixels.
//! Pixels are converted by the protocol's rule: 8-bit used as is, 16-bit min-max scaled.

use anyhow::{bail, Context, Result};
use minisam_models::image::{RgbImage, MAX_IMAGE_SIDE};

use crate::image_io::min_max_to_u8;

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const UNDEFINED: u32 = 0xFFFF_FFFF;
const MAX_DEPTH: usize = 16;

/// Does `bytes` look like a DICOM Part 10 file (preamble + "DICM")?
pub fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 132 && &bytes[128..132] == b"DICM"
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
    explicit: bool,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

/// One element header: tag, value start and length (`UNDEFINED` for open sequences).
struct Element {
    tag: (u16, u16),
    start: usize,
    len: u32,
}

impl<'a> Cursor<'a> {
    fn at_end(&self) -> bool {
        self.i >= self.b.len()
    }

    fn header(&mut self) -> Result<Element> {
        let short = || {
            anyhow::anyhow!(
                "DICOM element header runs past the end of the file at byte {}",
                self.i
            )
        };
        let group = u16_at(self.b, self.i).ok_or_else(short)?;
        let elem = u16_at(self.b, self.i + 2).ok_or_else(short)?;
        let tag = (group, elem);
        // Item and delimiter tags never carry a VR.
        let (len, start) = if group == 0xFFFE || !self.explicit {
            (u32_at(self.b, self.i + 4).ok_or_else(short)?, self.i + 8)
        } else {
            let vr = self.b.get(self.i + 4..self.i + 6).ok_or_else(short)?;
            if matches!(
                vr,
                b"OB"
                    | b"OW"
                    | b"OF"
                    | b"OD"
                    | b"OL"
                    | b"OV"
                    | b"SQ"
                    | b"SV"
                    | b"UC"
                    | b"UN"
                    | b"UR"
                    | b"UT"
                    | b"UV"
            ) {
                (u32_at(self.b, self.i + 8).ok_or_else(short)?, self.i + 12)
            } else {
                (
                    u32::from(u16_at(self.b, self.i + 6).ok_or_else(short)?),
                    self.i + 8,
                )
            }
        };
        Ok(Element { tag, start, len })
    }

    fn value(&self, e: &Element) -> Result<&'a [u8]> {
        let end = e
            .start
            .checked_add(e.len as usize)
            .filter(|&end| end <= self.b.len());
        let b: &'a [u8] = self.b;
        end.map(|end| &b[e.start..end]).with_context(|| {
            format!(
                "DICOM element {:04X},{:04X} runs past the end of the file",
                e.tag.0, e.tag.1
            )
        })
    }

    /// Skips an undefined-length sequence or item body up to its delimiter.
    fn skip_undefined(&mut self, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            bail!("DICOM sequences nested too deep");
        }
        loop {
            if self.at_end() {
                bail!("DICOM sequence without its delimiter");
            }
            let e = self.header()?;
            self.i = e.start;
            if matches!(e.tag, (0xFFFE, 0xE0DD) | (0xFFFE, 0xE00D)) {
                return Ok(());
            }
            if e.len == UNDEFINED {
                self.skip_undefined(depth + 1)?;
            } else {
                self.value(&e)?;
                self.i = e.start + e.len as usize;
            }
        }
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

pub fn read(bytes: &[u8]) -> Result<RgbImage> {
    if !looks_like(bytes) {
        bail!("not a DICOM file (no DICM marker at byte 128)");
    }
    let mut c = Cursor {
        b: bytes,
        i: 132,
        explicit: true,
    };
    let mut syntax = None;
    // File meta group 0002: always explicit VR little endian.
    while !c.at_end() && u16_at(bytes, c.i) == Some(0x0002) {
        let e = c.header()?;
        if e.tag == (0x0002, 0x0010) {
            syntax = Some(text(c.value(&e)?));
        }
        c.value(&e)?;
        c.i = e.start + e.len as usize;
    }
    c.explicit = match syntax.as_deref() {
        Some(EXPLICIT_LE) => true,
        Some(IMPLICIT_LE) => false,
        Some(other) => bail!("DICOM transfer syntax {other} (compressed or big endian) is not supported: convert the image to PNG"),
        None => bail!("DICOM file has no transfer syntax in its meta header"),
    };
    let (mut rows, mut cols, mut bits, mut samples, mut signed, mut frames) =
        (0usize, 0usize, 0u16, 1u16, false, 1usize);
    let mut photometric = String::from("MONOCHROME2");
    let mut pixels: Option<&[u8]> = None;
    while !c.at_end() {
        let e = c.header()?;
        if e.len == UNDEFINED {
            if e.tag == (0x7FE0, 0x0010) {
                bail!("DICOM pixel data is encapsulated (compressed): convert the image to PNG");
            }
            c.i = e.start;
            c.skip_undefined(0)?;
            continue;
        }
        let v = c.value(&e)?;
        let us = || {
            u16_at(v, 0).with_context(|| {
                format!("DICOM element {:04X},{:04X} is too short", e.tag.0, e.tag.1)
            })
        };
        match e.tag {
            (0x0028, 0x0002) => samples = us()?,
            (0x0028, 0x0004) => photometric = text(v),
            (0x0028, 0x0008) => {
                frames = text(v)
                    .parse()
                    .context("DICOM NumberOfFrames is not a number")?
            }
            (0x0028, 0x0010) => rows = usize::from(us()?),
            (0x0028, 0x0011) => cols = usize::from(us()?),
            (0x0028, 0x0100) => bits = us()?,
            (0x0028, 0x0103) => signed = us()? == 1,
            (0x7FE0, 0x0010) => pixels = Some(v),
            _ => {}
        }
        c.i = e.start + e.len as usize;
    }
    if samples != 1 || photometric != "MONOCHROME2" {
        bail!("DICOM {photometric} with {samples} samples per pixel is not supported (only MONOCHROME2 grey): convert the image to PNG");
    }
    if frames != 1 {
        bail!("DICOM file has {frames} frames; export the slice you want as a single-frame file or PNG");
    }
    if rows == 0 || cols == 0 || rows > MAX_IMAGE_SIDE || cols > MAX_IMAGE_SIDE {
        bail!("DICOM image size {cols}x{rows} is outside 1..={MAX_IMAGE_SIDE} per side");
    }
    let pixels = pixels.context("DICOM file has no pixel data")?;
    let n = rows * cols;
    let grey = match bits {
        8 if pixels.len() >= n => pixels[..n].to_vec(),
        16 if pixels.len() >= 2 * n => {
            // Signed samples are shifted to unsigned order; min-max scaling is unaffected.
            let v: Vec<u16> = pixels[..2 * n]
                .chunks_exact(2)
                .map(|p| {
                    let raw = u16::from_le_bytes([p[0], p[1]]);
                    if signed {
                        raw ^ 0x8000
                    } else {
                        raw
                    }
                })
                .collect();
            min_max_to_u8(&v)
        }
        8 | 16 => bail!(
            "DICOM pixel data holds {} bytes, {cols}x{rows} at {bits} bits needs more",
            pixels.len()
        ),
        other => bail!("DICOM with {other} bits allocated is not supported (8 or 16)"),
    };
    RgbImage::from_grey(cols, rows, &grey).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn el(out: &mut Vec<u8>, explicit: bool, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        out.extend(g.to_le_bytes());
        out.extend(e.to_le_bytes());
        if explicit {
            out.extend(vr);
            if matches!(vr, b"OB" | b"OW" | b"SQ") {
                out.extend([0, 0]);
                out.extend((v.len() as u32).to_le_bytes());
            } else {
                out.extend((v.len() as u16).to_le_bytes());
            }
        } else {
            out.extend((v.len() as u32).to_le_bytes());
        }
        out.extend(v);
    }

    /// A minimal 16-bit DICOM file, with an undefined-length sequence before the pixels.
    pub(crate) fn file(explicit: bool, w: u16, h: u16, pixels: &[u16], signed: bool) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend(b"DICM");
        let ts = if explicit {
            "1.2.840.10008.1.2.1\0"
        } else {
            "1.2.840.10008.1.2\0"
        };
        el(&mut out, true, 0x0002, 0x0010, b"UI", ts.as_bytes());
        el(&mut out, explicit, 0x0008, 0x0060, b"CS", b"CT");
        // (0008,1140) SQ of undefined length with one undefined-length item.
        out.extend([0x08, 0x00, 0x40, 0x11]);
        if explicit {
            out.extend(b"SQ\0\0");
        }
        out.extend(UNDEFINED.to_le_bytes());
        out.extend([0xFE, 0xFF, 0x00, 0xE0]);
        out.extend(UNDEFINED.to_le_bytes());
        el(&mut out, explicit, 0x0008, 0x1150, b"UI", b"1.2\0");
        out.extend([
            0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0, 0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0,
        ]);
        el(
            &mut out,
            explicit,
            0x0028,
            0x0002,
            b"US",
            &1u16.to_le_bytes(),
        );
        el(&mut out, explicit, 0x0028, 0x0004, b"CS", b"MONOCHROME2 ");
        el(&mut out, explicit, 0x0028, 0x0010, b"US", &h.to_le_bytes());
        el(&mut out, explicit, 0x0028, 0x0011, b"US", &w.to_le_bytes());
        el(
            &mut out,
            explicit,
            0x0028,
            0x0100,
            b"US",
            &16u16.to_le_bytes(),
        );
        el(
            &mut out,
            explicit,
            0x0028,
            0x0103,
            b"US",
            &u16::from(signed).to_le_bytes(),
        );
        let px: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
        el(&mut out, explicit, 0x7FE0, 0x0010, b"OW", &px);
        out
    }

    #[test]
    fn reads_explicit_and_implicit_16_bit_with_min_max_scaling() {
        for explicit in [true, false] {
            let img = read(&file(explicit, 3, 1, &[100, 150, 200], false)).unwrap();
            assert_eq!((img.width, img.height), (3, 1));
            assert_eq!(
                img.data,
                vec![0, 0, 0, 128, 128, 128, 255, 255, 255],
                "explicit={explicit}"
            );
        }
        // Signed: -100, 0, 100 -> 0, 127.5 -> 128, 255.
        let s = [(-100i16) as u16, 0, 100];
        assert_eq!(
            read(&file(true, 3, 1, &s, true)).unwrap().data[..4],
            [0, 0, 0, 128]
        );
    }

    #[test]
    fn refuses_what_it_cannot_decode() {
        assert!(read(b"short").is_err());
        let f = file(true, 3, 1, &[1, 2, 3], false);
        assert!(read(&f[..f.len() - 3]).is_err(), "truncated pixel data");
        let mut jpeg = f.clone();
        let at = jpeg
            .windows(19)
            .position(|w| w == b"1.2.840.10008.1.2.1")
            .unwrap();
        jpeg[at + 18] = b'4'; // 1.2.840.10008.1.2.4 = a JPEG family prefix
        let err = format!("{:#}", read(&jpeg).unwrap_err());
        assert!(err.contains("convert the image to PNG"), "{err}");
        let big = file(true, 3, 2, &[1, 2, 3], false);
        assert!(read(&big).is_err(), "pixel data shorter than rows x cols");
    }
}
