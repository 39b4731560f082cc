//! Data sets of NIfTI volume pairs, as CT/MR challenges ship them, seen by the protocol as sets
//! of 2D images: each labelled slice of each volume is one image, with the same targets, boxes
//! and Dice as a PNG pair.
//!
//! Layouts (`detect`), the folder given or any folder under `--data`:
//! - **MSD** (Medical Segmentation Decathlon): `imagesTr/<name>.nii.gz` and
//!   `labelsTr/<name>.nii.gz`. Hidden files (macOS `._*` copies in the released archives) are
//!   ignored; `imagesTs/` has no labels and is not read.
//! - **KiTS**: `case_*/imaging.nii.gz` and `case_*/segmentation.nii.gz`; cases without a
//!   segmentation (the challenge's test cases) are skipped.
//!
//! A slice's image name is `<volume>@<axis><index>` (`la_003.nii.gz@z045`, `case_00000@z061`):
//! the stored index along the axis the set is sliced along (`--axis`, default z). Only slices
//! holding at least one protocol target are listed, volume by volume in byte order of names,
//! then by index. Image and label volumes must have the same shape; both are sliced with the
//! image volume's orientation (`nifti_io::orientation`). 4D images give their first volume.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minisam_models::image::RgbImage;

use super::protocol::{self, SetDir};
use crate::dicom::Window;
use crate::image_io::LabelMask;
use crate::nifti_io::{self, cache, Axis, Orientation, Plane, SliceSpec};

/// How a set's volumes are cut into images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slicing {
    pub axis: Axis,
    pub window: Option<Window>,
}

impl Default for Slicing {
    /// Axial slices, min-max grey levels.
    fn default() -> Self {
        Slicing {
            axis: Axis::Z,
            window: None,
        }
    }
}

/// Where a set's image/label pairs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `images/*.png` + `masks/*.png` (the protocol's own layout).
    Png,
    /// `imagesTr/*.nii[.gz]` + `labelsTr/*.nii[.gz]`.
    Msd,
    /// `case_*/imaging.nii[.gz]` + `case_*/segmentation.nii[.gz]`.
    Kits,
}

const KITS_IMAGE: &str = "imaging.nii.gz";
const KITS_LABELS: &str = "segmentation.nii.gz";

/// The volume set `dir` holds, if it is laid out as MSD or KiTS; named after the folder.
pub fn detect(dir: &Path, slicing: Slicing) -> Option<SetDir> {
    let layout = if dir.join("imagesTr").is_dir() && dir.join("labelsTr").is_dir() {
        Layout::Msd
    } else if kits_cases(dir).is_ok_and(|c| !c.is_empty()) {
        Layout::Kits
    } else {
        return None;
    };
    let name = dir
        .canonicalize()
        .ok()?
        .file_name()?
        .to_string_lossy()
        .into_owned();
    Some(SetDir {
        name,
        dir: dir.to_path_buf(),
        layout,
        slicing,
    })
}

fn is_nifti_name(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".nii.gz") || name.ends_with(".nii"))
}

/// KiTS case folders holding an image volume, byte order.
fn kits_cases(dir: &Path) -> Result<Vec<String>> {
    Ok(protocol::sorted_entries(dir, true)?
        .into_iter()
        .filter(|c| c.starts_with("case_") && dir.join(c).join(KITS_IMAGE).is_file())
        .collect())
}

/// Volume names of a set (MSD file names, KiTS case names) that have labels, byte order.
fn volumes(set: &SetDir) -> Result<Vec<String>> {
    match set.layout {
        Layout::Msd => {
            let names: Vec<String> = protocol::sorted_entries(&set.dir.join("imagesTr"), false)?
                .into_iter()
                .filter(|n| is_nifti_name(n))
                .collect();
            for n in &names {
                let labels = set.dir.join("labelsTr").join(n);
                if !labels.is_file() {
                    bail!(
                        "set {}: volume imagesTr/{n} has no labels {}",
                        set.name,
                        labels.display()
                    );
                }
            }
            Ok(names)
        }
        Layout::Kits => Ok(kits_cases(&set.dir)?
            .into_iter()
            .filter(|c| set.dir.join(c).join(KITS_LABELS).is_file())
            .collect()),
        Layout::Png => bail!("set {} holds PNG pairs, not volumes", set.name),
    }
}

