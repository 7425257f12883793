//! Advisory lock keys: how appends, conditions and reads serialize exactly where they must.
//!
//! Every writer takes SHARED locks on keys derived from the events it writes; every conditional
//! append and every fenced read takes EXCLUSIVE locks on keys derived from its query items. The
//! derivation guarantees: if an event matches a query item, the item's exclusive keys and the
//! event's shared keys intersect. So a conditional append waits for every in-flight writer of a
//! matching event and vice versa, while writers and readers of disjoint boundaries never touch
//! the same key. See docs/design.md for the full argument.
use dcb_core::{NewEvent, Query, QueryItem, Tag};

#[derive(Clone, Copy)]
enum Level {
    All = 0,
    Type = 1,
    Tag = 2,
    TypeTag = 3,
    Escalation = 4,
    Command = 5,
}

/// Derives 64-bit advisory lock keys, namespaced by the store's schema.
#[derive(Debug, Clone)]
pub(crate) struct KeySpace {
    namespace: String,
    /// Past this many distinct keys an operation escalates to a coarse key instead, so huge
    /// batches and queries cannot exhaust PostgreSQL's shared lock table
    /// (`StoreConfig::max_lock_keys`).
    max_keys: usize,
}

/// A set of keys with their modes, ready for the lock statement (`sql::lock_rows`): sorted, distinct,
/// exclusive where any requester needs exclusive.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct LockSet {
    entries: Vec<(i64, bool)>,
}

impl LockSet {
    /// An empty set with room for `keys` keys.
    pub(crate) fn with_capacity(keys: usize) -> Self {
        Self {
            entries: Vec::with_capacity(keys),
        }
    }

    fn add(&mut self, key: i64, exclusive: bool) {
        self.entries.push((key, exclusive));
    }

    /// Sorts and deduplicates, in place, the entries from `start` on (all shared), returning
    /// how many distinct ones remain.
    fn dedup_from(&mut self, start: usize) -> usize {
        let tail = &mut self.entries[start..];
        tail.sort_unstable();
        let mut kept = 0;
        for i in 0..tail.len() {
            if kept == 0 || tail[i] != tail[kept - 1] {
                tail[kept] = tail[i];
                kept += 1;
            }
        }
        self.entries.truncate(start + kept);
        kept
    }

    /// How many keys were added (before duplicates are merged).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sorts, merges duplicates (exclusive wins) and returns the two parameter arrays.
    pub(crate) fn into_params(mut self) -> (Vec<i64>, Vec<bool>) {
        self.entries.sort_unstable();
        let mut keys: Vec<i64> = Vec::with_capacity(self.entries.len());
        let mut exclusive: Vec<bool> = Vec::with_capacity(self.entries.len());
        for (key, x) in self.entries {
            if keys.last() == Some(&key) {
                if let Some(last) = exclusive.last_mut() {
                    *last |= x;
                }
            } else {
                keys.push(key);
                exclusive.push(x);
            }
        }
        (keys, exclusive)
    }
}

impl KeySpace {
    pub(crate) fn new(schema: &str, max_keys: usize) -> Self {
        Self {
            namespace: format!("crablet/{schema}"),
            max_keys,
        }
    }

    fn key(&self, level: Level, parts: &[&str]) -> i64 {
        self.key_with_tag(level, parts, None)
    }

    /// The key of `parts` followed by the part `"{key}:{value}"` of `tag`, hashed without
    /// building that string (appends derive two such keys per tag).
    fn key_with_tag(&self, level: Level, parts: &[&str], tag: Option<&Tag>) -> i64 {
        // FNV-1a over length-prefixed parts: stable across processes, versions and platforms
        // (std's hasher is not), and unambiguous. Keys must never change between releases:
        // processes of two versions may append to one store at once.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        feed(&(self.namespace.len() as u32).to_le_bytes());
        feed(self.namespace.as_bytes());
        feed(&[level as u8]);
        for part in parts {
            feed(&(part.len() as u32).to_le_bytes());
            feed(part.as_bytes());
        }
        if let Some(tag) = tag {
            feed(&((tag.key.len() + 1 + tag.value.len()) as u32).to_le_bytes());
            feed(tag.key.as_bytes());
            feed(b":");
            feed(tag.value.as_bytes());
        }
        hash as i64
    }

