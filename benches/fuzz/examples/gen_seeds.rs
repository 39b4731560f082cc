//! Writes small valid inputs for every target into `corpus/<target>/` (run from benches/fuzz:
//! `cargo run --release --example gen_seeds`). Seeds are built with the project's own writers,
//! so they follow the formats exactly as the code does today; keep them small (the fuzzer
//! mutates whole inputs, and every byte costs executions per second).

use std::path::Path;

use minisam_models::adapter::{synth, LinearShape};
use minisam_models::format::{self, Provenance};
use minisam_models::import::{self, pth, zip, Checkpoint};
use minisam_models::store::MemoryStore;

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// `mode` byte of the model/adapter harnesses (see `split_mode` in src/lib.rs) + file.
fn with_mode(mode: u8, file: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(file);
    v
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 - n as f32 / 2.0) * scale).collect()
}

fn small_tensors() -> Tensors {
    vec![
        // NF4 (a 2-D `.weight` whose rows fill whole 64-element blocks).
        ("enc.proj.weight".into(), vec![2, 64], ramp(128, 0.01)),
        // fp16.
        ("enc.proj.bias".into(), vec![2], vec![0.5, -0.25]),
        // f32: outside fp16's range.
        ("enc.scale".into(), vec![2], vec![1.0e6, -3.0]),
    ]
}

fn model_seeds(tmp: &Path) {
    // Any real config does: the reader checks tensors against their own shapes, not the config.
    let config = Checkpoint::open(Path::new("../../tests/fixtures/tiny_sam/tiny_sam.pth")).expect("tiny SAM fixture").config().clone();
    let out = tmp.join("seed.msam");
    let store = MemoryStore::new(small_tensors());
    format::pack(&store, &config, Provenance::new("seed.pth", "0".repeat(64)), &[], &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    format::reader::validate(&bytes).expect("seed validates");
    for mode in 0..3 {
        put("model_reader", &format!("tiny_mode{mode}.msam"), &with_mode(mode, &bytes));
    }
}

fn adapter_seeds() {
    let linears = [
        LinearShape { name: "image_encoder.blocks.0.attn.qkv".into(), in_features: 8, out_features: 24 },
        LinearShape { name: "image_encoder.blocks.0.attn.proj".into(), in_features: 8, out_features: 8 },
    ];
    let targets = minisam_models::adapter::default_targets();
    let a = synth::random_adapter(&linears, &targets, &"ab".repeat(32), 2, 4.0, 7).unwrap();
    for mode in 0..3 {
        put("adapter_reader", &format!("r2_mode{mode}.lora"), &with_mode(mode, a.bytes()));
    }
}

fn pth_seeds() {
    let bytes = pth::write("tiny", &small_tensors()).unwrap();
    pth::read(&bytes).expect("seed reads");
    put("pth_reader", "tiny_pth", &with_mode(0, &bytes));
    put("pth_reader", "tiny_zip", &with_mode(1, &bytes));
    let entries = zip::entries(&bytes).unwrap();
    let pkl: &[u8] = &entries["tiny/data.pkl"];
    put("pth_reader", "tiny_pickle", &with_mode(2, pkl));
    // Mode 3: the same pickle, its tensors re-keyed onto the storage the harness provides.
    let mut built = vec![3u8];
    built.extend((pkl.len() as u16).to_le_bytes());
    built.extend_from_slice(pkl);
    built.extend((0..600u32).map(|i| (i * 7 % 256) as u8));
    put("pth_reader", "tiny_built_zip", &built);
    // A state dict wrapped in {"model": ...}, the other layout `read` accepts, is not produced
    // by our writer; the fuzzer reaches it from the pickle seed.
}

fn safetensors_seeds(tmp: &Path) {
    let out = tmp.join("seed.safetensors");
    import::write_safetensors(&out, &small_tensors()).unwrap();
    put("safetensors_reader", "tiny_f32", &std::fs::read(&out).unwrap());
    // F16 and BF16 entries and a metadata block, written by hand (our writer emits F32 only).
    let header = r#"{"__metadata__":{"format":"pt"},"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[4,8]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header.as_bytes());
    f.extend_from_slice(&[0x00, 0x3c, 0x00, 0xc0, 0x80, 0x3f, 0x00, 0x40]);
    minisam_models::import::safetensors::read(&f).expect("hand-written seed reads");
    put("safetensors_reader", "f16_bf16_meta", &f);
}

/// One data element (explicit VR when `explicit`; 4-byte lengths for the long-form VRs).
fn element(out: &mut Vec<u8>, explicit: bool, tag: (u16, u16), vr: &[u8; 2], v: &[u8]) {
    out.extend(tag.0.to_le_bytes());
    out.extend(tag.1.to_le_bytes());
    if !explicit {
        out.extend((v.len() as u32).to_le_bytes());
    } else if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
        out.extend(vr);
        out.extend([0, 0]);
        out.extend((v.len() as u32).to_le_bytes());
    } else {
        out.extend(vr);
        out.extend((v.len() as u16).to_le_bytes());
    }
    out.extend(v);
}

