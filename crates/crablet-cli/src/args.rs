//! Parsing of the values operators type: cursors, tags, and the event filters built from them.
use clap::Args;
use dcb_core::{Cursor, Query, QueryItem, Tag};

/// Parses a cursor written as its `Display`: `TRANSACTION_ID/POSITION`, two decimal integers,
/// nothing else (no sign on the transaction id, no leading zeros, no spaces), so that what is
/// accepted is exactly what `crablet` prints.
pub fn parse_cursor(text: &str) -> Result<Cursor, String> {
    let bad = |why: &str| {
        format!("malformed cursor {text:?}: {why}; a cursor is TRANSACTION_ID/POSITION as crablet prints it, e.g. 7421/15")
    };
    let (tx, position) = text.split_once('/').ok_or_else(|| bad("no '/'"))?;
    let tx: u64 = tx
        .parse()
        .map_err(|_| bad("the transaction id is not an unsigned integer"))?;
    let position: i64 = position
        .parse()
        .map_err(|_| bad("the position is not an integer"))?;
    let cursor = Cursor::new(tx, position);
    if cursor.to_string() != text {
        return Err(bad("not written the way crablet writes cursors"));
    }
    Ok(cursor)
}

/// Parses a tag filter `KEY=VALUE` (split at the first `=`; the value may contain `=`).
pub fn parse_tag(text: &str) -> Result<Tag, String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("malformed tag {text:?}: expected KEY=VALUE, e.g. course_id=c1"))?;
    if key.is_empty() {
        return Err(format!(
            "malformed tag {text:?}: the key before '=' is empty"
        ));
    }
    if key.contains(':') {
        return Err(format!(
            "malformed tag {text:?}: a tag key cannot contain ':' (write KEY=VALUE)"
        ));
    }
    if value.is_empty() {
        return Err(format!(
            "malformed tag {text:?}: the value after '=' is empty"
        ));
    }
    if text.contains('\0') {
        return Err(format!(
            "malformed tag {text:?}: NUL characters are not allowed"
        ));
    }
    Ok(Tag::new(key, value))
}

/// Which events: the filters shared by `events` and `export`.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only events of this type; repeat for several (OR-ed).
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Only events carrying this tag, as KEY=VALUE; repeat for several (AND-ed).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<Tag>,
    /// Only events strictly after this cursor (TRANSACTION_ID/POSITION, as printed).
    #[arg(long, value_name = "CURSOR", value_parser = parse_cursor)]
    pub after: Option<Cursor>,
    /// Only events strictly before this cursor.
    #[arg(long, value_name = "CURSOR", value_parser = parse_cursor)]
    pub before: Option<Cursor>,
}

impl FilterArgs {
    /// The store query: one item with every `--type` (any type when none) and every `--tag`;
    /// every event when there is neither.
    pub fn query(&self) -> Query {
        Query::from(
            QueryItem::new()
                .types(self.types.iter().cloned())
                .tags(self.tags.iter().cloned()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_parse_exactly_as_displayed() {
        assert_eq!(parse_cursor("7421/15"), Ok(Cursor::new(7421, 15)));
        assert_eq!(parse_cursor("0/-3"), Ok(Cursor::new(0, -3)));
        let round = Cursor::new(u64::MAX, i64::MAX);
        assert_eq!(parse_cursor(&round.to_string()), Ok(round));
        for bad in [
            "",
            "7421",
            "7421/",
            "/15",
            "7421/15/1",
            "+7421/15",
            "7421/+15",
            "07421/15",
            "7421/015",
            " 7421/15",
            "7421/15 ",
            "-1/15",
            "7421:15",
            "a/b",
            "18446744073709551616/1",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn tags_are_key_equals_value() {
        assert_eq!(parse_tag("course_id=c1"), Ok(Tag::new("course_id", "c1")));
        assert_eq!(parse_tag("k=a=b"), Ok(Tag::new("k", "a=b")));
        for bad in ["course_id", "=c1", "course_id=", "a:b=c", "course_id:c1"] {
            assert!(parse_tag(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn types_are_ored_and_tags_anded_in_one_item() {
        let filter = FilterArgs {
            types: vec!["A".into(), "B".into()],
            tags: vec![Tag::new("k", "1"), Tag::new("j", "2")],
            after: None,
            before: None,
        };
        let query = filter.query();
        assert_eq!(query.items.len(), 1);
        assert_eq!(query.items[0].types, ["A", "B"]);
        assert_eq!(query.items[0].tags.len(), 2);
        let all = FilterArgs {
            types: vec![],
            tags: vec![],
            after: None,
            before: None,
        };
        assert!(all.query().is_match_all());
    }
}
