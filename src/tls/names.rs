//! Server-name tables, for certificates chosen by SNI and for SNI routes.
//!
//! A name is either exact (`db.example.com`) or a wildcard (`*.example.com`)
//! that stands for exactly one more label on the left, as in certificates
//! (RFC 6125): `*.example.com` matches `a.example.com`, not `example.com`
//! nor `a.b.example.com`. An exact name always beats a wildcard. Names are
//! compared without case and without a trailing dot.

use std::collections::HashMap;

/// Values looked up by server name.
#[derive(Clone, Debug)]
pub struct NameTable<T> {
    exact: HashMap<String, T>,
    /// Keyed by what follows `*.`.
    wildcard: HashMap<String, T>,
}

impl<T> Default for NameTable<T> {
    fn default() -> Self {
        NameTable {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

/// `name` as names are compared: lower case, without a trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether `pattern` is a name or `*.name` that a table can hold: DNS
/// labels of letters, digits, `-` and `_`, a wildcard only as the whole
/// leftmost label and with at least two labels after it.
pub fn is_valid_pattern(pattern: &str) -> bool {
    let name = pattern.strip_suffix('.').unwrap_or(pattern);
    let (rest, wildcard) = match name.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (name, false),
    };
    let labels: Vec<&str> = rest.split('.').collect();
    !rest.is_empty()
        && rest.len() <= 253
        && (!wildcard || labels.len() >= 2)
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl<T> NameTable<T> {
    /// Add `value` for `pattern` (a name or `*.name`); `false` if the
    /// pattern was there already (the first one stays).
    pub fn insert(&mut self, pattern: &str, value: T) -> bool {
        let pattern = normalize(pattern);
        let (map, key) = match pattern.strip_prefix("*.") {
            Some(rest) => (&mut self.wildcard, rest.to_string()),
            None => (&mut self.exact, pattern),
        };
        if map.contains_key(&key) {
            return false;
        }
        map.insert(key, value);
        true
    }

    /// The value for `name`: its exact entry, else the wildcard one level up.
    pub fn get(&self, name: &str) -> Option<&T> {
        // Clients send names as they were typed; most are lower case already.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) || name.ends_with('.') {
            lower = normalize(name);
            lower.as_str()
        } else {
            name
        };
        if let Some(v) = self.exact.get(name) {
            return Some(v);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_beat_wildcards_and_wildcards_cover_one_label() {
        let mut t = NameTable::default();
        assert!(t.insert("*.example.com", "web"));
        assert!(t.insert("db.example.com", "db"));
        assert!(!t.insert("DB.example.com.", "again"), "duplicates refused");
        assert_eq!(t.get("db.example.com"), Some(&"db"));
        assert_eq!(t.get("DB.Example.COM."), Some(&"db"));
        assert_eq!(t.get("www.example.com"), Some(&"web"));
        assert_eq!(t.get("example.com"), None);
        assert_eq!(t.get("a.b.example.com"), None);
        assert_eq!(t.get("other.org"), None);
        assert_eq!(t.get(""), None);
    }

    #[test]
    fn patterns_are_checked() {
        for ok in ["a.example.com", "*.example.com", "localhost", "x_y.test."] {
            assert!(is_valid_pattern(ok), "{ok}");
        }
        for bad in [
            "", "*.com", "a.*.com", "*", "-a.com", "a..com", "a b.com", "*x.com",
        ] {
            assert!(!is_valid_pattern(bad), "{bad}");
        }
    }
}
