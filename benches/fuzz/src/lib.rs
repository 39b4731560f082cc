//! Fuzz harnesses of every parser that reads bytes from outside the process: one function per
//! target, called by the libFuzzer binaries in `fuzz_targets/` and, without instrumentation, by
//! `tests/replay.rs` over the committed seeds and crash regressions.
//!
//! A harness must never panic on its own: any panic is a finding in the code under test. Errors
//! returned by the readers are the expected outcome for almost every input and are ignored.

use std::sync::atomic::{AtomicU64, Ordering};

use minisam_models::adapter::{AdapterFile, AdapterManifest};
use minisam_models::format::{self, Manifest};
use minisam_models::store::WeightStore;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The targets, in the order `run.sh` and the replay test go through them.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("model_reader", model_reader),
    ("adapter_reader", adapter_reader),
    ("pth_reader", pth_reader),
    ("safetensors_reader", safetensors_reader),
    ("dicom_reader", dicom_reader),
    ("frame_prompt", frame_prompt),
];

/// Both container formats we own (`MSAMPACK`, `MSAMLORA`) share one header: magic (8),
/// version (4), manifest length (4), manifest CRC-32 (4), then the postcard manifest and zero
/// padding up to a 64-byte aligned data section.
const HEADER_LEN: usize = 20;
const ALIGN: usize = 64;

/// How the first input byte tells the model and adapter harnesses to treat the rest.
///
/// A random mutation almost never keeps a CRC-32 right, so a plain byte fuzzer would test little
/// beyond the checksum checks. Mode 0 hands the file over untouched (the checksum checks
/// themselves); mode 1 rewrites the manifest CRC so mutations reach the manifest decoder and
/// field checks; mode 2 decodes the manifest, recomputes every tensor CRC and the data length
/// from the data section, and re-encodes it, so mutations of the data and of the ranges reach
/// the deepest checks (bounds, overlaps, padding, NF4 scale records, finite factors).
fn split_mode(data: &[u8]) -> Option<(u8, &[u8])> {
    let (&mode, file) = data.split_first()?;
    Some((mode % 3, file))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Mode 1: the same file with the manifest CRC made right (when the length field is in range).
fn fix_manifest_crc(file: &[u8]) -> Vec<u8> {
    let mut out = file.to_vec();
    if out.len() >= HEADER_LEN {
        let m_len = le_u32(&out, 12) as usize;
        if let Some(m) = out.get(HEADER_LEN..HEADER_LEN.saturating_add(m_len)) {
            let crc = crc32fast::hash(m);
            out[16..20].copy_from_slice(&crc.to_le_bytes());
        }
    }
    out
}

/// Mode 2: decodes the manifest, lets `fix` repair it against the data section, and lays the
/// file out again (header, manifest, padding, the original data section). `None` when the
/// manifest does not decode: the reader would refuse it anyway, which modes 0 and 1 cover.
fn refit<M: Serialize + DeserializeOwned>(file: &[u8], fix: impl FnOnce(&mut M, &[u8])) -> Option<Vec<u8>> {
    if file.len() < HEADER_LEN {
        return None;
    }
    let m_len = le_u32(file, 12) as usize;
    let m_end = HEADER_LEN.checked_add(m_len).filter(|&e| e <= file.len())?;
    let mut manifest: M = postcard::from_bytes(&file[HEADER_LEN..m_end]).ok()?;
    let data = file.get(m_end.next_multiple_of(ALIGN)..).unwrap_or(&[]);
    fix(&mut manifest, data);
    let m = postcard::to_stdvec(&manifest).ok()?;
    let mut out = Vec::with_capacity(HEADER_LEN + m.len() + ALIGN + data.len());
    out.extend_from_slice(&file[..12]);
    out.extend_from_slice(&(m.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&m).to_le_bytes());
    out.extend_from_slice(&m);
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    out.extend_from_slice(data);
    Some(out)
}

/// CRC-32 of the given ranges of `data`, concatenated; ranges outside `data` are skipped (the
/// reader refuses them before it looks at the CRC).
fn crc_of(data: &[u8], ranges: impl IntoIterator<Item = (u64, u64)>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (offset, len) in ranges {
        let range = usize::try_from(offset).ok().zip(usize::try_from(len).ok()).and_then(|(o, l)| Some(o..o.checked_add(l)?));
        if let Some(bytes) = range.and_then(|r| data.get(r)) {
            h.update(bytes);
        }
    }
    h.finalize()
}

/// Packed model (`MSAMPACK`): [`format::reader::validate`] over the bytes, which is everything
/// `PackedModel::open` checks; an input that passes is also opened from a file and every tensor
/// fetched, as a model load would.
pub fn model_reader(data: &[u8]) {
    let Some((mode, file)) = split_mode(data) else { return };
    let file = match mode {
        0 => file.to_vec(),
        1 => fix_manifest_crc(file),
        _ => {
            let fixed = refit(file, |m: &mut Manifest, data| {
                m.data_len = data.len() as u64;
                for t in &mut m.tensors {
                    t.crc32 = crc_of(data, t.arrays.iter().map(|a| (a.offset, a.len)));
                }
            });
            match fixed {
                Some(f) => f,
                None => return,
            }
        }
    };
    if format::reader::validate(&file).is_ok() {
        open_packed_model(&file);
    }
}

/// Counter so concurrent fuzzing processes in one temporary directory never share a file.
static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

/// The mapped path, for the rare input that validates: `PackedModel::open` plus `get` of every
/// tensor must agree with the in-memory validation.
fn open_packed_model(file: &[u8]) {
    let seq = FILE_SEQ.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("minisam-fuzz-{}-{seq}.msam", std::process::id()));
    std::fs::write(&path, file).expect("temporary directory is writable");
    let opened = format::PackedModel::open(&path);
    let _ = std::fs::remove_file(&path);
    let model = opened.expect("a file validate() accepts must open");
    for name in model.names() {
        let t = model.get(&name).expect("every tensor of a validated model must load");
        let _ = t.to_f32();
    }
    let _ = model.tensors();
}

