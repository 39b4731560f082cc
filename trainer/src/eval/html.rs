//! `eval --report DIR`: one HTML page for people, `DIR/index.html`, with the pictures beside it
//! (`hist/*.svg`, `worst/*/*.png`). Self-contained: no script, no font or style from the network,
//! every link relative. It holds per-set and per-label Dice tables (mean, median, count, and the
//! PyTorch reference of SUMMARY.md when the run is comparable), a Dice histogram per set, and
//! overlays of each set's worst targets: prediction filled, ground truth outlined, box drawn.
//!
//! The numbers are those of the text summary (`report::summarize`, same rounding), so the page
//! and the terminal never disagree.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use minisam_models::image::{Mask, RgbImage};
use minisam_models::prompt::Prompts;

use super::histogram;
use super::report::{self, Reference, Row, Summary};
use super::Scored;
use crate::image_io;
use crate::overlay::{self, Layers, Style};

/// Overlays shown per set.
pub const WORST_PER_SET: usize = 5;

/// One of a set's worst targets, with its picture.
pub struct WorstTarget {
    pub image: String,
    pub label: u16,
    pub dice: f64,
    pub overlay: RgbImage,
}

/// The report's picture of a scored target: the prediction filled and outlined, the ground truth
/// outlined in its own colour, the box prompt drawn.
pub fn worst_target(s: &Scored) -> Result<WorstTarget> {
    let (w, h) = (s.truth.width, s.truth.height);
    let truth = Mask {
        width: w,
        height: h,
        data: s
            .truth
            .labels
            .iter()
            .map(|&l| u8::from(l == s.label))
            .collect(),
    };
    let prompts = Prompts::with_box(s.prompt);
    let layers = Layers {
        prediction: s.prediction,
        truth: Some(&truth),
        prompts: &prompts,
    };
    let overlay =
        overlay::render(s.image, &layers, &Style::for_image(w, h)).with_context(|| {
            format!(
                "overlay of set {}, image {}, label {}",
                s.set, s.image_name, s.label
            )
        })?;
    Ok(WorstTarget {
        image: s.image_name.to_string(),
        label: s.label,
        dice: s.dice,
        overlay,
    })
}

/// Everything the page shows.
pub struct Report<'a> {
    /// Facts about the run, shown as a list at the top: ("model", "models/x.msam (...)"), ...
    pub facts: Vec<(&'static str, String)>,
    pub rows: &'a [Row],
    /// (set, label) -> the label's name from the set's labels.json.
    pub names: &'a HashMap<(String, u16), String>,
    pub reference: Option<&'a Reference>,
    /// Per set, its worst targets, worst first.
    pub worst: &'a HashMap<String, Vec<WorstTarget>>,
}

/// Writes `dir/index.html` and its pictures (creating `dir`); returns the page's path. Files of
/// an earlier report in `dir` are overwritten, never deleted.
pub fn write(dir: &Path, report: &Report) -> Result<PathBuf> {
    let summary = report::summarize(report.rows);
    let mut sections = String::new();
    for (i, (set, _)) in summary.per_set.iter().enumerate() {
        let dice: Vec<f64> = report
            .rows
            .iter()
            .filter(|r| &r.set == set)
            .map(|r| r.dice)
            .collect();
        let stem = format!("{i:02}-{}", file_safe(set));
        let counts = histogram::bins(&dice);
        let hist = format!("hist/{stem}.svg");
        write_file(
            dir,
            &hist,
            histogram::svg(set, &counts, 380, 230)?.as_bytes(),
        )?;
        let mut figures = String::new();
        for (rank, t) in report
            .worst
            .get(set)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            let png = format!(
                "worst/{stem}/{}-{}-label{}.png",
                rank + 1,
                image_stem(&t.image),
                t.label
            );
            let path = dir.join(&png);
            create_parent(&path)?;
            image_io::write_rgb(&path, &t.overlay)?;
            let name = label_name(report.names, set, t.label);
            let _ = writeln!(
                figures,
                "<figure><a href=\"{png}\"><img src=\"{png}\" alt=\"overlay of {alt}\"></a>\
                 <figcaption><b>Dice {:.4}</b><br>{} · {}</figcaption></figure>",
                t.dice,
                esc(&t.image),
                esc(&name),
                alt = esc(&format!("{} label {}", t.image, t.label)),
            );
        }
        let _ = write!(
            sections,
            "<section id=\"set-{i}\">\n<h2>{set_name}</h2>\n<div class=\"set\">\n<div class=\"hist\">\
             <img src=\"{hist}\" alt=\"Dice histogram of {set_name}\">\n{bins}</div>\n\
             <div class=\"worst\"><h3>{k} worst of {n} targets</h3>\n<div class=\"grid\">\n{figures}</div></div>\n</div>\n</section>\n",
            set_name = esc(set),
            bins = bin_table(&counts),
            k = report.worst.get(set).map_or(0, Vec::len),
            n = dice.len(),
        );
    }
    let page = page(report, &summary, &sections);
    write_file(dir, "index.html", page.as_bytes())?;
    Ok(dir.join("index.html"))
}

