//! String, regex and header matchers (`envoy.type.matcher.v3`, `HeaderMatcher`), compiled once
//! at config time. Regexes use the `regex` crate, linear-time like Envoy's RE2, and match the
//! whole value as RE2's full match does.

use http::header::{HeaderMap, HeaderName};
use regex::Regex;
use xds_api::envoy::config::route::v3 as route_pb;
use xds_api::envoy::r#type::matcher::v3 as matcher_pb;

use crate::common::header_name;
use crate::error::{ConfigError, ConfigResult, err, field};

/// A compiled `StringMatcher`; the `bool` is `ignore_case`.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

/// Equal when configured alike (a regex by its pattern), so a config change can be told apart.
impl PartialEq for StringMatch {
    fn eq(&self, other: &StringMatch) -> bool {
        use StringMatch::*;
        match (self, other) {
            (Exact(a, x), Exact(b, y))
            | (Prefix(a, x), Prefix(b, y))
            | (Suffix(a, x), Suffix(b, y))
            | (Contains(a, x), Contains(b, y)) => a == b && x == y,
            (Regex(a), Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for StringMatch {}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        fn lower_eq(a: &str, b: &str) -> bool {
            a.eq_ignore_ascii_case(b)
        }
        match self {
            StringMatch::Exact(want, false) => value == want,
            StringMatch::Exact(want, true) => lower_eq(value, want),
            StringMatch::Prefix(want, false) => value.starts_with(want.as_str()),
            StringMatch::Prefix(want, true) => {
                value.len() >= want.len()
                    && value.is_char_boundary(want.len())
                    && lower_eq(&value[..want.len()], want)
            }
            StringMatch::Suffix(want, false) => value.ends_with(want.as_str()),
            StringMatch::Suffix(want, true) => {
                value.len() >= want.len()
                    && value.is_char_boundary(value.len() - want.len())
                    && lower_eq(&value[value.len() - want.len()..], want)
            }
            StringMatch::Contains(want, false) => value.contains(want.as_str()),
            StringMatch::Contains(want, true) => value
                .to_ascii_lowercase()
                .contains(&want.to_ascii_lowercase()),
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// A regex that must match the whole value (RE2's full match).
pub fn full_regex(pattern: &str, path: &str) -> ConfigResult<Regex> {
    re2_regex(&format!("^(?:{pattern})$"))
        .map_err(|e| ConfigError::new(path, format!("invalid regex: {e}")))
}

/// Compiles an RE2 pattern with RE2's ASCII classes. An error quotes the pattern as written.
fn re2_regex(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&ascii_perl_classes(pattern)).or_else(|_| Regex::new(pattern))
}

/// `pattern` with `\d` and `\w` (and, outside brackets, `\D` and `\W`) spelled as the ASCII
/// classes they are in RE2 and ECMAScript. The `regex` crate reads them as Unicode
/// classes, which match more (Arabic-Indic digits for `\d`) and compile to automata a hundred
/// times the size: Envoy's fourteen built-in stat tag regexes took 1.9 MB that way, 250 KB
/// spelled in ASCII. A negated class inside brackets has no ASCII spelling there, so stays.
pub fn ascii_perl_classes(pattern: &str) -> String {
    const DIGIT: &str = "0-9";
    const WORD: &str = "0-9A-Za-z_";
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars().peekable();
    // Bracket nesting (the regex crate nests classes); a `]` first in a class is literal.
    let mut depth = 0usize;
    let mut class_start = false;
    while let Some(c) = chars.next() {
        let at_class_start = std::mem::take(&mut class_start);
        match c {
            '\\' => {
                let Some(escaped) = chars.next() else {
                    out.push(c);
                    break;
                };
                let (set, negated) = match escaped {
                    'd' => (Some(DIGIT), false),
                    'w' => (Some(WORD), false),
                    'D' => (Some(DIGIT), true),
                    'W' => (Some(WORD), true),
                    _ => (None, false),
                };
                match set {
                    Some(set) if depth == 0 => {
                        out.push_str(if negated { "[^" } else { "[" });
                        out.push_str(set);
                        out.push(']');
                    }
                    Some(set) if !negated => out.push_str(set),
                    _ => {
                        out.push(c);
                        out.push(escaped);
                    }
                }
            }
            '[' if depth > 0 && chars.peek() == Some(&':') => {
                // A POSIX class (`[:digit:]`), copied through its `:]`.
                out.push(c);
                while let Some(inner) = chars.next() {
                    out.push(inner);
                    if inner == ':' && chars.peek() == Some(&']') {
                        out.push(chars.next().unwrap_or(']'));
                        break;
                    }
                }
            }
            '[' => {
                out.push(c);
                depth += 1;
                if chars.peek() == Some(&'^') {
                    out.push(chars.next().unwrap_or('^'));
                }
                class_start = true;
            }
            ']' if depth > 0 && !at_class_start => {
                out.push(c);
                depth -= 1;
            }
            _ => out.push(c),
        }
    }
    out
}

/// A `RegexMatcher` (its `regex`, matched whole).
pub fn regex_matcher(m: &matcher_pb::RegexMatcher, path: &str) -> ConfigResult<Regex> {
    // `engine_type` has one choice, RE2, whichever way it is written.
    let matcher_pb::RegexMatcher {
        regex,
        engine_type: _,
    } = m;
    full_regex(regex, &field(path, "regex"))
}

pub fn string_matcher(m: &matcher_pb::StringMatcher, path: &str) -> ConfigResult<StringMatch> {
    use matcher_pb::string_matcher::MatchPattern;
    let matcher_pb::StringMatcher {
        ignore_case,
        match_pattern,
    } = m;
    let ic = *ignore_case;
    Ok(match match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatch::Exact(s.clone(), ic),
        Some(MatchPattern::Prefix(s)) if !s.is_empty() => StringMatch::Prefix(s.clone(), ic),
        Some(MatchPattern::Suffix(s)) if !s.is_empty() => StringMatch::Suffix(s.clone(), ic),
        Some(MatchPattern::Contains(s)) if !s.is_empty() => StringMatch::Contains(s.clone(), ic),
        Some(MatchPattern::SafeRegex(r)) => {
            StringMatch::Regex(regex_matcher(r, &field(path, "safe_regex"))?)
        }
        Some(_) => return err(path, "the match string must not be empty"),
        None => return err(path, "a match pattern is required"),
    })
}

/// A regex rewrite: the pattern (matched anywhere, as RE2's replace does) and the
/// substitution in the `regex` crate's syntax.
#[derive(Debug, Clone)]
pub struct RegexRewrite {
    pub pattern: Regex,
    pub substitution: String,
}

pub fn regex_rewrite(
    m: &matcher_pb::RegexMatchAndSubstitute,
    path: &str,
) -> ConfigResult<RegexRewrite> {
    let matcher_pb::RegexMatchAndSubstitute {
        pattern,
        substitution,
    } = m;
    let Some(matcher_pb::RegexMatcher { regex, .. }) = pattern else {
        return err(field(path, "pattern"), "required");
    };
    let pattern = re2_regex(regex).map_err(|e| {
        ConfigError::new(
            format!("{path}.pattern.regex"),
            format!("invalid regex: {e}"),
        )
    })?;
    Ok(RegexRewrite {
        pattern,
        substitution: re2_substitution(substitution),
    })
}

/// RE2 substitutions use `\1`; the regex crate uses `${1}` and treats `$` as special.
fn re2_substitution(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            other => out.push(other),
        }
    }
    out
}

// === header matchers ===

#[derive(Debug, Clone, PartialEq)]
enum HeaderCheck {
    String(StringMatch),
    Present(bool),
    Range(i64, i64),
}

/// One `HeaderMatcher`, as routes, retry policies, the fault filter and access log filters use
/// it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    name: HeaderKey,
    check: HeaderCheck,
    invert: bool,
    treat_missing_as_empty: bool,
}

