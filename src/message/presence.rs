//! Presence as clients see it: a [`Member`] (one named subscriber on one topic), and the
//! `presence` envelope that tells a topic's watchers who joined and who left ([`Diff`]).
//!
//! A diff is what one node saw change on one topic during one flush interval, coalesced (a
//! member that joined and left within it appears in neither list) and capped at
//! [`MAX_CHANGES`] entries: past that, the envelope carries only the counts
//! (`"overflow":{"joins":N,"leaves":M}`) and the client reads the list again. This is what
//! keeps a reconnect storm of N subscribers from sending N × N events.

use serde::{Deserialize, Serialize};

use super::TopicName;

/// The most joins and leaves one presence envelope lists; past it, it carries counts only.
pub const MAX_CHANGES: usize = 100;

/// One named subscriber of one topic: a connection (or a poller seen recently) whose client
/// named itself with `client=` or through its token's subject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Unique across nodes and restarts: the node's key, `/`, then the connection's serial
    /// (or, for a poller, its transport and name). A join and its leave carry the same id.
    pub id: String,
    /// The name the client gave (`client=`) or its token's subject.
    pub client: String,
    /// How it follows the topic (`sse`, `ws`, `stream`, `longpoll`, `poll`).
    pub transport: String,
    /// The node it is connected to (`--node-name`).
    pub node: String,
    /// When it joined, in milliseconds since the epoch.
    pub since: u64,
}

/// Sorts a presence list as it is answered: oldest member first (then by id, so the order is
/// the same on every node).
pub fn oldest_first(members: &mut [Member]) {
    members.sort_by(|a, b| (a.since, &a.id).cmp(&(b.since, &b.id)));
}

/// Counts of the changes an envelope over [`MAX_CHANGES`] left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overflow {
    /// Members that joined.
    pub joins: usize,
    /// Members that left.
    pub leaves: usize,
}

/// What changed on one topic during one interval, as one envelope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    /// Members that joined.
    pub joins: Vec<Member>,
    /// Members that left.
    pub leaves: Vec<Member>,
    /// Set instead of the lists when there were more than [`MAX_CHANGES`] changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
}

impl Diff {
    /// The diff of `joins` and `leaves` as sent: the same lists, or counts only when they
    /// hold more than [`MAX_CHANGES`] together.
    pub fn capped(joins: Vec<Member>, leaves: Vec<Member>) -> Self {
        if joins.len() + leaves.len() > MAX_CHANGES {
            Self {
                overflow: Some(Overflow {
                    joins: joins.len(),
                    leaves: leaves.len(),
                }),
                ..Self::default()
            }
        } else {
            Self {
                joins,
                leaves,
                overflow: None,
            }
        }
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty() && self.overflow.is_none()
    }

    /// The envelope: `{"type":"presence","topic":"t","joins":[...],"leaves":[...]}` (with
    /// `"overflow"` in place of the lists' content when capped).
    pub fn envelope(&self, topic: &TopicName) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            r#type: &'static str,
            topic: &'a str,
            #[serde(flatten)]
            diff: &'a Diff,
        }
        serde_json::to_vec(&Envelope {
            r#type: "presence",
            topic: topic.as_str(),
            diff: self,
        })
        .unwrap_or_default()
    }
}

/// Drops the members that appear in both lists (joined and left within one interval: nobody
/// needs to hear of them), keeping the order of the rest.
pub fn coalesce(joins: &mut Vec<Member>, leaves: &mut Vec<Member>) {
    if joins.is_empty() || leaves.is_empty() {
        return;
    }
    let left: std::collections::HashSet<&str> = leaves.iter().map(|m| m.id.as_str()).collect();
    let both: std::collections::HashSet<String> = joins
        .iter()
        .filter(|m| left.contains(m.id.as_str()))
        .map(|m| m.id.clone())
        .collect();
    if both.is_empty() {
        return;
    }
    joins.retain(|m| !both.contains(&m.id));
    leaves.retain(|m| !both.contains(&m.id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            client: format!("c-{id}"),
            transport: "sse".into(),
            node: "n".into(),
            since: 1,
        }
    }

    #[test]
    fn a_join_and_leave_in_one_interval_cancel() {
        let mut joins = vec![member("a"), member("b"), member("c")];
        let mut leaves = vec![member("b"), member("z")];
        coalesce(&mut joins, &mut leaves);
        let ids = |list: &[Member]| list.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&joins), ["a", "c"]);
        assert_eq!(ids(&leaves), ["z"]);
    }

    #[test]
    fn past_the_cap_only_counts_are_sent() {
        let joins: Vec<Member> = (0..60).map(|i| member(&i.to_string())).collect();
        let leaves: Vec<Member> = (60..101).map(|i| member(&i.to_string())).collect();
        let diff = Diff::capped(joins, leaves);
        assert_eq!(
            diff.overflow,
            Some(Overflow {
                joins: 60,
                leaves: 41
            })
        );
        let topic = TopicName::parse("room").unwrap();
        let json: serde_json::Value = serde_json::from_slice(&diff.envelope(&topic)).unwrap();
        assert_eq!(json["type"], "presence");
        assert_eq!(json["overflow"]["joins"], 60);
        assert_eq!(json["joins"].as_array().unwrap().len(), 0);
        // At the cap exactly, the lists are sent.
        let diff = Diff::capped((0..100).map(|i| member(&i.to_string())).collect(), vec![]);
        assert_eq!((diff.joins.len(), diff.overflow), (100, None));
    }
}
