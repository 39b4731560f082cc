//! The evaluation protocol's enumeration (shared/reference/PROTOCOL.md): which sets, images and
//! targets, in which order, and which box prompt each target gets. Everything here is pure file
//! listing and arithmetic, so the order and the boxes can be tested without a model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::image_io::LabelMask;
use minisam_models::image::RgbImage;

use super::volume_sets::{self, Layout, Slicing};

/// Targets with fewer pixels than this are skipped (protocol "Targets").
pub const MIN_TARGET_PIXELS: usize = 16;

/// One dataset folder: `<data>/<name>/{images,masks}`, or a tree of NIfTI volume pairs
/// (`volume_sets`) whose "images" are labelled slices.
#[derive(Clone, Debug, PartialEq)]
pub struct SetDir {
    pub name: String,
    pub dir: PathBuf,
    pub layout: Layout,
    /// How volumes are cut into slices (unused by PNG sets).
    pub slicing: Slicing,
}

impl SetDir {
    /// A PNG set `<dir>/{images,masks}`.
    pub fn png(name: String, dir: PathBuf) -> SetDir {
        SetDir { name, dir, layout: Layout::Png, slicing: Slicing::default() }
    }
    /// The file an image comes from (for a slice: its volume).
    pub fn image_path(&self, file: &str) -> PathBuf {
        match self.layout {
            Layout::Png => self.dir.join("images").join(file),
            _ => volume_sets::image_volume(self, file),
        }
    }
    /// The file an image's labels come from (for a slice: its label volume).
    pub fn mask_path(&self, file: &str) -> PathBuf {
        match self.layout {
            Layout::Png => self.dir.join("masks").join(file),
            _ => volume_sets::label_volume(self, file),
        }
    }
    /// The image as the engine sees it.
    pub fn read_image(&self, file: &str) -> Result<RgbImage> {
        match self.layout {
            Layout::Png => crate::image_io::read_rgb(&self.image_path(file)),
            _ => volume_sets::read_image(self, file),
        }
    }
    /// The image's label mask.
    pub fn read_labels(&self, file: &str) -> Result<LabelMask> {
        match self.layout {
            Layout::Png => crate::image_io::read_labels(&self.mask_path(file)),
            _ => volume_sets::read_labels(self, file),
        }
    }
    /// What decides the image's side of the train/test split: the file, or for a slice its
    /// volume (a patient's slices never straddle the split).
    pub fn split_key<'a>(&self, file: &'a str) -> &'a str {
        match self.layout {
            Layout::Png => file,
            _ => volume_sets::volume_name(file),
        }
    }
}

/// Names of the entries of `dir` (directories if `dirs`, else files), sorted in byte order.
/// Names that are not UTF-8 are refused: they end up in the CSV.
pub(crate) fn sorted_entries(dir: &Path, dirs: bool) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}: check the --data path", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let is_dir = entry.path().is_dir();
        if is_dir != dirs {
            continue;
        }
        let name = entry.file_name().into_string().map_err(|n| {
            anyhow::anyhow!("{}: file name {n:?} is not UTF-8; rename it", dir.display())
        })?;
        names.push(name);
    }
    // `String`'s order is the byte order of its UTF-8 encoding: the protocol's order.
    names.sort();
    Ok(names)
}

/// The sets under `data` with volumes sliced along the default axis (see [`list_sets_with`]).
pub fn list_sets(data: &Path) -> Result<Vec<SetDir>> {
    list_sets_with(data, Slicing::default())
}

/// The sets under `data`, in byte order of names: every subdirectory holding an `images/`
/// folder, or volume pairs in the MSD or KiTS layout (`volume_sets`); `data` itself may be one
/// volume set. A set without `masks/` is an error (it cannot be scored); hidden folders are
/// ignored.
pub fn list_sets_with(data: &Path, slicing: Slicing) -> Result<Vec<SetDir>> {
    if let Some(set) = volume_sets::detect(data, slicing) {
        return Ok(vec![set]);
    }
    let mut sets = Vec::new();
    for name in sorted_entries(data, true)? {
        let dir = data.join(&name);
        if name.starts_with('.') {
            continue;
        }
        if let Some(set) = volume_sets::detect(&dir, slicing) {
            sets.push(set);
            continue;
        }
        if !dir.join("images").is_dir() {
            continue;
        }
        if !dir.join("masks").is_dir() {
            bail!(
                "set {name} has images/ but no masks/ folder in {}",
                dir.display()
            );
        }
        if slicing.window.is_some() {
            bail!("--window applies to NIfTI volume sets; set {name} holds PNG images, which are used as stored: leave --window out or point --data at the volumes");
        }
        sets.push(SetDir::png(name, dir));
    }
    if sets.is_empty() {
        bail!("no data set found in {}: expected <data>/<set>/images/*.png and <data>/<set>/masks/*.png, or NIfTI volumes as MSD (imagesTr/, labelsTr/) or KiTS (case_*/imaging.nii.gz, segmentation.nii.gz) lay them out", data.display());
    }
    Ok(sets)
}

