//! Bad input, made by editing the committed corpus's bytes: each must be an error naming the
//! cause, and none may allocate what its header claims. (Decoded values against nibabel are in
//! `trainer/tests/nifti_corpus.rs`.)

use super::*;

fn corpus(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nifti/volumes")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The little-endian, uncompressed uint8 volume (5x4x3), with header field edits.
fn uint8_nii() -> Vec<u8> {
    corpus("mr_uint8_qform.nii")
}

fn set_i16(b: &mut [u8], at: usize, v: i16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn err(bytes: &[u8], frame: usize) -> String {
    format!("{:#}", read(bytes, frame).expect_err("bad input accepted"))
}

#[test]
fn the_committed_volumes_are_recognised_and_read() {
    let v = read(&uint8_nii(), 0).unwrap();
    assert_eq!(
        (v.dims, v.datatype, v.scaling, v.frames),
        ([5, 4, 3], NiftiType::Uint8, None, 1)
    );
    let ct = read(&corpus("ct_int16_scaled.nii.gz"), 0).unwrap();
    assert_eq!(ct.scaling, Some((0.5, -1024.0)));
    assert!(looks_like(&uint8_nii()) && looks_like(&corpus("series_4d.nii.gz")));
    assert!(!looks_like(b"\x89PNG\r\n\x1a\n") && !looks_like(&[0u8; 400]));
}

#[test]
fn truncated_files_are_errors_that_say_so() {
    let nii = uint8_nii();
    assert!(
        err(&nii[..nii.len() - 7], 0).contains("truncated: 53 of the 60 voxel bytes"),
        "{}",
        err(&nii[..nii.len() - 7], 0)
    );
    assert!(err(&nii[..200], 0).contains("truncated: the file ends inside the 348-byte"));
    let gz = corpus("ct_int16_scaled.nii.gz");
    for cut in [gz.len() / 2, gz.len() - 9, 12] {
        let e = err(&gz[..cut], 0);
        assert!(
            e.contains("truncated") || e.contains("corrupt") || e.contains("gzip"),
            "cut at {cut}: {e}"
        );
    }
    let mut corrupt = gz.clone();
    corrupt[40] ^= 0xff;
    assert!(
        read(&corrupt, 0).is_err(),
        "a corrupt deflate stream must not decode"
    );
}

#[test]
fn bad_headers_are_named() {
    let mut b = uint8_nii();
    b[344..348].copy_from_slice(b"xx1\0");
    assert!(err(&b, 0).contains("bad magic"), "{}", err(&b, 0));
    let mut b = uint8_nii();
    b[344..348].copy_from_slice(b"ni1\0");
    assert!(err(&b, 0).contains(".hdr/.img pair"), "{}", err(&b, 0));
    let mut b = uint8_nii();
    b[108..112].copy_from_slice(&100f32.to_le_bytes());
    assert!(err(&b, 0).contains("vox_offset"), "{}", err(&b, 0));
    let mut b = uint8_nii();
    set_i16(&mut b, 40, 6);
    set_i16(&mut b, 50, 3);
    assert!(err(&b, 0).contains("6D volume"), "{}", err(&b, 0));
    let mut n2 = vec![0u8; 600];
    n2[..4].copy_from_slice(&540i32.to_le_bytes());
    n2[4..8].copy_from_slice(b"n+2\0");
    assert!(looks_like(&n2));
    assert!(err(&n2, 0).contains("NIfTI-2"), "{}", err(&n2, 0));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"hello, not a volume at all").unwrap();
    let not_nifti = gz.finish().unwrap();
    assert!(
        err(&not_nifti, 0).contains("does not hold a NIfTI volume"),
        "{}",
        err(&not_nifti, 0)
    );
}

#[test]
fn unsupported_data_types_are_named() {
    for (code, bits, name) in [
        (128i16, 24i16, "Rgb24"),
        (32, 64, "Complex64"),
        (1536, 128, "Float128"),
        (2304, 32, "Rgba32"),
    ] {
        let mut b = uint8_nii();
        set_i16(&mut b, 70, code);
        set_i16(&mut b, 72, bits);
        let e = err(&b, 0);
        assert!(e.contains(name) && e.contains("not read"), "{e}");
    }
    let mut b = uint8_nii();
    set_i16(&mut b, 70, 77);
    assert!(err(&b, 0).contains("unknown NIfTI data type code 77"));
}

#[test]
fn huge_volumes_are_refused_before_allocating() {
    let mut b = uint8_nii();
    for (i, d) in [32767i16, 32767, 32767].iter().enumerate() {
        set_i16(&mut b, 42 + 2 * i, *d);
    }
    let e = err(&b, 0);
    assert!(e.contains("more than the") && e.contains("voxels"), "{e}");
    let mut b = uint8_nii();
    set_i16(&mut b, 42, 0);
    assert!(err(&b, 0).contains("1..=32767"), "{}", err(&b, 0));
}

#[test]
fn frames_of_a_4d_series() {
    let series = corpus("series_4d.nii.gz");
    let first = read(&series, 0).unwrap();
    let second = read(&series, 1).unwrap();
    assert_eq!((first.frames, first.dims), (2, [4, 4, 3]));
    assert_ne!(
        first.value([1, 2, 1]),
        second.value([1, 2, 1]),
        "frame 1 is another volume"
    );
    assert!(err(&series, 2).contains("volume 2 asked for (--frame), the file holds 2 (0..=1)"));
}

#[test]
fn labels_must_be_whole_numbers() {
    let v = read(&corpus("float32_kits_axes.nii.gz"), 0).unwrap();
    let plane = v.orientation.plane(SliceSpec::default()).unwrap();
    let e = format!("{:#}", v.plane_labels(&plane).unwrap_err());
    assert!(e.contains("labels must be whole numbers"), "{e}");
    let grey = read(&uint8_nii(), 0).unwrap();
    assert!(grey
        .plane_labels(&grey.orientation.plane(SliceSpec::default()).unwrap())
        .is_ok());
}

#[test]
fn uint8_volumes_keep_their_values_and_windows_apply() {
    let v = read(&uint8_nii(), 0).unwrap();
    let plane = v.orientation.plane(SliceSpec::default()).unwrap();
    let img = v.plane_rgb(&plane, None).unwrap();
    let stored: Vec<u8> = v
        .plane_values(&plane)
        .unwrap()
        .iter()
        .map(|&x| x as u8)
        .collect();
    assert_eq!(
        img.data.iter().step_by(3).copied().collect::<Vec<_>>(),
        stored,
        "uint8 is used as stored"
    );
    let window = Window {
        centre: 128.0,
        width: 2.0,
    };
    let windowed = v.plane_rgb(&plane, Some(window)).unwrap();
    assert!(
        windowed.data.iter().all(|&g| g == 0 || g == 255),
        "a 2-wide window is a threshold"
    );
}
