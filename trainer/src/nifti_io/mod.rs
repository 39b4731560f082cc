//! NIfTI-1 volumes (`.nii`, `.nii.gz`) through the `nifti` crate, and the 2D slices the engine
//! segments. The crate parses the header and reads the voxel buffer; what is done here, so each
//! rule is visible and tested:
//!
//! 1. **Bounds before allocation.** The header is read first; the volume is refused when it is
//!    not 3D or 4D, its data type is not a real scalar (RGB, complex and 128-bit floats are
//!    named and refused), or its first 3D volume holds more than [`MAX_VOXELS`] voxels. Only
//!    then is the buffer allocated, and only for one 3D volume: a 4D file gives its volume
//!    `--frame N` (0 = the first). `.hdr`/`.img` pairs and NIfTI-2 are refused by name. The
//!    rest of the file is read through (not kept), so a cut `.nii.gz` fails its gzip check.
//! 2. **Values** are `stored × scl_slope + scl_inter` in f64, as NIfTI (and nibabel) define
//!    them: a slope of 0 or a non-finite one means "no scaling".
//! 3. **Slices** (`orientation`): the axis is named by the world (RAS) direction it runs along
//!    according to the sform, else the qform, else the stored order (nibabel's `img.affine`),
//!    or by its stored index 0|1|2; the index along it counts as stored. The slice is laid out
//!    the way radiology viewers show it, whatever the storage order.
//! 4. **Grey levels** as for DICOM: `--window` (centre/width or a preset) when given; else uint8
//!    volumes without scaling are used as stored and everything else is min-max scaled over the
//!    slice (the evaluation protocol's rule). `cal_min`/`cal_max` are ignored: real exports
//!    rarely set them.

pub mod cache;
pub mod orientation;

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minisam_models::image::{RgbImage, MAX_IMAGE_SIDE};
use nifti::{InMemNiftiVolume, NiftiHeader, NiftiType};

use crate::dicom::{window_to_u8, Window};
pub use orientation::{Axis, Orientation, Plane, SliceSpec};

/// Largest 3D volume read, in voxels (512 x 512 x 2048; 1 GiB as int16, 4 GiB as float64). A
/// header asking for more is refused before anything is allocated.
pub const MAX_VOXELS: usize = 512 * 512 * 2048;

/// Header sizes of NIfTI-1 and NIfTI-2 (the first field of both).
const NIFTI1_HEADER: i32 = 348;
const NIFTI2_HEADER: i32 = 540;

/// One 3D volume: its header facts and voxels, column-major (x fastest) as stored.
#[derive(Debug)]
pub struct Volume {
    /// Sizes of the three stored axes.
    pub dims: [usize; 3],
    pub datatype: NiftiType,
    /// `(slope, intercept)` when the header scales values.
    pub scaling: Option<(f64, f64)>,
    pub orientation: Orientation,
    /// Volumes in the file (the 4th dimension; 1 for a 3D file).
    pub frames: usize,
    voxels: Voxels,
}

/// The voxels in their stored type, in native byte order.
#[derive(Debug)]
enum Voxels {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Voxels {
    fn len(&self) -> usize {
        match self {
            Voxels::U8(v) => v.len(),
            Voxels::I8(v) => v.len(),
            Voxels::U16(v) => v.len(),
            Voxels::I16(v) => v.len(),
            Voxels::U32(v) => v.len(),
            Voxels::I32(v) => v.len(),
            Voxels::U64(v) => v.len(),
            Voxels::I64(v) => v.len(),
            Voxels::F32(v) => v.len(),
            Voxels::F64(v) => v.len(),
        }
    }

