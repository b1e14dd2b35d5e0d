//! Topic patterns and what a token grants: `news` (exactly that topic),
//! `scores.*` (every topic that starts with `scores.`), `*` (every topic).

use serde::{Deserialize, Serialize};

use crate::event::Topic;

/// A pattern over topic names. Anything that is not a valid pattern matches
/// nothing, so a typo in a token never grants more than it says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(pattern: impl Into<String>) -> Pattern {
        Pattern(pattern.into())
    }

    pub fn matches(&self, topic: &Topic) -> bool {
        let topic = topic.as_str();
        match self.0.strip_suffix('*') {
            Some(prefix) => !prefix.contains('*') && topic.starts_with(prefix),
            None => self.0 == topic,
        }
    }
}

/// The `crier` claim of a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<Pattern>,
    /// May read `GET /metrics` on the main listener (`"metrics": true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics: bool,
}

/// Whether any of `patterns` matches `topic`.
pub fn any_matches(patterns: &[Pattern], topic: &Topic) -> bool {
    patterns.iter().any(|p| p.matches(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Topic {
        Topic::parse(name, 128).unwrap()
    }

    #[test]
    fn exact_prefix_and_everything() {
        assert!(Pattern::new("news").matches(&t("news")));
        assert!(!Pattern::new("news").matches(&t("news2")));
        assert!(Pattern::new("scores.*").matches(&t("scores.nba")));
        assert!(!Pattern::new("scores.*").matches(&t("scores")));
        assert!(Pattern::new("*").matches(&t("anything")));
        assert!(Pattern::new("n*").matches(&t("news")));
    }

    #[test]
    fn malformed_patterns_match_nothing() {
        assert!(!Pattern::new("a*b").matches(&t("ab")));
        assert!(!Pattern::new("a*b").matches(&t("axb")));
        assert!(!Pattern::new("*x*").matches(&t("x")));
        assert!(!Pattern::new("").matches(&t("x")));
    }
}
