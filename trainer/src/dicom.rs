//! DICOM images through dicom-rs (`dicom-object` parses the file, `dicom-pixeldata` and the
//! transfer-syntax registry decode the pixel data), then the steps that turn stored samples into
//! the 3-channel uint8 image the engine sees, done here so each rule is visible and tested:
//!
//! 1. **Samples** of one frame (`--frame N`, 0 = first): sign-extended to Bits Stored, planar
//!    colour interleaved, YBR_FULL / YBR_FULL_422 converted to RGB (the same matrix and
//!    rounding as pydicom, the reference), PALETTE COLOR looked up in the file's palette.
//! 2. **Grey images**: the modality LUT (Rescale Slope/Intercept), then a window: `--window`
//!    (centre/width or a named preset) when given; else, for CT and MR, the file's first VOI
//!    window; else 8-bit samples with an identity rescale are used as stored and everything
//!    else is min-max scaled (the evaluation protocol's 16-bit rule). MONOCHROME1 is inverted
//!    last, so bright always means dense.
//! 3. **Colour images**: 8-bit samples as they are; wider ones (16-bit palettes) keep their top
//!    8 bits.
//!
//! Anything that cannot be decoded exactly (JPEG-LS: only a C++ codec exists; 1-bit images;
//! modality LUT sequences; YBR_PARTIAL) is an error naming the file, the transfer syntax and the
//! reason, never an approximation.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{PixelDecoder, PlanarConfiguration};
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
use minisam_models::image::{RgbImage, MAX_IMAGE_SIDE};

/// A VOI window: values `centre ± width/2` span black to white (DICOM's linear function).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub centre: f64,
    pub width: f64,
}

/// Named CT windows (Hounsfield units), for `--window NAME`.
pub const PRESETS: &[(&str, Window)] = &[
    (
        "abdomen",
        Window {
            centre: 40.0,
            width: 400.0,
        },
    ),
    (
        "lung",
        Window {
            centre: -600.0,
            width: 1500.0,
        },
    ),
    (
        "brain",
        Window {
            centre: 40.0,
            width: 80.0,
        },
    ),
    (
        "bone",
        Window {
            centre: 400.0,
            width: 1800.0,
        },
    ),
    (
        "mediastinum",
        Window {
            centre: 50.0,
            width: 350.0,
        },
    ),
    (
        "liver",
        Window {
            centre: 60.0,
            width: 160.0,
        },
    ),
];

impl std::str::FromStr for Window {
    type Err = String;
    /// `C,W` (numbers, width > 0) or a preset name.
    fn from_str(s: &str) -> std::result::Result<Window, String> {
        if let Some((_, w)) = PRESETS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s.trim()))
        {
            return Ok(*w);
        }
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        let help = || {
            format!(
                "expected CENTRE,WIDTH (e.g. 40,400) or one of {}",
                names.join(", ")
            )
        };
        let (c, w) = s.split_once(',').ok_or_else(help)?;
        let centre: f64 = c.trim().parse().map_err(|_| help())?;
        let width: f64 = w.trim().parse().map_err(|_| help())?;
        if !centre.is_finite() || !width.is_finite() || width < 1.0 {
            return Err(format!(
                "window width must be at least 1 and both numbers finite; {}",
                help()
            ));
        }
        Ok(Window { centre, width })
    }
}

/// How to turn a DICOM file into the engine's image.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DicomOptions {
    /// 0-based frame of a multi-frame file.
    pub frame: u32,
    /// Overrides the file's window (and min-max) for grey images.
    pub window: Option<Window>,
}

/// Does `bytes` look like a DICOM Part 10 file (preamble + "DICM")?
pub fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 132 && &bytes[128..132] == b"DICM"
}

