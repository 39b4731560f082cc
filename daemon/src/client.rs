//! The client side of `org.minisam.Segmenter1`, used by minisamctl, the tests and the bench:
//! a typed proxy plus helpers that put a frame into a sealed memfd and read the masks back.

use std::collections::HashMap;

use zbus::{proxy, OwnedFd, OwnedVariant};

use crate::service::{AdapterRow, SegmentReply, SlotReply, StreamReply, WireLayout};
use crate::prompts::{WireBox, WirePoint};

#[proxy(interface = "org.minisam.Segmenter1", default_service = "org.minisam.Segmenter1", default_path = "/org/minisam/Segmenter1")]
pub trait Segmenter1 {
    fn segment(
        &self,
        frame: OwnedFd,
        layout: &WireLayout,
        boxes: &[WireBox],
        points: &[WirePoint],
        options: HashMap<&str, OwnedVariant>,
    ) -> zbus::Result<SegmentReply>;

    fn reprompt(&self, frame_id: u64, boxes: &[WireBox], points: &[WirePoint], options: HashMap<&str, OwnedVariant>) -> zbus::Result<SegmentReply>;

    fn open_stream(&self, slots: u32, width: u32, height: u32, format: &str) -> zbus::Result<StreamReply>;

    #[allow(clippy::too_many_arguments)]
    fn segment_slot(
        &self,
        stream: u32,
        slot: u32,
        seq: u64,
        boxes: &[WireBox],
        points: &[WirePoint],
        options: HashMap<&str, OwnedVariant>,
    ) -> zbus::Result<SlotReply>;

    fn close_stream(&self, stream: u32) -> zbus::Result<()>;

    fn list_adapters(&self) -> zbus::Result<Vec<AdapterRow>>;

    fn activate_adapter(&self, name_or_modality: &str) -> zbus::Result<(String, String)>;

    fn install_adapter(&self, file: OwnedFd, activate: bool) -> zbus::Result<(String, String)>;

    fn rollback_adapter(&self) -> zbus::Result<(String, String)>;

    #[zbus(property)]
    fn active_model(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_adapter(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn memory_use(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn frames_served(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn adapter_changed(&self, name: &str, sha256: &str) -> zbus::Result<()>;
}

/// The D-Bus error name of a failed call (`org.minisam.Segmenter1.Error.Busy`), if it is one.
pub fn error_name(e: &zbus::Error) -> Option<String> {
    match e {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        _ => None,
    }
}

/// Options dictionary from pairs.
pub fn options<'a>(pairs: impl IntoIterator<Item = (&'a str, OwnedVariant)>) -> HashMap<&'a str, OwnedVariant> {
    pairs.into_iter().collect()
}

/// minisamctl's image files, kept to PNG on purpose: the `png` crate is small and already in
/// the workspace, while DICOM/JPEG/TIFF readers (dicom-rs, `image`) would enter this package's
/// dependency tree and with it the daemon's (see daemon/README.md). Other formats are turned into
/// the same PNG the engine would see with `minisam convert IN -o OUT.png`.
pub mod png_io {
    use std::fs::File;
    use std::io::{BufReader, BufWriter};
    use std::path::Path;

    use anyhow::{anyhow, bail, Context, Result};
    use minisam_models::image::{Mask, RgbImage, MAX_IMAGE_SIDE};

