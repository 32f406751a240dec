//! Diagnostics through `tracing`, for the CLI and its background processes (the VMM, the page
//! server, the network supervisor), whose stderr is their log file (vmm.log, pageserver.log,
//! net.log).
//!
//! The level comes from `MICROAGENT_LOG` (`tracing_subscriber::EnvFilter` syntax: `debug`,
//! `warn,vmm=debug`, ...; unset or empty: [`DEFAULT`], info for our crates); a background process
//! inherits it from the command that started it. The CLI's answers and errors to the user go
//! through `output.rs`, not here.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The environment variable that sets the level.
pub const ENV: &str = "MICROAGENT_LOG";

/// Info for our crates, warnings for the rest: libraries' own info lines (object_store's retries,
/// say) are not the user's business unless asked for.
pub const DEFAULT: &str = "warn,microagent=info,vmm=info,snapshot=info,guest_agent=info";

/// Who writes, and so how a line looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A command at a terminal: `microagent: warning: ...`, as its other messages.
    Cli,
    /// A background process writing its log file: `<RFC 3339 time> <LEVEL> <target>: ...`.
    Daemon,
}

/// Installs the process-wide subscriber (once; a second call changes nothing).
pub fn init(role: Role) {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter(std::env::var(ENV).ok().as_deref()))
        .with_writer(std::io::stderr)
        .event_format(Line(role))
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// The filter `spec` (the variable's value) asks for; [`DEFAULT`] when it is unset or blank.
/// Invalid directives are skipped (with a line on stderr), never fatal.
fn filter(spec: Option<&str>) -> EnvFilter {
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT);
    EnvFilter::builder().with_regex(false).parse_lossy(spec)
}

struct Line(Role);

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        match self.0 {
            Role::Cli => match *meta.level() {
                Level::INFO => write!(w, "microagent: ")?,
                Level::WARN => write!(w, "microagent: warning: ")?,
                l => write!(w, "microagent: {}: ", l.as_str().to_ascii_lowercase())?,
            },
            Role::Daemon => {
                SystemTime.format_time(&mut w)?;
                write!(w, " {} {}: ", meta.level(), meta.target())?;
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// A daemon's log line split into its level and message; `None` for a line that is not one
/// (output of a child such as passt, a panic message).
pub fn parse(line: &str) -> Option<(Level, &str)> {
    let (time, rest) = line.split_once(' ')?;
    if !(time.len() >= 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z')) {
        return None;
    }
    let (level, rest) = rest.split_once(' ')?;
    let level = level.parse::<Level>().ok()?;
    let (_target, message) = rest.split_once(": ")?;
    Some((level, message))
}

/// Why a background process stopped, from its log: the last line that is not routine (a
/// tracing line below WARN), without its time, level and target.
pub fn last_problem(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .find_map(|l| match parse(l) {
            Some((level, _)) if level > Level::WARN => None,
            Some((_, message)) => Some(message.to_string()),
            None => Some(l.to_string()),
        })
}

/// The last ERROR line of a log, without its time, level and target: why a VMM that died on its
/// own stopped (a memory chunk it could not fetch, a guest crash). None when it logged no error
/// (killed from outside), so nothing older is passed off as the reason.
pub fn last_error(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| match parse(l) {
        Some((level, message)) if level == Level::ERROR => Some(message.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn last_error_is_the_last_error_line_and_only_an_error() {
        let log = "2026-12-07T00:00:00.000000Z WARN vmm::x: slow\n\
                   2026-12-07T00:00:01.000000Z ERROR vmm::pf: memory.bin chunk 1 is missing: gone\n\
                   2026-12-07T00:00:02.000000Z INFO vmm::x: stopping\n";
        assert_eq!(
            last_error(log).as_deref(),
            Some("memory.bin chunk 1 is missing: gone")
        );
        assert_eq!(
            last_error("2026-12-07T00:00:00.000000Z WARN vmm::x: slow\n"),
            None
        );
        assert_eq!(last_error("not a tracing line\n"), None);
    }
    use std::sync::{Arc, Mutex};

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Formats a few events as `role` with the filter `spec` asks for and returns the text.
    fn logged(role: Role, spec: &str) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter(Some(spec)))
            .with_writer(move || out.clone())
            .event_format(Line(role))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(slot = 2, "a routine detail");
            tracing::warn!("the back end closed");
            tracing::error!("kernel not found: /nope");
            tracing::info!("stopped");
            tracing::info!(target: "object_store::client::retry", "backing off");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn daemon_lines_parse_back_and_the_level_filters() {
        let text = logged(Role::Daemon, "");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            parse(lines[0]),
            Some((Level::WARN, "the back end closed")),
            "{text}"
        );
        assert!(
            lines[1].contains(" ERROR microagent::logging::tests: "),
            "{text}"
        );
        assert_eq!(
            parse(lines[1]),
            Some((Level::ERROR, "kernel not found: /nope"))
        );
        // The routine line after the error does not hide it.
        assert_eq!(
            last_problem(&text).as_deref(),
            Some("kernel not found: /nope")
        );

        let debug = logged(Role::Daemon, "debug");
        let first = debug.lines().next().unwrap();
        assert_eq!(
            parse(first),
            Some((Level::DEBUG, "a routine detail slot=2")),
            "{debug}"
        );
    }

    #[test]
    fn by_default_our_info_shows_and_a_librarys_does_not() {
        for spec in ["", " "] {
            let text = logged(Role::Cli, spec);
            assert!(text.contains("microagent: stopped\n"), "{text}");
            assert!(!text.contains("backing off"), "{text}");
            assert!(!text.contains("routine"), "{text}");
        }
        // Asked for: everyone's.
        assert!(logged(Role::Cli, "info").contains("backing off"));
    }

    #[test]
    fn cli_lines_read_like_the_cli() {
        assert_eq!(
            logged(Role::Cli, "warn"),
            "microagent: warning: the back end closed\nmicroagent: error: kernel not found: /nope\n"
        );
    }

    #[test]
    fn a_foreign_last_line_is_the_reason() {
        let log = "2026-12-06T20:10:00.123456Z INFO microagent::vmm_process: started\n\
                   thread 'main' panicked at src/x.rs:1:1\n\n";
        assert_eq!(
            last_problem(log).as_deref(),
            Some("thread 'main' panicked at src/x.rs:1:1")
        );
        assert_eq!(parse("2026-12-06 not a log line: x"), None);
        assert_eq!(last_problem("2026-12-06T20:10:00Z DEBUG t: x\n"), None);
    }
}
