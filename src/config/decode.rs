//! Path-aware decoding of a parsed YAML tree.
//!
//! serde's derive stops at the first error; an operator fixing a file wants
//! every problem at once. These helpers walk a `serde_yaml::Value`, convert
//! leaves, and record each problem with the YAML path it belongs to, so the
//! caller can keep going and report everything in one pass.

use serde_yaml::{Mapping, Value};
use std::time::Duration;

use super::{MAX_PROBLEMS, Problem};

/// Collects problems while a document is decoded.
#[derive(Default)]
pub(super) struct Decoder {
    pub(super) problems: Problems,
}

/// The problems found so far: the first [`MAX_PROBLEMS`] are kept, the rest
/// only counted, so a file of a million mistakes costs no more memory (or
/// output) than one of a hundred.
#[derive(Default)]
pub(super) struct Problems {
    kept: Vec<Problem>,
    found: usize,
}

impl Problems {
    /// How many were found, kept or not: callers compare it before and
    /// after decoding a part to learn whether that part had problems.
    pub(super) fn len(&self) -> usize {
        self.found
    }

    pub(super) fn is_empty(&self) -> bool {
        self.found == 0
    }

    /// Whether a new problem would only be counted.
    pub(super) fn is_full(&self) -> bool {
        self.found >= MAX_PROBLEMS
    }

    fn push(&mut self, p: Problem) {
        if !self.is_full() {
            self.kept.push(p);
        }
        self.found += 1;
    }

    /// Count one more problem without describing it.
    fn count(&mut self) {
        self.found += 1;
    }

    /// The kept problems, and how many more were found.
    pub(super) fn into_parts(self) -> (Vec<Problem>, usize) {
        let more = self.found - self.kept.len();
        (self.kept, more)
    }
}

/// The fields of one YAML mapping whose keys were already checked.
pub(super) struct Fields<'v> {
    path: String,
    map: &'v Mapping,
}

