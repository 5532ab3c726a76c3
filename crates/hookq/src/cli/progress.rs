//! Progress on stderr for the commands that take a while (`shovel`,
//! `simulate`, `bench`): a bar on a terminal, otherwise a plain line every few
//! seconds, so logs and CI output stay readable.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a plain progress line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// Says what a plain line counts, e.g. "hookq shovel: looked at".
    label: String,
    last_line: Mutex<Option<Instant>>,
}

impl Progress {
    /// `label` starts every plain line; `unit` follows the bar's count.
    pub fn new(label: &str, unit: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let template = format!("{{spinner}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{msg}} ({{per_sec}}, {{eta}} left)");
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Self {
            bar,
            label: format!("{label} {unit}"),
            last_line: Mutex::new(None),
        }
    }

    /// `done` of `total` so far; `note` says what else happened ("12 moved").
    pub fn update(&self, done: u64, total: u64, note: impl FnOnce() -> String) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(note());
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            *last = Some(Instant::now());
            eprintln!("{} {done} of {total}, {}", self.label, note());
        }
    }

    /// Prints a line on stdout without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| super::print(line)),
            None => super::print(line),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