/// The volume part of a slice's image name.
pub fn volume_name(image: &str) -> &str {
    image.rsplit_once('@').map_or(image, |(v, _)| v)
}

/// The stored index of a slice's image name.
fn slice_index(image: &str) -> Result<usize> {
    let parsed = image.rsplit_once('@').and_then(|(_, s)| {
        s.trim_start_matches(|c: char| c.is_ascii_alphabetic())
            .parse()
            .ok()
    });
    parsed.with_context(|| format!("{image:?} is not a slice name <volume>@<axis><index>"))
}

pub fn image_volume(set: &SetDir, image: &str) -> PathBuf {
    let v = volume_name(image);
    match set.layout {
        Layout::Kits => set.dir.join(v).join(KITS_IMAGE),
        _ => set.dir.join("imagesTr").join(v),
    }
}

pub fn label_volume(set: &SetDir, image: &str) -> PathBuf {
    let v = volume_name(image);
    match set.layout {
        Layout::Kits => set.dir.join(v).join(KITS_LABELS),
        _ => set.dir.join("labelsTr").join(v),
    }
}

/// The image volume's orientation (from its header alone), checked against the label volume's
/// shape.
fn geometry(set: &SetDir, volume: &str) -> Result<Orientation> {
    let (image, labels) = (image_volume(set, volume), label_volume(set, volume));
    let orientation = nifti_io::read_orientation(&image)?;
    let label_dims = nifti_io::read_orientation(&labels)?.dims;
    if orientation.dims != label_dims {
        bail!(
            "set {}: image volume {} is {:?} but its labels {} are {:?}; they must have the same shape",
            set.name,
            image.display(),
            orientation.dims,
            labels.display(),
            label_dims
        );
    }
    Ok(orientation)
}

/// The slice `image` names, in the image volume's orientation.
fn plane(set: &SetDir, image: &str) -> Result<Plane> {
    let index = slice_index(image)?;
    geometry(set, volume_name(image))?.plane(SliceSpec {
        axis: set.slicing.axis,
        index: Some(index),
    })
}

/// Every slice of every volume that holds a protocol target, as image names.
pub fn list_slices(set: &SetDir) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for v in volumes(set)? {
        let orientation = geometry(set, &v)?;
        let labels = cache::volume(&label_volume(set, &v))?;
        let first = orientation.plane(SliceSpec {
            axis: set.slicing.axis,
            index: Some(0),
        })?;
        for index in 0..orientation.dims[first.stored_axis] {
            let plane = orientation.plane(SliceSpec {
                axis: set.slicing.axis,
                index: Some(index),
            })?;
            let mask = labels
                .plane_labels(&plane)
                .with_context(|| format!("labels {}", label_volume(set, &v).display()))?;
            if !protocol::targets(&mask).is_empty() {
                out.push(format!("{v}@{}{index:03}", plane.world_letter()));
            }
        }
    }
    Ok(out)
}

pub fn read_image(set: &SetDir, image: &str) -> Result<RgbImage> {
    let path = image_volume(set, image);
    let plane = plane(set, image)?;
    cache::volume(&path)?
        .plane_rgb(&plane, set.slicing.window)
        .with_context(|| format!("slice {} of {}", plane.describe(), path.display()))
}

pub fn read_labels(set: &SetDir, image: &str) -> Result<LabelMask> {
    let path = label_volume(set, image);
    let plane = plane(set, image)?;
    cache::volume(&path)?
        .plane_labels(&plane)
        .with_context(|| format!("labels {}", path.display()))
}

/// A slice's labels as bytes (little-endian u16), for hashing a training set.
pub fn label_bytes(set: &SetDir, image: &str) -> Result<Vec<u8>> {
    Ok(read_labels(set, image)?
        .labels
        .iter()
        .flat_map(|l| l.to_le_bytes())
        .collect())
}
