//! Results of an evaluation: the per-target CSV of the protocol and the summary table in the
//! layout of shared/reference/SUMMARY.md (per set, per label, ALL over targets and over sets),
//! optionally beside the reference's numbers so a regression is visible at a glance.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// One scored target, a CSV row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub set: String,
    pub image: String,
    pub label: u16,
    pub dice: f64,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Header `set,image,label,dice`, one row per target in the given order, Dice with 6 decimals.
pub fn write_csv<W: Write>(mut w: W, rows: &[Row]) -> std::io::Result<()> {
    writeln!(w, "set,image,label,dice")?;
    for r in rows {
        writeln!(
            w,
            "{},{},{},{:.6}",
            csv_field(&r.set),
            csv_field(&r.image),
            r.label,
            r.dice
        )?;
    }
    w.flush()
}

pub fn write_csv_file(path: &Path, rows: &[Row]) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| {
        format!(
            "cannot create {}: check that its folder exists",
            path.display()
        )
    })?;
    write_csv(std::io::BufWriter::new(f), rows)
        .with_context(|| format!("writing {}", path.display()))
}

/// Mean Dice over a group of targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mean {
    pub n: usize,
    pub mean: f64,
}

fn mean(v: &[f64]) -> Mean {
    Mean {
        n: v.len(),
        mean: if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        },
    }
}

/// Aggregates in the order the sets were evaluated.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub per_set: Vec<(String, Mean)>,
    pub per_label: Vec<(String, u16, Mean)>,
    pub all_targets: Mean,
    /// Mean of the per-set means.
    pub all_datasets: f64,
}

pub fn summarize(rows: &[Row]) -> Summary {
    let mut set_order: Vec<String> = Vec::new();
    let mut by_set: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut by_label: BTreeMap<(usize, u16), Vec<f64>> = BTreeMap::new();
    for r in rows {
        if !by_set.contains_key(r.set.as_str()) {
            set_order.push(r.set.clone());
        }
        by_set.entry(&r.set).or_default().push(r.dice);
        let idx = set_order.iter().position(|s| *s == r.set).unwrap_or(0);
        by_label.entry((idx, r.label)).or_default().push(r.dice);
    }
    let per_set: Vec<(String, Mean)> = set_order
        .iter()
        .map(|s| (s.clone(), mean(&by_set[s.as_str()])))
        .collect();
    let per_label = by_label
        .iter()
        .map(|((i, l), v)| (set_order[*i].clone(), *l, mean(v)))
        .collect();
    let all: Vec<f64> = rows.iter().map(|r| r.dice).collect();
    let set_means: Vec<f64> = per_set.iter().map(|(_, m)| m.mean).collect();
    Summary {
        per_set,
        per_label,
        all_targets: mean(&all),
        all_datasets: mean(&set_means).mean,
    }
}

/// One column of the reference table, e.g. "litemedsam box".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reference {
    pub column: String,
    pub per_set: HashMap<String, f64>,
    pub per_label: HashMap<(String, u16), f64>,
}

fn cells(line: &str) -> Option<Vec<String>> {
    let t = line.trim();
    if !t.starts_with('|') {
        return None;
    }
    Some(
        t.trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('*').trim().to_string())
            .collect(),
    )
}

impl Reference {
    /// Reads `column` of tree `tree` from SUMMARY.md; `None` when the file has no such column.
    pub fn parse(summary_md: &str, tree: &str, column: &str) -> Option<Reference> {
        let mut r = Reference {
            column: column.to_string(),
            ..Default::default()
        };
        let mut in_tree = false;
        let mut header: Vec<String> = Vec::new();
        for line in summary_md.lines() {
            if let Some(name) = line.strip_prefix("## Tree ") {
                in_tree = name.trim().trim_matches('`') == tree;
                header.clear();
                continue;
            }
            let Some(c) = cells(line) else {
                header.clear();
                continue;
            };
            if !in_tree || c.iter().all(|x| x.chars().all(|ch| ch == '-' || ch == ':')) {
                continue;
            }
            if c.first().map(String::as_str) == Some("dataset") {
                header = c;
                continue;
            }
            let Some(col) = header.iter().position(|h| h == column) else {
                continue;
            };
            let Some(value) = c.get(col).and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            match header.get(1).map(String::as_str) {
                Some("n") => {
                    r.per_set.insert(c[0].clone(), value);
                }
                Some("label") => {
                    let label = c[1]
                        .split_whitespace()
                        .next()
                        .and_then(|l| l.parse::<u16>().ok());
                    if let Some(l) = label {
                        r.per_label.insert((c[0].clone(), l), value);
                    }
                }
                _ => {}
            }
        }
        (!r.per_set.is_empty()).then_some(r)
    }
}

