//! Which way a volume's stored axes point, and how a slice is laid out as an image.
//!
//! The voxel-to-world matrix is nibabel's `img.affine`: the sform when `sform_code > 0`, else
//! the qform (quaternion, `pixdim`, `qfac`) when `qform_code > 0`, else Analyze's default
//! `diag(-pixdim1, pixdim2, pixdim3)`. Each stored axis is then matched to the world axis it runs
//! closest to, exactly as nibabel's `io_orientation` does (columns normalised, replaced by the
//! nearest orthogonal matrix, then for stored axes 0, 1, 2 in turn the largest remaining
//! component wins), so an axis named `z` here is the one nibabel's `aff2axcodes` calls S or I.
//!
//! A slice is cut at a stored index (what nibabel's `dataobj` and ITK-SNAP count) and laid out as
//! radiology viewers show it, whatever the storage order: axial slices with anterior at the top
//! and the patient's right on the image's left; coronal with superior at the top, right on the
//! left; sagittal with superior at the top, anterior on the left. In RAS terms: of the two
//! in-plane world axes the lower one runs along the columns and the higher along the rows, both
//! towards L, P, I (`numpy.flip(canonical_slice.T, (0, 1))` of nibabel's `as_closest_canonical`).

use anyhow::{anyhow, bail, Result};
use nifti::NiftiHeader;

/// The world axes, RAS order: index 0 = x (left-right), 1 = y (posterior-anterior), 2 = z
/// (inferior-superior).
const WORLD: [&str; 3] = ["x", "y", "z"];
/// nibabel's axis codes for a stored axis running towards +world / -world.
const CODES: [[char; 2]; 3] = [['R', 'L'], ['A', 'P'], ['S', 'I']];

/// Which axis to slice along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// The stored axis closest to world axis 0 (x), 1 (y) or 2 (z).
    World(usize),
    /// Stored axis 0, 1 or 2, as in the file.
    Stored(usize),
}

impl Axis {
    pub const Z: Axis = Axis::World(2);
}

impl std::str::FromStr for Axis {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Axis, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "x" => Ok(Axis::World(0)),
            "y" => Ok(Axis::World(1)),
            "z" => Ok(Axis::World(2)),
            "0" => Ok(Axis::Stored(0)),
            "1" => Ok(Axis::Stored(1)),
            "2" => Ok(Axis::Stored(2)),
            other => Err(format!(
                "axis {other:?}: expected x, y, z (world directions) or 0, 1, 2 (stored axes)"
            )),
        }
    }
}

impl std::fmt::Display for Axis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Axis::World(w) => write!(f, "{}", WORLD[*w]),
            Axis::Stored(a) => write!(f, "{a}"),
        }
    }
}

/// `--slice AXIS[:INDEX]`: an axis and a stored index along it (`None` = the middle slice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub axis: Axis,
    pub index: Option<usize>,
}

impl Default for SliceSpec {
    /// The middle axial slice.
    fn default() -> Self {
        SliceSpec {
            axis: Axis::Z,
            index: None,
        }
    }
}

impl std::str::FromStr for SliceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<SliceSpec, String> {
        let (axis, index) = match s.split_once(':') {
            Some((a, i)) => {
                let index = i.trim().parse::<usize>().map_err(|_| format!("slice {s:?}: index {i:?} is not a whole number; expected AXIS:INDEX such as z:40"))?;
                (a, Some(index))
            }
            None => (s, None),
        };
        Ok(SliceSpec {
            axis: axis.parse()?,
            index,
        })
    }
}

impl std::fmt::Display for SliceSpec {
    /// `z:40`, or `z` for the middle slice.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}:{i}", self.axis),
            None => write!(f, "{}", self.axis),
        }
    }
}

/// Where each stored axis points: `axes[a] = (world axis, +1 or -1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orientation {
    pub dims: [usize; 3],
    pub axes: [(usize, i8); 3],
}

type Mat3 = [[f64; 3]; 3];

impl Orientation {
    /// From the header's transforms, as the module docs say.
    pub fn from_header(h: &NiftiHeader, dims: [usize; 3]) -> Result<Orientation> {
        let (m, source) = if h.sform_code > 0 {
            let rows = [h.srow_x, h.srow_y, h.srow_z];
            (rows.map(|r| [r[0], r[1], r[2]].map(f64::from)), "sform")
        } else if h.qform_code > 0 {
            (qform(h), "qform")
        } else {
            let zoom = |i: usize| {
                if h.pixdim[i] == 0.0 {
                    1.0
                } else {
                    f64::from(h.pixdim[i]).abs()
                }
            };
            (
                [
                    [-zoom(1), 0.0, 0.0],
                    [0.0, zoom(2), 0.0],
                    [0.0, 0.0, zoom(3)],
                ],
                "default",
            )
        };
        let axes = io_orientation(&m).ok_or_else(|| anyhow!("bad NIfTI header: the {source} matrix {m:?} is degenerate (no direction for some axis); fix the header or set {source}_code 0"))?;
        Ok(Orientation { dims, axes })
    }

