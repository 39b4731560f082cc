//! Reads every volume of the committed NIfTI corpus (trainer/tests/data/nifti, made by its
//! generate.py with nibabel as the reference reader) and compares with what nibabel read:
//! every voxel after scaling, the axis codes, the displayed slices (values, min-max grey and the
//! abdomen window) and, for the MSD and KiTS mini-trees, the labelled slices the protocol lists
//! and their targets. All comparisons are exact (max abs diff 0). Run with `--nocapture` for the
//! per-volume table.

use std::path::{Path, PathBuf};

use minisam::dicom::Window;
use minisam::eval::protocol;
use minisam::eval::volume_sets::Slicing;
use minisam::nifti_io::{self, SliceSpec};

fn corpus() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nifti");
    dir.join("expected.json").exists().then_some(dir)
}

fn expected(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "value counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn volumes_read_like_nibabel() {
    let Some(dir) = corpus() else {
        println!("SKIP: no NIfTI corpus at trainer/tests/data/nifti (run its generate.py)");
        return;
    };
    let exp = expected(&dir);
    println!(
        "{:<45} {:>10} {:<8} {:>7} {:>9} {:>8}",
        "file", "shape", "axes", "voxels", "maxdiff", "slices"
    );
    for v in exp["volumes"].as_array().unwrap() {
        let file = v["file"].as_str().unwrap();
        let frame = v["frame"].as_u64().unwrap() as usize;
        let vol = nifti_io::read_path(&dir.join(file), frame).unwrap();
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(vol.dims.to_vec(), shape, "{file}");
        assert_eq!(
            vol.orientation.codes(),
            v["axcodes"].as_str().unwrap(),
            "{file}: axis codes"
        );
        let [nx, ny, nz] = vol.dims;
        let ours: Vec<f64> = (0..nz)
            .flat_map(|k| (0..ny).flat_map(move |j| (0..nx).map(move |i| [i, j, k])))
            .map(|ijk| vol.value(ijk))
            .collect();
        let diff = max_abs_diff(&ours, &f64s(&v["values"]));
        assert_eq!(
            diff, 0.0,
            "{file}: voxels differ from nibabel's by up to {diff}"
        );
        let slices = v["slices"].as_array().unwrap();
        for s in slices {
            let spec: SliceSpec = s["slice"].as_str().unwrap().parse().unwrap();
            let plane = vol.orientation.plane(spec).unwrap();
            let what = format!("{file} slice {}", s["slice"]);
            assert_eq!(
                plane.stored_axis as u64,
                s["stored_axis"].as_u64().unwrap(),
                "{what}"
            );
            assert_eq!(
                (plane.width as u64, plane.height as u64),
                (s["width"].as_u64().unwrap(), s["height"].as_u64().unwrap()),
                "{what}"
            );
            assert_eq!(
                max_abs_diff(&vol.plane_values(&plane).unwrap(), &f64s(&s["values"])),
                0.0,
                "{what}: values"
            );
            let grey: Vec<f64> = vol
                .slice_rgb(spec, None)
                .unwrap()
                .data
                .iter()
                .step_by(3)
                .map(|&g| f64::from(g))
                .collect();
            assert_eq!(
                max_abs_diff(&grey, &f64s(&s["grey"])),
                0.0,
                "{what}: min-max grey levels"
            );
            let abdomen: Window = "abdomen".parse().unwrap();
            let windowed: Vec<f64> = vol
                .slice_rgb(spec, Some(abdomen))
                .unwrap()
                .data
                .iter()
                .step_by(3)
                .map(|&g| f64::from(g))
                .collect();
            assert_eq!(
                max_abs_diff(&windowed, &f64s(&s["abdomen"])),
                0.0,
                "{what}: abdomen window"
            );
        }
        println!(
            "{file:<45} {:>10} {:<8} {:>7} {diff:>9} {:>8}",
            format!("{nx}x{ny}x{nz}"),
            vol.orientation.codes(),
            nx * ny * nz,
            slices.len()
        );
    }
}

