//! The adapter file format: round trip, every way a file can be damaged, every field a writer can
//! get wrong. Binding to a model is tested in `crate::sam`.

use super::*;

const BASE: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn layers() -> Vec<LinearShape> {
    let l = |name: &str, i, o| LinearShape { name: name.into(), in_features: i, out_features: o };
    vec![
        l("image_encoder.blocks.0.attn.qkv", 4, 12),
        l("image_encoder.blocks.0.attn.proj", 4, 4),
        l("image_encoder.blocks.0.mlp.lin1", 4, 16),
        l("mask_decoder.transformer.layers.0.self_attn.q_proj", 8, 8),
    ]
}

/// A small valid adapter (two tensors, rank 2) and its factors.
fn sample() -> (AdapterMeta, Vec<LoraFactors>) {
    let targets = default_targets();
    let factors = synth::random_factors(&layers(), &targets, 2, 11).unwrap();
    let mut meta = synth::test_meta(&targets, BASE, 2, 4.0, 11);
    meta.val_dice = Some(0.875);
    (meta, factors)
}

fn sample_bytes() -> Vec<u8> {
    let (meta, factors) = sample();
    encode_adapter(&meta, &factors).unwrap().bytes().to_vec()
}

fn err_text(r: crate::Result<AdapterFile>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn round_trip_through_bytes_writer_and_file() {
    let (meta, factors) = sample();
    assert_eq!(factors.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["image_encoder.blocks.0.attn.qkv", "image_encoder.blocks.0.attn.proj"]);
    let mut written = Vec::new();
    let adapter = write_adapter(&mut written, &meta, &factors).unwrap();
    assert_eq!(written, adapter.bytes());
    let m = adapter.manifest();
    assert_eq!((m.name.as_str(), m.modality.as_str(), m.base_model_sha256.as_str()), ("random-11", "US", BASE));
    assert_eq!((m.rank, m.alpha, m.scale(), m.val_dice), (2, 4.0, 2.0, Some(0.875)));
    assert_eq!(m.targets, ["*.attn.qkv", "*.attn.proj"]);
    assert_eq!(m.created, meta.created);
    assert_eq!(m.training_set_sha256, meta.training_set_sha256);
    assert_eq!(m.trainer_version, meta.trainer_version);
    assert_eq!(adapter.factors(), &factors[..]);
    assert_eq!(m.tensors[0].in_features, 4);
    assert_eq!(m.tensors[0].out_features, 12);
    assert!(m.tensors.iter().all(|t| t.a.offset % 64 == 0 && t.b.offset % 64 == 0));
    use sha2::Digest;
    assert_eq!(adapter.sha256_hex(), crate::import::hex(&sha2::Sha256::digest(&written)));
    assert_eq!(&written[..8], b"MSAMLORA");
    assert_eq!(u32::from_le_bytes(written[8..12].try_into().unwrap()), 1);

    let path = std::env::temp_dir().join(format!("minisam-adapter-test-{}.lora", std::process::id()));
    std::fs::write(&path, &written).unwrap();
    let reopened = AdapterFile::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(reopened.manifest(), m);
    assert_eq!(reopened.factors(), adapter.factors());
    assert_eq!(reopened.sha256_hex(), adapter.sha256_hex());
    // The same inputs give the same bytes: the hash is a stable identity.
    assert_eq!(encode_adapter(&meta, &factors).unwrap().bytes(), &written[..]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample_bytes();
    for len in 0..bytes.len() {
        assert!(AdapterFile::from_bytes(bytes[..len].to_vec()).is_err(), "truncated to {len} of {} bytes was accepted", bytes.len());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(AdapterFile::from_bytes(longer).is_err(), "a trailing byte was accepted");
}

#[test]
fn every_single_byte_flip_is_an_error() {
    let bytes = sample_bytes();
    // Header, manifest, padding and data alike: the CRCs and zero-padding rules leave no byte
    // whose change goes unnoticed.
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            assert!(AdapterFile::from_bytes(b).is_err(), "flipping byte {i} with {mask:#04x} was accepted");
        }
    }
}

#[test]
fn header_errors_say_what_is_wrong() {
    let bytes = sample_bytes();
    assert!(err_text(AdapterFile::from_bytes(b"MSAMPACK".repeat(4))).contains("not a MSAMLORA"));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(err_text(AdapterFile::from_bytes(v2)).contains("version 2"));
    let mut crc = bytes.clone();
    crc[HEADER_LEN + 3] ^= 1;
    assert!(err_text(AdapterFile::from_bytes(crc)).contains("manifest checksum"));
    let last = bytes.len() - 5;
    let mut data = bytes.clone();
    data[last] ^= 0x10;
    let e = err_text(AdapterFile::from_bytes(data));
    assert!(e.contains("checksum mismatch") || e.contains("padding") || e.contains("non-zero"), "{e}");
    let e = err_text(AdapterFile::open(std::path::Path::new("/nonexistent/x.lora")));
    assert!(e.contains("/nonexistent/x.lora"), "{e}");
}

/// Re-assembles a file from an edited manifest and data section, with correct header CRC, so
/// that the manifest-level checks (not the CRC) are what refuses it.
fn reassemble(m: &AdapterManifest, data: &[u8]) -> Vec<u8> {
    let enc = postcard::to_stdvec(m).unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&VERSION.to_le_bytes());
    f.extend_from_slice(&(enc.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(&enc).to_le_bytes());
    f.extend_from_slice(&enc);
    f.resize(f.len().div_ceil(ALIGN) * ALIGN, 0);
    f.extend_from_slice(data);
    f
}

/// The sample's manifest and data section.
fn sample_parts() -> (AdapterManifest, Vec<u8>) {
    let (meta, factors) = sample();
    let a = encode_adapter(&meta, &factors).unwrap();
    let data = a.bytes()[a.bytes().len() - a.manifest().data_len as usize..].to_vec();
    (a.manifest().clone(), data)
}

fn tensor_crc(t: &AdapterTensor, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for r in [t.a, t.b] {
        h.update(&data[r.offset as usize..(r.offset + r.len) as usize]);
    }
    h.finalize()
}

#[test]
fn reassembling_an_untouched_manifest_is_accepted() {
    // Guards the tests below: their edits, not `reassemble`, are what gets refused.
    let (m, data) = sample_parts();
    AdapterFile::from_bytes(reassemble(&m, &data)).unwrap();
}

#[test]
fn table_errors_name_the_tensor() {
    let (m, data) = sample_parts();
    let check = |edit: &dyn Fn(&mut AdapterManifest, &mut Vec<u8>), want: &str| {
        let (mut m, mut data) = (m.clone(), data.clone());
        edit(&mut m, &mut data);
        let e = err_text(AdapterFile::from_bytes(reassemble(&m, &data)));
        assert!(e.contains(want), "expected {want:?} in: {e}");
    };
    check(&|m, _| m.tensors[1].name = m.tensors[0].name.clone(), "listed twice");
    check(&|m, _| m.tensors[0].name = "image_encoder.blocks.0.mlp.lin1".into(), "matches none of the targets");
    check(&|m, _| m.tensors[0].a.len -= 4, "rank 2 needs");
    check(&|m, _| m.tensors[0].in_features = 0, "in_features 0");
    check(&|m, _| m.tensors[0].out_features = MAX_FEATURES + 1, "out_features");
    check(&|m, _| m.tensors.clear(), "0 tensors");
    check(
        &|m, d| {
            // Move A by 4 bytes (still inside the data section): misaligned.
            let t = &mut m.tensors[0];
            d.splice(t.a.offset as usize..t.a.offset as usize, [0u8; 4]);
            d.truncate(d.len() - 4);
            t.a.offset += 4;
        },
        "not 64-byte aligned",
    );
    check(
        &|m, d| {
            // Point tensor 1's A at tensor 0's A (same length with these sizes? make it so).
            let a0 = m.tensors[0].a;
            m.tensors[1].a = ByteRange { offset: a0.offset, len: m.tensors[1].a.len };
            m.tensors[1].crc32 = tensor_crc(&m.tensors[1], d);
        },
        "overlaps",
    );
    check(&|m, d| m.tensors[1].b.offset = (d.len() as u64).div_ceil(64) * 64, "outside the");
    check(
        &|m, d| {
            m.data_len += 64;
            d.extend_from_slice(&[0u8; 63]);
            d.push(1);
        },
        "after the last factor",
    );
    check(
        &|m, d| {
            // A NaN with a matching CRC: only the value check can catch it.
            let off = m.tensors[0].b.offset as usize;
            d[off..off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            m.tensors[0].crc32 = tensor_crc(&m.tensors[0], d);
        },
        "non-finite",
    );
}

#[test]
fn manifest_field_errors_are_refused_by_writer_and_reader() {
    let (meta, factors) = sample();
    let check = |edit: &dyn Fn(&mut AdapterMeta), want: &str| {
        let mut m = meta.clone();
        edit(&mut m);
        let e = err_text(encode_adapter(&m, &factors));
        assert!(e.contains(want), "expected {want:?} in: {e}");
        assert!(e.starts_with("adapter rejected"), "{e}");
    };
    check(&|m| m.name = String::new(), "name");
    check(&|m| m.name = "../etc/passwd".into(), "name");
    check(&|m| m.name = "x".repeat(65), "name");
    check(&|m| m.modality = "U S".into(), "modality");
    check(&|m| m.base_model_sha256 = BASE.to_uppercase(), "base_model_sha256");
    check(&|m| m.base_model_sha256 = BASE[..63].into(), "base_model_sha256");
    check(&|m| m.training_set_sha256 = String::new(), "training_set_sha256");
    check(&|m| m.alpha = f32::NAN, "alpha");
    check(&|m| m.alpha = 0.0, "alpha");
    check(&|m| m.rank = 3, "rank 3");
    check(&|m| m.targets = vec![], "targets");
    check(&|m| m.created = "2026-11-29 17:25:00".into(), "RFC 3339");
    check(&|m| m.val_dice = Some(1.5), "val_dice");
    check(&|m| m.val_dice = Some(f32::NAN), "val_dice");
    check(&|m| m.trainer_version = String::new(), "trainer_version");

    let mut rank0 = meta.clone();
    rank0.rank = 0;
    let zero_factors: Vec<LoraFactors> = factors.iter().map(|f| LoraFactors { a: vec![], b: vec![], ..f.clone() }).collect();
    assert!(err_text(encode_adapter(&rank0, &zero_factors)).contains("rank 0"));

    let mut nan = factors.clone();
    nan[1].a[3] = f32::INFINITY;
    let e = err_text(encode_adapter(&meta, &nan));
    assert!(e.contains("image_encoder.blocks.0.attn.proj") && e.contains("non-finite"), "{e}");
    assert!(err_text(encode_adapter(&meta, &[])).contains("0 tensors"));
}

#[test]
fn random_adapters_are_seeded_and_change_something() {
    let targets = vec!["*".to_string()];
    let a = synth::random_adapter(&layers(), &targets, BASE, 3, 6.0, 5).unwrap();
    let b = synth::random_adapter(&layers(), &targets, BASE, 3, 6.0, 5).unwrap();
    let c = synth::random_adapter(&layers(), &targets, BASE, 3, 6.0, 6).unwrap();
    assert_eq!(a.sha256_hex(), b.sha256_hex());
    assert_ne!(a.sha256_hex(), c.sha256_hex());
    assert_eq!(a.factors().len(), layers().len());
    assert!(a.factors().iter().all(|f| f.b.iter().any(|&v| v != 0.0)), "B must be non-zero to change outputs");
    let none = synth::random_factors(&layers(), &["nothing.*".to_string()], 2, 1);
    assert!(none.unwrap_err().to_string().contains("match none"));
}

#[test]
fn default_targets_are_the_encoder_attention_projections() {
    let all = layers();
    let chosen: Vec<&str> = select_targets(&all, &default_targets()).iter().map(|l| l.name.as_str()).collect();
    assert_eq!(chosen, ["image_encoder.blocks.0.attn.qkv", "image_encoder.blocks.0.attn.proj"]);
}
