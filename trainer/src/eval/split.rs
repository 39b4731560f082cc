//! The train/test split of a data tree, shared by `train` and `eval` so that an adapter is always
//! scored on images it never saw.
//!
//! An image is in the test split when a hash of `set/file` falls below `test_share`: the split
//! depends on the image's name only — not on listing order, on `--limit`, or on which other sets
//! are present — so the per-set and the per-modality runs use the same test images.

use sha2::{Digest, Sha256};

/// Which images of the tree a command uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// Every image (the evaluation protocol's own setting).
    All,
    /// Images outside the test split (what `train` learns from).
    Train,
    /// The held-out test images.
    Test,
}

/// Default share of each set's images in the test split.
pub const DEFAULT_TEST_SHARE: f64 = 0.5;

/// Whether image `file` of set `set` belongs to the test split of share `test_share` (0..=1).
pub fn in_test_split(set: &str, file: &str, test_share: f64) -> bool {
    let digest = Sha256::digest(format!("minisam-split-v1/{set}/{file}").as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // Uniform in [0, 1) with 53 bits, as an f64 holds exactly.
    let u = (u64::from_be_bytes(head) >> 11) as f64 / (1u64 << 53) as f64;
    u < test_share
}

impl Split {
    /// Whether this split keeps image `file` of set `set`.
    pub fn keeps(self, set: &str, file: &str, test_share: f64) -> bool {
        match self {
            Split::All => true,
            Split::Train => !in_test_split(set, file, test_share),
            Split::Test => in_test_split(set, file, test_share),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case_{i:04}.png")).collect()
    }

    #[test]
    fn train_and_test_partition_every_set() {
        for share in [0.0, 0.3, 0.5, 1.0] {
            for f in names(200) {
                let train = Split::Train.keeps("us-hc18", &f, share);
                let test = Split::Test.keeps("us-hc18", &f, share);
                assert!(train != test, "{f} at share {share}: train {train}, test {test}");
                assert!(Split::All.keeps("us-hc18", &f, share));
            }
        }
    }

    #[test]
    fn the_test_share_is_close_to_what_was_asked_and_grows_monotonically() {
        let files = names(2000);
        let count = |share: f64| files.iter().filter(|f| in_test_split("ct-kits19", f, share)).count();
        let half = count(0.5);
        assert!((900..=1100).contains(&half), "{half} of 2000 in a 0.5 test split");
        // A larger share keeps every image of a smaller one (u < a implies u < b for a < b).
        for f in &files {
            if in_test_split("ct-kits19", f, 0.3) {
                assert!(in_test_split("ct-kits19", f, 0.5), "{f}");
            }
        }
    }

    #[test]
    fn the_split_depends_on_the_set_name_too() {
        let files = names(200);
        let differs = files.iter().filter(|f| in_test_split("a", f, 0.5) != in_test_split("b", f, 0.5)).count();
        assert!(differs > 50, "only {differs} of 200 images change side with the set name");
    }
}