fn fmt_ref(r: Option<&Reference>, v: Option<f64>) -> String {
    match (r, v) {
        (None, _) => String::new(),
        (Some(_), Some(v)) => format!("  {v:>8.4}"),
        (Some(_), None) => format!("  {:>8}", "-"),
    }
}

/// The reference when its ALL rows compare with `summary`'s: they are over its whole tree, so
/// only when every one of its sets was run, and no other.
pub fn whole_tree_reference<'r>(
    summary: &Summary,
    reference: Option<&'r Reference>,
) -> Option<&'r Reference> {
    reference.filter(|r| {
        let ref_sets = r.per_set.keys().filter(|k| !k.starts_with("ALL")).count();
        ref_sets == summary.per_set.len()
            && summary
                .per_set
                .iter()
                .all(|(s, _)| r.per_set.contains_key(s))
    })
}

/// The printed summary. `names` maps (set, label) to the label's name from labels.json.
pub fn render(
    summary: &Summary,
    names: &HashMap<(String, u16), String>,
    reference: Option<&Reference>,
) -> String {
    let mut out = String::new();
    let ref_head = if reference.is_some() {
        format!("  {:>8}", "ref")
    } else {
        String::new()
    };
    if let Some(r) = reference {
        let _ = writeln!(out, "(ref = shared/reference/SUMMARY.md, {})", r.column);
    }
    let _ = writeln!(out, "{:<16} {:>5}  {:>8}{ref_head}", "dataset", "n", "dice");
    for (set, m) in &summary.per_set {
        let rv = reference.and_then(|r| r.per_set.get(set).copied());
        let _ = writeln!(
            out,
            "{:<16} {:>5}  {:>8.4}{}",
            set,
            m.n,
            m.mean,
            fmt_ref(reference, rv)
        );
    }
    let whole_tree = whole_tree_reference(summary, reference);
    let at = whole_tree.and_then(|r| r.per_set.get("ALL (targets)").copied());
    let ad = whole_tree.and_then(|r| r.per_set.get("ALL (datasets)").copied());
    let _ = writeln!(
        out,
        "{:<16} {:>5}  {:>8.4}{}",
        "ALL (targets)",
        summary.all_targets.n,
        summary.all_targets.mean,
        fmt_ref(reference, at)
    );
    let _ = writeln!(
        out,
        "{:<16} {:>5}  {:>8.4}{}",
        "ALL (datasets)",
        "",
        summary.all_datasets,
        fmt_ref(reference, ad)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:<22} {:>5}  {:>8}{ref_head}",
        "dataset", "label", "n", "dice"
    );
    for (set, label, m) in &summary.per_label {
        let name = names
            .get(&(set.clone(), *label))
            .map(|n| format!("{label} {n}"))
            .unwrap_or_else(|| label.to_string());
        let rv = reference.and_then(|r| r.per_label.get(&(set.clone(), *label)).copied());
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:>5}  {:>8.4}{}",
            set,
            name,
            m.n,
            m.mean,
            fmt_ref(reference, rv)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(set: &str, image: &str, label: u16, dice: f64) -> Row {
        Row {
            set: set.into(),
            image: image.into(),
            label,
            dice,
        }
    }

    #[test]
    fn csv_has_the_exact_header_and_six_decimals() {
        let mut buf = Vec::new();
        write_csv(
            &mut buf,
            &[
                row("ct-kits19", "10036_103.png", 1, 0.5),
                row("a,b", "x\"y.png", 2, 1.0 / 3.0),
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "set,image,label,dice\nct-kits19,10036_103.png,1,0.500000\n\"a,b\",\"x\"\"y.png\",2,0.333333\n"
        );
    }

    #[test]
    fn summary_means_per_set_label_and_overall() {
        let rows = [
            row("b", "1", 1, 1.0),
            row("b", "1", 2, 0.0),
            row("b", "2", 1, 0.5),
            row("a", "1", 1, 0.2),
        ];
        let s = summarize(&rows);
        assert_eq!(s.per_set[0].0, "b", "sets keep evaluation order");
        assert_eq!(s.per_set[0].1, Mean { n: 3, mean: 0.5 });
        assert_eq!(s.per_set[1].1, Mean { n: 1, mean: 0.2 });
        assert_eq!(
            s.per_label[0],
            ("b".to_string(), 1, Mean { n: 2, mean: 0.75 })
        );
        assert_eq!(
            s.per_label[1],
            ("b".to_string(), 2, Mean { n: 1, mean: 0.0 })
        );
        assert_eq!(s.all_targets.n, 4);
        assert!((s.all_targets.mean - 1.7 / 4.0).abs() < 1e-12);
        assert!((s.all_datasets - 0.35).abs() < 1e-12);
    }

    const MD: &str = "# x\n\n## Tree `shared`\n\n| dataset | n | litemedsam box | mobilesam box |\n|---|---|---|---|\n\
| ct-kits19 | 22 | 0.8201 | 0.7939 |\n| **ALL (targets)** | 245 | 0.8753 | 0.8574 |\n\nPer label:\n\n\
| dataset | label | n | litemedsam box | mobilesam box |\n|---|---|---|---|---|\n| ct-kits19 | 2 kidney_tumor | 10 | 0.9050 | 0.9293 |\n\n\
| dataset | litemedsam box | mobilesam box |\n|---|---|---|\n| ct-kits19 | 0/22 | 2/22 |\n\n## Tree `holdout`\n\n\
| dataset | n | litemedsam box |\n|---|---|---|\n| ct-kits19 | 22 | 0.1 |\n";

    #[test]
    fn reference_column_is_read_from_the_right_tree() {
        let r = Reference::parse(MD, "shared", "mobilesam box").unwrap();
        assert_eq!(r.per_set.get("ct-kits19"), Some(&0.7939));
        assert_eq!(r.per_set.get("ALL (targets)"), Some(&0.8574));
        assert_eq!(
            r.per_label.get(&("ct-kits19".to_string(), 2)),
            Some(&0.9293)
        );
        assert_eq!(
            Reference::parse(MD, "holdout", "litemedsam box")
                .unwrap()
                .per_set
                .get("ct-kits19"),
            Some(&0.1)
        );
        assert!(Reference::parse(MD, "shared", "sam box").is_none());
        assert!(Reference::parse(MD, "other", "litemedsam box").is_none());
    }

    #[test]
    fn rendered_table_shows_names_and_reference() {
        let s = summarize(&[row("ct-kits19", "a", 2, 0.9)]);
        let names = HashMap::from([(("ct-kits19".to_string(), 2), "kidney_tumor".to_string())]);
        let r = Reference::parse(MD, "shared", "litemedsam box").unwrap();
        let t = render(&s, &names, Some(&r));
        assert!(t.contains("2 kidney_tumor"), "{t}");
        assert!(
            t.lines().any(|l| l.starts_with("ct-kits19")
                && l.contains("0.9000")
                && l.ends_with("0.8201")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("ALL (targets)") && l.ends_with("0.8753")),
            "{t}"
        );
        assert!(!render(&s, &names, None).contains("ref"));
        let two = summarize(&[row("ct-kits19", "a", 2, 0.9), row("other", "b", 1, 0.5)]);
        let t2 = render(&two, &names, Some(&r));
        assert!(
            t2.lines()
                .any(|l| l.starts_with("ALL (targets)") && l.ends_with('-')),
            "a partial tree must not show the reference's ALL: {t2}"
        );
    }
}
