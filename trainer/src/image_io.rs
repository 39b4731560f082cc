//! PNG in and out, with the evaluation protocol's conversion rules applied at the border so the
//! model only ever sees the "3-channel uint8" image the reference sees:
//! 8-bit samples are used as they are; 16-bit samples are min-max scaled to 0..255 and rounded
//! (half to even, as numpy); grey is repeated to three channels; channels beyond RGB (alpha) are
//! dropped. Palette images are expanded to their colours. Label masks are read without any
//! scaling: a pixel's value (or palette index) is its label. DICOM slices go through `crate::dicom`
//! (frames, LUTs, windows); JPEG, TIFF and BMP stills through the `image` crate with the same
//! rules (8-bit as is, 16-bit and float min-max scaled). PNG stays on the `png` crate, which the
//! mask writer and label reader need anyway and whose palette and bit-depth handling the
//! protocol tests pin down.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minisam_models::image::{Mask, RgbImage, MAX_IMAGE_SIDE};

pub use crate::dicom::{DicomOptions, Window};
pub use crate::nifti_io::SliceSpec;

/// How a file becomes the engine's image: the frame of a multi-frame DICOM file or the 3D
/// volume of a 4D NIfTI file, a grey-level window for both, and a NIfTI volume's slice.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReadOptions {
    pub frame: u32,
    pub window: Option<Window>,
    /// `None` on a volume: the middle axial slice.
    pub slice: Option<SliceSpec>,
}

impl ReadOptions {
    fn dicom(&self) -> DicomOptions {
        DicomOptions {
            frame: self.frame,
            window: self.window,
        }
    }
}

/// A label image: one `u16` label per pixel, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMask {
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u16>,
}

/// What a written mask pixel holds for "inside": 255 is visible in any viewer; 1 matches the
/// golden `*_mask.png` files of the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskValue {
    Visible255,
    One,
}

fn open(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).with_context(|| {
        format!(
            "cannot open {}: check the path and its permissions",
            path.display()
        )
    })?;
    Ok(BufReader::new(f))
}

/// Decoded samples of one PNG frame after the requested transformations.
struct Decoded {
    width: usize,
    height: usize,
    color: png::ColorType,
    depth: png::BitDepth,
    bytes: Vec<u8>,
}

fn decode<R: Read>(r: R, transformations: png::Transformations) -> Result<Decoded> {
    let mut decoder = png::Decoder::new(r);
    decoder.set_transformations(transformations);
    let mut reader = decoder.read_info().context("not a readable PNG file")?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        bail!("PNG size {w}x{h} is outside the supported 1..={MAX_IMAGE_SIDE} pixels per side");
    }
    let mut bytes = vec![0u8; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut bytes)
        .context("corrupt PNG image data")?;
    bytes.truncate(frame.buffer_size());
    let (color, depth) = reader.output_color_type();
    Ok(Decoded {
        width: w,
        height: h,
        color,
        depth,
        bytes,
    })
}

/// Reads an image file (PNG, JPEG, TIFF, BMP, DICOM or a NIfTI volume, recognised by content)
/// as the protocol's 3-channel uint8 image; a DICOM file's first frame with its default window,
/// a volume's middle axial slice.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    read_rgb_with(path, &ReadOptions::default())
}

/// [`read_rgb`] with a frame, window and slice; asking for one that does not apply to the file
/// is an error rather than silently ignored.
pub fn read_rgb_with(path: &Path, opts: &ReadOptions) -> Result<RgbImage> {
    let mut bytes = Vec::new();
    open(path)?
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let image = if crate::dicom::looks_like(&bytes) {
        if opts.slice.is_some() {
            Err(anyhow!(
                "--slice applies to NIfTI volumes only; this is a DICOM file (use --frame)"
            ))
        } else {
            crate::dicom::read(&bytes, &opts.dicom())
        }
    } else if crate::nifti_io::looks_like(&bytes) {
        crate::nifti_io::read(&bytes, opts.frame as usize)
            .and_then(|v| v.slice_rgb(opts.slice.unwrap_or_default(), opts.window))
    } else if opts.frame != 0 || opts.window.is_some() || opts.slice.is_some() {
        Err(anyhow!(
            "--frame, --window and --slice apply to DICOM files and NIfTI volumes only; this is a still image"
        ))
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        read_rgb_from(&bytes[..])
    } else {
        read_still(&bytes)
    };
    image.with_context(|| format!("reading image {}", path.display()))
}