/// What a header matcher reads: a header, or one of the pseudo-headers Envoy lets routes
/// match on.
#[derive(Debug, Clone, PartialEq)]
enum HeaderKey {
    Header(HeaderName),
    Method,
    Path,
    Authority,
    Scheme,
}

/// A request's pseudo-headers, for header matchers that name them (`:method`, `:path`,
/// `:authority`, `:scheme`). Empty values count as absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct PseudoHeaders<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
}

/// One `HeaderMatcher` at `hpath`.
pub fn header_matcher(h: &route_pb::HeaderMatcher, hpath: &str) -> ConfigResult<HeaderMatch> {
    let route_pb::HeaderMatcher {
        name,
        invert_match,
        treat_missing_header_as_empty,
        header_match_specifier,
    } = h;
    use route_pb::header_matcher::HeaderMatchSpecifier as S;
    let check = match header_match_specifier {
        Some(S::ExactMatch(s)) => HeaderCheck::String(StringMatch::Exact(s.clone(), false)),
        Some(S::PrefixMatch(s)) => HeaderCheck::String(StringMatch::Prefix(s.clone(), false)),
        Some(S::SuffixMatch(s)) => HeaderCheck::String(StringMatch::Suffix(s.clone(), false)),
        Some(S::ContainsMatch(s)) => HeaderCheck::String(StringMatch::Contains(s.clone(), false)),
        Some(S::SafeRegexMatch(r)) => HeaderCheck::String(StringMatch::Regex(regex_matcher(
            r,
            &field(hpath, "safe_regex_match"),
        )?)),
        Some(S::StringMatch(s)) => {
            HeaderCheck::String(string_matcher(s, &field(hpath, "string_match"))?)
        }
        Some(S::PresentMatch(p)) => HeaderCheck::Present(*p),
        Some(S::RangeMatch(r)) => {
            let xds_api::envoy::r#type::v3::Int64Range { start, end } = r;
            HeaderCheck::Range(*start, *end)
        }
        None => HeaderCheck::Present(true),
    };
    let name = match name.to_ascii_lowercase().as_str() {
        ":method" => HeaderKey::Method,
        ":path" => HeaderKey::Path,
        ":authority" => HeaderKey::Authority,
        ":scheme" => HeaderKey::Scheme,
        pseudo if pseudo.starts_with(':') => {
            return err(
                field(hpath, "name"),
                format!("{name:?}: only :method, :path, :authority and :scheme can be matched"),
            );
        }
        _ => HeaderKey::Header(header_name(name, &field(hpath, "name"))?),
    };
    Ok(HeaderMatch {
        name,
        check,
        invert: *invert_match,
        treat_missing_as_empty: *treat_missing_header_as_empty,
    })
}

