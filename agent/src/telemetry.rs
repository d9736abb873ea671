//! Logs and progress bars.
//!
//! Logs go through `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as human-readable lines
//! or as one JSON object per line (`--log-format json`) for log collectors. Progress bars draw on stderr
//! only when it is a terminal, so logs piped to a file or the journal stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Calling it twice is harmless (the second call does nothing).
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// [`init`] with another filter when `RUST_LOG` is unset: `microfed demo` prints its own progress and
/// keeps only warnings from its agents, and nothing from the embedded broker, which logs every
/// client's disconnection as an error.
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: a log file or the journal would keep the escape codes.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A progress bar for `len` steps of work, hidden when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// At most the first `max_bytes` bytes of `s`, cut back to a character boundary: for showing a
/// string that came from outside (a peer's model version, device id, error text) without the
/// panic `&s[..n]` gives when byte `n` falls inside a character.
pub fn clip(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod clip_tests {
    use super::clip;

    #[test]
    fn clip_never_splits_a_character() {
        assert_eq!(clip("abc", 12), "abc");
        assert_eq!(clip("aaaaaaaaaaaé", 12), "aaaaaaaaaaa");
        assert_eq!(clip("ééé", 3), "é");
        assert_eq!(clip("\u{1F600}", 2), "");
        assert_eq!(clip("", 0), "");
        for n in 0..20 {
            let _ = clip("aé\u{1F600}bç\u{1F600}", n);
        }
    }
}