/// JPEG, TIFF or BMP through the `image` crate, with the protocol's conversion rules.
pub fn read_still(bytes: &[u8]) -> Result<RgbImage> {
    use image::ImageFormat;
    let unknown = || {
        anyhow!("unrecognised image format: PNG, JPEG, TIFF, BMP and DICOM files are read; convert the image to PNG")
    };
    let format = image::guess_format(bytes).map_err(|_| unknown())?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Tiff | ImageFormat::Bmp
    ) {
        return Err(unknown());
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    // Size limits before decoding, so a hostile header cannot make us allocate gigabytes.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE as u32);
    limits.max_image_height = Some(MAX_IMAGE_SIDE as u32);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| anyhow!("corrupt or unsupported {format:?} image ({e}); convert it to PNG"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("{format:?} image of size {w}x{h} is empty");
    }
    let colour = img.color();
    let grey = !colour.has_color();
    let sample_bytes = usize::from(colour.bytes_per_pixel() / colour.channel_count());
    // Alpha is dropped by the grey/RGB conversions, as for PNG.
    let data: Vec<u8> = match (sample_bytes, grey) {
        (1, true) => img.to_luma8().into_raw(),
        (1, false) => img.to_rgb8().into_raw(),
        (2, true) => min_max_to_u8(&img.to_luma16().into_raw()),
        (2, false) => min_max_to_u8(&img.to_rgb16().into_raw()),
        (_, g) => {
            let f = if g {
                img.to_luma32f().into_raw()
            } else {
                img.to_rgb32f().into_raw()
            };
            if f.iter().any(|v| !v.is_finite()) {
                bail!("{format:?} image holds NaN or infinite samples");
            }
            min_max_f64_to_u8(&f.iter().map(|&v| f64::from(v)).collect::<Vec<_>>())
        }
    };
    let img = if grey {
        RgbImage::from_grey(w, h, &data)
    } else {
        RgbImage::new(w, h, data)
    };
    img.map_err(|e| anyhow!("{e}"))
}

pub fn read_rgb_from<R: Read>(r: R) -> Result<RgbImage> {
    let d = decode(r, png::Transformations::EXPAND)?;
    let channels = match d.color {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("palette PNG was not expanded by the decoder"),
    };
    // Colour channels kept: grey (1) or RGB (3); alpha is dropped.
    let kept = if channels >= 3 { 3 } else { 1 };
    let n = d.width * d.height;
    let samples: Vec<u16> = match d.depth {
        png::BitDepth::Sixteen => d
            .bytes
            .chunks_exact(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .collect(),
        png::BitDepth::Eight => d.bytes.iter().map(|&b| u16::from(b)).collect(),
        other => bail!("unexpected bit depth {other:?} after expansion"),
    };
    if samples.len() != n * channels {
        bail!(
            "PNG holds {} samples, expected {}",
            samples.len(),
            n * channels
        );
    }
    let colour: Vec<u16> = samples
        .chunks_exact(channels)
        .flat_map(|px| px[..kept].iter().copied())
        .collect();
    let bytes = if d.depth == png::BitDepth::Eight {
        colour.iter().map(|&v| v as u8).collect()
    } else {
        min_max_to_u8(&colour)
    };
    let img = if kept == 1 {
        RgbImage::from_grey(d.width, d.height, &bytes)
    } else {
        RgbImage::new(d.width, d.height, bytes)
    };
    img.map_err(|e| anyhow!("{e}"))
}

/// `(v - min) / (max - min) * 255`, rounded half to even; a constant image maps to 0 (the
/// reference divides by a zero range only to get zeros after clipping).
pub fn min_max_to_u8(v: &[u16]) -> Vec<u8> {
    let (lo, hi) = v
        .iter()
        .fold((u16::MAX, 0u16), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    if v.is_empty() || hi <= lo {
        return vec![0; v.len()];
    }
    let range = f64::from(hi - lo);
    v.iter()
        .map(|&x| (f64::from(x - lo) / range * 255.0).round_ties_even() as u8)
        .collect()
}

/// The same rule over real values (DICOM after its modality LUT, float TIFF).
pub fn min_max_f64_to_u8(v: &[f64]) -> Vec<u8> {
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    if v.is_empty() || hi <= lo {
        return vec![0; v.len()];
    }
    v.iter()
        .map(|&x| ((x - lo) / (hi - lo) * 255.0).round_ties_even() as u8)
        .collect()
}

/// Reads a label mask: 1/2/4/8/16-bit grey or palette (the index is the label).
pub fn read_labels(path: &Path) -> Result<LabelMask> {
    read_labels_from(open(path)?).with_context(|| format!("reading label mask {}", path.display()))
}

pub fn read_labels_from<R: Read>(r: R) -> Result<LabelMask> {
    let d = decode(r, png::Transformations::IDENTITY)?;
    if !matches!(d.color, png::ColorType::Grayscale | png::ColorType::Indexed) {
        bail!("a label mask must be a single-channel (grey or palette) PNG, this one is {:?}; save the mask as 8-bit grey label indices", d.color);
    }
    let bits = d.depth as usize;
    let row_bytes = (d.width * bits).div_ceil(8);
    if d.bytes.len() < row_bytes * d.height {
        bail!(
            "PNG mask data is shorter than its {}x{} size",
            d.width,
            d.height
        );
    }
    let mut labels = Vec::with_capacity(d.width * d.height);
    for row in d.bytes.chunks_exact(row_bytes).take(d.height) {
        match bits {
            16 => labels.extend(
                row.chunks_exact(2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]])),
            ),
            8 => labels.extend(row.iter().map(|&b| u16::from(b))),
            1 | 2 | 4 => {
                let mask = (1u16 << bits) - 1;
                labels.extend((0..d.width).map(|x| {
                    let bit = x * bits;
                    (u16::from(row[bit / 8]) >> (8 - bits - bit % 8)) & mask
                }));
            }
            other => bail!("unsupported mask bit depth {other}"),
        }
    }
    Ok(LabelMask {
        width: d.width,
        height: d.height,
        labels,
    })
}

