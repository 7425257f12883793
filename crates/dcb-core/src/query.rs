use crate::Tag;
use serde::{Deserialize, Serialize};

/// One alternative of a [`Query`]: the event type must be one of `types` (any type when empty)
/// and the event must carry every tag in `tags` (extra tags are fine; any tags when empty).
///
/// An item with neither types nor tags matches every event; that is what [`Query::all`] is.
///
/// ```
/// use dcb_core::QueryItem;
/// let item = QueryItem::new()
///     .types(["StudentEnrolled", "StudentLeft"])
///     .tag("course_id", "c1");
/// assert_eq!(item.types.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QueryItem {
    /// Accepted event types, OR-ed. Empty: any type.
    pub types: Vec<String>,
    /// Required tags, AND-ed. Empty: any tags.
    pub tags: Vec<Tag>,
}

impl QueryItem {
    /// An item that matches every event until types or tags are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// An item selecting the event types of the typed event `T` (a
    /// [`DomainEvent`](crate::DomainEvent), or a tuple of them), old names included, so the
    /// names are never spelled out by hand.
    ///
    /// ```ignore
    /// // Every CourseDefined and StudentEnrolled event of course c1:
    /// let item = QueryItem::of::<(CourseDefined, StudentEnrolled)>().tag("course_id", "c1");
    /// ```
    pub fn of<T: crate::EventTypes>() -> Self {
        Self::new().types(T::read_types())
    }

    /// An item selecting some variants of an enum of typed events, by the kinds its derive
    /// generates ([`EventKind`](crate::EventKind)).
    ///
    /// No kinds is refused with [`ValidationKind::EmptyQuery`](crate::ValidationKind::EmptyQuery),
    /// like a [`Query`] without items: an item without types would select every type, the
    /// opposite of selecting none of the variants.
    ///
    /// ```ignore
    /// let item = QueryItem::of_kinds([CourseEventKind::Defined, CourseEventKind::CapacityChanged])?
    ///     .tag("course_id", "c1");
    /// ```
    pub fn of_kinds<K: crate::EventKind>(
        kinds: impl IntoIterator<Item = K>,
    ) -> Result<Self, crate::Error> {
        let mut types: Vec<String> = Vec::new();
        for name in kinds.into_iter().flat_map(K::read_types) {
            if !types.contains(&name) {
                types.push(name);
            }
        }
        if types.is_empty() {
            return Err(crate::Error::Validation(crate::ValidationError::new(
                "kinds",
                crate::ValidationKind::EmptyQuery,
                format!(
                    "QueryItem::of_kinds needs at least one {}: an item without types matches \
                     every event type",
                    std::any::type_name::<K>()
                ),
            )));
        }
        Ok(Self::new().types(types))
    }

    /// Adds accepted event types.
    pub fn types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.types.extend(types.into_iter().map(Into::into));
        self
    }

    /// Adds one required tag.
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.push(Tag::new(key, value));
        self
    }

    /// Adds required tags.
    pub fn tags(mut self, tags: impl IntoIterator<Item = Tag>) -> Self {
        self.tags.extend(tags);
        self
    }

    /// True when the item matches every event (no types and no tags).
    pub fn is_match_all(&self) -> bool {
        self.types.is_empty() && self.tags.is_empty()
    }
}

/// A selection of events: the OR of its [`QueryItem`]s.
///
/// A query with no items matches nothing and is rejected where a query is required; use
/// [`Query::all`] to select every event.
///
/// ```
/// use dcb_core::{Query, QueryItem, Tag};
/// let query = Query::from_items([
///     QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1"),
///     QueryItem::new().types(["StudentEnrolled"]).tag("student_id", "s1"),
/// ]);
/// assert_eq!(query.items.len(), 2);
/// assert!(Query::all().is_match_all());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Query {
    /// The alternatives, OR-ed.
    pub items: Vec<QueryItem>,
}

impl Query {
    /// A query that matches every event.
    pub fn all() -> Self {
        Self {
            items: vec![QueryItem::new()],
        }
    }

    /// A query built from items.
    pub fn from_items(items: impl IntoIterator<Item = QueryItem>) -> Self {
        Self {
            items: items.into_iter().collect(),
        }
    }

    /// A one-item query on event types only.
    pub fn types<I, S>(types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::from(QueryItem::new().types(types))
    }