impl Decoder {
    /// Record a problem at `path`.
    pub(super) fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(path, message));
    }

    /// Treat `value` as a mapping whose keys must come from `allowed`;
    /// every other key is reported.
    pub(super) fn mapping<'v>(
        &mut self,
        value: &'v Value,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'v>> {
        let Value::Mapping(map) = value else {
            self.problem(path, format!("must be a mapping, found {}", kind(value)));
            return None;
        };
        for key in map.keys() {
            match key.as_str() {
                Some(k) if allowed.contains(&k) => {}
                // Past the cap, a key costs a count, not a message.
                _ if self.problems.is_full() => self.problems.count(),
                Some(k) => {
                    let mut message = format!("unknown key `{k}`");
                    match suggest(k, allowed) {
                        Some(s) => message.push_str(&format!(" (did you mean `{s}`?)")),
                        None => {
                            message.push_str(&format!(" (expected one of: {})", allowed.join(", ")))
                        }
                    }
                    self.problem(join(path, k), message);
                }
                None => self.problem(path, format!("keys must be strings, found {}", kind(key))),
            }
        }
        Some(Fields {
            path: path.to_string(),
            map,
        })
    }

    /// A string value.
    pub(super) fn string<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v str> {
        match value {
            Value::String(s) => Some(s),
            other => {
                self.problem(path, format!("must be a string, found {}", kind(other)));
                None
            }
        }
    }

    /// A duration written with a unit, such as `250ms`, `2s` or `5m`.
    pub(super) fn duration(&mut self, value: &Value, path: &str) -> Option<Duration> {
        let Value::String(s) = value else {
            self.problem(
                path,
                format!(
                    "must be a duration with a unit, like 2s or 250ms, found {}",
                    kind(value)
                ),
            );
            return None;
        };
        match humantime::parse_duration(s.trim()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(
                    path,
                    format!(
                        "`{s}` is not a duration ({e}); write it with a unit, like 2s or 250ms"
                    ),
                );
                None
            }
        }
    }

    /// A duration in `min..=max`. Every duration key has a maximum: beyond
    /// it a value means nothing useful, and near `Duration::MAX` it would
    /// overflow the time arithmetic that uses it.
    pub(super) fn duration_within(
        &mut self,
        value: &Value,
        path: &str,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let d = self.duration(value, path)?;
        if d < min {
            self.problem(
                path,
                format!("must be at least {}", humantime::format_duration(min)),
            );
            return None;
        }
        if d > max {
            self.problem(
                path,
                format!("must be at most {}", humantime::format_duration(max)),
            );
            return None;
        }
        Some(d)
    }

    /// An integer in `min..=max`.
    pub(super) fn integer(&mut self, value: &Value, path: &str, min: u64, max: u64) -> Option<u64> {
        let n = match value {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64().unwrap_or_default(),
            // A negative integer is below any minimum we use.
            Value::Number(n) if n.as_i64().is_some() => {
                self.problem(path, format!("must be at least {min}"));
                return None;
            }
            Value::Number(n) => {
                self.problem(path, format!("must be a whole number, found {n}"));
                return None;
            }
            other => {
                self.problem(
                    path,
                    format!("must be a whole number, found {}", kind(other)),
                );
                return None;
            }
        };
        if n < min {
            self.problem(path, format!("must be at least {min}"));
            None
        } else if n > max {
            self.problem(path, format!("must be at most {max}"));
            None
        } else {
            Some(n)
        }
    }

    /// `true` or `false`.
    pub(super) fn boolean(&mut self, value: &Value, path: &str) -> Option<bool> {
        match value {
            Value::Bool(b) => Some(*b),
            other => {
                self.problem(
                    path,
                    format!("must be true or false, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// One of a fixed set of names.
    pub(super) fn choice<T: Copy>(
        &mut self,
        value: &Value,
        path: &str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let Value::String(s) = value else {
            self.problem(
                path,
                format!(
                    "must be one of: {}, found {}",
                    names.join(", "),
                    kind(value)
                ),
            );
            return None;
        };
        if let Some((_, v)) = choices.iter().find(|(n, _)| n == s) {
            return Some(*v);
        }
        let mut message = format!("`{s}` is not one of: {}", names.join(", "));
        if let Some(hint) = suggest(s, &names) {
            message.push_str(&format!(" (did you mean `{hint}`?)"));
        }
        self.problem(path, message);
        None
    }
}

impl<'v> Fields<'v> {
    /// The value under `key`; an explicit YAML null counts as absent.
    pub(super) fn get(&self, key: &str) -> Option<&'v Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The path of the field `key`.
    pub(super) fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

/// `parent.key`, or `key` at the top level.
pub(super) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// How a value is described in an error message.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The closest allowed name to a misspelt one, if it is close enough.
fn suggest<'a>(input: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(input, a), *a))
        .filter(|(d, a)| *d <= 2 && *d < a.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggest("raise", &["rise", "fall"]), Some("rise"));
        assert_eq!(
            suggest("intervall", &["interval", "timeout"]),
            Some("interval")
        );
        assert_eq!(suggest("zzzzzz", &["rise", "fall"]), None);
    }

    #[test]
    fn integers_are_range_checked() {
        let mut d = Decoder::default();
        assert_eq!(d.integer(&Value::from(3), "a", 1, 10), Some(3));
        assert_eq!(d.integer(&Value::from(0), "b", 1, 10), None);
        assert_eq!(d.integer(&Value::from(-4), "c", 1, 10), None);
        assert_eq!(d.integer(&Value::from(11), "d", 1, 10), None);
        assert_eq!(d.integer(&Value::from("x"), "e", 1, 10), None);
        let messages: Vec<String> = d.problems.kept.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "b: must be at least 1",
                "c: must be at least 1",
                "d: must be at most 10",
                "e: must be a whole number, found a string"
            ]
        );
    }

    #[test]
    fn durations_need_units() {
        let mut d = Decoder::default();
        assert_eq!(
            d.duration(&Value::from("250ms"), "a"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            d.duration(&Value::from("5m"), "a"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(d.duration(&Value::from(2), "b"), None);
        assert_eq!(d.duration(&Value::from("2"), "c"), None);
        assert_eq!(d.problems.len(), 2);
        assert!(
            d.problems.kept[0]
                .to_string()
                .starts_with("b: must be a duration with a unit")
        );
        assert!(
            d.problems.kept[1]
                .to_string()
                .starts_with("c: `2` is not a duration")
        );
    }
}
