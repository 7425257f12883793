use std::fmt;

/// A Rust type that a typed event's tag field can hold: how it is written as a tag value and
/// read back from one.
///
/// Implemented for `String`, `bool`, `char` and the integer types. Implement it for your own
/// identifiers (newtypes, UUIDs) to tag with them; `from_tag_value(to_tag_value(x))` must give
/// `x` back, since reads return exactly what was appended. Floats are not tag values: `1` and
/// `1.0` would be two different tags for one number.
///
/// ```
/// use dcb_core::TagValue;
///
/// #[derive(Debug, PartialEq)]
/// struct CourseId(String);
///
/// impl TagValue for CourseId {
///     fn to_tag_value(&self) -> String {
///         self.0.clone()
///     }
///     fn from_tag_value(value: &str) -> Result<Self, String> {
///         Ok(CourseId(value.to_string()))
///     }
/// }
///
/// assert_eq!(42_u32.to_tag_value(), "42");
/// assert_eq!(u32::from_tag_value("42"), Ok(42));
/// assert!(u32::from_tag_value("forty-two").is_err());
/// assert_eq!(CourseId::from_tag_value("c1"), Ok(CourseId("c1".into())));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a tag value",
    label = "this field is marked `#[crablet(tag)]`",
    note = "tag fields hold a String, an integer, bool or char, a Vec or Option of one, or a type that implements `TagValue` (the conversion to and from the tag's text)"
)]
pub trait TagValue: Sized {
    /// The value as it is stored in the tag.
    fn to_tag_value(&self) -> String;

    /// Parses a stored tag value; the error says why it does not parse.
    fn from_tag_value(value: &str) -> Result<Self, String>;
}

impl TagValue for String {
    fn to_tag_value(&self) -> String {
        self.clone()
    }

    fn from_tag_value(value: &str) -> Result<Self, String> {
        Ok(value.to_string())
    }
}

fn parse<T: std::str::FromStr>(value: &str) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    value
        .parse()
        .map_err(|err: T::Err| format!("{err} (as {})", std::any::type_name::<T>()))
}

macro_rules! tag_value_by_display {
    ($($ty:ty),*) => {$(
        impl TagValue for $ty {
            fn to_tag_value(&self) -> String {
                self.to_string()
            }

            fn from_tag_value(value: &str) -> Result<Self, String> {
                let parsed: $ty = parse(value)?;
                // "+7" and "007" parse but would not be written back the same way.
                if parsed.to_string() != value {
                    return Err(format!(
                        "{value:?} is not written as {} writes {parsed}",
                        std::any::type_name::<$ty>()
                    ));
                }
                Ok(parsed)
            }
        }
    )*};
}

tag_value_by_display!(bool, char, u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize);