/// The images of a set in protocol order: a PNG set's `*.png` files (byte order, each with a
/// mask of the same name), a volume set's labelled slices.
pub fn list_images(set: &SetDir) -> Result<Vec<String>> {
    if set.layout != Layout::Png {
        return volume_sets::list_slices(set);
    }
    let images: Vec<String> = sorted_entries(&set.dir.join("images"), false)?
        .into_iter()
        .filter(|n| n.ends_with(".png"))
        .collect();
    for name in &images {
        if !set.mask_path(name).is_file() {
            bail!(
                "set {}: image {name} has no mask {}",
                set.name,
                set.mask_path(name).display()
            );
        }
    }
    Ok(images)
}

/// Tight inclusive box of a target: min/max column and row of its pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TightBox {
    pub x0: usize,
    pub y0: usize,
    pub x1: usize,
    pub y1: usize,
}

/// One target of an image: label, pixel count and tight box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub label: u16,
    pub pixels: usize,
    pub tight_box: TightBox,
}

/// The targets of one mask in ascending label order, skipping label 0 and labels with fewer than
/// [`MIN_TARGET_PIXELS`] pixels. One pass over the mask.
pub fn targets(mask: &LabelMask) -> Vec<Target> {
    let mut found: BTreeMap<u16, Target> = BTreeMap::new();
    for (i, &label) in mask.labels.iter().enumerate() {
        if label == 0 {
            continue;
        }
        let (x, y) = (i % mask.width, i / mask.width);
        let t = found.entry(label).or_insert(Target {
            label,
            pixels: 0,
            tight_box: TightBox {
                x0: x,
                y0: y,
                x1: x,
                y1: y,
            },
        });
        t.pixels += 1;
        let b = &mut t.tight_box;
        b.x0 = b.x0.min(x);
        b.x1 = b.x1.max(x);
        b.y0 = b.y0.min(y);
        b.y1 = b.y1.max(y);
    }
    found
        .into_values()
        .filter(|t| t.pixels >= MIN_TARGET_PIXELS)
        .collect()
}

/// Which box each target gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptKind {
    /// The tight box of the target.
    Box,
    /// The reference's jittered box, read from boxes-jitter.json.
    BoxJitter,
}

impl PromptKind {
    pub fn name(self) -> &'static str {
        match self {
            PromptKind::Box => "box",
            PromptKind::BoxJitter => "box-jitter",
        }
    }
}

/// The jittered boxes of the reference, keyed by (set, image, label).
#[derive(Debug)]
pub struct JitterBoxes {
    source: PathBuf,
    boxes: HashMap<(String, String, u16), [f32; 4]>,
}