    /// nibabel's axis codes, e.g. `"LPS"`.
    pub fn codes(&self) -> String {
        self.axes
            .iter()
            .map(|&(w, s)| CODES[w][usize::from(s < 0)])
            .collect()
    }

    /// The stored axis running along world axis `w`.
    fn stored_axis_of(&self, w: usize) -> usize {
        self.axes
            .iter()
            .position(|&(world, _)| world == w)
            .expect("io_orientation assigns every world axis once")
    }

    /// The plane of `spec`: which stored voxel each image pixel shows.
    pub fn plane(&self, spec: SliceSpec) -> Result<Plane> {
        let stored = match spec.axis {
            Axis::World(w) => self.stored_axis_of(w),
            Axis::Stored(a) => a,
        };
        let n = self.dims[stored];
        let index = spec.index.unwrap_or(n / 2);
        if index >= n {
            bail!("slice {}:{index} is outside the volume: stored axis {stored} ({}) has indices 0..={}", spec.axis, self.codes(), n - 1);
        }
        let world = self.axes[stored].0;
        let mut in_plane: Vec<usize> = (0..3).filter(|&w| w != world).collect();
        in_plane.sort_unstable();
        // Display runs towards L, P, I: against a stored axis pointing to R, A, S.
        let run = |w: usize| {
            let a = self.stored_axis_of(w);
            Run {
                axis: a,
                len: self.dims[a],
                reversed: self.axes[a].1 > 0,
            }
        };
        let (cols, rows) = (run(in_plane[0]), run(in_plane[1]));
        Ok(Plane {
            volume_dims: self.dims,
            stored_axis: stored,
            world_axis: world,
            index,
            width: cols.len,
            height: rows.len,
            cols,
            rows,
        })
    }
}

/// One image direction: the stored axis it walks and whether it walks it backwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub axis: usize,
    pub len: usize,
    pub reversed: bool,
}

impl Run {
    fn stored_index(&self, d: usize) -> usize {
        if self.reversed {
            self.len - 1 - d
        } else {
            d
        }
    }
}

/// A slice through a volume, laid out for display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plane {
    pub volume_dims: [usize; 3],
    pub stored_axis: usize,
    pub world_axis: usize,
    pub index: usize,
    pub width: usize,
    pub height: usize,
    pub cols: Run,
    pub rows: Run,
}

impl Plane {
    /// Stored voxel coordinates of every pixel, row-major.
    pub fn voxels(&self) -> impl Iterator<Item = [usize; 3]> + '_ {
        (0..self.height).flat_map(move |r| {
            (0..self.width).map(move |c| {
                let mut ijk = [0; 3];
                ijk[self.stored_axis] = self.index;
                ijk[self.rows.axis] = self.rows.stored_index(r);
                ijk[self.cols.axis] = self.cols.stored_index(c);
                ijk
            })
        })
    }

    /// `z:40 (stored axis 2, 512x512)`, for messages and names.
    pub fn describe(&self) -> String {
        format!(
            "{}:{} (stored axis {}, {}x{})",
            WORLD[self.world_axis], self.index, self.stored_axis, self.width, self.height
        )
    }

    /// The world axis letter the slice is cut along.
    pub fn world_letter(&self) -> &'static str {
        WORLD[self.world_axis]
    }
}

/// The qform: rotation from the quaternion, columns scaled by pixdim, the third by qfac.
fn qform(h: &NiftiHeader) -> Mat3 {
    let (b, c, d) = (
        f64::from(h.quatern_b),
        f64::from(h.quatern_c),
        f64::from(h.quatern_d),
    );
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    // qfac is pixdim[0]: -1 flips the third axis; anything else (often 0) counts as 1.
    let qfac = if h.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
    let zoom = [
        f64::from(h.pixdim[1]),
        f64::from(h.pixdim[2]),
        f64::from(h.pixdim[3]) * qfac,
    ];
    let mut m = r;
    for row in &mut m {
        for (v, z) in row.iter_mut().zip(zoom) {
            *v *= z;
        }
    }
    m
}

fn det(m: &Mat3) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// The transposed inverse of `m` (cofactors over the determinant).
fn inverse_transpose(m: &Mat3) -> Mat3 {
    let d = det(m);
    let mut out = [[0.0; 3]; 3];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let (i1, i2) = ((i + 1) % 3, (i + 2) % 3);
            let (j1, j2) = ((j + 1) % 3, (j + 2) % 3);
            *v = (m[i1][j1] * m[i2][j2] - m[i1][j2] * m[i2][j1]) / d;
        }
    }
    out
}