fn page(report: &Report, summary: &Summary, sections: &str) -> String {
    let mut facts = String::new();
    for (k, v) in &report.facts {
        let _ = write!(facts, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(v));
    }
    let reference_note = match report.reference {
        Some(r) => format!(
            "<p class=\"note\">ref = the PyTorch reference (shared/reference/SUMMARY.md, column <i>{}</i>); Δ = this run − ref.</p>",
            esc(&r.column)
        ),
        None => "<p class=\"note\">No reference column: the model's family is not in SUMMARY.md, or the run is partial (--limit, --split).</p>".into(),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>minisam eval report</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<h1>minisam eval</h1>\n<dl class=\"facts\">{facts}</dl>\n\
         {reference_note}\n<div class=\"tables\">\n<div>\n<h2>Per set</h2>\n{sets}</div>\n<div>\n<h2>Per label</h2>\n{labels}</div>\n</div>\n\
         <p class=\"note\">Overlays: <span class=\"key pred\"></span> prediction (filled, outlined), \
         <span class=\"key truth\"></span> ground truth (outline), <span class=\"key box\"></span> box prompt. \
         Click an overlay for full size.</p>\n{sections}</body>\n</html>\n",
        sets = set_table(report, summary),
        labels = label_table(report, summary),
    )
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222}\
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:18px 0 6px}h3{font-size:14px;margin:0 0 6px}\
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:1px 12px;margin:0}dt{color:#666}dd{margin:0}\
.note{color:#555;font-size:13px}.tables{display:flex;gap:32px;flex-wrap:wrap}\
table{border-collapse:collapse}th,td{padding:2px 8px;border-bottom:1px solid #ddd}th{text-align:left}\
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.all td{font-weight:600}\
.worse{color:#b00}.better{color:#070}\
section{border-top:2px solid #eee;margin-top:12px}.set{display:flex;gap:16px;align-items:flex-start}\
.hist{flex:0 0 380px}.hist table{font-size:12px;margin-top:4px}.worst{flex:1}\
.grid{display:grid;grid-template-columns:repeat(5,1fr);gap:8px}\
figure{margin:0}figure img{width:100%;display:block;border:1px solid #ccc}figcaption{font-size:12px;overflow-wrap:anywhere}\
.key{display:inline-block;width:12px;height:12px;vertical-align:middle;border:2px solid}\
.key.pred{background:rgba(30,144,255,.45);border-color:#0ff}.key.truth{border-color:#ffd700}.key.box{border-color:#0f0}";

fn num(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.4}")
    }
}

/// The ref and Δ cells: empty without a reference, a dash when it has no value for this row.
fn ref_cells(reference: Option<&Reference>, ours: f64, theirs: Option<f64>) -> String {
    match (reference, theirs) {
        (None, _) => String::new(),
        (Some(_), None) => "<td class=\"num\">–</td><td class=\"num\">–</td>".into(),
        (Some(_), Some(r)) => {
            let delta = ours - r;
            let class = if delta < -0.01 {
                " worse"
            } else if delta > 0.01 {
                " better"
            } else {
                ""
            };
            format!(
                "<td class=\"num\">{}</td><td class=\"num{class}\">{delta:+.4}</td>",
                num(r)
            )
        }
    }
}

fn ref_heads(reference: Option<&Reference>) -> &'static str {
    if reference.is_some() {
        "<th>ref</th><th>Δ</th>"
    } else {
        ""
    }
}

fn set_table(report: &Report, summary: &Summary) -> String {
    let r = report.reference;
    let mut t = format!(
        "<table id=\"sets\">\n<tr><th>dataset</th><th>n</th><th>mean</th><th>median</th>{}</tr>\n",
        ref_heads(r)
    );
    for (i, (set, m)) in summary.per_set.iter().enumerate() {
        let dice: Vec<f64> = report
            .rows
            .iter()
            .filter(|x| &x.set == set)
            .map(|x| x.dice)
            .collect();
        let _ = writeln!(
            t,
            "<tr><td><a href=\"#set-{i}\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>{}</tr>",
            esc(set),
            m.n,
            num(m.mean),
            num(super::median(&dice)),
            ref_cells(r, m.mean, r.and_then(|r| r.per_set.get(set).copied()))
        );
    }
    let whole = report::whole_tree_reference(summary, r);
    let all: Vec<f64> = report.rows.iter().map(|x| x.dice).collect();
    let _ = writeln!(
        t,
        "<tr class=\"all\"><td>ALL (targets)</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>{}</tr>",
        summary.all_targets.n,
        num(summary.all_targets.mean),
        num(super::median(&all)),
        ref_cells(r, summary.all_targets.mean, whole.and_then(|r| r.per_set.get("ALL (targets)").copied()))
    );
    let _ = writeln!(
        t,
        "<tr class=\"all\"><td>ALL (datasets)</td><td class=\"num\"></td><td class=\"num\">{}</td><td class=\"num\"></td>{}</tr>",
        num(summary.all_datasets),
        ref_cells(r, summary.all_datasets, whole.and_then(|r| r.per_set.get("ALL (datasets)").copied()))
    );
    t.push_str("</table>\n");
    t
}

fn label_table(report: &Report, summary: &Summary) -> String {
    let r = report.reference;
    let mut t = format!(
        "<table id=\"labels\">\n<tr><th>dataset</th><th>label</th><th>n</th><th>mean</th><th>median</th>{}</tr>\n",
        ref_heads(r)
    );
    for (set, label, m) in &summary.per_label {
        let dice: Vec<f64> = report
            .rows
            .iter()
            .filter(|x| &x.set == set && x.label == *label)
            .map(|x| x.dice)
            .collect();
        let theirs = r.and_then(|r| r.per_label.get(&(set.clone(), *label)).copied());
        let _ = writeln!(
            t,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>{}</tr>",
            esc(set),
            esc(&label_name(report.names, set, *label)),
            m.n,
            num(m.mean),
            num(super::median(&dice)),
            ref_cells(r, m.mean, theirs)
        );
    }
    t.push_str("</table>\n");
    t
}

/// The histogram's numbers, for readers who want them exactly (and for screen readers).
fn bin_table(counts: &[usize; histogram::BINS]) -> String {
    let mut t = String::from("<details><summary>counts per bin</summary><table class=\"bins\">\n<tr><th>Dice</th><th>targets</th></tr>\n");
    for (i, c) in counts.iter().enumerate() {
        let close = if i + 1 == histogram::BINS { ']' } else { ')' };
        let _ = writeln!(
            t,
            "<tr><td>[{:.2}, {:.2}{close}</td><td class=\"num\">{c}</td></tr>",
            histogram::bin_start(i),
            histogram::bin_start(i + 1)
        );
    }
    t.push_str("</table></details>\n");
    t
}

fn label_name(names: &HashMap<(String, u16), String>, set: &str, label: u16) -> String {
    match names.get(&(set.to_string(), label)) {
        Some(n) => format!("{label} {n}"),
        None => label.to_string(),
    }
}

/// Text (and attribute values) for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A set or image name as part of a file name and URL: ASCII letters, digits, `.`, `-` and `_`
/// kept, anything else `_`, no leading dot (names stay unique through the index or rank
/// prefixed to them).
fn file_safe(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    safe.trim_start_matches('.').to_string()
}

/// An image's file name without its extension, made [`file_safe`].
fn image_stem(name: &str) -> String {
    let stem = match name.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => name,
    };
    file_safe(stem)
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the report folder {}", parent.display()))?;
    }
    Ok(())
}

fn write_file(dir: &Path, relative: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(relative);
    create_parent(&path)?;
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
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

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("minisam-html-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The cells of the table with `id`, tags stripped (entities kept), row by row.
    fn table_cells(html: &str, id: &str) -> Vec<Vec<String>> {
        let start = html
            .find(&format!("<table id=\"{id}\">"))
            .expect("table present");
        let body = &html[start..start + html[start..].find("</table>").unwrap()];
        body.split("<tr")
            .skip(2)
            .map(|tr| {
                tr.split("<td")
                    .skip(1)
                    .map(|td| {
                        let inner = &td[td.find('>').unwrap() + 1..td.find("</td>").unwrap()];
                        let mut text = String::new();
                        let mut in_tag = false;
                        for c in inner.chars() {
                            match c {
                                '<' => in_tag = true,
                                '>' => in_tag = false,
                                c if !in_tag => text.push(c),
                                _ => {}
                            }
                        }
                        text
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn tables_match_the_summary_and_the_reference() {
        let rows = [
            row("b<&>", "1.png", 1, 0.9),
            row("b<&>", "2.png", 1, 0.5),
            row("b<&>", "2.png", 2, 0.1),
            row("a", "x.png", 1, 0.8),
        ];
        let md = "## Tree `t`\n\n| dataset | n | litemedsam box |\n|---|---|---|\n| a | 1 | 0.7000 |\n\n\
                  | dataset | label | n | litemedsam box |\n|---|---|---|---|\n| a | 1 x | 1 | 0.75 |\n";
        let reference = Reference::parse(md, "t", "litemedsam box").unwrap();
        let names = HashMap::from([(("b<&>".to_string(), 2), "tumour".to_string())]);
        let worst = HashMap::new();
        let dir = temp("tables");
        let report = Report {
            facts: vec![("model", "m.msam".into())],
            rows: &rows,
            names: &names,
            reference: Some(&reference),
            worst: &worst,
        };
        let index = write(&dir, &report).unwrap();
        let html = std::fs::read_to_string(index).unwrap();
        let sets = table_cells(&html, "sets");
        assert_eq!(
            sets[0],
            ["b&lt;&amp;&gt;", "3", "0.5000", "0.5000", "–", "–"].map(String::from)
        );
        assert_eq!(
            sets[1],
            ["a", "1", "0.8000", "0.8000", "0.7000", "+0.1000"].map(String::from)
        );
        assert_eq!(
            sets[2][..4],
            ["ALL (targets)", "4", "0.5750", "0.6500"].map(String::from)
        );
        assert_eq!(sets[2][4], "–", "a partial tree has no ALL reference");
        assert_eq!(
            sets[3][..3],
            ["ALL (datasets)", "", "0.6500"].map(String::from)
        );
        let labels = table_cells(&html, "labels");
        assert_eq!(
            labels[1],
            [
                "b&lt;&amp;&gt;",
                "2 tumour",
                "1",
                "0.1000",
                "0.1000",
                "–",
                "–"
            ]
            .map(String::from)
        );
        assert_eq!(labels[2][5..], ["0.7500", "+0.0500"].map(String::from));
        assert!(
            html.contains("b&lt;&amp;&gt;") && !html.contains("b<&>"),
            "names are escaped"
        );
        assert!(dir.join("hist/00-b___.svg").is_file() && dir.join("hist/01-a.svg").is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(image_stem("10036_103.png"), "10036_103");
        assert_eq!(image_stem("../x y.png"), "_x_y");
        assert_eq!(image_stem(".hidden"), "hidden");
        assert_eq!(file_safe("..weird"), "weird");
        assert_eq!(file_safe("ünï/a"), "_n__a");
        assert_eq!(file_safe("us.hc18"), "us.hc18");
    }
}