    /// A one-item query on the event types of the typed event `T` (or a tuple of them); see
    /// [`QueryItem::of`].
    pub fn of<T: crate::EventTypes>() -> Self {
        Self::from(QueryItem::of::<T>())
    }

    /// A one-item query on tags only.
    pub fn tags(tags: impl IntoIterator<Item = Tag>) -> Self {
        Self::from(QueryItem::new().tags(tags))
    }

    /// Adds an alternative.
    pub fn or(mut self, item: QueryItem) -> Self {
        self.items.push(item);
        self
    }

    /// True when some item matches every event.
    pub fn is_match_all(&self) -> bool {
        self.items.iter().any(QueryItem::is_match_all)
    }

    /// The OR of several queries, with identical items kept once.
    pub fn union<'a>(queries: impl IntoIterator<Item = &'a Query>) -> Query {
        let mut items: Vec<QueryItem> = Vec::new();
        for query in queries {
            for item in &query.items {
                if !items.contains(item) {
                    items.push(item.clone());
                }
            }
        }
        Query { items }
    }

    /// The same selection, usually in fewer items, for backends to evaluate:
    /// types and tags sorted and kept once, items with the same tags merged into one (their
    /// types joined), items that another item already covers dropped, and any match-all item
    /// turned into [`Query::all`]. Matches exactly the events `self` matches.
    ///
    /// A decision model of several projectors on one entity asks for the same tags with
    /// different types; as one item, a store looks its tags up once instead of once per
    /// projector.
    ///
    /// ```
    /// use dcb_core::{Query, QueryItem};
    /// let query = Query::from_items([
    ///     QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1"),
    ///     QueryItem::new().types(["StudentEnrolled"]).tag("course_id", "c1"),
    ///     QueryItem::new().types(["StudentEnrolled"]).tag("course_id", "c1").tag("student_id", "s1"),
    /// ]);
    /// let simple = query.simplified();
    /// assert_eq!(
    ///     simple,
    ///     Query::from(QueryItem::new().types(["CourseDefined", "StudentEnrolled"]).tag("course_id", "c1"))
    /// );
    /// ```
    pub fn simplified(&self) -> Query {
        if self.is_match_all() {
            return Query::all();
        }
        // Merge items with equal (sorted, distinct) tags; `types` empty means any type.
        let mut merged: Vec<QueryItem> = Vec::with_capacity(self.items.len());
        let mut by_tags: std::collections::HashMap<Vec<Tag>, usize> =
            std::collections::HashMap::with_capacity(self.items.len());
        for item in &self.items {
            let mut tags = item.tags.clone();
            tags.sort_unstable();
            tags.dedup();
            match by_tags.get(&tags) {
                Some(&i) => {
                    let types = &mut merged[i].types;
                    if types.is_empty() || item.types.is_empty() {
                        types.clear();
                    } else {
                        types.extend(item.types.iter().cloned());
                    }
                }
                None => {
                    by_tags.insert(tags.clone(), merged.len());
                    merged.push(QueryItem {
                        types: item.types.clone(),
                        tags,
                    });
                }
            }
        }
        for item in &mut merged {
            item.types.sort_unstable();
            item.types.dedup();
        }
        // Drop items another item covers. After the merge no two items have equal tags, so
        // covering is a strict order and every dropped item's cover (or its cover's) stays.
        // Quadratic: only for queries of a size that decision models have.
        if merged.len() <= MAX_ITEMS_TO_SUBSUME {
            let keep: Vec<bool> = merged
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    !merged
                        .iter()
                        .enumerate()
                        .any(|(j, other)| i != j && covers(other, item))
                })
                .collect();
            let mut keep = keep.into_iter();
            merged.retain(|_| keep.next().unwrap_or(true));
        }
        Query { items: merged }
    }
}

/// Past this many (merged) items, [`Query::simplified`] does not look for covered items.
const MAX_ITEMS_TO_SUBSUME: usize = 64;

/// True when every event `b` matches is matched by `a` (both with sorted, distinct parts).
fn covers(a: &QueryItem, b: &QueryItem) -> bool {
    let tags = a.tags.iter().all(|t| b.tags.binary_search(t).is_ok());
    let types = a.types.is_empty()
        || (!b.types.is_empty() && b.types.iter().all(|t| a.types.binary_search(t).is_ok()));
    tags && types
}

impl From<QueryItem> for Query {
    fn from(item: QueryItem) -> Self {
        Self { items: vec![item] }
    }
}
