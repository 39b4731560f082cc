//! `minisam eval`: the box-prompt evaluation protocol of shared/reference/PROTOCOL.md.
//!
//! The run is planned first (every set, image, target and box, from the masks alone) so that a
//! missing jitter box or a broken mask fails in a second, not after an hour of encoding. Then each
//! image is encoded once and all its targets are decoded from that one embedding. The model is
//! behind [`BoxSegmenter`] so the whole loop is tested with a fake model.

pub mod dice;
pub mod histogram;
pub mod html;
pub mod protocol;
pub mod report;
pub mod split;
pub mod volume_sets;
pub mod worst;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use minisam_models::image::{Mask, RgbImage};
use minisam_models::prompt::BoxPrompt;

use crate::image_io::LabelMask;
use protocol::{JitterBoxes, PromptKind, SetDir, Target};
use report::Row;
use split::Split;

/// What the evaluation needs of a model: encode a frame once, segment it from a box many times.
pub trait BoxSegmenter {
    type Embedding;
    fn encode(&self, image: &RgbImage) -> Result<Self::Embedding>;
    fn segment(&self, embedding: &Self::Embedding, b: BoxPrompt) -> Result<Mask>;
}

pub struct EvalOptions<'a> {
    pub data: &'a Path,
    pub prompt: PromptKind,
    /// Required for [`PromptKind::BoxJitter`].
    pub jitter: Option<&'a JitterBoxes>,
    /// First N images of each set (quick runs); `None` = all. Applied before the split.
    pub limit: Option<usize>,
    /// Which images: all (the protocol), or one side of the train/test split.
    pub split: Split,
    /// Share of each set's images in the test split (see [`split`]).
    pub test_share: f64,
    /// How NIfTI volume sets are sliced (PNG sets ignore it).
    pub slicing: volume_sets::Slicing,
}

/// One image and the prompts of its targets, in protocol order.
#[derive(Debug)]
pub struct ImagePlan {
    pub set: usize,
    pub image: String,
    pub targets: Vec<(Target, BoxPrompt)>,
}

#[derive(Debug)]
pub struct Plan {
    pub sets: Vec<SetDir>,
    pub images: Vec<ImagePlan>,
    /// (set, label) -> name from the sets' labels.json.
    pub names: HashMap<(String, u16), String>,
}

impl Plan {
    pub fn target_count(&self) -> usize {
        self.images.iter().map(|i| i.targets.len()).sum()
    }
}

fn tight_prompt(t: &Target) -> BoxPrompt {
    let b = t.tight_box;
    BoxPrompt {
        x0: b.x0 as f32,
        y0: b.y0 as f32,
        x1: b.x1 as f32,
        y1: b.y1 as f32,
    }
}

/// Lists every target of the tree and its box, reading only the masks.
pub fn plan(opts: &EvalOptions) -> Result<Plan> {
    if opts.prompt == PromptKind::BoxJitter && opts.jitter.is_none() {
        bail!("--prompt box-jitter needs the reference boxes: pass --jitter-boxes FILE (boxes-jitter.json)");
    }
    let sets = protocol::list_sets_with(opts.data, opts.slicing)?;
    let mut images = Vec::new();
    let mut names = HashMap::new();
    for (si, set) in sets.iter().enumerate() {
        for (label, name) in protocol::label_names(set)? {
            names.insert((set.name.clone(), label), name);
        }
        let files = protocol::list_images(set)?;
        let n = opts.limit.unwrap_or(files.len()).min(files.len());
        for file in files.into_iter().take(n) {
            if !opts.split.keeps(&set.name, set.split_key(&file), opts.test_share) {
                continue;
            }
            let mask = set.read_labels(&file)?;
            let mut targets = Vec::new();
            for t in protocol::targets(&mask) {
                let prompt = match (opts.prompt, opts.jitter) {
                    (PromptKind::BoxJitter, Some(j)) => {
                        let [x0, y0, x1, y1] = j.get(&set.name, &file, t.label)?;
                        BoxPrompt { x0, y0, x1, y1 }
                    }
                    _ => tight_prompt(&t),
                };
                targets.push((t, prompt));
            }
            images.push(ImagePlan {
                set: si,
                image: file,
                targets,
            });
        }
    }
    if images.iter().all(|i| i.targets.is_empty()) {
        bail!(
            "no target (label > 0 with at least {} pixels) in any mask under {}",
            protocol::MIN_TARGET_PIXELS,
            opts.data.display()
        );
    }
    Ok(Plan {
        sets,
        images,
        names,
    })
}

