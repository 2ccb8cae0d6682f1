//! Topic patterns and the topic lists of a request: `news.*` (every topic whose name starts
//! with `news.`), and `/topics/a,b,news.*/sse`, the several names and patterns one request
//! follows.
//!
//! One grammar for every place a pattern appears: a token's grants, `--public-topics`, and
//! what a subscriber follows. A pattern is a topic-name prefix followed by `*` (`*` alone is
//! every topic); anything else is an exact name. Commas are not allowed in topic names, so a
//! list can't be mistaken for a name.

use super::{Invalid, MAX_NAME_LEN, TopicName, valid_name};

/// A topic pattern of a token or of `--public-topics`: an exact name, or a prefix ending in
/// `*` (`news.*` matches `news.sport`; `*` matches every topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicPattern {
    /// Exactly this topic.
    Exact(String),
    /// Every topic starting with this.
    Prefix(String),
}

impl TopicPattern {
    /// Reads `news.*`, `*` or `news`.
    pub fn parse(text: &str) -> Self {
        match text.strip_suffix('*') {
            Some(prefix) => TopicPattern::Prefix(prefix.to_owned()),
            None => TopicPattern::Exact(text.to_owned()),
        }
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicPattern::Exact(name) => name == topic,
            TopicPattern::Prefix(prefix) => topic.starts_with(prefix.as_str()),
        }
    }

    /// Whether every topic the subscription pattern `prefix*` can match also matches this
    /// one: a grant covers a pattern only if it is a prefix grant at least as broad.
    pub fn covers_prefix(&self, prefix: &str) -> bool {
        match self {
            TopicPattern::Exact(_) => false,
            TopicPattern::Prefix(grant) => prefix.starts_with(grant.as_str()),
        }
    }
}

/// One entry of a request's topic list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// A topic named outright.
    Name(TopicName),
    /// Every topic whose name starts with this prefix (written `prefix*`), including topics
    /// created later.
    Prefix(String),
}

impl Selector {
    /// Reads one entry: a topic name, or a name prefix followed by `*`.
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        match text.strip_suffix('*') {
            // The prefix follows the name rule, but may be empty (`*`) and leaves room for
            // at least one more character.
            Some(prefix)
                if prefix.len() < MAX_NAME_LEN && (prefix.is_empty() || valid_name(prefix)) =>
            {
                Ok(Selector::Prefix(prefix.to_owned()))
            }
            Some(_) => Err(Invalid::Topic(text.chars().take(64).collect())),
            None => Ok(Selector::Name(TopicName::parse(text)?)),
        }
    }

    /// Whether `topic` is one this entry selects.
    pub fn selects(&self, topic: &str) -> bool {
        match self {
            Selector::Name(name) => name.as_str() == topic,
            Selector::Prefix(prefix) => topic.starts_with(prefix.as_str()),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Name(name) => f.write_str(name.as_str()),
            Selector::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// The topics one request follows: the comma-separated list of its path, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    entries: Vec<Selector>,
}

/// Why a topic list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// An entry is not a topic name or pattern.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// More entries than a connection may follow.
    #[error("the list names {count} topics; at most {limit} may be followed on one connection")]
    TooMany {
        /// Entries in the list.
        count: usize,
        /// The most allowed.
        limit: usize,
    },
    /// The same entry twice: a cursor names listed topics by position, so each must be once.
    #[error("{0:?} is listed twice")]
    Repeated(String),
}

impl Selection {
    /// Reads `a,b,news.*`: at most `limit` entries, none repeated.
    pub fn parse(list: &str, limit: usize) -> Result<Self, ListError> {
        let count = list.split(',').count();
        if count > limit {
            return Err(ListError::TooMany { count, limit });
        }
        let mut entries: Vec<Selector> = Vec::with_capacity(count);
        for text in list.split(',') {
            let entry = Selector::parse(text)?;
            if entries.contains(&entry) {
                return Err(ListError::Repeated(text.to_owned()));
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }

    /// The one topic of a list that names exactly one and no pattern: the single-topic path.
    pub fn single(&self) -> Option<&TopicName> {
        match self.entries.as_slice() {
            [Selector::Name(name)] => Some(name),
            _ => None,
        }
    }

    /// The entries, in the list's order (a listed topic's position is its index here).
    pub fn entries(&self) -> &[Selector] {
        &self.entries
    }

    /// Whether any entry is a pattern.
    pub fn has_patterns(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, Selector::Prefix(_)))
    }

    /// The position of `topic` if the list names it outright.
    pub fn position(&self, topic: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| matches!(e, Selector::Name(name) if name.as_str() == topic))
    }

    /// Whether a pattern of the list selects `topic`.
    pub fn pattern_selects(&self, topic: &str) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, Selector::Prefix(_)) && e.selects(topic))
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{entry}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        assert!(TopicPattern::parse("news.*").matches("news.sport"));
        assert!(TopicPattern::parse("news.*").matches("news."));
        assert!(!TopicPattern::parse("news.*").matches("news"));
        assert!(TopicPattern::parse("*").matches("anything"));
        assert!(TopicPattern::parse("chat").matches("chat"));
        assert!(!TopicPattern::parse("chat").matches("chat2"));
    }

    #[test]
    fn a_grant_covers_a_pattern_only_when_at_least_as_broad() {
        assert!(TopicPattern::parse("news.*").covers_prefix("news."));
        assert!(TopicPattern::parse("news.*").covers_prefix("news.sport."));
        assert!(TopicPattern::parse("*").covers_prefix(""));
        assert!(!TopicPattern::parse("news.*").covers_prefix("new"));
        assert!(!TopicPattern::parse("news.*").covers_prefix(""));
        assert!(!TopicPattern::parse("news.").covers_prefix("news."));
    }

    #[test]
    fn lists_keep_their_order_and_refuse_what_a_cursor_could_not_name() {
        let list = Selection::parse("b,a,news.*", 3).unwrap();
        assert_eq!(list.to_string(), "b,a,news.*");
        assert_eq!(list.position("a"), Some(1));
        assert_eq!(list.position("news.x"), None);
        assert!(list.pattern_selects("news.x") && !list.pattern_selects("a"));
        assert_eq!(list.single(), None);
        assert!(Selection::parse("a", 1).unwrap().single().is_some());
        assert!(Selection::parse("a*", 1).unwrap().single().is_none());
        assert_eq!(
            Selection::parse("a,b,c", 2),
            Err(ListError::TooMany { count: 3, limit: 2 })
        );
        assert_eq!(
            Selection::parse("a,b,a", 5),
            Err(ListError::Repeated("a".into()))
        );
        for bad in ["a,", ",a", "a,,b", "a b", "a*b*", "a**", "ü*"] {
            assert!(
                matches!(Selection::parse(bad, 5), Err(ListError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