    /// The shared keys of the events an append writes; over `max_keys`, the exclusive
    /// escalation key instead (which conflicts with every conditional append and fenced read).
    /// The room [`add_event_keys`](Self::add_event_keys) reserves for `events`: a set sized
    /// by the sum of these (and of [`query_keys_room`](Self::query_keys_room)) never regrows.
    pub(crate) fn event_keys_room(&self, events: &[NewEvent]) -> usize {
        let tags: usize = events.iter().map(|e| e.tags.len()).sum();
        self.max_keys.min(1 + events.len() + 2 * tags) + 1
    }

    /// The most entries [`add_query_keys`](Self::add_query_keys) adds for `query`.
    pub(crate) fn query_keys_room(query: &Query) -> usize {
        1 + query
            .items
            .iter()
            .map(|i| i.types.len().max(1))
            .sum::<usize>()
    }

    pub(crate) fn add_event_keys(&self, set: &mut LockSet, events: &[NewEvent]) {
        // The keys go straight into the set, and this call's are deduplicated in place at the
        // end; past `max_keys` also on the way, to escalate early, and then again only once
        // they doubled (so a batch repeating its tags stays linear). No hash set: appends are
        // hot.
        let start = set.entries.len();
        set.entries.reserve(self.event_keys_room(events));
        set.add(self.key(Level::All, &[]), false);
        let mut check_at = self.max_keys;
        for event in events {
            let t = event.event_type.as_str();
            set.add(self.key(Level::Type, &[t]), false);
            for tag in &event.tags {
                set.add(self.key_with_tag(Level::Tag, &[], Some(tag)), false);
                set.add(self.key_with_tag(Level::TypeTag, &[t], Some(tag)), false);
            }
            if set.entries.len() - start > check_at {
                let distinct = set.dedup_from(start);
                if distinct > self.max_keys {
                    // Escalate as soon as the bound is passed: the fine keys would be dropped.
                    break;
                }
                check_at = self.max_keys.max(2 * distinct);
            }
        }
        // Deduplicated per call (as `max_group_keys` counts them), and cheap: a few keys.
        if set.dedup_from(start) > self.max_keys {
            set.entries.truncate(start);
            set.add(self.key(Level::Escalation, &[]), true);
        }
    }

    fn item_keys(&self, item: &QueryItem, into: &mut Vec<i64>) {
        // One tag is enough: an event matching the item carries all of the item's tags.
        let first_tag = item.tags.iter().min();
        match (item.types.is_empty(), first_tag) {
            (true, None) => into.push(self.key(Level::All, &[])),
            (true, Some(g)) => into.push(self.key_with_tag(Level::Tag, &[], Some(g))),
            (false, None) => into.extend(item.types.iter().map(|t| self.key(Level::Type, &[t]))),
            (false, Some(g)) => into.extend(
                item.types
                    .iter()
                    .map(|t| self.key_with_tag(Level::TypeTag, &[t], Some(g))),
            ),
        }
    }

    /// The exclusive keys of a query (for a condition check or a fenced read), plus the shared
    /// escalation key; over `max_keys`, the exclusive match-all key instead.
    pub(crate) fn add_query_keys(&self, set: &mut LockSet, query: &Query) {
        let room = Self::query_keys_room(query);
        set.entries.reserve(room);
        let mut keys = Vec::with_capacity(room - 1);
        for item in &query.items {
            self.item_keys(item, &mut keys);
        }
        keys.sort_unstable();
        keys.dedup();
        if keys.len() > self.max_keys {
            set.add(self.key(Level::All, &[]), true);
        } else {
            keys.into_iter().for_each(|k| set.add(k, true));
        }
        set.add(self.key(Level::Escalation, &[]), false);
    }

    /// The keys of a multi-command append or group too large to lock key by key: the exclusive
    /// escalation key (conflicts with every check and fenced read) and the exclusive match-all
    /// key (conflicts with every writer), so it serializes with everything it could touch.
    pub(crate) fn escalated(&self) -> LockSet {
        let mut set = LockSet::default();
        set.add(self.key(Level::All, &[]), true);
        set.add(self.key(Level::Escalation, &[]), true);
        set
    }

