//! `/logging`: Envoy's named loggers, each standing for some of our modules' log targets, with
//! their levels changed at runtime (`?level=`, `?NAME=`, `?paths=NAME:LEVEL,...`).

use std::sync::{Mutex, OnceLock};

use http::StatusCode;

/// Envoy's logger names that have a counterpart here, and the log targets each one sets.
/// `misc` also sets everything not listed (hyper, h2, tonic, rustls).
const LOGGERS: &[(&str, &[&str])] = &[
    ("admin", &["remora_proxy::admin"]),
    ("config", &["remora_proxy::config", "remora_proxy::xds"]),
    (
        "conn_handler",
        &[
            "remora_proxy::listener",
            "remora_proxy::filter_chain",
            "remora_proxy::drain",
        ],
    ),
    ("connection", &["remora_proxy::tls"]),
    ("filter", &["remora_proxy::tcp_proxy"]),
    ("http", &["remora_proxy::http"]),
    ("main", &["remora_proxy::server", "remora_proxy::memory"]),
    ("misc", &[]),
    ("pool", &["remora_proxy::pool"]),
    ("stats", &["remora_proxy::stats"]),
    ("upstream", &["remora_proxy::cluster", "remora_proxy::lb"]),
];

/// Envoy's level names, and the `tracing` level each maps to.
const LEVELS: &[(&str, &str)] = &[
    ("trace", "trace"),
    ("debug", "debug"),
    ("info", "info"),
    ("warning", "warn"),
    ("error", "error"),
    ("critical", "error"),
    ("off", "off"),
];

const USAGE: &str = "usage: /logging?<name>=<level> (change single level)\n\
usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n\
usage: /logging?level=<level> (change all levels)\n\
levels: trace debug info warning error critical off\n";

type Apply = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

struct State {
    /// Each logger's level, by its Envoy name, in `LOGGERS` order.
    levels: Mutex<Vec<&'static str>>,
    /// Installs a filter directive string in the process's subscriber.
    apply: Apply,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Sets every logger to `level` (an Envoy level name, e.g. from `-l`) and remembers how to
/// change the subscriber's filter. Called once by `main`.
pub fn install(level: &str, apply: Apply) {
    let level = envoy_level(level).unwrap_or("info");
    let _ = STATE.set(State {
        levels: Mutex::new(vec![level; LOGGERS.len()]),
        apply,
    });
}

/// The filter for the subscriber at start-up: every logger at `level`.
pub fn initial_filter(level: &str) -> String {
    directives(&vec![envoy_level(level).unwrap_or("info"); LOGGERS.len()])
}

/// The Envoy logger a log target belongs to (`misc` for one no logger lists), for `%n`.
pub fn logger_of(target: &str) -> &'static str {
    LOGGERS
        .iter()
        .find(|(_, targets)| {
            targets.iter().any(|prefix| {
                target
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
        })
        .map_or("misc", |(name, _)| name)
}

/// Whether `name` is one of Envoy's level names (or `warn`).
pub fn is_level(name: &str) -> bool {
    envoy_level(name).is_some()
}

fn envoy_level(name: &str) -> Option<&'static str> {
    let name = if name.eq_ignore_ascii_case("warn") {
        "warning"
    } else {
        name
    };
    LEVELS
        .iter()
        .find(|(envoy, _)| envoy.eq_ignore_ascii_case(name))
        .map(|(envoy, _)| *envoy)
}

fn tracing_level(envoy: &str) -> &'static str {
    LEVELS
        .iter()
        .find(|(name, _)| *name == envoy)
        .map_or("info", |(_, level)| level)
}

/// One `EnvFilter` directive string: `misc`'s level for everything, then each logger's targets.
fn directives(levels: &[&'static str]) -> String {
    let misc = LOGGERS.iter().position(|(name, _)| *name == "misc");
    let mut out = tracing_level(misc.map_or("info", |i| levels[i])).to_string();
    for ((_, targets), level) in LOGGERS.iter().zip(levels) {
        for target in *targets {
            out.push_str(&format!(",{target}={}", tracing_level(level)));
        }
    }
    out
}

/// Handles `POST /logging?...`: the status and the body to answer with.
pub fn handle(query: &str) -> (StatusCode, String) {
    let Some(state) = STATE.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "error: logging is not configurable in this process\n".into(),
        );
    };
    let mut levels = state.levels.lock().unwrap_or_else(|p| p.into_inner());
    let mut changed = levels.clone();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let updates: Vec<(&str, &str)> = match key {
            "level" => LOGGERS.iter().map(|(name, _)| (*name, value)).collect(),
            "paths" => value
                .split(',')
                .map(|p| p.split_once(':').unwrap_or((p, "")))
                .collect(),
            name => vec![(name, value)],
        };
        for (name, level) in updates {
            let Some(index) = LOGGERS.iter().position(|(logger, _)| *logger == name) else {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("error: unknown logger name\n\n{USAGE}"),
                );
            };
            let Some(level) = envoy_level(level) else {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("error: unknown logger level\n\n{USAGE}"),
                );
            };
            changed[index] = level;
        }
    }
    if changed != *levels {
        if let Err(error) = (state.apply)(&directives(&changed)) {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("error: {error}\n"),
            );
        }
        *levels = changed;
    }
    let mut out = String::from("active loggers:\n");
    for ((name, _), level) in LOGGERS.iter().zip(levels.iter()) {
        out.push_str(&format!("  {name}: {level}\n"));
    }
    (StatusCode::OK, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_give_misc_the_default_and_each_logger_its_targets() {
        let mut levels = vec!["info"; LOGGERS.len()];
        let http = LOGGERS.iter().position(|(n, _)| *n == "http").unwrap();
        let misc = LOGGERS.iter().position(|(n, _)| *n == "misc").unwrap();
        levels[http] = "trace";
        levels[misc] = "warning";
        let filter = directives(&levels);
        assert!(filter.starts_with("warn,"), "{filter}");
        assert!(filter.contains(",remora_proxy::http=trace"), "{filter}");
        assert!(filter.contains(",remora_proxy::pool=info"), "{filter}");
        // Every directive parses as tracing-subscriber reads it.
        assert!(tracing_subscriber::EnvFilter::try_new(&filter).is_ok());
    }

    #[test]
    fn level_names_are_envoys() {
        assert_eq!(envoy_level("WARN"), Some("warning"));
        assert_eq!(envoy_level("critical"), Some("critical"));
        assert_eq!(tracing_level("critical"), "error");
        assert_eq!(envoy_level("verbose"), None);
    }
}
