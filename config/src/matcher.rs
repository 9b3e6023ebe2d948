//! String and regex matchers (`envoy.type.matcher.v3`), compiled once at config time. Regexes
//! use the `regex` crate, linear-time like Envoy's RE2, and match the whole value as RE2's
//! full match does.

use regex::Regex;
use xds_api::envoy::r#type::matcher::v3 as matcher_pb;

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
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| ConfigError::new(path, format!("invalid regex: {e}")))
}

/// A `RegexMatcher` (its `regex`, matched whole).
pub fn regex_matcher(m: &matcher_pb::RegexMatcher, path: &str) -> ConfigResult<Regex> {
    let matcher_pb::RegexMatcher { regex } = m;
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
    let Some(matcher_pb::RegexMatcher { regex }) = pattern else {
        return err(field(path, "pattern"), "required");
    };
    let pattern = Regex::new(regex).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

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