    /// The stored value at linear index `i`, as f64 (exact up to 2^53).
    fn get(&self, i: usize) -> f64 {
        match self {
            Voxels::U8(v) => f64::from(v[i]),
            Voxels::I8(v) => f64::from(v[i]),
            Voxels::U16(v) => f64::from(v[i]),
            Voxels::I16(v) => f64::from(v[i]),
            Voxels::U32(v) => f64::from(v[i]),
            Voxels::I32(v) => f64::from(v[i]),
            Voxels::U64(v) => v[i] as f64,
            Voxels::I64(v) => v[i] as f64,
            Voxels::F32(v) => f64::from(v[i]),
            Voxels::F64(v) => v[i],
        }
    }
}

/// Does `bytes` start like a NIfTI file: a NIfTI-1/2 header, or gzip (checked further when read)?
pub fn looks_like(bytes: &[u8]) -> bool {
    is_gzip(bytes) || header_size(bytes).is_some()
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// `sizeof_hdr` when the bytes start with a NIfTI-1 or NIfTI-2 header of either byte order.
fn header_size(bytes: &[u8]) -> Option<i32> {
    let first: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    [i32::from_le_bytes(first), i32::from_be_bytes(first)]
        .into_iter()
        .find(|&n| {
            let magic_at = if n == NIFTI1_HEADER { 344 } else { 4 };
            (n == NIFTI1_HEADER || n == NIFTI2_HEADER)
                && bytes
                    .get(magic_at..magic_at + 2)
                    .is_some_and(|m| m == b"n+" || m == b"ni")
        })
}

/// Reads volume `frame` (0 = the first) of a `.nii` or `.nii.gz` file held in `bytes`.
pub fn read(bytes: &[u8], frame: usize) -> Result<Volume> {
    if is_gzip(bytes) {
        let mut gz = flate2::read::GzDecoder::new(bytes);
        let mut head = [0u8; 4];
        gz.read_exact(&mut head).map_err(|e| {
            anyhow!("not a readable gzip file ({e}); check that the .nii.gz is complete")
        })?;
        if !plausible_header_start(&head) {
            bail!("a gzip file that does not hold a NIfTI volume (its first bytes are no NIfTI header)");
        }
        read_stream(std::io::Cursor::new(head).chain(gz), frame)
    } else {
        read_stream(bytes, frame)
    }
}

/// The first field of a NIfTI-1 or NIfTI-2 header, in either byte order.
fn plausible_header_start(head: &[u8; 4]) -> bool {
    [i32::from_le_bytes(*head), i32::from_be_bytes(*head)]
        .iter()
        .any(|&n| n == NIFTI1_HEADER || n == NIFTI2_HEADER)
}

/// Reads a NIfTI file from disk (see [`read`]), naming it in every error.
pub fn read_path(path: &Path, frame: usize) -> Result<Volume> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read {}: check the path and its permissions",
            path.display()
        )
    })?;
    read(&bytes, frame).with_context(|| format!("reading NIfTI volume {}", path.display()))
}

/// Reads only the header of a file on disk: its 3D shape and orientation (to slice a label
/// volume as its image, and compare their shapes, without decoding either).
pub fn read_orientation(path: &Path) -> Result<Orientation> {
    let context = || format!("reading the NIfTI header of {}", path.display());
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open {}: check the path and its permissions",
            path.display()
        )
    })?;
    let mut reader = std::io::BufReader::new(file);
    let mut head = [0u8; 2];
    reader
        .read_exact(&mut head)
        .map_err(|_| anyhow!("empty file"))
        .with_context(context)?;
    let stream = std::io::Cursor::new(head).chain(reader);
    let header = if is_gzip(&head) {
        parse_header(flate2::read::GzDecoder::new(stream))
    } else {
        parse_header(stream)
    };
    let header = header.with_context(context)?;
    let (dims, _) = checked_shape(&header).with_context(context)?;
    Orientation::from_header(&header, dims).with_context(context)
}

fn parse_header<R: Read>(mut stream: R) -> Result<NiftiHeader> {
    let header = NiftiHeader::from_reader(&mut stream).map_err(|e| match e {
        nifti::NiftiError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            anyhow!("truncated: the file ends inside the 348-byte NIfTI-1 header")
        }
        nifti::NiftiError::InvalidFormat => anyhow!("not a NIfTI-1 file (bad magic code in the header; NIfTI-2 is not read: save it as NIfTI-1, e.g. with nibabel)"),
        e => anyhow!("bad NIfTI header: {e}"),
    })?;
    if header.sizeof_hdr == NIFTI2_HEADER {
        bail!("NIfTI-2 header: only NIfTI-1 is read; save the volume as NIfTI-1 (e.g. nibabel's Nifti1Image)");
    }
    if &header.magic == b"ni1\0" {
        bail!("a .hdr/.img pair header: only single-file .nii/.nii.gz volumes are read; convert it (e.g. nibabel save as .nii.gz)");
    }
    Ok(header)
}

