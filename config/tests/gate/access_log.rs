//! Access logs on the HCM: the stdout, stderr and file loggers, text and JSON formats, and the
//! command operators Remora renders.

use http::HeaderName;
use remora_config::access_log::{
    CompareOp, Comparison, DEFAULT_FORMAT, HeaderField, JsonField, LogFilter, LogFormat, Target,
    Token, parse_format,
};

use crate::hcm::hcm;
use crate::support::*;

fn file_log(format: &str) -> String {
    format!(
        "access_log: [{{name: envoy.access_loggers.file, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: /var/log/a.log{format}}}}}]"
    )
}

const TYPED: &str = "access_log[0].typed_config";

/// A stdout log with `filter` (YAML, flow style).
fn filtered(filter: &str) -> String {
    format!(
        "access_log: [{{name: a, filter: {filter}, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog}}}}]"
    )
}

#[test]
fn access_log_fields_are_refused_by_path() {
    let format = format!("{TYPED}.log_format");
    check_rejections(
        HCM,
        &[
            (
                &filtered("{}"),
                "access_log[0].filter",
                "no filter this proxy knows",
            ),
            (
                &filtered("{grpc_status_filter: {statuses: [OK]}}"),
                "access_log[0].filter.grpc_status_filter",
                "Remora does not support this field",
            ),
            (
                &filtered("{response_flag_filter: {flags: [UH, XX]}}"),
                "access_log[0].filter.response_flag_filter.flags[1]",
                "\"XX\" is not one of Envoy's response flags",
            ),
            (
                &filtered("{and_filter: {filters: [{not_health_check_filter: {}}]}}"),
                "access_log[0].filter.and_filter.filters",
                "needs at least two filters",
            ),
            (
                &filtered(
                    "{or_filter: {filters: [{traceable_filter: {}}, {status_code_filter: {}}]}}",
                ),
                "access_log[0].filter.or_filter.filters[1].status_code_filter.comparison",
                "required",
            ),
            (
                &filtered("{duration_filter: {comparison: {op: GE}}}"),
                "access_log[0].filter.duration_filter.comparison.value",
                "required",
            ),
            (
                &filtered("{header_filter: {header: {name: \":status\"}}}"),
                "access_log[0].filter.header_filter.header.name",
                "only :method, :path, :authority and :scheme can be matched",
            ),
            ("access_log: [{name: a}]", TYPED, "required"),
            (
                "access_log: [{name: a, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog}}]",
                &format!("{TYPED}.path"),
                "must not be empty",
            ),
            (
                "access_log: [{name: a, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]",
                TYPED,
                "access logger type.googleapis.com/envoy.extensions.filters.http.router.v3.Router is not supported",
            ),
            (
                &file_log(", log_format: {text_format: \"%RESPONSE_CODE% %FILTER_STATE(x)%\\n\"}"),
                &format,
                "command operator %FILTER_STATE(x)% is not supported",
            ),
            (
                &file_log(", log_format: {text_format: \"%START_TIME\"}"),
                &format,
                "unterminated command operator",
            ),
            (
                &file_log(", log_format: {text_format: \"%REQ(x-a):big%\"}"),
                &format,
                "command operator %REQ(x-a):big% is not supported",
            ),
            (
                &file_log(", log_format: {text_format: \"%RESP(a?b)%\"}"),
                &format,
                "command operator %RESP(a?b)% is not supported",
            ),
            (
                &file_log(", log_format: {text_format: x, content_type: text/html}"),
                &format!("{format}.content_type"),
                UNSUPPORTED,
            ),
            (
                &file_log(
                    ", log_format: {text_format: x, json_format_options: {sort_properties: true}}",
                ),
                &format!("{format}.json_format_options"),
                UNSUPPORTED,
            ),
            (
                &file_log(", log_format: {text_format_source: {filename: /etc/format}}"),
                &format!("{format}.text_format_source"),
                "only inline_string and inline_bytes are supported",
            ),
            (
                &file_log(", log_format: {json_format: {outer: {inner: \"%NOPE%\"}}}"),
                &format!("{format}.json_format"),
                "outer.inner: command operator %NOPE% is not supported",
            ),
        ],
    );
}