/// Stored samples of one frame after step 1: `channels` is 1 (grey) or 3 (RGB), row-major,
/// interleaved. Palette images hold the palette's values (8 or 16 bit).
#[derive(Clone, Debug, PartialEq)]
pub struct Samples {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub values: Vec<i64>,
    /// Bits per sample of `values` (Bits Stored, or the palette's entry size).
    pub bits: u16,
    /// The file's photometric interpretation, e.g. `MONOCHROME2`.
    pub photometric: String,
    pub frames: u32,
}

const EXPLICIT_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
/// JPEG Baseline and Extended: the DCT processes whose decoder converts YCbCr.
const JPEG_DCT: &[&str] = &["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"];

/// Whether a JPEG stream has a JFIF (APP0 "JFIF") or Adobe (APP14 "Adobe") marker before its
/// first scan: the markers that tell a decoder whether 3 components are YCbCr or RGB.
fn jpeg_has_colour_marker(stream: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= stream.len() && stream[i] == 0xFF {
        let marker = stream[i + 1];
        if marker == 0xDA {
            return false; // start of scan: no marker came before it
        }
        let len = usize::from(u16::from_be_bytes([stream[i + 2], stream[i + 3]]));
        let body = stream.get(i + 4..i + 2 + len).unwrap_or(&[]);
        if (marker == 0xE0 && body.starts_with(b"JFIF")) || (marker == 0xEE && body.starts_with(b"Adobe")) {
            return true;
        }
        i += 2 + len;
    }
    false
}

/// An error and its sources, `outer: inner: ...`: dicom-pixeldata's top-level message ("Could not
/// decode pixel data") hides the codec's reason (e.g. an unsupported sample precision).
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(inner) = next {
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = inner.source();
    }
    out
}

/// The parsed file, its transfer syntax (UID and name) for error messages.
struct File {
    obj: DefaultDicomObject,
    ts: String,
}

impl File {
    fn open(bytes: &[u8]) -> Result<File> {
        if !looks_like(bytes) {
            bail!("not a DICOM file (no DICM marker at byte 128)");
        }
        crate::dicom_lengths::check(bytes)?;
        // The preamble is always skipped, never detected: detection looks for `DICM` 128 bytes
        // into what it is given, so a file with a second `DICM` at byte 256 had its meta group
        // read from there, not where the bounds pass above checked it (fuzz finding
        // `second_dicm_at_256`: a 305-byte file made dicom-object zero-fill 3.4 GiB).
        let obj = OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(bytes)
            .map_err(|e| {
                anyhow!("not a readable DICOM file ({e}); check that it is complete, or convert the file to explicit VR little endian (e.g. `gdcmconv --raw`)")
            })?;
        let uid = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        let name = TransferSyntaxRegistry
            .get(&uid)
            .map(|t| t.name().to_string())
            .unwrap_or_else(|| "unknown".into());
        Ok(File {
            obj,
            ts: format!("transfer syntax {name} ({uid})"),
        })
    }

    /// Whether dicom-rs holds the pixel data as 16-bit words (VR OW read as `U16`).
    fn pixel_data_is_words(&self) -> bool {
        matches!(
            self.obj.get(tags::PIXEL_DATA).map(|e| e.value()),
            Some(dicom_core::DicomValue::Primitive(dicom_core::PrimitiveValue::U16(_)))
        )
    }

    /// Frame `frame` of an encapsulated JPEG decoded with no colour transform, when its stream
    /// has neither a JFIF (APP0) nor an Adobe (APP14) marker; `None` when it has one (the
    /// markers then say what the components are, and the codec's output stands).
    fn jpeg_frame_without_transform(&self, frame: u32, frames: u32, w: usize, h: usize) -> Result<Option<Vec<u8>>> {
        let Some(fragments) = self.obj.get(tags::PIXEL_DATA).and_then(|e| e.value().fragments()) else {
            return Ok(None);
        };
        // A single frame may span several fragments; several frames have one fragment each.
        let stream: Vec<u8> = if frames == 1 {
            fragments.concat()
        } else if fragments.len() == frames as usize {
            fragments[frame as usize].clone()
        } else {
            bail!(self.fail(format!("{} fragments for {frames} frames: cannot tell which hold frame {frame} of this RGB JPEG", fragments.len())));
        };
        if jpeg_has_colour_marker(&stream) {
            return Ok(None);
        }
        let mut decoder = jpeg_decoder::Decoder::new(&stream[..]);
        decoder.set_color_transform(jpeg_decoder::ColorTransform::None);
        let pixels = decoder
            .decode()
            .map_err(|e| self.fail(format!("cannot decode the RGB JPEG frame {frame}: {e}")))?;
        if pixels.len() != w * h * 3 {
            bail!(self.fail(format!("the RGB JPEG frame {frame} holds {} bytes, {w}x{h} RGB needs {}", pixels.len(), w * h * 3)));
        }
        Ok(Some(pixels))
    }