/// The 3D shape and the number of 3D volumes, checked against the limits.
fn checked_shape(h: &NiftiHeader) -> Result<([usize; 3], usize)> {
    let rank = usize::from(h.dim[0]);
    if !(1..=7).contains(&rank) {
        bail!(
            "bad NIfTI header: dim[0] = {} is not a number of dimensions (1..=7)",
            h.dim[0]
        );
    }
    let dims: Vec<usize> = (1..=rank).map(|i| usize::from(h.dim[i])).collect();
    if dims.iter().any(|&d| d == 0 || d > i16::MAX as usize) {
        bail!("bad NIfTI header: dimensions {dims:?} must each be 1..=32767");
    }
    if rank > 4 && dims[4..].iter().any(|&d| d > 1) {
        bail!("a {rank}D volume {dims:?}: only 3D volumes and 4D series of them are read");
    }
    let at = |i: usize| dims.get(i).copied().unwrap_or(1);
    let shape = [at(0), at(1), at(2)];
    let voxels = shape.iter().product::<usize>();
    if voxels > MAX_VOXELS {
        bail!(
            "volume {}x{}x{} has {voxels} voxels, more than the {MAX_VOXELS} read (a bound on memory); crop or resample it",
            shape[0], shape[1], shape[2]
        );
    }
    Ok((shape, at(3)))
}

fn read_stream<R: Read>(mut stream: R, frame: usize) -> Result<Volume> {
    let header = parse_header(&mut stream)?;
    let (dims, frames) = checked_shape(&header)?;
    let datatype = header
        .data_type()
        .map_err(|_| anyhow!("unknown NIfTI data type code {}", header.datatype))?;
    let element = supported_element_size(datatype)?;
    if frame >= frames {
        bail!(
            "volume {frame} asked for (--frame), the file holds {frames} (0..={})",
            frames - 1
        );
    }
    let vox_offset = header.vox_offset;
    if !vox_offset.is_finite() || vox_offset < 352.0 || vox_offset.fract() != 0.0 {
        bail!("bad NIfTI header: vox_offset {vox_offset} must be a whole number of bytes >= 352");
    }
    let volume_bytes = dims.iter().product::<usize>() * element;
    // Extensions and the volumes before `frame` are skipped without being kept.
    let skip =
        (vox_offset as u64 - u64::from(NIFTI1_HEADER as u32)) + (frame * volume_bytes) as u64;
    let skipped = std::io::copy(&mut (&mut stream).take(skip), &mut std::io::sink())
        .map_err(|e| anyhow!("corrupt data before the voxels: {e}"))?;
    if skipped != skip {
        bail!("truncated: the file ends before its voxel data (at byte {} of the stream, the voxels start at {})", u64::from(NIFTI1_HEADER as u32) + skipped, vox_offset as u64 + (frame * volume_bytes) as u64);
    }
    // One 3D volume: the header's shape with the 4th dimension dropped.
    let mut one = header.clone();
    one.dim = [
        3,
        dims[0] as u16,
        dims[1] as u16,
        dims[2] as u16,
        1,
        1,
        1,
        1,
    ];
    one.bitpix = (element * 8) as i16;
    let volume = InMemNiftiVolume::from_reader(&mut stream, &one).map_err(|e| match e {
        nifti::NiftiError::IncompatibleLength(got, want) => {
            anyhow!("truncated: {got} of the {want} voxel bytes of volume {frame} are in the file")
        }
        nifti::NiftiError::Io(io) => anyhow!("corrupt or truncated voxel data ({io})"),
        e => anyhow!("cannot read the voxels: {e}"),
    })?;
    // The rest of the stream is read too (later volumes, a gzip trailer), so that a cut or
    // corrupt .nii.gz is an error even when the voxels asked for came out whole.
    std::io::copy(&mut stream, &mut std::io::sink())
        .map_err(|e| anyhow!("corrupt or truncated file after the voxels ({e})"))?;
    let voxels = typed(volume, datatype)?;
    debug_assert_eq!(voxels.len(), dims.iter().product::<usize>());
    let (slope, inter) = (f64::from(header.scl_slope), f64::from(header.scl_inter));
    let scaling = if slope == 0.0 || !slope.is_finite() {
        None
    } else if !inter.is_finite() {
        bail!("bad NIfTI header: scl_slope {slope} with a non-finite scl_inter {inter}");
    } else if slope == 1.0 && inter == 0.0 {
        None
    } else {
        Some((slope, inter))
    };
    Ok(Volume {
        dims,
        datatype,
        scaling,
        orientation: Orientation::from_header(&header, dims)?,
        frames,
        voxels,
    })
}

/// Bytes per voxel of the data types read; the others are refused by name.
fn supported_element_size(t: NiftiType) -> Result<usize> {
    use NiftiType::*;
    Ok(match t {
        Uint8 | Int8 => 1,
        Uint16 | Int16 => 2,
        Uint32 | Int32 | Float32 => 4,
        Uint64 | Int64 | Float64 => 8,
        other => bail!("NIfTI data type {other:?} (code {}) is not read: only real scalar voxels (int8..int64, uint8..uint64, float32, float64); convert the volume to one", other as i16),
    })
}

