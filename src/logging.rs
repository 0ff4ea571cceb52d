//! Logging setup: `tracing` to stderr, human-readable or JSON (`--log-format json`), filtered
//! by `--log-level` or `RUST_LOG`. Nothing in the guard logs a cookie value.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat, level: &str) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colour codes only for a person at a terminal: journald, a log file or a pipe would get
    // escape sequences in every line (and formatting them costs instructions per request).
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if !ansi {
        // The one line per request, in this same layout, without the generic formatter.
        crate::proxy::access_log::write_directly(format);
    }
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