/// nibabel's `io_orientation` of a 3x3 voxel-to-world matrix: `None` when it is degenerate.
fn io_orientation(m: &Mat3) -> Option<[(usize, i8); 3]> {
    if m.iter().flatten().any(|v| !v.is_finite()) {
        return None;
    }
    // Unit columns (a zero column stays zero and makes the matrix degenerate).
    let mut r = *m;
    for j in 0..3 {
        let norm = (0..3).map(|i| m[i][j] * m[i][j]).sum::<f64>().sqrt();
        let norm = if norm == 0.0 { 1.0 } else { norm };
        for row in &mut r {
            row[j] /= norm;
        }
    }
    if det(&r).abs() < 1e-6 {
        return None;
    }
    // Nearest orthogonal matrix (the polar factor nibabel takes from the SVD) by Newton's
    // iteration R <- (R + R^-T) / 2, which converges quadratically for a non-singular R.
    for _ in 0..100 {
        let it = inverse_transpose(&r);
        let mut change: f64 = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                let next = 0.5 * (r[i][j] + it[i][j]);
                change = change.max((next - r[i][j]).abs());
                r[i][j] = next;
            }
        }
        if change < 1e-15 {
            break;
        }
    }
    let mut axes = [(0, 1); 3];
    for (stored, out) in axes.iter_mut().enumerate() {
        let world = (0..3).max_by(|&a, &b| {
            r[a][stored]
                .abs()
                .total_cmp(&r[b][stored].abs())
                .then(b.cmp(&a))
        })?;
        if r[world][stored] == 0.0 {
            return None;
        }
        *out = (world, if r[world][stored] < 0.0 { -1 } else { 1 });
        r[world] = [0.0; 3];
    }
    Some(axes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_codes_follow_the_largest_component_in_stored_order() {
        let ras = io_orientation(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).unwrap();
        assert_eq!(ras, [(0, 1), (1, 1), (2, 1)]);
        // KiTS-like: stored axis 0 runs along z, axis 2 along -x.
        let kits = io_orientation(&[[0.0, 0.0, -0.8], [0.0, -0.8, 0.0], [-5.0, 0.0, 0.0]]).unwrap();
        assert_eq!(kits, [(2, -1), (1, -1), (0, -1)]);
        // 30 degrees oblique about z still names the closer axis.
        let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
        assert_eq!(
            io_orientation(&[[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 2.0]]).unwrap(),
            [(0, 1), (1, 1), (2, 1)]
        );
        assert!(
            io_orientation(&[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).is_none(),
            "degenerate"
        );
        assert!(
            io_orientation(&[[f64::NAN, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).is_none()
        );
    }

    #[test]
    fn slice_specs_parse_strictly() {
        assert_eq!(
            "z:40".parse::<SliceSpec>().unwrap(),
            SliceSpec {
                axis: Axis::World(2),
                index: Some(40)
            }
        );
        assert_eq!(
            "1".parse::<SliceSpec>().unwrap(),
            SliceSpec {
                axis: Axis::Stored(1),
                index: None
            }
        );
        assert_eq!(
            " X : 3".parse::<SliceSpec>().unwrap(),
            SliceSpec {
                axis: Axis::World(0),
                index: Some(3)
            }
        );
        for bad in ["", "w:1", "z:-1", "z:1.5", "3:0", "z:"] {
            assert!(bad.parse::<SliceSpec>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn planes_are_laid_out_for_display() {
        // RAS storage 4x3x2: an axial slice shows columns R->L and rows A->P, both reversed.
        let o = Orientation {
            dims: [4, 3, 2],
            axes: [(0, 1), (1, 1), (2, 1)],
        };
        let p = o
            .plane(SliceSpec {
                axis: Axis::Z,
                index: Some(1),
            })
            .unwrap();
        assert_eq!((p.width, p.height), (4, 3));
        let v: Vec<[usize; 3]> = p.voxels().collect();
        assert_eq!(
            v[0],
            [3, 2, 1],
            "top-left pixel is the most right, most anterior voxel"
        );
        assert_eq!(v[1], [2, 2, 1]);
        assert_eq!(v[4], [3, 1, 1]);
        // LPS storage (DICOM-like) is shown as stored.
        let lps = Orientation {
            dims: [4, 3, 2],
            axes: [(0, -1), (1, -1), (2, 1)],
        };
        let p = lps
            .plane(SliceSpec {
                axis: Axis::Stored(2),
                index: None,
            })
            .unwrap();
        assert_eq!(p.index, 1, "the middle slice by default");
        assert_eq!(
            p.voxels().take(5).collect::<Vec<_>>(),
            vec![[0, 0, 1], [1, 0, 1], [2, 0, 1], [3, 0, 1], [0, 1, 1]]
        );
        // Sagittal: columns along y (towards P), rows along z (towards I).
        let p = lps
            .plane(SliceSpec {
                axis: Axis::World(0),
                index: Some(2),
            })
            .unwrap();
        assert_eq!((p.width, p.height, p.stored_axis), (3, 2, 0));
        assert_eq!(p.voxels().next().unwrap(), [2, 0, 1]);
        let err = lps
            .plane(SliceSpec {
                axis: Axis::Z,
                index: Some(2),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("0..=1"), "{err}");
    }
}
