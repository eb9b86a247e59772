//! Metadata filters: which documents a search may return, by source path, id or a metadata
//! field (from a jsonl line's extra fields), each matched as a glob.
//!
//! A filter is turned into a per-segment row bitset by the snapshot and applied *inside* the
//! search (exact search skips the rows, HNSW walks through them without returning them), so
//! the top-k is the top-k of the matching rows rather than a post-filtered shorter list.

use crate::collection::DocEntry;

/// A conjunction of `key=glob` conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    conditions: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Condition {
    key: String,
    pattern: String,
}

impl Filter {
    /// Parses conditions written `key=glob`: `source=docs/**.md`, `id=doc-1*`, `title=Moon`,
    /// or any metadata field, `lang=en`. A document passes if every condition holds.
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Filter, String> {
        let mut conditions = Vec::new();
        for spec in specs {
            let spec = spec.as_ref();
            let (key, pattern) = spec
                .split_once('=')
                .ok_or_else(|| format!("filter {spec:?}: expected key=pattern"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("filter {spec:?}: empty key"));
            }
            conditions.push(Condition {
                key: key.to_string(),
                pattern: pattern.to_string(),
            });
        }
        Ok(Filter { conditions })
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// The `(key, glob)` conditions, in order (a store that filters in its own query language
    /// translates them).
    pub fn conditions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.conditions
            .iter()
            .map(|c| (c.key.as_str(), c.pattern.as_str()))
    }

    /// Documents that pass both filters.
    pub fn and(mut self, other: Filter) -> Filter {
        self.conditions.extend(other.conditions);
        self
    }

    pub fn matches(&self, doc: &DocEntry) -> bool {
        self.conditions.iter().all(|c| {
            let value = match c.key.as_str() {
                "source" => Some(doc.source.clone()),
                "id" | "doc_id" => Some(doc.id.clone()),
                "title" => doc.title.clone(),
                field => doc.metadata.get(field).map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
            };
            value.is_some_and(|v| glob_match(&c.pattern, &v))
        })
    }
}

/// Shell-style glob: `*` matches any run of characters (including `/`), `?` one character;
/// everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with one backtrack point (the last `*`): linear in practice and
    // never exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] == t[ti] && p[pi] != '*')) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(source: &str, meta: serde_json::Value) -> DocEntry {
        DocEntry {
            id: source.to_string(),
            source: source.to_string(),
            title: Some("The Moon".into()),
            content_hash: String::new(),
            metadata: meta.as_object().cloned().unwrap_or_default(),
            segment: None,
            first_row: 0,
            rows: 1,
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.md", "docs/a.md"));
        assert!(glob_match("docs/**.md", "docs/x/y.md"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("", "x"));
        assert!(glob_match("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!glob_match("*a*b*c*", "xxaxxcxxbxx"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        // Pathological patterns stay fast.
        let long = "a".repeat(2000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(50)), &long));
    }

    #[test]
    fn conditions_are_anded_and_read_metadata() {
        let d = doc(
            "docs/moon.md",
            serde_json::json!({"lang": "en", "year": 1913}),
        );
        let f = |specs: &[&str]| Filter::parse(specs).unwrap().matches(&d);
        assert!(f(&["source=*.md"]));
        assert!(f(&["source=*.md", "lang=en"]));
        assert!(!f(&["source=*.md", "lang=fr"]));
        assert!(f(&["year=19*"]), "numbers compare by their JSON text");
        assert!(f(&["title=*Moon"]));
        assert!(!f(&["missing=*"]), "a missing field never matches");
        assert!(f(&[]), "no condition matches everything");
        assert!(Filter::parse(&["nokey"]).is_err());
        assert!(Filter::parse(&["=x"]).is_err());
    }
}