/// LoRA adapter (`MSAMLORA`): `AdapterFile::from_bytes`, the path files and D-Bus uploads take.
pub fn adapter_reader(data: &[u8]) {
    let Some((mode, file)) = split_mode(data) else { return };
    let file = match mode {
        0 => file.to_vec(),
        1 => fix_manifest_crc(file),
        _ => {
            let fixed = refit(file, |m: &mut AdapterManifest, data| {
                m.data_len = data.len() as u64;
                for t in &mut m.tensors {
                    t.crc32 = crc_of(data, [(t.a.offset, t.a.len), (t.b.offset, t.b.len)]);
                }
            });
            match fixed {
                Some(f) => f,
                None => return,
            }
        }
    };
    if let Ok(a) = AdapterFile::from_bytes(file) {
        // Factors of a validated adapter must match their declared shapes.
        let rank = a.manifest().rank as usize;
        assert_eq!(a.factors().len(), a.manifest().tensors.len());
        for f in a.factors() {
            assert_eq!(f.a.len(), rank * f.in_features, "factor A of {} has the wrong size", f.name);
            assert_eq!(f.b.len(), f.out_features * rank, "factor B of {} has the wrong size", f.name);
            assert!(f.a.iter().chain(&f.b).all(|v| v.is_finite()), "non-finite factor accepted in {}", f.name);
        }
    }
}

/// PyTorch `.pth` (zip + restricted pickle). The first byte `% 4` picks the layer: 0 the whole
/// checkpoint reader, 1 the zip directory alone, 2 the pickle VM alone, 3 the whole reader over
/// a zip the harness builds (`<u16 pickle length><pickle><storage bytes>`: the pickle becomes
/// `ck/data.pkl` and the rest the storages `ck/data/0`..`3`), so mutations of the state dict
/// reach tensor gathering without first having to keep a zip directory consistent.
pub fn pth_reader(data: &[u8]) {
    use minisam_models::import::{pickle, pth, zip};
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => import_checkpoint(pth::read(rest)),
        1 => {
            let _ = zip::entries(rest);
        }
        2 => {
            let _ = pickle::load(rest);
        }
        _ => {
            let mut f = Fields(rest);
            let n = u16::from_le_bytes(f.take()) as usize;
            let (pkl, storage) = f.0.split_at(n.min(f.0.len()));
            let mut z = zip::ZipWriter::default();
            let mut ok = z.add("ck/data.pkl", pkl).is_ok();
            for key in 0..4 {
                ok &= z.add(&format!("ck/data/{key}"), storage).is_ok();
            }
            if ok {
                import_checkpoint(pth::read(&z.finish()));
            }
        }
    }
}

