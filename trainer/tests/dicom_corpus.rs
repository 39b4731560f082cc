//! Decodes every file of the committed DICOM corpus (trainer/tests/data/dicom, made by its
//! generate.py with pydicom as the reference decoder) and compares with pydicom's pixels:
//! identical for lossless transfer syntaxes, PSNR >= 40 dB for lossy ones. Grey images are also
//! compared after the modality LUT and window / min-max (the `.u8` files), and CT files with the
//! `abdomen` preset. Files the engine must refuse are checked to fail with a message naming the
//! transfer syntax. Run with `--nocapture` for the per-file table.

use std::path::{Path, PathBuf};

use minisam::dicom::{self, DicomOptions};

fn corpus() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom");
    dir.join("manifest.json").exists().then_some(dir)
}

fn i32s(path: &Path) -> Vec<i64> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

/// (max |a - b|, PSNR in dB for the given peak; infinite when equal).
fn compare(a: &[i64], b: &[i64], peak: f64) -> (i64, f64) {
    assert_eq!(a.len(), b.len(), "sample counts differ");
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .max()
        .unwrap_or(0);
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (peak * peak / mse).log10()
    };
    (max, psnr)
}

#[test]
fn corpus_decodes_like_pydicom() {
    let Some(dir) = corpus() else {
        println!("SKIP: no DICOM corpus at trainer/tests/data/dicom (run its generate.py)");
        return;
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    println!(
        "{:<26} {:<44} {:<14} {:>8} {:>8} {:>9}",
        "file", "transfer syntax", "photometric", "maxdiff", "PSNR", "u8 diff"
    );
    for e in manifest.as_array().unwrap() {
        let file = e["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let frame = e["frame"].as_u64().unwrap() as u32;
        let opts = DicomOptions {
            frame,
            window: None,
        };
        let (ts, pi) = (
            e["name"].as_str().unwrap(),
            e["photometric"].as_str().unwrap(),
        );
        if let Some(want) = e.get("error").and_then(|v| v.as_str()) {
            match dicom::read(&bytes, &opts) {
                Ok(_) => failures.push(format!("{file}: decoded, but must be refused ({want})")),
                Err(err) => {
                    let msg = format!("{err:#}");
                    println!("{file:<26} {ts:<44} {pi:<14} refused: {msg}");
                    if !msg.contains(want) || !msg.contains("transfer syntax") {
                        failures.push(format!(
                            "{file}: error does not name {want} and the transfer syntax: {msg}"
                        ));
                    }
                }
            }
            continue;
        }
        let lossy = e["lossy"].as_bool().unwrap();
        let s = match dicom::samples(&bytes, frame) {
            Ok(s) => s,
            Err(err) => {
                failures.push(format!("{file}: {err:#}"));
                continue;
            }
        };
        let want = i32s(&dir.join(file.replace(".dcm", ".ref")));
        if (s.width, s.height, s.channels)
            != (
                e["width"].as_u64().unwrap() as usize,
                e["height"].as_u64().unwrap() as usize,
                e["channels"].as_u64().unwrap() as usize,
            )
        {
            failures.push(format!(
                "{file}: size {}x{}x{}",
                s.width, s.height, s.channels
            ));
            continue;
        }
        let (max, psnr) = compare(&s.values, &want, ((1i64 << s.bits) - 1) as f64);
        if (!lossy && max != 0) || psnr < 40.0 {
            failures.push(format!(
                "{file}: max diff {max}, PSNR {psnr:.1} dB against pydicom"
            ));
        }
        // The engine's image: grey after LUTs, colour reduced to 8 bits.
        let img = dicom::read(&bytes, &opts).unwrap();
        let mut u8_note = String::from("-");
        let u8_path = dir.join(file.replace(".dcm", ".u8"));
        if s.channels == 1 && u8_path.exists() {
            let got: Vec<i64> = img.data.iter().step_by(3).map(|&v| i64::from(v)).collect();
            let want: Vec<i64> = std::fs::read(&u8_path)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            let (m, p) = compare(&got, &want, 255.0);
            u8_note = m.to_string();
            if (!lossy && m != 0) || p < 40.0 {
                failures.push(format!(
                    "{file}: engine image differs from the reference rule ({}): max {m}",
                    e["rule"]
                ));
            }
            if let Some(abd) = e.get("abdomen").and_then(|v| v.as_str()) {
                let img = dicom::read(
                    &bytes,
                    &DicomOptions {
                        frame,
                        window: Some("abdomen".parse().unwrap()),
                    },
                )
                .unwrap();
                let got: Vec<i64> = img.data.iter().step_by(3).map(|&v| i64::from(v)).collect();
                let want: Vec<i64> = std::fs::read(dir.join(abd))
                    .unwrap()
                    .into_iter()
                    .map(i64::from)
                    .collect();
                let (m, _) = compare(&got, &want, 255.0);
                u8_note = format!("{u8_note}/{m}");
                if m != 0 {
                    failures.push(format!("{file}: abdomen preset differs: max {m}"));
                }
            }
        } else if s.channels == 3 {
            let shift = s.bits.saturating_sub(8);
            let want8: Vec<i64> = want.iter().map(|v| v >> shift).collect();
            let got: Vec<i64> = img.data.iter().map(|&v| i64::from(v)).collect();
            let (m, p) = compare(&got, &want8, 255.0);
            u8_note = m.to_string();
            if (!lossy && m != 0) || p < 40.0 {
                failures.push(format!("{file}: engine RGB differs: max {m}"));
            }
        }
        println!("{file:<26} {ts:<44} {pi:<14} {max:>8} {psnr:>8.1} {u8_note:>9}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn frames_past_the_end_and_truncated_files_are_errors() {
    let Some(dir) = corpus() else {
        println!("SKIP: no DICOM corpus at trainer/tests/data/dicom (run its generate.py)");
        return;
    };
    for f in ["ct_multiframe_native.dcm", "ct_multiframe_rle.dcm"] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let err = format!(
            "{:#}",
            dicom::read(
                &bytes,
                &DicomOptions {
                    frame: 3,
                    window: None
                }
            )
            .unwrap_err()
        );
        assert!(
            err.contains("frame 3") && err.contains("transfer syntax"),
            "{f}: {err}"
        );
        let rgb = std::fs::read(dir.join("rgb_rle.dcm")).unwrap();
        let err = format!(
            "{:#}",
            dicom::read(
                &rgb,
                &DicomOptions {
                    frame: 0,
                    window: Some("lung".parse().unwrap())
                }
            )
            .unwrap_err()
        );
        assert!(err.contains("grey images"), "{err}");
        // Cuts inside the pixel data (the last 8 bytes of an encapsulated file are only the
        // sequence delimiter, whose absence at the end of the file loses no pixel).
        for cut in [bytes.len() / 2, bytes.len() - 20] {
            assert!(
                dicom::read(
                    &bytes[..cut],
                    &DicomOptions {
                        frame: 2,
                        window: None
                    }
                )
                .is_err(),
                "{f} cut at {cut} accepted"
            );
        }
    }
}
