//! Progress of long commands (`eval`, `train`, `distill`, `pack`): a bar with ETA (`indicatif`)
//! when stderr is a terminal, plain lines otherwise, so logs and CI output stay greppable text
//! without escape codes.
//!
//! - **Bar** (terminal): `eval [=====>    ] 12/40 00:31<01:13 <message>`; item lines (an image's
//!   Dice, an epoch's validation) are printed above it and stay on screen.
//! - **Plain** (not a terminal, or `MINISAM_PROGRESS=plain`): each item line gets
//!   `(elapsed 0m31s, ETA 1m13s)` appended; `every` keeps fast loops (one line per tensor) to
//!   one line per interval, plus the last.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Bar,
    Plain,
}

impl Mode {
    /// A bar when stderr is a terminal, unless `MINISAM_PROGRESS=plain` asks for lines.
    pub fn for_stderr() -> Mode {
        let plain = std::env::var("MINISAM_PROGRESS").is_ok_and(|v| v == "plain");
        if std::io::stderr().is_terminal() && !plain {
            Mode::Bar
        } else {
            Mode::Plain
        }
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    start: Instant,
    every: Duration,
    last_line: Option<Instant>,
    /// Append `(elapsed, ETA)` to plain lines (off for lines that carry their own ETA).
    timing: bool,
}

impl Progress {
    /// `total` items of work called `label`; in plain mode at most one line per `every`.
    pub fn new(mode: Mode, label: &str, total: u64, every: Duration) -> Progress {
        let bar = (mode == Mode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{prefix} [{bar:30.cyan/blue}] {pos}/{len} {elapsed_precise}<{eta_precise} {wide_msg}")
                .expect("the template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar
        });
        Progress {
            bar,
            total,
            done: 0,
            start: Instant::now(),
            every,
            last_line: None,
            timing: true,
        }
    }

    /// Plain lines as given, for callers whose lines already say their ETA.
    pub fn without_timing(mut self) -> Progress {
        self.timing = false;
        self
    }

    /// Item `done` (1-based, of `total`) finished; `line` says what it was.
    pub fn step(&mut self, log: &mut dyn Write, done: u64, line: &str) -> std::io::Result<()> {
        self.done = done.min(self.total);
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            bar.set_message(line.to_string());
            return Ok(());
        }
        let due =
            self.last_line.is_none_or(|t| t.elapsed() >= self.every) || self.done == self.total;
        if due {
            self.last_line = Some(Instant::now());
            if self.timing {
                writeln!(log, "{line} ({})", self.timing())?;
            } else {
                writeln!(log, "{line}")?;
            }
        }
        Ok(())
    }

    /// Like [`Progress::step`], but on a terminal the line also stays above the bar (an
    /// image's scores), as it does in plain mode.
    pub fn item(&mut self, log: &mut dyn Write, done: u64, line: &str) -> std::io::Result<()> {
        if let Some(bar) = &self.bar {
            bar.println(line);
        }
        self.step(log, done, line)
    }

    /// A line that stays in the output (above the bar, or in the log), without advancing.
    pub fn println(&self, log: &mut dyn Write, line: &str) -> std::io::Result<()> {
        match &self.bar {
            Some(bar) => {
                bar.println(line);
                Ok(())
            }
            None => writeln!(log, "{line}"),
        }
    }

    /// `elapsed 0m31s, ETA 1m13s` from the mean time per item so far.
    pub fn timing(&self) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if self.done == 0 {
            f64::NAN
        } else {
            elapsed / self.done as f64 * (self.total - self.done) as f64
        };
        format!(
            "elapsed {}, ETA {}",
            fmt_duration(elapsed),
            if eta.is_nan() {
                "-".into()
            } else {
                fmt_duration(eta)
            }
        )
    }

    /// Removes the bar (the item lines printed above it stay).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `1m05s`, or `2h03m` from an hour on.
pub fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_mode_writes_one_line_per_item_with_elapsed_and_eta() {
        let mut log = Vec::new();
        let mut p = Progress::new(Mode::Plain, "eval", 3, Duration::ZERO);
        for i in 1..=3 {
            p.step(
                &mut log,
                i,
                &format!("[{i}/3] s/img{i}.png: label 1 dice 0.9000"),
            )
            .unwrap();
        }
        p.println(&mut log, "done").unwrap();
        let text = String::from_utf8(log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0]
                .starts_with("[1/3] s/img1.png: label 1 dice 0.9000 (elapsed 0m00s, ETA 0m00s)"),
            "{text}"
        );
        assert_eq!(lines[3], "done");
        assert!(
            !text.contains('\u{1b}'),
            "no escape codes in plain mode: {text:?}"
        );
    }

    #[test]
    fn plain_mode_limits_fast_loops_to_one_line_per_interval_and_the_last() {
        let mut log = Vec::new();
        let mut p = Progress::new(Mode::Plain, "pack", 100, Duration::from_secs(3600));
        for i in 1..=100 {
            p.step(&mut log, i, &format!("tensor {i}")).unwrap();
        }
        let text = String::from_utf8(log).unwrap();
        assert_eq!(
            text.lines()
                .map(|l| l.split(" (").next().unwrap())
                .collect::<Vec<_>>(),
            vec!["tensor 1", "tensor 100"]
        );
    }

    #[test]
    fn durations_read_as_minutes_or_hours() {
        assert_eq!(fmt_duration(65.4), "1m05s");
        assert_eq!(fmt_duration(7380.0), "2h03m");
        assert_eq!(fmt_duration(-3.0), "0m00s");
    }
}