fn typed(v: InMemNiftiVolume, t: NiftiType) -> Result<Voxels> {
    use NiftiType::*;
    let err = |e: nifti::NiftiError| anyhow!("cannot convert the voxels: {e}");
    Ok(match t {
        Uint8 => Voxels::U8(v.into_nifti_typed_data().map_err(err)?),
        Int8 => Voxels::I8(v.into_nifti_typed_data().map_err(err)?),
        Uint16 => Voxels::U16(v.into_nifti_typed_data().map_err(err)?),
        Int16 => Voxels::I16(v.into_nifti_typed_data().map_err(err)?),
        Uint32 => Voxels::U32(v.into_nifti_typed_data().map_err(err)?),
        Int32 => Voxels::I32(v.into_nifti_typed_data().map_err(err)?),
        Uint64 => Voxels::U64(v.into_nifti_typed_data().map_err(err)?),
        Int64 => Voxels::I64(v.into_nifti_typed_data().map_err(err)?),
        Float32 => Voxels::F32(v.into_nifti_typed_data().map_err(err)?),
        Float64 => Voxels::F64(v.into_nifti_typed_data().map_err(err)?),
        other => bail!("NIfTI data type {other:?} is not read"),
    })
}

impl Volume {
    /// Bytes held by the voxels.
    pub fn byte_size(&self) -> usize {
        self.voxels.len() * supported_element_size(self.datatype).unwrap_or(8)
    }

    /// The value (after scaling) of stored voxel `[i, j, k]`.
    pub fn value(&self, [i, j, k]: [usize; 3]) -> f64 {
        let raw = self.voxels.get(i + self.dims[0] * (j + self.dims[1] * k));
        match self.scaling {
            Some((slope, inter)) => raw * slope + inter,
            None => raw,
        }
    }

    /// Every value of `plane` (from this volume's or a same-shaped volume's orientation), row-major.
    pub fn plane_values(&self, plane: &Plane) -> Result<Vec<f64>> {
        if plane.volume_dims != self.dims {
            bail!(
                "slice of a {:?} volume asked of a {:?} one",
                plane.volume_dims,
                self.dims
            );
        }
        Ok(plane.voxels().map(|ijk| self.value(ijk)).collect())
    }

    /// The slice `spec` as the engine's image, with the grey-level rules of the module docs.
    pub fn slice_rgb(&self, spec: SliceSpec, window: Option<Window>) -> Result<RgbImage> {
        let plane = self.orientation.plane(spec)?;
        self.plane_rgb(&plane, window)
    }

    /// [`Volume::slice_rgb`] for a resolved plane.
    pub fn plane_rgb(&self, plane: &Plane, window: Option<Window>) -> Result<RgbImage> {
        let (w, h) = (plane.width, plane.height);
        if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
            bail!("slice {w}x{h} exceeds {MAX_IMAGE_SIDE} pixels per side");
        }
        let values = self.plane_values(plane)?;
        if values.iter().any(|v| !v.is_finite()) {
            bail!(
                "slice {} holds NaN or infinite voxels; fix the volume",
                plane.describe()
            );
        }
        let grey: Vec<u8> = match window {
            Some(win) => values
                .iter()
                .map(|&x| window_to_u8(x, win, false))
                .collect(),
            None if self.datatype == NiftiType::Uint8 && self.scaling.is_none() => {
                values.iter().map(|&v| v as u8).collect()
            }
            None => crate::image_io::min_max_f64_to_u8(&values),
        };
        RgbImage::from_grey(w, h, &grey).map_err(|e| anyhow!("{e}"))
    }

    /// The slice as labels: each value must be a whole number in 0..=65535.
    pub fn plane_labels(&self, plane: &Plane) -> Result<crate::image_io::LabelMask> {
        let values = self.plane_values(plane)?;
        let mut labels = Vec::with_capacity(values.len());
        for (n, &v) in values.iter().enumerate() {
            if !(0.0..=65535.0).contains(&v) || v.fract() != 0.0 {
                bail!(
                    "label value {v} at pixel ({}, {}) of slice {}: labels must be whole numbers 0..=65535",
                    n % plane.width,
                    n / plane.width,
                    plane.describe()
                );
            }
            labels.push(v as u16);
        }
        Ok(crate::image_io::LabelMask {
            width: plane.width,
            height: plane.height,
            labels,
        })
    }
}

#[cfg(test)]
mod tests;