#[test]
fn msd_and_kits_trees_list_the_labelled_slices_nibabel_finds() {
    let Some(dir) = corpus() else {
        println!("SKIP: no NIfTI corpus at trainer/tests/data/nifti (run its generate.py)");
        return;
    };
    let exp = expected(&dir);
    for (tree, slices) in exp["trees"].as_object().unwrap() {
        let sets = protocol::list_sets_with(&dir.join(tree), Slicing::default()).unwrap();
        assert_eq!(sets.len(), 1, "{tree}: the folder itself is one set");
        let set = &sets[0];
        let names = protocol::list_images(set).unwrap();
        let want: Vec<&str> = slices
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["image"].as_str().unwrap())
            .collect();
        assert_eq!(names, want, "{tree}: labelled slices");
        for s in slices.as_array().unwrap() {
            let image = s["image"].as_str().unwrap();
            let labels = set.read_labels(image).unwrap();
            let ours: Vec<serde_json::Value> = protocol::targets(&labels)
                .iter()
                .map(|t| {
                    serde_json::json!([
                        t.label,
                        t.pixels,
                        [
                            t.tight_box.x0,
                            t.tight_box.y0,
                            t.tight_box.x1,
                            t.tight_box.y1
                        ]
                    ])
                })
                .collect();
            assert_eq!(
                serde_json::Value::Array(ours),
                s["targets"],
                "{tree} {image}: targets"
            );
            let img = set.read_image(image).unwrap();
            assert_eq!(
                (img.width, img.height),
                (labels.width, labels.height),
                "{tree} {image}"
            );
        }
        println!(
            "{tree}: {} labelled slices, as nibabel lists them",
            names.len()
        );
    }
    // A root holding both trees sees two sets, named after their folders.
    let root = std::env::temp_dir().join(format!("minisam-nifti-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(dir.join("msd/Task99_Mini"), root.join("Task99_Mini")).unwrap();
    std::os::unix::fs::symlink(dir.join("kits"), root.join("kits19")).unwrap();
    let names: Vec<String> = protocol::list_sets_with(&root, Slicing::default())
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn an_image_and_labels_of_different_shapes_are_named() {
    let Some(dir) = corpus() else {
        println!("SKIP: no NIfTI corpus at trainer/tests/data/nifti (run its generate.py)");
        return;
    };
    let root = std::env::temp_dir().join(format!("minisam-nifti-shapes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(
        dir.join("msd/Task99_Mini/imagesTr/mini_001.nii.gz"),
        root.join("imagesTr/a.nii.gz"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("volumes/ct_int16_scaled.nii.gz"),
        root.join("labelsTr/a.nii.gz"),
    )
    .unwrap();
    let set = &protocol::list_sets_with(&root, Slicing::default()).unwrap()[0];
    let err = format!("{:#}", protocol::list_images(set).unwrap_err());
    assert!(
        err.contains("imagesTr/a.nii.gz") && err.contains("labelsTr/a.nii.gz"),
        "{err}"
    );
    assert!(
        err.contains("[24, 20, 6]") && err.contains("[6, 5, 4]"),
        "{err}"
    );
    std::fs::remove_file(root.join("labelsTr/a.nii.gz")).unwrap();
    let err = format!("{:#}", protocol::list_images(set).unwrap_err());
    assert!(err.contains("has no labels"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn convert_writes_the_slice_the_engine_sees() {
    let Some(dir) = corpus() else {
        println!("SKIP: no NIfTI corpus at trainer/tests/data/nifti (run its generate.py)");
        return;
    };
    let exp = expected(&dir);
    let ct = &exp["volumes"][0];
    let slice = &ct["slices"][0];
    let out =
        std::env::temp_dir().join(format!("minisam-nifti-convert-{}.png", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_minisam"))
        .args([
            "convert",
            dir.join(ct["file"].as_str().unwrap()).to_str().unwrap(),
            "--slice",
            slice["slice"].as_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let img = minisam::image_io::read_rgb(&out).unwrap();
    let grey: Vec<f64> = img.data.iter().step_by(3).map(|&g| f64::from(g)).collect();
    assert_eq!(max_abs_diff(&grey, &f64s(&slice["grey"])), 0.0);
    std::fs::remove_file(&out).unwrap();
    // A slice outside the volume is refused, naming the range.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_minisam"))
        .args([
            "convert",
            dir.join(ct["file"].as_str().unwrap()).to_str().unwrap(),
            "--slice",
            "z:9",
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("0..=3"), "{stderr}");
}

#[test]
fn a_volume_is_on_one_side_of_the_train_test_split() {
    use minisam::eval::split::Split;
    use minisam::eval::volume_sets::volume_name;
    let Some(dir) = corpus() else {
        println!("SKIP: no NIfTI corpus at trainer/tests/data/nifti (run its generate.py)");
        return;
    };
    for tree in ["msd/Task99_Mini", "kits"] {
        // A share of 0.5 over two volumes: whatever the hash says, no volume may be on both sides.
        let side = |split: Split| -> Vec<String> {
            let selection = minisam::selection::Selection {
                root: dir.join(tree),
                sets: vec![],
                limit: None,
                split,
                test_share: 0.5,
                slicing: Slicing::default(),
            };
            selection
                .images()
                .unwrap()
                .into_iter()
                .map(|(_, image)| volume_name(&image).to_string())
                .collect()
        };
        let (train, test) = (side(Split::Train), side(Split::Test));
        assert_eq!(train.len() + test.len(), side(Split::All).len(), "{tree}");
        assert!(
            train.iter().all(|v| !test.contains(v)),
            "{tree}: a volume straddles the split: train {train:?}, test {test:?}"
        );
    }
}
