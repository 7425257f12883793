use crate::{Query, QueryItem, Tag};

/// The one matching rule of crablet, used by the in-memory store, the fold engine and the
/// tests that check every SQL backend against it.
///
/// An event matches a query when it matches at least one item. It matches an item when its
/// type is one of the item's types (or the item has none) and it carries every tag of the item
/// (or the item has none). An item with neither types nor tags matches every event; a query
/// with no items matches nothing.
///
/// ```
/// use dcb_core::{matches, Query, QueryItem, Tag};
/// let tags = [Tag::new("course_id", "c1"), Tag::new("student_id", "s1")];
/// assert!(matches(&Query::from(QueryItem::new().tag("course_id", "c1")), "Enrolled", &tags));
/// assert!(!matches(&Query::types(["Left"]), "Enrolled", &tags));
/// assert!(matches(&Query::all(), "Anything", &[]));
/// assert!(!matches(&Query::default(), "Anything", &[]));
/// ```
pub fn matches(query: &Query, event_type: &str, tags: &[Tag]) -> bool {
    query
        .items
        .iter()
        .any(|item| item_matches(item, event_type, tags))
}

pub(crate) fn item_matches(item: &QueryItem, event_type: &str, tags: &[Tag]) -> bool {
    (item.types.is_empty() || item.types.iter().any(|t| t == event_type))
        && item.tags.iter().all(|wanted| tags.contains(wanted))
}