/// Scored rows plus timings (milliseconds per call).
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub encode_ms: Vec<f64>,
    pub decode_ms: Vec<f64>,
}

/// One scored target with everything that made its score, lent to an observer of [`execute_observed`]
/// (the report keeps the worst ones' pictures) for the time of the call.
pub struct Scored<'a> {
    pub set: &'a str,
    pub image_name: &'a str,
    /// The image as the model saw it.
    pub image: &'a RgbImage,
    /// The image's label mask; the target is `label`.
    pub truth: &'a LabelMask,
    pub label: u16,
    pub prompt: BoxPrompt,
    pub prediction: &'a Mask,
    pub dice: f64,
}

/// Encodes each image with targets once and scores each target; `progress` gets one line per image.
pub fn execute<M: BoxSegmenter>(model: &M, plan: &Plan, progress: impl FnMut(&str)) -> Result<Outcome> {
    execute_observed(model, plan, progress, |_| Ok(()))
}

/// [`execute`], showing each scored target to `observe` as it is scored (an error stops the run).
pub fn execute_observed<M: BoxSegmenter>(
    model: &M,
    plan: &Plan,
    mut progress: impl FnMut(&str),
    mut observe: impl FnMut(&Scored) -> Result<()>,
) -> Result<Outcome> {
    let mut out = Outcome::default();
    let total = plan.images.len();
    for (done, ip) in plan.images.iter().enumerate() {
        if ip.targets.is_empty() {
            continue;
        }
        let set = &plan.sets[ip.set];
        let context = || format!("set {}, image {}", set.name, ip.image);
        let mask = set.read_labels(&ip.image)?;
        let image = set.read_image(&ip.image)?;
        if (image.width, image.height) != (mask.width, mask.height) {
            bail!(
                "{}: image is {}x{} but its mask is {}x{}",
                context(),
                image.width,
                image.height,
                mask.width,
                mask.height
            );
        }
        let t0 = Instant::now();
        let emb = model
            .encode(&image)
            .with_context(|| format!("encoding {}", context()))?;
        out.encode_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut line = format!("[{}/{}] {}/{}:", done + 1, total, set.name, ip.image);
        for (t, prompt) in &ip.targets {
            let t1 = Instant::now();
            let pred = model
                .segment(&emb, *prompt)
                .with_context(|| format!("segmenting label {} of {}", t.label, context()))?;
            out.decode_ms.push(t1.elapsed().as_secs_f64() * 1e3);
            let d = dice::dice(&pred.data, &mask.labels, t.label).with_context(context)?;
            line.push_str(&format!(" label {} dice {d:.4}", t.label));
            observe(&Scored {
                set: &set.name,
                image_name: &ip.image,
                image: &image,
                truth: &mask,
                label: t.label,
                prompt: *prompt,
                prediction: &pred,
                dice: d,
            })?;
            out.rows.push(Row {
                set: set.name.clone(),
                image: ip.image.clone(),
                label: t.label,
                dice: d,
            });
        }
        progress(&line);
    }
    Ok(out)
}