    /// The most keys one transaction of several calls takes before it escalates: enough for
    /// 100 single-event conditional commands, small against PostgreSQL's shared lock table
    /// (`max_locks_per_transaction` x connections, 6,400 entries by default).
    pub(crate) fn max_group_keys(&self) -> usize {
        (16 * self.max_keys).max(1024)
    }

    /// The exclusive key serializing commands with the same idempotency id.
    pub(crate) fn add_command_key(&self, set: &mut LockSet, command_id: &str) {
        set.add(self.key(Level::Command, &[command_id]), true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcb_core::matches;

    fn event(t: &str, tags: &[(&str, &str)]) -> NewEvent {
        NewEvent::new(
            t,
            tags.iter().map(|(k, v)| Tag::new(*k, *v)).collect(),
            serde_json::json!({}),
        )
    }

    fn shared(ks: &KeySpace, e: &NewEvent) -> Vec<i64> {
        let mut set = LockSet::default();
        ks.add_event_keys(&mut set, std::slice::from_ref(e));
        set.into_params().0
    }

    fn exclusive(ks: &KeySpace, q: &Query) -> Vec<i64> {
        let mut set = LockSet::default();
        ks.add_query_keys(&mut set, q);
        let (keys, x) = set.into_params();
        keys.into_iter()
            .zip(x)
            .filter(|(_, x)| *x)
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn a_set_sized_by_the_rooms_never_regrows() {
        let ks = KeySpace::new("s", 64);
        let calls: Vec<(Vec<NewEvent>, Query)> = (0..16)
            .map(|n| {
                let course = format!("c{n}");
                let events = vec![
                    event("Enrolled", &[("course", &course), ("student", "s1")]),
                    event("Left", &[("course", &course)]),
                ];
                let query = Query::from_items([
                    QueryItem::new()
                        .types(["Enrolled", "Left"])
                        .tag("course", &course),
                    QueryItem::new().tag("student", "s1"),
                ]);
                (events, query)
            })
            .collect();
        let room: usize = calls
            .iter()
            .map(|(e, q)| ks.event_keys_room(e) + KeySpace::query_keys_room(q))
            .sum();
        let mut set = LockSet::with_capacity(room);
        let capacity = set.entries.capacity();
        for (events, query) in &calls {
            ks.add_event_keys(&mut set, events);
            ks.add_query_keys(&mut set, query);
        }
        assert_eq!(set.entries.capacity(), capacity, "the lock set regrew");
    }

    #[test]
    fn matching_event_and_item_share_a_key_and_disjoint_ones_do_not() {
        let ks = KeySpace::new("public", 48);
        let events = [
            event("A", &[("x", "1"), ("y", "2")]),
            event("B", &[("x", "1")]),
            event("A", &[]),
            event("C", &[("y", "2"), ("z", "3")]),
        ];
        let items = [
            QueryItem::new(),
            QueryItem::new().types(["A"]),
            QueryItem::new().types(["A", "B"]).tag("x", "1"),
            QueryItem::new().tag("y", "2"),
            QueryItem::new().tag("y", "2").tag("x", "1"),
            QueryItem::new().types(["C"]).tag("z", "3").tag("y", "2"),
            QueryItem::new().types(["D"]).tag("x", "1"),
        ];
        for e in &events {
            let s = shared(&ks, e);
            for item in &items {
                let q = Query::from(item.clone());
                let x = exclusive(&ks, &q);
                let share = x.iter().any(|k| s.contains(k));
                if matches(&q, &e.event_type, &e.tags) {
                    assert!(share, "{e:?} matches {item:?} but shares no key");
                }
            }
        }
        // Disjoint boundaries: different tag values never share an exclusive key.
        let q1 = Query::from(QueryItem::new().types(["A"]).tag("x", "1"));
        let e2 = event("A", &[("x", "2")]);
        assert!(!exclusive(&ks, &q1)
            .iter()
            .any(|k| shared(&ks, &e2).contains(k)));
    }

    #[test]
    fn keys_are_stable_and_tag_keys_need_no_tag_string() {
        let ks = KeySpace::new("public", 48);
        let tag = Tag::new("course", "c:1");
        assert_eq!(
            ks.key_with_tag(Level::TypeTag, &["A"], Some(&tag)),
            ks.key(Level::TypeTag, &["A", "course:c:1"])
        );
        assert_eq!(
            ks.key_with_tag(Level::Tag, &[], Some(&tag)),
            ks.key(Level::Tag, &["course:c:1"])
        );
        // Pinned: a release that changes key derivation would let processes of two versions
        // append to one store without excluding each other.
        assert_eq!(ks.key(Level::All, &[]), -1_960_495_108_338_426_506);
        assert_eq!(
            ks.key_with_tag(Level::TypeTag, &["A"], Some(&tag)),
            -382_084_374_653_877_292
        );
    }

    #[test]
    fn namespaces_separate_schemas() {
        let q = Query::all();
        assert_ne!(
            exclusive(&KeySpace::new("a", 48), &q),
            exclusive(&KeySpace::new("b", 48), &q)
        );
    }

    #[test]
    fn huge_batches_escalate_to_one_exclusive_key() {
        let ks = KeySpace::new("public", 48);
        let events: Vec<NewEvent> = (0..100)
            .map(|i| event("A", &[("id", &i.to_string())]))
            .collect();
        let mut set = LockSet::default();
        ks.add_event_keys(&mut set, &events);
        let (keys, x) = set.into_params();
        assert_eq!(keys.len(), 1);
        assert!(x[0]);
        // ... and it conflicts with every condition (which holds it shared).
        let mut cond = LockSet::default();
        ks.add_query_keys(&mut cond, &Query::from(QueryItem::new().tag("id", "1")));
        assert!(cond.into_params().0.contains(&keys[0]));

        // With room for them, the same batch takes its fine keys, all shared, and still meets
        // every matching condition's keys; a store escalating at 48 conflicts with it too.
        let roomy = KeySpace::new("public", 400);
        let mut set = LockSet::default();
        roomy.add_event_keys(&mut set, &events);
        let (fine, x) = set.into_params();
        assert_eq!(
            fine.len(),
            1 + 1 + 2 * 100,
            "all, type, tag and type/tag per event"
        );
        assert!(x.iter().all(|x| !x));
        for i in [0, 57, 99] {
            let q = Query::from(QueryItem::new().types(["A"]).tag("id", i.to_string()));
            assert!(exclusive(&roomy, &q).iter().any(|k| fine.contains(k)));
            assert!(exclusive(&ks, &q).iter().any(|k| fine.contains(k)));
        }
    }

    #[test]
    fn escalation_counts_distinct_keys_only() {
        let ks = KeySpace::new("public", 48);
        let keys_of = |events: &[NewEvent]| {
            let mut set = LockSet::default();
            ks.add_event_keys(&mut set, events);
            set.into_params()
        };
        // 1 + 1 + 2 * 23 = 48 distinct keys: at the bound, not over it.
        let at_bound: Vec<NewEvent> = (0..23)
            .map(|i| event("A", &[("id", &i.to_string())]))
            .collect();
        let (keys, x) = keys_of(&at_bound);
        assert_eq!(keys.len(), 48);
        assert!(x.iter().all(|x| !x));
        // One more tag value passes it.
        let over: Vec<NewEvent> = (0..24)
            .map(|i| event("A", &[("id", &i.to_string())]))
            .collect();
        assert_eq!(keys_of(&over).0.len(), 1);
        // Thousands of events repeating a few tags stay fine-grained.
        let repeated: Vec<NewEvent> = (0..5000)
            .map(|i| event("A", &[("id", &(i % 20).to_string())]))
            .collect();
        let (keys, x) = keys_of(&repeated);
        assert_eq!(keys.len(), 1 + 1 + 2 * 20);
        assert!(x.iter().all(|x| !x));
        // Two calls in one set (a group) escalate each on its own count.
        let mut set = LockSet::default();
        ks.add_event_keys(&mut set, &at_bound);
        ks.add_event_keys(&mut set, &at_bound[..5]);
        let (keys, x) = set.into_params();
        assert_eq!(keys.len(), 48);
        assert!(x.iter().all(|x| !x));
    }

    #[test]
    fn lock_set_is_sorted_distinct_and_exclusive_wins() {
        let mut set = LockSet::default();
        set.add(5, false);
        set.add(-3, false);
        set.add(5, true);
        set.add(5, false);
        assert_eq!(set.into_params(), (vec![-3, 5], vec![false, true]));
    }
}
