//! The proxy's own log lines in the shape `application_log_config` asks for (Envoy's pattern
//! flags, or a JSON object of them), so log pipelines built for Envoy's lines parse Remora's.
//! Until a bootstrap sets one, and without it, lines keep `tracing`'s default shape.

use std::fmt::Write as _;
use std::sync::OnceLock;

use remora_config::app_log::{AppLogFormat, Flag, JsonValue, Piece};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{Format, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

static FORMAT: OnceLock<AppLogFormat> = OnceLock::new();

/// Makes every line from now on take `format`. Set once, from the bootstrap.
pub fn set_format(format: AppLogFormat) {
    let _ = FORMAT.set(format);
}

/// The event formatter `main` installs: the bootstrap's shape once set, else `tracing`'s.
#[derive(Debug, Default)]
pub struct Lines {
    default: Format,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(shape) = FORMAT.get() else {
            return self.default.format_event(ctx, writer, event);
        };
        let line = Line::of(event);
        match shape {
            AppLogFormat::Text(pieces) => {
                let mut out = String::new();
                line.render(pieces, &mut out);
                writeln!(writer, "{out}")
            }
            AppLogFormat::Json(fields) => {
                writeln!(writer, "{}", serde_json::Value::Object(line.object(fields)))
            }
        }
    }
}

/// What one event offers the flags.
struct Line<'a> {
    event: &'a Event<'a>,
    at: jiff::Timestamp,
    message: String,
}

impl<'a> Line<'a> {
    fn of(event: &'a Event<'a>) -> Self {
        let mut message = Message::default();
        event.record(&mut message);
        Line {
            event,
            at: jiff::Timestamp::now(),
            message: message.text,
        }
    }

    fn object(&self, fields: &[(String, JsonValue)]) -> serde_json::Map<String, serde_json::Value> {
        fields
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    JsonValue::Pattern(pieces) => {
                        let mut text = String::new();
                        self.render(pieces, &mut text);
                        serde_json::Value::String(text)
                    }
                    JsonValue::Fixed(value) => value.clone(),
                    JsonValue::Object(inner) => serde_json::Value::Object(self.object(inner)),
                };
                (key.clone(), value)
            })
            .collect()
    }

    fn render(&self, pieces: &[Piece], out: &mut String) {
        let meta = self.event.metadata();
        let utc = self.at.to_zoned(jiff::tz::TimeZone::UTC);
        let nanos = utc.subsec_nanosecond();
        for piece in pieces {
            let Piece::Flag(flag) = piece else {
                if let Piece::Text(text) = piece {
                    out.push_str(text);
                }
                continue;
            };
            let _ = match flag {
                Flag::Year => write!(out, "{:04}", utc.year()),
                Flag::Month => write!(out, "{:02}", utc.month()),
                Flag::Day => write!(out, "{:02}", utc.day()),
                Flag::Hour => write!(out, "{:02}", utc.hour()),
                Flag::Minute => write!(out, "{:02}", utc.minute()),
                Flag::Second => write!(out, "{:02}", utc.second()),
                Flag::Time => write!(
                    out,
                    "{:02}:{:02}:{:02}",
                    utc.hour(),
                    utc.minute(),
                    utc.second()
                ),
                Flag::Date => write!(
                    out,
                    "{:02}/{:02}/{:02}",
                    utc.month(),
                    utc.day(),
                    utc.year() % 100
                ),
                Flag::Millis => write!(out, "{:03}", nanos / 1_000_000),
                Flag::Micros => write!(out, "{:06}", nanos / 1_000),
                Flag::Nanos => write!(out, "{:09}", nanos),
                Flag::Offset => write!(out, "+00:00"),
                Flag::Epoch => write!(out, "{}", self.at.as_second()),
                Flag::Level => write!(out, "{}", level_name(meta.level())),
                Flag::LevelLetter => {
                    write!(out, "{}", &level_name(meta.level())[..1].to_uppercase())
                }
                Flag::Logger => write!(out, "{}", crate::admin::logging::logger_of(meta.target())),
                Flag::Message => write!(out, "{}", self.message),
                Flag::EscapedMessage => {
                    let quoted = serde_json::Value::String(self.message.clone()).to_string();
                    write!(out, "{}", &quoted[1..quoted.len() - 1])
                }
                Flag::Thread => write!(out, "{}", thread_id()),
                Flag::Process => write!(out, "{}", std::process::id()),
                Flag::File => write!(out, "{}", meta.file().unwrap_or_default()),
                Flag::FileBase => write!(
                    out,
                    "{}",
                    meta.file()
                        .and_then(|f| f.rsplit('/').next())
                        .unwrap_or_default()
                ),
                Flag::Line => write!(out, "{}", meta.line().unwrap_or_default()),
                Flag::Function => write!(out, "{}", meta.module_path().unwrap_or_default()),
                Flag::FileLine => write!(
                    out,
                    "{}:{}",
                    meta.file().unwrap_or_default(),
                    meta.line().unwrap_or_default()
                ),
            };
        }
    }
}

/// Envoy's level names.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warning",
        Level::ERROR => "error",
    }
}

/// The calling thread's id as the kernel numbers it (what Envoy's `%t` prints), read once per
/// thread from `/proc/thread-self`.
fn thread_id() -> u64 {
    thread_local! {
        static ID: u64 = std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|link| link.file_name()?.to_str()?.parse().ok())
            .unwrap_or_default();
    }
    ID.with(|id| *id)
}

/// The event's message, then its other fields as ` key=value`, as `tracing` prints them.
#[derive(Default)]
struct Message {
    text: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text.insert_str(0, value);
        } else {
            let _ = write!(self.text, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.text.insert_str(0, &format!("{value:?}"));
        } else {
            let _ = write!(self.text, " {}={value:?}", field.name());
        }
    }
}