/// Writes a binary mask as 8-bit grey.
pub fn write_mask(path: &Path, mask: &Mask, value: MaskValue) -> Result<()> {
    let f = File::create(path).with_context(|| {
        format!(
            "cannot create {}: check that its folder exists and is writable",
            path.display()
        )
    })?;
    let mut w = BufWriter::new(f);
    write_mask_to(&mut w, mask, value)
        .with_context(|| format!("writing mask {}", path.display()))?;
    w.flush()
        .with_context(|| format!("writing mask {}", path.display()))
}

pub fn write_mask_to<W: Write>(w: W, mask: &Mask, value: MaskValue) -> Result<()> {
    if mask.data.len() != mask.width * mask.height || mask.width == 0 || mask.height == 0 {
        bail!(
            "mask of {}x{} has {} pixels",
            mask.width,
            mask.height,
            mask.data.len()
        );
    }
    let on = match value {
        MaskValue::Visible255 => 255,
        MaskValue::One => 1,
    };
    let mut enc = png::Encoder::new(w, mask.width as u32, mask.height as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    let data: Vec<u8> = mask
        .data
        .iter()
        .map(|&v| if v != 0 { on } else { 0 })
        .collect();
    writer.write_image_data(&data)?;
    writer.finish()?;
    Ok(())
}

/// Writes an image as an 8-bit RGB PNG (`minisam convert`): exactly the engine's input.
pub fn write_rgb(path: &Path, img: &RgbImage) -> Result<()> {
    let f = File::create(path).with_context(|| {
        format!(
            "cannot create {}: check the directory and its permissions",
            path.display()
        )
    })?;
    let mut enc = png::Encoder::new(BufWriter::new(f), img.width as u32, img.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&img.data)?;
    writer.finish()?;
    Ok(())
}

/// Test helper shared by this crate's tests: encodes raw samples as a PNG in memory.
#[cfg(test)]
pub(crate) fn encode_png(
    w: u32,
    h: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
    palette: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if let Some(p) = palette {
            enc.set_palette(p.to_vec());
        }
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(data).unwrap();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use png::{BitDepth, ColorType};

    #[test]
    fn eight_bit_grey_is_used_as_is_and_repeated() {
        let png = encode_png(
            3,
            1,
            ColorType::Grayscale,
            BitDepth::Eight,
            &[0, 7, 200],
            None,
        );
        let img = read_rgb_from(&png[..]).unwrap();
        assert_eq!((img.width, img.height), (3, 1));
        assert_eq!(img.data, vec![0, 0, 0, 7, 7, 7, 200, 200, 200]);
    }

    #[test]
    fn sixteen_bit_is_min_max_scaled_and_rounded() {
        // 1000, 1500, 2000 -> 0, 127.5 (ties to even: 128), 255
        let raw: Vec<u8> = [1000u16, 1500, 2000]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let png = encode_png(3, 1, ColorType::Grayscale, BitDepth::Sixteen, &raw, None);
        assert_eq!(
            read_rgb_from(&png[..]).unwrap().data,
            vec![0, 0, 0, 128, 128, 128, 255, 255, 255]
        );
        assert_eq!(min_max_to_u8(&[5, 5]), vec![0, 0]);
        assert_eq!(
            min_max_to_u8(&[0, 1, 2, 3, 4, 5]),
            vec![0, 51, 102, 153, 204, 255]
        );
    }

    #[test]
    fn alpha_is_dropped_and_palette_expanded() {
        let rgba = encode_png(
            2,
            1,
            ColorType::Rgba,
            BitDepth::Eight,
            &[1, 2, 3, 255, 4, 5, 6, 0],
            None,
        );
        assert_eq!(
            read_rgb_from(&rgba[..]).unwrap().data,
            vec![1, 2, 3, 4, 5, 6]
        );
        let ga = encode_png(
            2,
            1,
            ColorType::GrayscaleAlpha,
            BitDepth::Eight,
            &[9, 0, 10, 255],
            None,
        );
        assert_eq!(
            read_rgb_from(&ga[..]).unwrap().data,
            vec![9, 9, 9, 10, 10, 10]
        );
        let pal = encode_png(
            2,
            1,
            ColorType::Indexed,
            BitDepth::Eight,
            &[1, 0],
            Some(&[10, 20, 30, 40, 50, 60]),
        );
        assert_eq!(
            read_rgb_from(&pal[..]).unwrap().data,
            vec![40, 50, 60, 10, 20, 30]
        );
        // 16-bit RGB: scaled over the colour samples together.
        let raw: Vec<u8> = [0u16, 100, 200, 300, 400, 500]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let rgb16 = encode_png(2, 1, ColorType::Rgb, BitDepth::Sixteen, &raw, None);
        assert_eq!(
            read_rgb_from(&rgb16[..]).unwrap().data,
            vec![0, 51, 102, 153, 204, 255]
        );
    }

    #[test]
    fn labels_round_trip_and_keep_raw_values() {
        let png = encode_png(
            2,
            2,
            ColorType::Grayscale,
            BitDepth::Eight,
            &[0, 1, 2, 255],
            None,
        );
        assert_eq!(
            read_labels_from(&png[..]).unwrap().labels,
            vec![0, 1, 2, 255]
        );
        let raw: Vec<u8> = [0u16, 300, 7, 65535]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let png16 = encode_png(2, 2, ColorType::Grayscale, BitDepth::Sixteen, &raw, None);
        assert_eq!(
            read_labels_from(&png16[..]).unwrap().labels,
            vec![0, 300, 7, 65535]
        );
        // 1-bit, 3 wide: bits 101 per row, padded.
        let png1 = encode_png(
            3,
            2,
            ColorType::Grayscale,
            BitDepth::One,
            &[0b1010_0000, 0b0100_0000],
            None,
        );
        assert_eq!(
            read_labels_from(&png1[..]).unwrap().labels,
            vec![1, 0, 1, 0, 1, 0]
        );
        let rgb = encode_png(1, 1, ColorType::Rgb, BitDepth::Eight, &[1, 2, 3], None);
        assert!(read_labels_from(&rgb[..]).is_err());
    }

    #[test]
    fn mask_written_then_read_back() {
        let m = Mask {
            width: 3,
            height: 2,
            data: vec![0, 1, 1, 0, 0, 1],
        };
        for (value, on) in [(MaskValue::Visible255, 255u16), (MaskValue::One, 1)] {
            let mut buf = Vec::new();
            write_mask_to(&mut buf, &m, value).unwrap();
            let back = read_labels_from(&buf[..]).unwrap();
            assert_eq!((back.width, back.height), (3, 2));
            assert_eq!(
                back.labels,
                m.data
                    .iter()
                    .map(|&v| u16::from(v) * on)
                    .collect::<Vec<_>>()
            );
        }
        let bad = Mask {
            width: 3,
            height: 2,
            data: vec![0; 5],
        };
        assert!(write_mask_to(Vec::new(), &bad, MaskValue::One).is_err());
    }

    #[test]
    fn garbage_and_missing_files_are_errors() {
        assert!(read_rgb_from(&b"not a png at all"[..]).is_err());
        let png = encode_png(4, 4, ColorType::Grayscale, BitDepth::Eight, &[3; 16], None);
        assert!(
            read_rgb_from(&png[..png.len() / 2]).is_err(),
            "truncated PNG accepted"
        );
        assert!(read_labels_from(&b""[..]).is_err());
        let dcm =
            std::env::temp_dir().join(format!("minisam-test-{}-slice.dcm", std::process::id()));
        std::fs::write(
            &dcm,
            crate::dicom::tests::file(true, 2, 1, &[0, 1000], false),
        )
        .unwrap();
        assert_eq!(
            read_rgb(&dcm).unwrap().data,
            vec![0, 0, 0, 255, 255, 255],
            "DICOM is recognised by content"
        );
        std::fs::remove_file(&dcm).unwrap();
        let err = read_rgb(Path::new("/nonexistent/dir/x.png")).unwrap_err();
        assert!(format!("{err:#}").contains("cannot open"));
    }

    fn encoded(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn jpeg_tiff_and_bmp_follow_the_protocol_rules() {
        use image::{DynamicImage, ImageBuffer, ImageFormat};
        // 16-bit grey TIFF: min-max, half to even, like 16-bit PNG.
        let g16 = ImageBuffer::from_raw(3, 1, vec![100u16, 150, 200]).unwrap();
        let tiff = encoded(DynamicImage::ImageLuma16(g16), ImageFormat::Tiff);
        assert_eq!(
            read_still(&tiff).unwrap().data,
            vec![0, 0, 0, 128, 128, 128, 255, 255, 255]
        );
        // 8-bit RGB BMP and TIFF: as stored.
        let rgb: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        for format in [ImageFormat::Bmp, ImageFormat::Tiff] {
            let img = DynamicImage::ImageRgb8(ImageBuffer::from_raw(2, 3, rgb.clone()).unwrap());
            let got = read_still(&encoded(img, format)).unwrap();
            assert_eq!(
                (got.width, got.height, &got.data),
                (2, 3, &rgb),
                "{format:?}"
            );
        }
        // 8-bit grey JPEG: lossy, but close.
        let grey: Vec<u8> = (0..16 * 16)
            .map(|i| (i % 16 * 8 + i / 16 * 4) as u8)
            .collect();
        let jpeg = encoded(
            DynamicImage::ImageLuma8(ImageBuffer::from_raw(16, 16, grey.clone()).unwrap()),
            ImageFormat::Jpeg,
        );
        let got = read_still(&jpeg).unwrap();
        let worst = got
            .data
            .iter()
            .step_by(3)
            .zip(&grey)
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap();
        assert!(worst <= 8, "JPEG differs by {worst}");
        // Unknown, truncated and non-still inputs are errors that say what is read.
        let err = format!("{:#}", read_still(b"GIF89a....").unwrap_err());
        assert!(err.contains("PNG, JPEG, TIFF, BMP and DICOM"), "{err}");
        assert!(read_still(&tiff[..tiff.len() / 2]).is_err());
        assert!(read_still(&jpeg[..jpeg.len() / 2]).is_err());
        let p =
            std::env::temp_dir().join(format!("minisam-test-{}-still.tiff", std::process::id()));
        std::fs::write(&p, &tiff).unwrap();
        assert_eq!(
            read_rgb(&p).unwrap().data[3],
            128,
            "TIFF is recognised by content"
        );
        let opts = ReadOptions {
            frame: 1,
            ..ReadOptions::default()
        };
        assert!(format!("{:#}", read_rgb_with(&p, &opts).unwrap_err())
            .contains("DICOM files and NIfTI volumes only"));
        std::fs::remove_file(&p).unwrap();
    }
}
