//! `application_log_config`: the shape of the proxy's own log lines, in Envoy's pattern flags
//! (`%Y-%m-%dT%T.%fZ %l %n %v`, as Istio's bootstrap writes them), or a JSON object whose values
//! are such patterns. Log pipelines built for Envoy parse these lines, so the flags print what
//! Envoy's print.

use xds_api::envoy::config::bootstrap::v3 as bootstrap_pb;

use crate::error::{ConfigResult, err, field};

/// A line's pattern, read.
#[derive(Debug, Clone, PartialEq)]
pub enum AppLogFormat {
    Text(Vec<Piece>),
    /// Keys in the order written; each value a pattern, or a JSON value printed as given.
    Json(Vec<(String, JsonValue)>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum JsonValue {
    Pattern(Vec<Piece>),
    Fixed(serde_json::Value),
    Object(Vec<(String, JsonValue)>),
}

/// A literal run, or a flag (the character after `%`).
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Flag(Flag),
}

/// The flags Remora prints; any other `%x` prints as written, as in Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `%Y %m %d %H %M %S`: the UTC date and time's parts.
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    /// `%T`: `%H:%M:%S`; `%D`: `%m/%d/%y`.
    Time,
    Date,
    /// `%e %f %F`: the fraction of the second in milli-, micro- and nanoseconds.
    Millis,
    Micros,
    Nanos,
    /// `%z`: the UTC offset, `+00:00`; `%E`: seconds since the epoch.
    Offset,
    Epoch,
    /// `%l`: `trace` ... `critical`; `%L`: its first letter, upper case.
    Level,
    LevelLetter,
    /// `%n`: Envoy's logger name (`main`, `upstream`, ...).
    Logger,
    /// `%v`: the message; `%j` and `%_`: the message escaped for JSON.
    Message,
    EscapedMessage,
    /// `%t`: the thread's id; `%P`: the process's.
    Thread,
    Process,
    /// `%g`: the source file; `%s`: its base name; `%#`: the line; `%!`: the module; `%@`:
    /// `file:line`.
    File,
    FileBase,
    Line,
    Function,
    FileLine,
}

fn flag(c: char) -> Option<Flag> {
    use Flag::*;
    Some(match c {
        'Y' => Year,
        'm' => Month,
        'd' => Day,
        'H' => Hour,
        'M' => Minute,
        'S' => Second,
        'T' => Time,
        'D' => Date,
        'e' => Millis,
        'f' => Micros,
        'F' => Nanos,
        'z' => Offset,
        'E' => Epoch,
        'l' => Level,
        'L' => LevelLetter,
        'n' => Logger,
        'v' => Message,
        'j' | '_' => EscapedMessage,
        't' => Thread,
        'P' => Process,
        'g' => File,
        's' => FileBase,
        '#' => Line,
        '!' => Function,
        '@' => FileLine,
        _ => return None,
    })
}

/// Splits a pattern into literal runs and flags. `%%` is a `%`; `%^` and `%$` (colour) print
/// nothing; an unknown flag prints as written.
pub fn pattern(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            literal.push(c);
            continue;
        }
        match chars.next() {
            None => literal.push('%'),
            Some('%') => literal.push('%'),
            Some('^' | '$') => {}
            Some(c) => match flag(c) {
                Some(flag) => {
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Flag(flag));
                }
                None => {
                    literal.push('%');
                    literal.push(c);
                }
            },
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    pieces
}

/// Reads `application_log_config`.
pub fn app_log_config(
    proto: &bootstrap_pb::ApplicationLogConfig,
    path: &str,
) -> ConfigResult<Option<AppLogFormat>> {
    use bootstrap_pb::application_log_config::log_format::LogFormat as Which;
    let bootstrap_pb::ApplicationLogConfig { log_format } = proto;
    let path = field(path, "log_format");
    Ok(
        match log_format.as_ref().and_then(|f| f.log_format.as_ref()) {
            None => None,
            Some(Which::TextFormat(text)) => Some(AppLogFormat::Text(pattern(text))),
            Some(Which::JsonFormat(object)) => Some(AppLogFormat::Json(json_object(
                object,
                &field(&path, "json_format"),
            )?)),
        },
    )
}

fn json_object(object: &prost_types::Struct, path: &str) -> ConfigResult<Vec<(String, JsonValue)>> {
    let mut keys: Vec<&String> = object.fields.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|key| {
            let kpath = field(path, key);
            let value = &object.fields[key];
            use prost_types::value::Kind;
            let value = match &value.kind {
                Some(Kind::StringValue(text)) => {
                    let pieces = pattern(text);
                    // As Envoy refuses it: a raw message could break the line's JSON.
                    if pieces.contains(&Piece::Flag(Flag::Message)) {
                        return err(
                            kpath,
                            "%v is not available in a JSON format; %j prints the message escaped",
                        );
                    }
                    JsonValue::Pattern(pieces)
                }
                Some(Kind::StructValue(inner)) => JsonValue::Object(json_object(inner, &kpath)?),
                // A whole number prints as one (`5`, not `5.0`), as Envoy prints it.
                Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9e15 => {
                    JsonValue::Fixed(serde_json::json!(*n as i64))
                }
                Some(Kind::NumberValue(n)) => JsonValue::Fixed(serde_json::json!(n)),
                Some(Kind::BoolValue(b)) => JsonValue::Fixed(serde_json::json!(b)),
                Some(Kind::NullValue(_)) | None => JsonValue::Fixed(serde_json::Value::Null),
                Some(Kind::ListValue(_)) => return err(kpath, "a list is not a log field"),
            };
            Ok((key.clone(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_pattern_reads_as_flags_and_text() {
        use Flag::*;
        let pieces = pattern("%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t %Q 100%%%^");
        let flags: Vec<Flag> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Flag(f) => Some(*f),
                Piece::Text(_) => None,
            })
            .collect();
        assert_eq!(
            flags,
            [
                Year, Month, Day, Time, Micros, Level, Logger, File, Line, Message, Thread
            ]
        );
        assert_eq!(pieces.last(), Some(&Piece::Text(" %Q 100%".into())));
    }
}