    /// A PNG as the protocol's RGB8 image: 8-bit samples as stored, 16-bit min-max scaled
    /// (rounded half to even), grey repeated, alpha dropped, palettes expanded; the same rules as
    /// `minisam::image_io::read_rgb` (checked in the tests below).
    pub fn read_rgb(path: &Path) -> Result<RgbImage> {
        let f = File::open(path).with_context(|| format!("cannot open {}: check the path and its permissions", path.display()))?;
        let mut head = [0u8; 8];
        std::io::Read::read_exact(&mut BufReader::new(File::open(path)?), &mut head).ok();
        if head != *b"\x89PNG\r\n\x1a\n" {
            bail!("{} is not a PNG: minisamctl reads PNG only; convert it first with `minisam convert {} -o image.png` (DICOM, JPEG, TIFF, BMP)", path.display(), path.display());
        }
        let mut decoder = png::Decoder::new(BufReader::new(f));
        decoder.set_transformations(png::Transformations::EXPAND);
        let mut reader = decoder.read_info().with_context(|| format!("{} is not a readable PNG", path.display()))?;
        let (w, h) = (reader.info().width as usize, reader.info().height as usize);
        if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
            bail!("PNG size {w}x{h} is outside the supported 1..={MAX_IMAGE_SIDE} pixels per side");
        }
        let mut buf = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).with_context(|| format!("{}: corrupt PNG image data", path.display()))?;
        buf.truncate(info.buffer_size());
        let (color, depth) = reader.output_color_type();
        let channels = color.samples();
        let kept = if channels >= 3 { 3 } else { 1 };
        let samples: Vec<u16> = match depth {
            png::BitDepth::Sixteen => buf.chunks_exact(2).map(|b| u16::from_be_bytes([b[0], b[1]])).collect(),
            png::BitDepth::Eight => buf.iter().map(|&b| u16::from(b)).collect(),
            other => bail!("unexpected PNG bit depth {other:?} after expansion"),
        };
        if samples.len() != w * h * channels {
            bail!("PNG holds {} samples, expected {}", samples.len(), w * h * channels);
        }
        let colour: Vec<u16> = samples.chunks_exact(channels).flat_map(|px| px[..kept].iter().copied()).collect();
        let bytes: Vec<u8> = if depth == png::BitDepth::Eight {
            colour.iter().map(|&v| v as u8).collect()
        } else {
            let (lo, hi) = colour.iter().fold((u16::MAX, 0u16), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            let range = f64::from(hi.saturating_sub(lo));
            colour.iter().map(|&x| if range > 0.0 { (f64::from(x - lo) / range * 255.0).round_ties_even() as u8 } else { 0 }).collect()
        };
        let img = if kept == 1 { RgbImage::from_grey(w, h, &bytes) } else { RgbImage::new(w, h, bytes) };
        img.map_err(|e| anyhow!("{e}"))
    }

    /// Writes a mask as an 8-bit grey PNG, 255 inside, 0 outside.
    pub fn write_mask(path: &Path, mask: &Mask) -> Result<()> {
        let f = File::create(path).with_context(|| format!("cannot create {}: check the directory and its permissions", path.display()))?;
        let mut enc = png::Encoder::new(BufWriter::new(f), mask.width as u32, mask.height as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let data: Vec<u8> = mask.data.iter().map(|&v| if v != 0 { 255 } else { 0 }).collect();
        enc.write_header()
            .and_then(|mut w| w.write_image_data(&data))
            .with_context(|| format!("writing {}", path.display()))
    }

    #[cfg(test)]
    mod tests {
        use std::path::Path;

        #[test]
        fn reads_like_the_engine_and_writes_masks_it_reads_back() {
            let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/samples/us-hc18-000_HC.png");
            if !sample.exists() {
                println!("SKIP: {} is absent", sample.display());
                return;
            }
            let ours = super::read_rgb(&sample).unwrap();
            let engine = minisam::image_io::read_rgb(&sample).unwrap();
            assert_eq!((ours.width, ours.height, &ours.data), (engine.width, engine.height, &engine.data));
            let mask = minisam_models::image::Mask { width: 3, height: 1, data: vec![0, 1, 1] };
            let out = std::env::temp_dir().join(format!("minisamctl-test-{}.png", std::process::id()));
            super::write_mask(&out, &mask).unwrap();
            assert_eq!(minisam::image_io::read_labels(&out).unwrap().labels, vec![0, 255, 255]);
            std::fs::write(&out, b"BM not a png").unwrap();
            let err = format!("{:#}", super::read_rgb(&out).unwrap_err());
            assert!(err.contains("minisam convert"), "{err}");
            std::fs::remove_file(&out).unwrap();
        }
    }
}