impl JitterBoxes {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read jitter boxes {}: pass --jitter-boxes FILE",
                path.display()
            )
        })?;
        Self::parse(&text, path).with_context(|| format!("reading jitter boxes {}", path.display()))
    }

    /// Parses `[{"set", "image", "label", "box_xyxy": [x0, y0, x1, y1]}, ...]`.
    pub fn parse(text: &str, source: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let items = v
            .as_array()
            .context("expected a JSON array of {set, image, label, box_xyxy}")?;
        let mut boxes = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let set = item
                .get("set")
                .and_then(|v| v.as_str())
                .with_context(|| format!("entry {i}: missing string \"set\""))?;
            let image = item
                .get("image")
                .and_then(|v| v.as_str())
                .with_context(|| format!("entry {i}: missing string \"image\""))?;
            let label = item
                .get("label")
                .and_then(|v| v.as_f64())
                .with_context(|| format!("entry {i}: missing number \"label\""))?;
            if label.fract() != 0.0 || !(1.0..=65535.0).contains(&label) {
                bail!("entry {i}: label {label} is not an integer in 1..=65535");
            }
            let coords = item
                .get("box_xyxy")
                .and_then(|v| v.as_array())
                .with_context(|| format!("entry {i}: missing array \"box_xyxy\""))?;
            let c: Vec<f64> = coords.iter().filter_map(|v| v.as_f64()).collect();
            if c.len() != 4 || coords.len() != 4 {
                bail!("entry {i}: box_xyxy must hold 4 numbers");
            }
            let key = (set.to_string(), image.to_string(), label as u16);
            if boxes
                .insert(key, [c[0] as f32, c[1] as f32, c[2] as f32, c[3] as f32])
                .is_some()
            {
                bail!("entry {i}: a second box for set {set} image {image} label {label}");
            }
        }
        Ok(Self {
            source: source.to_path_buf(),
            boxes,
        })
    }

    pub fn get(&self, set: &str, image: &str, label: u16) -> Result<[f32; 4]> {
        self.boxes.get(&(set.to_string(), image.to_string(), label)).copied().with_context(|| {
            format!(
                "no jitter box for set {set}, image {image}, label {label} in {}: that file was made for another tree; \
                 give the matching file with --jitter-boxes or use --prompt box",
                self.source.display()
            )
        })
    }

    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }
}

/// `<data>/../reference/boxes-jitter.json`, where the shared tree keeps it, if it exists.
pub fn default_jitter_path(data: &Path) -> Option<PathBuf> {
    let p = data.join("..").join("reference").join("boxes-jitter.json");
    p.is_file().then_some(p)
}

