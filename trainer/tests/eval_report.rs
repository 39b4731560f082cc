//! `minisam eval --report DIR` end to end on committed fixtures: the random-weight tiny SAM
//! (`tests/fixtures/tiny_sam`) on a tiny two-set tree (`tests/data/eval-tiny`, made by its
//! `generate.py`). The page must reference only files that exist, show the numbers the terminal
//! shows, count every target in its histogram and show at most 5 overlays per set.

use std::path::{Path, PathBuf};
use std::process::Command;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Text of an HTML fragment without its tags.
fn strip_tags(s: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.trim().to_string()
}

/// Data rows (those with `<td>`) of every table that opens with `open`, in page order.
fn tables<'a>(html: &'a str, open: &str) -> Vec<Vec<Vec<String>>> {
    html.match_indices(open)
        .map(|(start, _)| {
            let body: &'a str = &html[start..start + html[start..].find("</table>").unwrap()];
            body.split("<tr")
                .filter(|tr| tr.contains("<td"))
                .map(|tr| {
                    tr.split("<td")
                        .skip(1)
                        .map(|td| {
                            strip_tags(&td[td.find('>').unwrap() + 1..td.find("</td>").unwrap()])
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Values of `attr="..."` in the page.
fn attribute_values(html: &str, attr: &str) -> Vec<String> {
    let key = format!("{attr}=\"");
    html.match_indices(&key)
        .map(|(i, _)| {
            let rest = &html[i + key.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

/// A row of the text summary: its name columns joined, n, and the Dice as printed.
type TextRow = (String, usize, String);

/// The text summary's two tables (per set, per label), split at the blank line.
fn text_tables(stdout: &str) -> (Vec<TextRow>, Vec<TextRow>) {
    let mut per_set = Vec::new();
    let mut per_label = Vec::new();
    let mut second = false;
    for line in stdout.lines() {
        if line.trim().is_empty() {
            second = !per_set.is_empty();
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"dataset") || words.len() < 3 {
            continue;
        }
        // "ALL (datasets)" has no count.
        let dice = words[words.len() - 1].to_string();
        let (names, n) = match words[words.len() - 2].parse::<usize>() {
            Ok(n) => (words[..words.len() - 2].join(" "), n),
            Err(_) if line.starts_with("ALL (datasets)") => ("ALL (datasets)".to_string(), 0),
            Err(_) => continue,
        };
        if second {
            per_label.push((names, n, dice));
        } else {
            per_set.push((names, n, dice));
        }
    }
    (per_set, per_label)
}

#[test]
fn eval_report_on_the_tiny_fixtures() {
    let data = manifest().join("tests/data/eval-tiny");
    let model = manifest().join("../tests/fixtures/tiny_sam/tiny_sam.pth");
    let out = std::env::temp_dir().join(format!("minisam-eval-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let dir: PathBuf = out.join("report");
    let run = Command::new(env!("CARGO_BIN_EXE_minisam"))
        .args(["eval", "--backend", "cpu", "--threads", "1", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(out.join("results.csv"))
        .arg("--report")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "eval failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("report: {}", dir.join("index.html").display())),
        "{stdout}"
    );
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();

    // Self-contained: nothing fetched, nothing run.
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
    let links: Vec<String> = attribute_values(&html, "src")
        .into_iter()
        .chain(attribute_values(&html, "href"))
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        links.len() >= 2 + 2 * (3 + 5),
        "histograms and overlays (img + link each): {links:?}"
    );
    for l in &links {
        assert!(
            !l.contains("..") && !l.starts_with('/'),
            "{l} leaves the report folder"
        );
        assert!(dir.join(l).is_file(), "{l} is referenced but missing");
    }
    let svgs = links.iter().filter(|l| l.ends_with(".svg")).count();
    assert_eq!(svgs, 2, "one histogram per set");

    // The page's numbers are the terminal's.
    let (text_sets, text_labels) = text_tables(&stdout);
    let sets = &tables(&html, "<table id=\"sets\">")[0];
    assert_eq!(text_sets.len(), 4, "2 sets + 2 ALL rows: {stdout}");
    assert_eq!(sets.len(), text_sets.len());
    for ((name, n, dice), row) in text_sets.iter().zip(sets) {
        assert_eq!(&row[0], name);
        if name != "ALL (datasets)" {
            assert_eq!(row[1], n.to_string(), "{name}");
        }
        assert_eq!(&row[2], dice, "mean Dice of {name}");
    }
    let labels = &tables(&html, "<table id=\"labels\">")[0];
    assert_eq!(labels.len(), 3, "ct-tiny labels 1 and 2, us-tiny label 1");
    for ((names, n, dice), row) in text_labels.iter().zip(labels) {
        assert_eq!(format!("{} {}", row[0], row[1]), *names);
        assert_eq!((&row[2], &row[3]), (&n.to_string(), dice));
    }
    // The CSV has one row per target, as many as the page counts.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count() - 1, text_sets[2].1);

    // Each set's histogram counts every target of the set.
    let bins = tables(&html, "<table class=\"bins\">");
    assert_eq!(bins.len(), 2);
    for (set_bins, (name, n, _)) in bins.iter().zip(&text_sets) {
        assert_eq!(set_bins.len(), 20);
        let total: usize = set_bins
            .iter()
            .map(|r| r[1].parse::<usize>().unwrap())
            .sum();
        assert_eq!(total, *n, "histogram of {name}");
    }

    // The worst 5 (or all, when fewer), each with its Dice, worst first.
    let sections: Vec<&str> = html.split("<section").skip(1).collect();
    assert_eq!(sections.len(), 2);
    for (section, (name, n, _)) in sections.iter().zip(&text_sets) {
        let shown: Vec<f64> = section
            .split("<b>Dice ")
            .skip(1)
            .map(|s| s[..s.find('<').unwrap()].parse().unwrap())
            .collect();
        assert_eq!(shown.len(), (*n).min(5), "overlays of {name}");
        assert!(
            shown.windows(2).all(|w| w[0] <= w[1]),
            "worst first: {shown:?}"
        );
    }
    let rows: Vec<f64> = csv
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("us-tiny,"))
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    let mut sorted = rows.clone();
    sorted.sort_by(f64::total_cmp);
    let shown: Vec<f64> = sections[1]
        .split("<b>Dice ")
        .skip(1)
        .map(|s| s[..s.find('<').unwrap()].parse().unwrap())
        .collect();
    assert_eq!(rows.len(), 7);
    for (page, csv) in shown.iter().zip(&sorted[..5]) {
        // The page rounds to 4 decimals, the CSV to 6.
        assert!(
            (page - csv).abs() <= 0.5e-4 + 1e-6,
            "us-tiny shows its 5 lowest: {shown:?} vs {sorted:?}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