#[test]
fn the_deprecated_file_formats_read_as_their_log_format() {
    let format_of = |fields: &str| {
        hcm(&accepted(HCM, &file_log(fields))).access_logs[0]
            .format
            .clone()
    };
    assert_eq!(
        format_of(", format: \"%RESPONSE_CODE% %PROTOCOL%\\n\""),
        format_of(", log_format: {text_format: \"%RESPONSE_CODE% %PROTOCOL%\\n\"}")
    );
    let json = format_of(", log_format: {json_format: {code: \"%RESPONSE_CODE%\"}}");
    assert_eq!(
        format_of(", json_format: {code: \"%RESPONSE_CODE%\"}"),
        json
    );
    assert_eq!(
        format_of(", typed_json_format: {code: \"%RESPONSE_CODE%\"}"),
        json
    );
}

#[test]
fn access_logs_reach_the_model() {
    let default_tokens = parse_format(DEFAULT_FORMAT).expect("the default format parses");
    let hcm = hcm(&accepted(
        HCM,
        r#"
access_log:
- name: out
  typed_config: {"@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog}
  filter:
    or_filter:
      filters:
      - status_code_filter: {comparison: {op: GE, value: {default_value: 500, runtime_key: a}}}
      - and_filter:
          filters:
          - response_flag_filter: {flags: [UH]}
          - runtime_filter: {runtime_key: b, percent_sampled: {numerator: 5, denominator: TEN_THOUSAND}}
- name: err
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog
    log_format: {text_format_source: {inline_string: "%RESPONSE_CODE% %REQ(:PATH?X-PATH):10%\n"}, omit_empty_values: true}
- name: file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: /var/log/a.log
    log_format:
      json_format: {status: "%RESPONSE_CODE%", nested: {path: "%REQ(:PATH)%", n: 1}, list: ["%PROTOCOL%", true]}
"#,
    ));
    let logs = &hcm.access_logs;
    assert_eq!(logs[0].target, Target::Stdout);
    assert_eq!(
        logs[0].filter,
        Some(LogFilter::Or(vec![
            LogFilter::StatusCode(Comparison {
                op: CompareOp::Ge,
                value: 500
            }),
            LogFilter::And(vec![
                LogFilter::ResponseFlags(vec!["UH".into()]),
                LogFilter::Runtime {
                    numerator: 5,
                    denominator: 10_000,
                    independent_randomness: false
                },
            ]),
        ]))
    );
    assert_eq!(logs[1].filter, None);
    assert_eq!(
        logs[0].format,
        LogFormat::Text {
            tokens: default_tokens,
            omit_empty: false
        }
    );
    assert_eq!(logs[1].target, Target::Stderr);
    assert_eq!(
        logs[1].format,
        LogFormat::Text {
            tokens: vec![
                Token::ResponseCode,
                Token::Text(" ".into()),
                Token::Request {
                    name: HeaderField::Path,
                    alt: Some(HeaderField::Header(HeaderName::from_static("x-path"))),
                    max: Some(10)
                },
                Token::Text("\n".into()),
            ],
            omit_empty: true
        }
    );
    assert_eq!(logs[2].target, Target::File("/var/log/a.log".into()));
    let LogFormat::Json { fields, omit_empty } = &logs[2].format else {
        panic!("a JSON format")
    };
    assert!(!omit_empty);
    let keys: Vec<&str> = fields.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(
        keys,
        ["list", "nested", "status"],
        "sorted, as Envoy writes them"
    );
    assert_eq!(fields[2].1, JsonField::Format(vec![Token::ResponseCode]));
    assert!(matches!(&fields[1].1, JsonField::Object(inner) if inner.len() == 2));
    assert!(matches!(&fields[0].1, JsonField::List(items) if items.len() == 2));
    // `%%` is a literal percent sign.
    assert_eq!(
        parse_format("100%% %PROTOCOL%").unwrap(),
        [
            Token::Text("100".into()),
            Token::Text("%".into()),
            Token::Text(" ".into()),
            Token::Protocol
        ]
    );
}