impl HeaderMatch {
    /// Whether `headers` match (several values of the header are joined with commas first);
    /// a pseudo-header counts as absent.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        self.matches_request(&PseudoHeaders::default(), headers)
    }

    /// Whether a request with these pseudo-headers and `headers` matches.
    pub fn matches_request(&self, pseudo: &PseudoHeaders<'_>, headers: &HeaderMap) -> bool {
        let name = match &self.name {
            HeaderKey::Header(name) => name,
            HeaderKey::Method => return self.matches_value(Some(pseudo.method)),
            HeaderKey::Path => return self.matches_value(Some(pseudo.path)),
            HeaderKey::Authority => return self.matches_value(Some(pseudo.authority)),
            HeaderKey::Scheme => return self.matches_value(Some(pseudo.scheme)),
        };
        let mut values = headers.get_all(name).iter();
        let joined;
        let value: &str = match values.next() {
            None if self.treat_missing_as_empty => "",
            None => {
                return matches!(self.check, HeaderCheck::Present(present) if present == self.invert);
            }
            Some(first) => match values.next() {
                None => match first.to_str() {
                    Ok(v) => v,
                    Err(_) => return self.invert,
                },
                Some(_) => {
                    joined = headers
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join(",");
                    &joined
                }
            },
        };
        self.check_value(value)
    }

    /// A pseudo-header's value (empty: absent).
    fn matches_value(&self, value: Option<&str>) -> bool {
        match value.filter(|v| !v.is_empty()) {
            Some(value) => self.check_value(value),
            None if self.treat_missing_as_empty => self.check_value(""),
            None => matches!(self.check, HeaderCheck::Present(present) if present == self.invert),
        }
    }

    fn check_value(&self, value: &str) -> bool {
        let matched = match &self.check {
            HeaderCheck::String(m) => m.matches(value),
            HeaderCheck::Present(present) => *present,
            HeaderCheck::Range(start, end) => {
                value.parse::<i64>().is_ok_and(|v| v >= *start && v < *end)
            }
        };
        matched != self.invert
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_classes_are_spelled_in_ascii_as_re2_reads_them() {
        for (written, spelled) in [
            (r"_rq(_(\d{3}))$", r"_rq(_([0-9]{3}))$"),
            (r"\D\W", r"[^0-9][^0-9A-Za-z_]"),
            (r"[\w-]+", r"[0-9A-Za-z_-]+"),
            (r"[_.[:digit:]\w]*", r"[_.[:digit:]0-9A-Za-z_]*"),
            (r"[^\d]", r"[^0-9]"),
            (r"[]\d]", r"[]0-9]"),
            (r"[\]]\d", r"[\]][0-9]"),
            // Escaped backslashes, negated classes inside brackets and other escapes stay.
            (r"\\d", r"\\d"),
            (r"[\W.]", r"[\W.]"),
            (r"\s\b\.", r"\s\b\."),
            (r"\", r"\"),
        ] {
            assert_eq!(ascii_perl_classes(written), spelled, "{written}");
        }
        let digits = full_regex(r"\d+", "p").unwrap();
        assert!(digits.is_match("2024"));
        // ARABIC-INDIC DIGIT THREE: a digit to Unicode, not to RE2.
        assert!(!digits.is_match("\u{663}"));
        let error = full_regex(r"\d(", "route.safe_regex.regex").unwrap_err();
        assert!(error.reason.contains(r"\d("), "{}", error.reason);
    }

    #[test]
    fn substitution_converts_re2_syntax() {
        assert_eq!(re2_substitution(r"\1/x$"), "${1}/x$$");
    }

    #[test]
    fn matchers_honour_ignore_case_and_char_boundaries() {
        assert!(StringMatch::Prefix("AB".into(), true).matches("abc"));
        assert!(!StringMatch::Prefix("AB".into(), false).matches("abc"));
        // A suffix that would split a multi-byte character does not match (and does not panic).
        assert!(!StringMatch::Suffix("a".into(), true).matches("é"));
        assert!(StringMatch::Contains("B".into(), true).matches("abc"));
        let re = full_regex("a+", "r").unwrap();
        assert!(re.is_match("aaa") && !re.is_match("aab"));
    }
}