fn dicom(explicit: bool, bits: u16, w: u16, h: u16, nested: bool) -> Vec<u8> {
    let mut f = vec![0u8; 128];
    f.extend(b"DICM");
    let ts: &[u8] = if explicit { b"1.2.840.10008.1.2.1\0" } else { b"1.2.840.10008.1.2\0" };
    element(&mut f, true, (0x0002, 0x0010), b"UI", ts);
    element(&mut f, explicit, (0x0008, 0x0060), b"CS", b"MR");
    if nested {
        // An undefined-length sequence holding one undefined-length item, then the delimiters.
        f.extend([0x08, 0x00, 0x40, 0x11]);
        if explicit {
            f.extend(b"SQ\0\0");
        }
        f.extend(u32::MAX.to_le_bytes());
        f.extend([0xFE, 0xFF, 0x00, 0xE0]);
        f.extend(u32::MAX.to_le_bytes());
        element(&mut f, explicit, (0x0008, 0x1150), b"UI", b"1.2\0");
        f.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0, 0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    element(&mut f, explicit, (0x0028, 0x0002), b"US", &1u16.to_le_bytes());
    element(&mut f, explicit, (0x0028, 0x0004), b"CS", b"MONOCHROME2 ");
    element(&mut f, explicit, (0x0028, 0x0008), b"IS", b"1 ");
    element(&mut f, explicit, (0x0028, 0x0010), b"US", &h.to_le_bytes());
    element(&mut f, explicit, (0x0028, 0x0011), b"US", &w.to_le_bytes());
    element(&mut f, explicit, (0x0028, 0x0100), b"US", &bits.to_le_bytes());
    element(&mut f, explicit, (0x0028, 0x0103), b"US", &1u16.to_le_bytes());
    let n = usize::from(w) * usize::from(h) * usize::from(bits / 8);
    let px: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
    element(&mut f, explicit, (0x7FE0, 0x0010), if bits == 8 { b"OB" } else { b"OW" }, &px);
    f
}

fn dicom_seeds() {
    for (name, f) in [
        ("explicit16_nested.dcm", dicom(true, 16, 4, 3, true)),
        ("implicit16_nested.dcm", dicom(false, 16, 4, 3, true)),
        ("explicit8.dcm", dicom(true, 8, 5, 2, false)),
    ] {
        minisam::dicom::read(&f, &minisam::dicom::DicomOptions::default()).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        put("dicom_reader", name, &f);
    }
}

/// A frame request in the layout `frame_prompt` decodes (see src/lib.rs).
fn frame_request(w: u32, h: u32, stride: u32, fmt: u8, boxes: &[[f64; 4]], points: &[(f64, f64, u32)], frame_sel: u8) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(w.to_le_bytes());
    v.extend(h.to_le_bytes());
    v.extend(stride.to_le_bytes());
    v.push(fmt);
    v.extend(*b"gray8\0");
    v.extend(1_000_000u64.to_le_bytes());
    v.push(boxes.len() as u8);
    v.push(points.len() as u8);
    v.push(frame_sel);
    for b in boxes {
        for c in b {
            v.extend(c.to_le_bytes());
        }
    }
    for &(x, y, l) in points {
        v.extend(x.to_le_bytes());
        v.extend(y.to_le_bytes());
        v.extend(l.to_le_bytes());
    }
    let bpp = [1, 2, 3, 1][fmt as usize % 4];
    v.extend((0..(stride.max(w * bpp) * h) as usize).map(|i| (i * 13 % 256) as u8));
    v
}

fn frame_seeds() {
    put("frame_prompt", "gray8_box", &frame_request(4, 3, 6, 0, &[[0.5, 0.5, 3.0, 2.0]], &[], 1));
    put("frame_prompt", "gray16_points", &frame_request(3, 2, 6, 1, &[], &[(1.0, 1.0, 1), (0.0, 1.5, 0)], 1));
    put("frame_prompt", "rgb8_box_points_nosize", &frame_request(2, 2, 8, 2, &[[0.0, 0.0, 2.0, 2.0]], &[(1.0, 1.0, 1)], 0));
}

fn main() {
    let tmp = std::env::temp_dir().join(format!("minisam-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    model_seeds(&tmp);
    adapter_seeds();
    pth_seeds();
    safetensors_seeds(&tmp);
    dicom_seeds();
    frame_seeds();
    std::fs::remove_dir_all(&tmp).unwrap();
    println!("seeds written under corpus/");
}