/// Safetensors (8-byte header length, JSON header, data).
pub fn safetensors_reader(data: &[u8]) {
    import_checkpoint(minisam_models::import::safetensors::read(data));
}

/// What `Checkpoint::open` does after reading the file: Hugging Face renaming, conv-BN folding
/// and architecture detection, all driven by names and shapes from the file.
fn import_checkpoint(read: minisam_models::Result<minisam_models::import::fold::TensorMap>) {
    if let Ok(map) = read {
        let tensors = map.into_iter().map(|(name, (shape, values))| (name, shape, values)).collect();
        let _ = minisam_models::import::Checkpoint::from_tensors(tensors);
    }
}

/// The DICOM reader of the CLI and trainer (dicom-rs underneath): decoding, LUTs, windowing and
/// colour conversion. The first preamble byte (free in a Part 10 file) picks the frame, so
/// multi-frame paths are reached too.
pub fn dicom_reader(data: &[u8]) {
    let frame = data.first().map_or(0, |b| u32::from(b % 4));
    let opts = minisam::dicom::DicomOptions { frame, window: None };
    if let Ok(img) = minisam::dicom::read(data, &opts) {
        assert_eq!(img.data.len(), img.width * img.height * 3, "decoded image size disagrees with its dimensions");
    }
}

/// Reads fixed-size fields off the front of the input; missing bytes read as zero, so every
/// input decodes to some request.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn f64(&mut self) -> f64 {
        f64::from_le_bytes(self.take())
    }
}

/// What a D-Bus `Segment` request carries before anything is mapped: a frame layout (width,
/// height, stride, pixel format name, against `--max-frame-pixels`), then boxes and points.
/// A layout that validates is then used to convert the rest of the input as the frame's pixels
/// (`frame::to_rgb` must refuse a short buffer, never index past it), and the prompts are
/// validated against the frame size as the service does.
pub fn frame_prompt(data: &[u8]) {
    use minisamd::frame::{to_rgb, Layout};
    use minisamd::prompts::PromptSet;

    let mut f = Fields(data);
    let (width, height, stride) = (f.u32(), f.u32(), f.u32());
    let fmt_sel = f.u8();
    // Mostly the three real names; otherwise a short name from the input, so the refusal of
    // unknown (and non-UTF-8-looking) names is exercised too.
    let odd: [u8; 6] = f.take();
    let odd = String::from_utf8_lossy(&odd[..(fmt_sel as usize >> 2) % 7]).into_owned();
    let format = match fmt_sel % 4 {
        0 => "gray8",
        1 => "gray16",
        2 => "rgb8",
        _ => odd.as_str(),
    };
    let max_pixels = f.u64();
    let n_boxes = f.u8() % 4;
    let n_points = f.u8() % 70;
    let frame_sel = f.u8();
    let boxes: Vec<_> = (0..n_boxes).map(|_| (f.f64(), f.f64(), f.f64(), f.f64())).collect();
    let points: Vec<_> = (0..n_points).map(|_| (f.f64(), f.f64(), f.u32() % 3)).collect();
    let pixels = f.0;

    let layout = Layout::new(width, height, stride, format, max_pixels);
    if let Ok(layout) = &layout {
        assert!(layout.stride >= layout.row_bytes(), "accepted a stride shorter than a row");
        assert!((layout.width * layout.height) as u64 <= max_pixels, "accepted a frame over the pixel bound");
        let mut img = minisam_models::image::RgbImage { width: 0, height: 0, data: Vec::new() };
        if to_rgb(pixels, layout, &mut img).is_ok() {
            assert_eq!(img.data.len(), layout.width * layout.height * 3);
        }
    }
    let frame = match (&layout, frame_sel % 3) {
        (_, 0) => None,
        (Ok(l), 1) => Some((l.width, l.height)),
        _ => Some((width as usize, height as usize)),
    };
    if let Ok(set) = PromptSet::from_wire(&boxes, &points, frame) {
        let mut prompts = minisam_models::prompt::Prompts::default();
        set.fill(&mut prompts);
        if let Some((w, h)) = frame {
            // from_wire validated against the frame: the engine's own check must agree.
            if w > 0 && h > 0 && w <= minisam_models::image::MAX_IMAGE_SIDE && h <= minisam_models::image::MAX_IMAGE_SIDE {
                assert!(prompts.validate(w, h).is_ok(), "prompts accepted by from_wire fail Prompts::validate");
            }
        }
    }
}
