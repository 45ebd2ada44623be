//! Logging of the server: tracing to stderr, as text or JSON lines, filtered like `RUST_LOG`.

use std::fmt;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (colored when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    pub const ALLOWED: &'static str = "text or json";

    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "RUST_LOG={value:?} is not a valid filter ({reason}); use e.g. info, or clusterclaw_server=debug,info"
    )]
    BadFilter { value: String, reason: String },
    #[error("logging is already set up in this process")]
    AlreadySet,
}

/// The filter from `RUST_LOG`, `info` when unset.
pub fn filter_from_env() -> Result<EnvFilter, TelemetryError> {
    let builder = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into());
    match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => {
            builder
                .parse(&value)
                .map_err(|e| TelemetryError::BadFilter {
                    value,
                    reason: e.to_string(),
                })
        }
        _ => Ok(builder.parse_lossy("")),
    }
}

/// Installs the global subscriber: stderr, in `format`, filtered by `RUST_LOG` (default info).
pub fn init(format: LogFormat) -> Result<(), TelemetryError> {
    let filter = filter_from_env()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadySet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse() {
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("JSON"), None);
        assert_eq!(LogFormat::Json.to_string(), "json");
    }
}