    fn fail(&self, why: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: {why}", self.ts)
    }

    fn text(&self, tag: dicom_object::Tag) -> Option<String> {
        self.obj.get(tag).and_then(|e| e.to_str().ok()).map(|s| {
            s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string()
        })
    }

    fn float(&self, tag: dicom_object::Tag) -> Option<f64> {
        self.obj
            .get(tag)
            .and_then(|e| e.to_multi_float64().ok())
            .and_then(|v| v.first().copied())
    }

    fn samples(&self, frame: u32) -> Result<Samples> {
        let photometric = self
            .text(tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap_or_default();
        if self.obj.get(tags::MODALITY_LUT_SEQUENCE).is_some() {
            bail!(self.fail("a Modality LUT Sequence (non-linear) is not supported; export the image with Rescale Slope/Intercept instead"));
        }
        let uid = self.obj.meta().transfer_syntax().trim_end_matches('\0');
        match TransferSyntaxRegistry.get(uid) {
            None => bail!(self.fail("unknown transfer syntax; convert the file to explicit VR little endian (e.g. `gdcmconv --raw`)")),
            Some(ts) if !ts.can_decode_all() => bail!(self.fail(
                "no pure-Rust decoder for this compression is built in (JPEG-LS needs the C++ CharLS); convert the file to explicit VR little endian (e.g. `gdcmconv --raw` or `dcmdjpls`)"
            )),
            Some(_) => {}
        }
        // dicom-rs 0.10's RLE decoder indexes past a truncated segment and panics; a corrupt
        // file must be an error here, not a crash of `eval` halfway through a data set.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.obj.decode_pixel_data()
        }))
        .map_err(|_| {
            self.fail("the decoder failed on corrupt or truncated pixel data; re-export the file")
        })?
        .map_err(|e| self.fail(format!("cannot decode the pixel data: {}", causes(&e))))?;
        let (w, h) = (decoded.columns() as usize, decoded.rows() as usize);
        if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
            bail!(self.fail(format!(
                "image size {w}x{h} is outside the supported 1..={MAX_IMAGE_SIDE} pixels per side"
            )));
        }
        let frames = decoded.number_of_frames();
        if frame >= frames {
            bail!(self.fail(format!(
                "frame {frame} asked for, the file has {frames} (0..={})",
                frames.saturating_sub(1)
            )));
        }
        let spp = decoded.samples_per_pixel() as usize;
        let alloc = decoded.bits_allocated();
        let stored = decoded.bits_stored();
        if !matches!(alloc, 8 | 16 | 32) || stored == 0 || stored > alloc {
            bail!(self.fail(format!(
                "{alloc}-bit samples ({stored} stored) are not supported (8, 16 or 32)"
            )));
        }
        let signed = decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
        // The decoder reports RGB for every 3-sample encapsulated image, but only the JPEG and
        // JPEG 2000 codecs really convert colour; RLE and native data stay as the file says.
        let ts_uid = uid.to_string();
        let codec_made_rgb = ts_uid.starts_with("1.2.840.10008.1.2.4.");
        let native_422 = photometric == "YBR_FULL_422"
            && !ts_uid.starts_with("1.2.840.10008.1.2.4.")
            && ts_uid != RLE;
        let bytes_per = usize::from(alloc / 8);
        let n = w * h;
        // Samples per frame in the decoded buffer: YBR_FULL_422 stores 2 chroma per 2 pixels.
        let frame_samples = if native_422 { n * 2 } else { n * spp };
        let frame_bytes = frame_samples * bytes_per;
        let data = decoded.data();
        let start = frame as usize * frame_bytes;
        let raw = data.get(start..start + frame_bytes).ok_or_else(|| {
            self.fail(format!(
                "pixel data holds {} bytes, frame {frame} needs bytes {start}..{}",
                data.len(),
                start + frame_bytes
            ))
        })?;
        // Decoded buffers are in native byte order (dicom-pixeldata's contract).
        let mut values: Vec<i64> = match bytes_per {
            1 => raw.iter().map(|&b| i64::from(b)).collect(),
            2 => raw
                .chunks_exact(2)
                .map(|c| i64::from(u16::from_ne_bytes([c[0], c[1]])))
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| i64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        };
        // 32-bit samples of a big-endian file: dicom-rs reads pixel data of VR OW as 16-bit
        // words and turns each into native order, so a 32-bit sample arrives with its two halves
        // swapped (found on real RT dose exports; 16-bit samples are whole words and unaffected).
        if bytes_per == 4 && ts_uid == EXPLICIT_BIG_ENDIAN && self.pixel_data_is_words() {
            for v in &mut values {
                *v = ((*v & 0xFFFF) << 16) | (*v >> 16);
            }
        }
        // An RGB JPEG without a JFIF or Adobe marker: DICOM's RGB says its components are R, G
        // and B (PS3.5 8.2.1), but the JPEG decoder assumes YCbCr for any 3-component stream
        // without markers and converts. Decode that frame again with no colour transform.
        if photometric == "RGB" && spp == 3 && bytes_per == 1 && JPEG_DCT.contains(&ts_uid.as_str()) {
            if let Some(rgb) = self.jpeg_frame_without_transform(frame, frames, w, h)? {
                values = rgb.into_iter().map(i64::from).collect();
            }
        }
        // Keep Bits Stored, sign-extended for signed data (high bits may hold overlays).
        let mask = (1i64 << stored) - 1;
        for v in &mut values {
            *v &= mask;
            if signed && *v >> (stored - 1) == 1 {
                *v -= 1 << stored;
            }
        }
        // Planar configuration 1 (`PixelFirst` in dicom-rs: RRR…GGG…BBB…) to interleaved;
        // codecs already hand out interleaved samples and say so.
        if spp == 3 && decoded.planar_configuration() == PlanarConfiguration::PixelFirst {
            values = (0..n)
                .flat_map(|i| [values[i], values[n + i], values[2 * n + i]])
                .collect();
        }
        let mut bits = stored;
        let channels = match (photometric.as_str(), spp) {
            ("MONOCHROME1" | "MONOCHROME2", 1) => 1,
            ("RGB", 3) => 3,
            ("YBR_FULL" | "YBR_FULL_422" | "YBR_ICT" | "YBR_RCT", 3) if codec_made_rgb => 3,
            ("YBR_FULL", 3) => {
                ybr_to_rgb(&mut values, stored);
                3
            }
            ("YBR_FULL_422", 3) => {
                values = expand_422(&values, w, h).ok_or_else(|| self.fail("YBR_FULL_422 needs an even number of columns"))?;
                ybr_to_rgb(&mut values, stored);
                3
            }
            ("PALETTE COLOR", 1) => {
                let (v, b) = self.palette(&values)?;
                bits = b;
                values = v;
                3
            }
            (p, s) => bail!(self.fail(format!("photometric interpretation {p:?} with {s} samples per pixel is not supported; convert the image to RGB or MONOCHROME2"))),
        };
        Ok(Samples {
            width: w,
            height: h,
            channels,
            values,
            bits,
            photometric,
            frames,
        })
    }

    /// PALETTE COLOR: each stored index looked up in the red, green and blue tables.
    fn palette(&self, index: &[i64]) -> Result<(Vec<i64>, u16)> {
        let mut tables = Vec::new();
        for (desc, data) in [
            (
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
            (
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
            (
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
        ] {
            let missing = || {
                self.fail("PALETTE COLOR image without its lookup tables (segmented palettes are not supported)")
            };
            let d: Vec<i64> = self
                .obj
                .get(desc)
                .and_then(|e| e.to_multi_int::<i64>().ok())
                .ok_or_else(missing)?;
            let [entries, first, bits] = d[..] else {
                bail!(missing())
            };
            // A descriptor's count of 0 means 65536 entries; the first-mapped value may have
            // been read as signed.
            let entries = if entries == 0 {
                65536
            } else {
                entries as usize
            };
            let first = first & 0xffff;
            let e = self.obj.get(data).ok_or_else(missing)?;
            let table: Vec<i64> = match bits {
                8 => e
                    .to_bytes()
                    .map_err(|_| missing())?
                    .iter()
                    .map(|&b| i64::from(b))
                    .collect(),
                16 => e
                    .to_multi_int::<u16>()
                    .map_err(|_| missing())?
                    .into_iter()
                    .map(i64::from)
                    .collect(),
                b => bail!(self.fail(format!(
                    "palette entries of {b} bits are not supported (8 or 16)"
                ))),
            };
            if table.len() < entries {
                bail!(self.fail(format!(
                    "palette has {} entries, its descriptor says {entries}",
                    table.len()
                )));
            }
            tables.push((table, entries, first, bits as u16));
        }
        let bits = tables[0].3;
        let mut out = Vec::with_capacity(index.len() * 3);
        for &i in index {
            for (table, entries, first, _) in &tables {
                // Indices outside the table take its first or last entry (PS3.3 C.7.6.3.1.5).
                let at = (i - first).clamp(0, *entries as i64 - 1) as usize;
                out.push(table[at]);
            }
        }
        Ok((out, bits))
    }
}

const RLE: &str = "1.2.840.10008.1.2.5";

/// YBR_FULL → RGB with pydicom's matrix, `+ 0.5`, floor and clip (so the two agree exactly).
fn ybr_to_rgb(v: &mut [i64], bits: u16) {
    let max = ((1i64 << bits) - 1) as f32;
    let half = (1i64 << (bits - 1)) as f32;
    for px in v.chunks_exact_mut(3) {
        let (y, cb, cr) = (px[0] as f32, px[1] as f32 - half, px[2] as f32 - half);
        let r = y + 1.402 * cr;
        let g = y + (-0.114 * 1.772 / 0.587) * cb + (-0.299 * 1.402 / 0.587) * cr;
        let b = y + 1.772 * cb;
        for (o, c) in px.iter_mut().zip([r, g, b]) {
            *o = (c + 0.5).floor().clamp(0.0, max) as i64;
        }
    }
}

/// Native YBR_FULL_422: each pair of pixels is stored `Y1 Y2 Cb Cr`; both share the chroma.
fn expand_422(v: &[i64], w: usize, h: usize) -> Option<Vec<i64>> {
    if w % 2 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(w * h * 3);
    for q in v.chunks_exact(4).take(w * h / 2) {
        out.extend_from_slice(&[q[0], q[2], q[3], q[1], q[2], q[3]]);
    }
    Some(out)
}

/// Decodes one frame's samples (step 1), for tests and tools that compare against a reference.
pub fn samples(bytes: &[u8], frame: u32) -> Result<Samples> {
    let f = File::open(bytes)?;
    f.samples(frame)
}

/// Reads a DICOM file as the engine's 3-channel uint8 image (steps 1 to 3).
pub fn read(bytes: &[u8], opts: &DicomOptions) -> Result<RgbImage> {
    let f = File::open(bytes)?;
    let s = f.samples(opts.frame)?;
    let (w, h) = (s.width, s.height);
    if s.channels == 3 {
        if opts.window.is_some() {
            bail!(f.fail(format!(
                "--window applies to grey images; this one is {} (colour), leave --window out",
                s.photometric
            )));
        }
        let shift = s.bits.saturating_sub(8);
        let data = s
            .values
            .iter()
            .map(|&v| (v >> shift).clamp(0, 255) as u8)
            .collect();
        return RgbImage::new(w, h, data).map_err(|e| anyhow!("{e}"));
    }
    let slope = f.float(tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = f.float(tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    if !slope.is_finite() || !intercept.is_finite() || slope == 0.0 {
        bail!(f.fail(format!(
            "rescale slope {slope} / intercept {intercept} are not usable"
        )));
    }
    let modality = f.text(tags::MODALITY).unwrap_or_default();
    let file_window = match (f.float(tags::WINDOW_CENTER), f.float(tags::WINDOW_WIDTH)) {
        (Some(centre), Some(width)) if matches!(modality.as_str(), "CT" | "MR") && width >= 1.0 => {
            Some(Window { centre, width })
        }
        _ => None,
    };
    let sigmoid = f
        .text(tags::VOILUT_FUNCTION)
        .is_some_and(|s| s == "SIGMOID");
    let identity = slope == 1.0 && intercept == 0.0;
    let grey: Vec<u8> = match opts.window.or(file_window) {
        Some(win) => s
            .values
            .iter()
            .map(|&v| {
                let x = v as f64 * slope + intercept;
                window_to_u8(x, win, sigmoid && opts.window.is_none())
            })
            .collect(),
        None if s.bits <= 8 && identity && s.values.iter().all(|&v| (0..=255).contains(&v)) => {
            s.values.iter().map(|&v| v as u8).collect()
        }
        None => crate::image_io::min_max_f64_to_u8(
            &s.values
                .iter()
                .map(|&v| v as f64 * slope + intercept)
                .collect::<Vec<_>>(),
        ),
    };
    let grey = if s.photometric == "MONOCHROME1" {
        grey.into_iter().map(|g| 255 - g).collect()
    } else {
        grey
    };
    RgbImage::from_grey(w, h, &grey).map_err(|e| anyhow!("{e}"))
}

/// DICOM's VOI functions (PS3.3 C.11.2.1.2) to 0..255, rounded half up.
pub fn window_to_u8(x: f64, w: Window, sigmoid: bool) -> u8 {
    let y = if sigmoid {
        255.0 / (1.0 + (-4.0 * (x - w.centre) / w.width).exp())
    } else if x <= w.centre - 0.5 - (w.width - 1.0) / 2.0 {
        0.0
    } else if x > w.centre - 0.5 + (w.width - 1.0) / 2.0 {
        255.0
    } else {
        ((x - (w.centre - 0.5)) / (w.width - 1.0) + 0.5) * 255.0
    };
    (y + 0.5).floor().clamp(0.0, 255.0) as u8
}

/// Reads a DICOM file with the given options, naming the file in every error.
pub fn read_path(path: &Path, bytes: &[u8], opts: &DicomOptions) -> Result<RgbImage> {
    read(bytes, opts).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const UNDEFINED: u32 = 0xFFFF_FFFF;

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
        // File meta: group length, SOP class/instance and transfer syntax.
        let mut meta = Vec::new();
        el(
            &mut meta,
            true,
            0x0002,
            0x0002,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.7\0",
        );
        el(&mut meta, true, 0x0002, 0x0003, b"UI", b"1.2.3.4\0");
        el(&mut meta, true, 0x0002, 0x0010, b"UI", ts.as_bytes());
        el(
            &mut out,
            true,
            0x0002,
            0x0000,
            b"UL",
            &(meta.len() as u32).to_le_bytes(),
        );
        out.extend(meta);
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
            0x0101,
            b"US",
            &16u16.to_le_bytes(),
        );
        el(
            &mut out,
            explicit,
            0x0028,
            0x0102,
            b"US",
            &15u16.to_le_bytes(),
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
            let img = read(
                &file(explicit, 3, 1, &[100, 150, 200], false),
                &DicomOptions::default(),
            )
            .unwrap();
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
            read(&file(true, 3, 1, &s, true), &DicomOptions::default())
                .unwrap()
                .data[..4],
            [0, 0, 0, 128]
        );
    }

    #[test]
    fn a_value_longer_than_the_file_is_refused_before_dicom_rs_reserves_it() {
        // The fuzz finding: without the bounds pass dicom-object zero-fills 3 GiB first.
        let bytes = include_bytes!("../../benches/fuzz/regressions/dicom_reader/meta_length_3gib");
        let err = format!("{:#}", read(bytes, &DicomOptions::default()).unwrap_err());
        assert!(err.contains("declares") && err.contains("damaged"), "{err}");
    }

    #[test]
    fn refuses_what_it_cannot_decode() {
        let o = DicomOptions::default();
        assert!(read(b"short", &o).is_err());
        let f = file(true, 3, 1, &[1, 2, 3], false);
        assert!(read(&f[..f.len() - 3], &o).is_err(), "truncated pixel data");
        let mut jpeg = f.clone();
        let at = jpeg
            .windows(19)
            .position(|w| w == b"1.2.840.10008.1.2.1")
            .unwrap();
        jpeg[at + 18] = b'4'; // 1.2.840.10008.1.2.4: a prefix, no transfer syntax of its own
        let err = format!("{:#}", read(&jpeg, &o).unwrap_err());
        assert!(
            err.contains("1.2.840.10008.1.2.4") && err.contains("convert the file"),
            "{err}"
        );
        let big = file(true, 3, 2, &[1, 2, 3], false);
        assert!(
            read(&big, &o).is_err(),
            "pixel data shorter than rows x cols"
        );
        let err = format!(
            "{:#}",
            read(
                &f,
                &DicomOptions {
                    frame: 1,
                    window: None
                }
            )
            .unwrap_err()
        );
        assert!(err.contains("frame 1") && err.contains("has 1"), "{err}");
    }

    #[test]
    fn windows_parse_and_apply() {
        let w: Window = "40,400".parse().unwrap();
        assert_eq!(
            w,
            Window {
                centre: 40.0,
                width: 400.0
            }
        );
        assert_eq!("Lung".parse::<Window>().unwrap().centre, -600.0);
        for bad in ["", "40", "40,0", "a,b", "abdomenx", "nan,4"] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
        assert_eq!(window_to_u8(-1000.0, w, false), 0);
        assert_eq!(window_to_u8(1000.0, w, false), 255);
        assert_eq!(window_to_u8(39.5, w, false), 128);
        // A window overrides min-max on a CT slice: 100..200 inside 40±200.
        let img = read(
            &file(true, 3, 1, &[100, 150, 200], false),
            &DicomOptions {
                frame: 0,
                window: Some(w),
            },
        )
        .unwrap();
        assert_eq!(img.data[0], window_to_u8(100.0, w, false));
    }

    /// Fuzz finding: a second `DICM` 256 bytes in made dicom-object's preamble detection skip
    /// another 128 bytes, so it parsed a meta group the bounds pass never saw and zero-filled
    /// 3.4 GiB for it. The file must now fail quickly, on the meta group at byte 132.
    #[test]
    fn a_second_dicm_marker_does_not_move_the_meta_group() {
        let bytes = include_bytes!("../../benches/fuzz/regressions/dicom_reader/second_dicm_at_256");
        let started = std::time::Instant::now();
        let err = read(bytes, &DicomOptions { frame: 0, window: None }).unwrap_err();
        assert!(started.elapsed().as_secs_f64() < 1.0, "took {:?}: {err:#}", started.elapsed());
    }
}
