//! The Dice histogram of a set: fixed bins over [0, 1] and their static SVG picture.
//!
//! Drawn with `plotters` on its SVG backend alone (no bitmap backend, no font loading: text is
//! written as SVG `<text>` and laid out by the browser), so the report needs no system library.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Bins of width 0.05: Dice differences that matter (a few points) stay visible.
pub const BINS: usize = 20;

/// Counts per bin: bin `i` holds `[i/BINS, (i+1)/BINS)`, the last one also 1.0. Dice outside
/// [0, 1] cannot occur; were one to, it is counted in the nearest end bin, so the counts always
/// add up to the number of targets.
pub fn bins(dice: &[f64]) -> [usize; BINS] {
    let mut counts = [0usize; BINS];
    for &d in dice {
        let i = (d * BINS as f64).floor();
        let i = if i.is_nan() {
            0
        } else {
            (i.max(0.0) as usize).min(BINS - 1)
        };
        counts[i] += 1;
    }
    counts
}

/// Lower edge of bin `i`.
pub fn bin_start(i: usize) -> f64 {
    i as f64 / BINS as f64
}

/// The histogram as a standalone SVG document of `width` x `height` pixels.
pub fn svg(title: &str, counts: &[usize; BINS], width: u32, height: u32) -> Result<String> {
    let mut out = String::new();
    draw(&mut out, title, counts, (width, height))
        .map_err(|e| anyhow!("drawing the Dice histogram of {title}: {e}"))?;
    Ok(out)
}

fn draw(
    out: &mut String,
    title: &str,
    counts: &[usize; BINS],
    size: (u32, u32),
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(out, size).into_drawing_area();
    root.fill(&WHITE)?;
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 15))
        .margin(6)
        .x_label_area_size(34)
        .y_label_area_size(36)
        .build_cartesian_2d(0f64..1f64, 0u32..top + top.div_ceil(10))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(6)
        .y_labels(top.min(6) as usize)
        .x_label_formatter(&|v| format!("{v:.1}"))
        .x_desc("Dice")
        .y_desc("targets")
        .draw()?;
    let bar = RGBColor(30, 144, 255).filled();
    let gap = 0.1 / BINS as f64;
    chart.draw_series(
        counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                Rectangle::new(
                    [(bin_start(i) + gap, 0), (bin_start(i + 1) - gap, c as u32)],
                    bar,
                )
            }),
    )?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_half_open_with_one_in_the_last_and_sum_to_the_count() {
        let dice = [0.0, 0.049, 0.05, 0.5, 0.999, 1.0, 1.0, 0.95];
        let b = bins(&dice);
        assert_eq!(b[0], 2);
        assert_eq!(b[1], 1);
        assert_eq!(b[10], 1);
        assert_eq!(b[19], 4, "0.95, 0.999 and both 1.0");
        assert_eq!(b.iter().sum::<usize>(), dice.len());
        assert_eq!(bins(&[f64::NAN, -0.1, 1.5]).iter().sum::<usize>(), 3);
    }

    #[test]
    fn svg_has_one_bar_per_non_empty_bin() {
        let counts = bins(&[0.1, 0.1, 0.9, 0.92, 0.93]);
        let s = svg("us-hc18 <&>", &counts, 360, 220).unwrap();
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        let bars = s.matches("fill=\"#1E90FF\"").count();
        assert_eq!(bars, 2, "{s}");
        assert!(s.contains("us-hc18 &lt;&amp;&gt;"), "the title is escaped");
    }
}