/// Median of a list of timings (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::protocol::tests::{temp_dir, write_pair};
    use super::*;
    use std::cell::Cell;

    /// Predicts the filled box, counting encodes.
    struct BoxFiller {
        encodes: Cell<usize>,
    }

    impl BoxSegmenter for BoxFiller {
        type Embedding = (usize, usize);
        fn encode(&self, image: &RgbImage) -> Result<(usize, usize)> {
            self.encodes.set(self.encodes.get() + 1);
            Ok((image.width, image.height))
        }
        fn segment(&self, &(w, h): &(usize, usize), b: BoxPrompt) -> Result<Mask> {
            let mut data = vec![0u8; w * h];
            for y in b.y0 as usize..=b.y1 as usize {
                for x in b.x0 as usize..=b.x1 as usize {
                    data[y * w + x] = 1;
                }
            }
            Ok(Mask {
                width: w,
                height: h,
                data,
            })
        }
    }

    /// 8x8 masks: a 4x4 square of label 1 (Dice 1 with its box), an L of label 2 with 20 px in a
    /// 5x8 box (Dice 2*20/(20+40)), and 10 px of label 3 (skipped).
    fn tree(tag: &str) -> std::path::PathBuf {
        let root = temp_dir(tag);
        let mut l = vec![0u8; 64];
        for y in 0..4 {
            for x in 0..4 {
                l[y * 8 + x] = 1;
            }
        }
        for y in 3..8 {
            l[y * 8 + 7] = 2;
        }
        for x in 0..8 {
            if l[7 * 8 + x] == 0 {
                l[7 * 8 + x] = 2;
            }
        }
        for y in 4..7 {
            for x in 0..3 {
                l[y * 8 + x + 1] = 2;
            }
        }
        for i in 0..10 {
            l[4 * 8 + 4 + i % 3 + (i / 3) * 8] = 3;
        }
        write_pair(&root, "s2", "b.png", 8, 8, &l);
        write_pair(&root, "s2", "a.png", 8, 8, &l);
        write_pair(&root, "s1", "z.png", 8, 8, &l);
        write_pair(&root, "s1", "empty.png", 8, 8, &[0; 64]);
        root
    }

    #[test]
    fn the_train_and_test_splits_plan_disjoint_images_that_make_up_the_tree() {
        let root = tree("split");
        let images = |split: Split| -> Vec<String> {
            let opts = EvalOptions { data: &root, prompt: PromptKind::Box, jitter: None, limit: None, split, test_share: 0.5, slicing: volume_sets::Slicing::default() };
            let p = plan(&opts).map(|p| p.images.iter().map(|i| format!("{}/{}", p.sets[i.set].name, i.image)).collect());
            // A side of the split with no target at all is an error, as for a whole tree.
            p.unwrap_or_default()
        };
        let (all, train, test) = (images(Split::All), images(Split::Train), images(Split::Test));
        assert_eq!(all.len(), 4);
        assert!(train.iter().all(|i| !test.contains(i)), "train {train:?} and test {test:?} overlap");
        let mut both: Vec<String> = train.iter().chain(&test).cloned().collect();
        both.sort();
        let mut sorted_all = all.clone();
        sorted_all.sort();
        assert_eq!(both, sorted_all);
        // The sides are what the split function says, image by image.
        for i in &test {
            let (set, file) = i.split_once('/').unwrap();
            assert!(split::in_test_split(set, file, 0.5));
        }
    }

    #[test]
    fn runs_the_protocol_in_order_and_encodes_each_image_once() {
        let root = tree("run");
        let opts = EvalOptions {
            data: &root,
            prompt: PromptKind::Box,
            jitter: None,
            limit: None,
            split: Split::All,
            test_share: split::DEFAULT_TEST_SHARE,
            slicing: volume_sets::Slicing::default(),
        };
        let p = plan(&opts).unwrap();
        let counts: Vec<usize> = p.images.iter().map(|i| i.targets.len()).collect();
        let l2: Vec<u16> = p.images[1].targets.iter().map(|(t, _)| t.label).collect();
        assert_eq!(l2, vec![1, 2], "label 3 has < 16 px");
        assert_eq!(counts, vec![0, 2, 2, 2]);
        let m = BoxFiller {
            encodes: Cell::new(0),
        };
        let out = execute(&m, &p, |_| {}).unwrap();
        assert_eq!(
            m.encodes.get(),
            3,
            "empty image is not encoded, others once"
        );
        let keys: Vec<(&str, &str, u16)> = out
            .rows
            .iter()
            .map(|r| (r.set.as_str(), r.image.as_str(), r.label))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("s1", "z.png", 1),
                ("s1", "z.png", 2),
                ("s2", "a.png", 1),
                ("s2", "a.png", 2),
                ("s2", "b.png", 1),
                ("s2", "b.png", 2)
            ]
        );
        assert_eq!(out.rows[0].dice, 1.0);
        let l2_pixels = p.images[1].targets[1].0.pixels as f64;
        let b = p.images[1].targets[1].0.tight_box;
        let box_area = ((b.x1 - b.x0 + 1) * (b.y1 - b.y0 + 1)) as f64;
        assert!((out.rows[1].dice - 2.0 * l2_pixels / (l2_pixels + box_area)).abs() < 1e-12);
        assert_eq!(out.decode_ms.len(), 6);

        let limited = plan(&EvalOptions {
            limit: Some(1),
            ..opts
        })
        .unwrap();
        assert_eq!(
            limited
                .images
                .iter()
                .map(|i| i.image.as_str())
                .collect::<Vec<_>>(),
            vec!["empty.png", "a.png"]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn jitter_prompts_come_from_the_file_and_a_missing_box_fails_before_encoding() {
        let root = tree("jitter");
        let mut entries = Vec::new();
        for (set, image) in [("s1", "z.png"), ("s2", "a.png"), ("s2", "b.png")] {
            for label in [1, 2] {
                entries.push(format!(
                    r#"{{"set":"{set}","image":"{image}","label":{label},"box_xyxy":[0,0,7,7]}}"#
                ));
            }
        }
        let full =
            JitterBoxes::parse(&format!("[{}]", entries.join(",")), Path::new("j.json")).unwrap();
        let opts = EvalOptions {
            data: &root,
            prompt: PromptKind::BoxJitter,
            jitter: Some(&full),
            limit: None,
            split: Split::All,
            test_share: split::DEFAULT_TEST_SHARE,
            slicing: volume_sets::Slicing::default(),
        };
        let p = plan(&opts).unwrap();
        assert!(p.images.iter().flat_map(|i| &i.targets).all(|(_, b)| *b
            == BoxPrompt {
                x0: 0.0,
                y0: 0.0,
                x1: 7.0,
                y1: 7.0
            }));
        let out = execute(
            &BoxFiller {
                encodes: Cell::new(0),
            },
            &p,
            |_| {},
        )
        .unwrap();
        assert!((out.rows[0].dice - 2.0 * 16.0 / 80.0).abs() < 1e-12);

        let partial = JitterBoxes::parse(
            &format!("[{}]", entries[..5].join(",")),
            Path::new("j.json"),
        )
        .unwrap();
        let err = format!(
            "{:#}",
            plan(&EvalOptions {
                jitter: Some(&partial),
                ..opts
            })
            .unwrap_err()
        );
        assert!(err.contains("b.png") && err.contains("label 2"), "{err}");
        assert!(plan(&EvalOptions {
            jitter: None,
            ..opts
        })
        .is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn mismatched_image_and_mask_sizes_are_reported() {
        let root = temp_dir("sizes");
        write_pair(&root, "s", "a.png", 8, 8, &[1; 64]);
        let img = crate::image_io::encode_png(
            4,
            4,
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &[0; 16],
            None,
        );
        std::fs::write(root.join("s/images/a.png"), img).unwrap();
        let p = plan(&EvalOptions {
            data: &root,
            prompt: PromptKind::Box,
            jitter: None,
            limit: None,
            split: Split::All,
            test_share: split::DEFAULT_TEST_SHARE,
            slicing: volume_sets::Slicing::default(),
        })
        .unwrap();
        let err = format!(
            "{:#}",
            execute(
                &BoxFiller {
                    encodes: Cell::new(0)
                },
                &p,
                |_| {}
            )
            .unwrap_err()
        );
        assert!(err.contains("4x4") && err.contains("8x8"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_observer_sees_each_scored_target_with_what_made_its_score() {
        let root = tree("observe");
        let opts = EvalOptions {
            data: &root,
            prompt: PromptKind::Box,
            jitter: None,
            limit: None,
            split: Split::All,
            test_share: split::DEFAULT_TEST_SHARE,
            slicing: volume_sets::Slicing::default(),
        };
        let p = plan(&opts).unwrap();
        let model = BoxFiller { encodes: Cell::new(0) };
        let mut seen = Vec::new();
        let out = execute_observed(&model, &p, |_| {}, |s| {
            let recomputed = dice::dice(&s.prediction.data, &s.truth.labels, s.label)?;
            assert_eq!(recomputed, s.dice);
            assert_eq!((s.image.width, s.image.height), (s.truth.width, s.truth.height));
            let inside = s.prediction.data[s.prompt.y0 as usize * 8 + s.prompt.x0 as usize];
            assert_eq!(inside, 1, "the prediction is the one made from this prompt");
            seen.push((s.set.to_string(), s.image_name.to_string(), s.label, s.dice));
            Ok(())
        })
        .unwrap();
        let rows: Vec<_> = out.rows.iter().map(|r| (r.set.clone(), r.image.clone(), r.label, r.dice)).collect();
        assert_eq!(seen, rows);
        let err = execute_observed(&model, &p, |_| {}, |_| anyhow::bail!("disk full")).unwrap_err();
        assert!(format!("{err:#}").contains("disk full"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn median_of_timings() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