/// `labels.json` of a set (`{"1": "kidney", ...}`); empty when the file is absent.
pub fn label_names(set: &SetDir) -> Result<BTreeMap<u16, String>> {
    let path = set.dir.join("labels.json");
    if !path.is_file() {
        return Ok(BTreeMap::new());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let serde_json::Value::Object(members) = v else {
        bail!(
            "{}: expected an object {{\"label\": \"name\"}}",
            path.display()
        );
    };
    let mut names = BTreeMap::new();
    for (k, v) in members {
        let (Ok(label), Some(name)) = (k.parse::<u16>(), v.as_str()) else {
            bail!(
                "{}: entry {k:?} is not \"<label number>\": \"<name>\"",
                path.display()
            );
        };
        names.insert(label, name.to_string());
    }
    Ok(names)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image_io::encode_png;
    use png::{BitDepth, ColorType};

    /// A fresh empty folder under the system temp dir, unique per test and process.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("minisam-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes `<root>/<set>/{images,masks}/<name>` with an 8-bit grey image and label mask.
    pub(crate) fn write_pair(root: &Path, set: &str, name: &str, w: u32, h: u32, labels: &[u8]) {
        for sub in ["images", "masks"] {
            std::fs::create_dir_all(root.join(set).join(sub)).unwrap();
        }
        let img: Vec<u8> = (0..w * h).map(|i| (i * 7 % 256) as u8).collect();
        std::fs::write(
            root.join(set).join("images").join(name),
            encode_png(w, h, ColorType::Grayscale, BitDepth::Eight, &img, None),
        )
        .unwrap();
        std::fs::write(
            root.join(set).join("masks").join(name),
            encode_png(w, h, ColorType::Grayscale, BitDepth::Eight, labels, None),
        )
        .unwrap();
    }

    fn mask(w: usize, h: usize, labels: Vec<u16>) -> LabelMask {
        LabelMask {
            width: w,
            height: h,
            labels,
        }
    }

    #[test]
    fn targets_are_ascending_with_tight_inclusive_boxes_and_small_ones_skipped() {
        // 8x8: label 3 is a 4x4 block at (2..=5, 1..=4) = 16 px (kept), label 1 has 15 px (skipped),
        // label 2 has 20 px spread over two rows.
        let (w, h) = (8, 8);
        let mut l = vec![0u16; w * h];
        for y in 1..=4 {
            for x in 2..=5 {
                l[y * w + x] = 3;
            }
        }
        for x in 0..8 {
            l[6 * w + x] = 2;
            l[7 * w + x] = 2;
        }
        for i in 0..4 {
            l[5 * w + i] = 2;
        }
        let mut ones = 0;
        for v in l.iter_mut() {
            if *v == 0 && ones < 15 {
                *v = 1;
                ones += 1;
            }
        }
        let t = targets(&mask(w, h, l));
        assert_eq!(t.iter().map(|t| t.label).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(t[0].pixels, 20);
        assert_eq!(
            t[0].tight_box,
            TightBox {
                x0: 0,
                y0: 5,
                x1: 7,
                y1: 7
            }
        );
        assert_eq!(t[1].pixels, 16);
        assert_eq!(
            t[1].tight_box,
            TightBox {
                x0: 2,
                y0: 1,
                x1: 5,
                y1: 4
            }
        );
        assert!(targets(&mask(2, 2, vec![0; 4])).is_empty());
    }

    #[test]
    fn sets_and_images_are_listed_in_byte_order() {
        let root = temp_dir("order");
        for (set, name) in [
            ("b", "z.png"),
            ("b", "B.png"),
            ("b", "a.png"),
            ("a", "1.png"),
            ("Z", "x.png"),
        ] {
            write_pair(&root, set, name, 2, 2, &[0, 0, 0, 1]);
        }
        std::fs::write(root.join("b/images/notes.txt"), "x").unwrap();
        std::fs::create_dir_all(root.join("not-a-set")).unwrap();
        std::fs::write(root.join("README.md"), "x").unwrap();
        let sets = list_sets(&root).unwrap();
        let windowed = Slicing { window: Some(crate::dicom::Window { centre: 40.0, width: 400.0 }), ..Slicing::default() };
        let err = format!("{:#}", list_sets_with(&root, windowed).unwrap_err());
        assert!(err.contains("--window applies to NIfTI volume sets"), "{err}");
        assert_eq!(
            sets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            vec!["Z", "a", "b"]
        );
        assert_eq!(
            list_images(&sets[2]).unwrap(),
            vec!["B.png", "a.png", "z.png"]
        );
        std::fs::remove_file(root.join("b/masks/a.png")).unwrap();
        assert!(format!("{:#}", list_images(&sets[2]).unwrap_err()).contains("has no mask"));
        assert!(list_sets(&root.join("missing")).is_err());
        assert!(
            list_sets(&root.join("not-a-set")).is_err(),
            "a tree without sets must be an error"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn jitter_boxes_are_found_by_set_image_label_and_missing_ones_are_errors() {
        let text = r#"[{"set": "s", "image": "a.png", "label": 2, "box_xyxy": [1, 2, 30, 40]}]"#;
        let j = JitterBoxes::parse(text, Path::new("j.json")).unwrap();
        assert_eq!(j.len(), 1);
        assert_eq!(j.get("s", "a.png", 2).unwrap(), [1.0, 2.0, 30.0, 40.0]);
        let err = format!("{:#}", j.get("s", "a.png", 1).unwrap_err());
        assert!(
            err.contains("label 1") && err.contains("--jitter-boxes"),
            "{err}"
        );
        assert!(j.get("t", "a.png", 2).is_err());
        let dup = r#"[{"set":"s","image":"a","label":1,"box_xyxy":[0,0,1,1]},{"set":"s","image":"a","label":1,"box_xyxy":[0,0,1,1]}]"#;
        assert!(JitterBoxes::parse(dup, Path::new("j")).is_err());
        assert!(JitterBoxes::parse(
            r#"[{"set":"s","image":"a","label":1,"box_xyxy":[0,0,1]}]"#,
            Path::new("j")
        )
        .is_err());
        assert!(JitterBoxes::parse(
            r#"[{"set":"s","image":"a","label":1.5,"box_xyxy":[0,0,1,1]}]"#,
            Path::new("j")
        )
        .is_err());
        assert!(JitterBoxes::parse("{}", Path::new("j")).is_err());
    }

    #[test]
    fn label_names_are_read_when_present() {
        let root = temp_dir("labels");
        write_pair(&root, "s", "a.png", 2, 2, &[0; 4]);
        let set = &list_sets(&root).unwrap()[0];
        assert!(label_names(set).unwrap().is_empty());
        std::fs::write(
            root.join("s/labels.json"),
            r#"{"0": "background", "2": "kidney_tumor"}"#,
        )
        .unwrap();
        assert_eq!(
            label_names(set).unwrap().get(&2).map(String::as_str),
            Some("kidney_tumor")
        );
        std::fs::write(root.join("s/labels.json"), r#"{"x": "y"}"#).unwrap();
        assert!(label_names(set).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
