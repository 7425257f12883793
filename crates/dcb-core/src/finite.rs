//! Serializing to JSON without losing non-finite floats: serde_json writes NaN and the
//! infinities as `null`, which then fails to decode (or decodes as something else). Encoding
//! refuses them instead.
use serde::ser::{self, Serialize, Serializer};
use serde_json::Value;
use std::cell::Cell;

/// Why a value did not become JSON ([`to_finite_json`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum ToJsonError {
    /// It holds a NaN or an infinity, which JSON cannot represent.
    NonFinite,
    /// serde_json refused it (a map with non-string keys, a failing `Serialize`, ...).
    Serde(serde_json::Error),
}

impl std::fmt::Display for ToJsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToJsonError::NonFinite => {
                f.write_str("it holds a NaN or infinite float, which JSON cannot represent")
            }
            ToJsonError::Serde(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for ToJsonError {}

/// `value` as JSON, or an error if any float in it is NaN or infinite (which `serde_json`
/// would silently write as `null`). What crablet uses for event payloads and metadata, and for
/// command payloads.
///
/// ```
/// use dcb_core::{to_finite_json, ToJsonError};
/// assert_eq!(to_finite_json(&[1.5]).unwrap(), serde_json::json!([1.5]));
/// assert!(matches!(to_finite_json(&f64::NAN), Err(ToJsonError::NonFinite)));
/// ```
pub fn to_finite_json<T: Serialize + ?Sized>(value: &T) -> Result<Value, ToJsonError> {
    let found = Cell::new(false);
    match serde_json::to_value(Finite {
        value,
        found: &found,
    }) {
        Ok(json) => Ok(json),
        Err(_) if found.get() => Err(ToJsonError::NonFinite),
        Err(err) => Err(ToJsonError::Serde(err)),
    }
}

/// `value`, serialized through [`Checked`].
struct Finite<'a, T: ?Sized> {
    value: &'a T,
    found: &'a Cell<bool>,
}

impl<T: Serialize + ?Sized> Serialize for Finite<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(Checked {
            inner: serializer,
            found: self.found,
        })
    }
}

/// A serializer that passes everything to `inner` except non-finite floats.
struct Checked<'a, S> {
    inner: S,
    found: &'a Cell<bool>,
}

impl<S> Checked<'_, S> {
    fn refuse<E: ser::Error>(&self, value: f64) -> E {
        self.found.set(true);
        E::custom(format!("{value} cannot be represented in JSON"))
    }
}

/// The compound serializers: each element goes through [`Finite`].
struct Compound<'a, C> {
    inner: C,
    found: &'a Cell<bool>,
}

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method(self, $($arg: $ty),*) -> Result<Self::Ok, Self::Error> {
            self.inner.$method($($arg),*)
        }
    )*};
}

impl<'a, S: Serializer> Serializer for Checked<'a, S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Compound<'a, S::SerializeSeq>;
    type SerializeTuple = Compound<'a, S::SerializeTuple>;
    type SerializeTupleStruct = Compound<'a, S::SerializeTupleStruct>;
    type SerializeTupleVariant = Compound<'a, S::SerializeTupleVariant>;
    type SerializeMap = Compound<'a, S::SerializeMap>;
    type SerializeStruct = Compound<'a, S::SerializeStruct>;
    type SerializeStructVariant = Compound<'a, S::SerializeStructVariant>;

    forward! {
        serialize_bool(v: bool);
        serialize_i8(v: i8);
        serialize_i16(v: i16);
        serialize_i32(v: i32);
        serialize_i64(v: i64);
        serialize_i128(v: i128);
        serialize_u8(v: u8);
        serialize_u16(v: u16);
        serialize_u32(v: u32);
        serialize_u64(v: u64);
        serialize_u128(v: u128);
        serialize_char(v: char);
        serialize_str(v: &str);
        serialize_bytes(v: &[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(name: &'static str);
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str);
    }

    fn serialize_f32(self, v: f32) -> Result<Self::Ok, Self::Error> {
        if v.is_finite() {
            self.inner.serialize_f32(v)
        } else {
            Err(self.refuse(f64::from(v)))
        }
    }

    fn serialize_f64(self, v: f64) -> Result<Self::Ok, Self::Error> {
        if v.is_finite() {
            self.inner.serialize_f64(v)
        } else {
            Err(self.refuse(v))
        }
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Self::Ok, Self::Error> {
        let found = self.found;
        self.inner.serialize_some(&Finite { value, found })
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<Self::Ok, Self::Error> {
        let found = self.found;
        self.inner
            .serialize_newtype_struct(name, &Finite { value, found })
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Self::Ok, Self::Error> {
        let found = self.found;
        self.inner
            .serialize_newtype_variant(name, index, variant, &Finite { value, found })
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, Self::Error> {
        let found = self.found;
        Ok(Compound {
            inner: self.inner.serialize_seq(len)?,
            found,
        })
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, Self::Error> {
        let found = self.found;
        Ok(Compound {
            inner: self.inner.serialize_tuple(len)?,
            found,
        })
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, Self::Error> {
        let found = self.found;
        Ok(Compound {
            inner: self.inner.serialize_tuple_struct(name, len)?,
            found,
        })
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, Self::Error> {
        let found = self.found;
        Ok(Compound {
            inner: self
                .inner
                .serialize_tuple_variant(name, index, variant, len)?,
            found,
        })
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, Self::Error> {
        let found = self.found;
        Ok(Compound {
            inner: self.inner.serialize_map(len)?,
            found,
        })
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, Self::Error> {
        let found = self.found;
        Ok(Compound {
            inner: self.inner.serialize_struct(name, len)?,
            found,
        })
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, Self::Error> {
        let found = self.found;
        Ok(Compound {
            inner: self
                .inner
                .serialize_struct_variant(name, index, variant, len)?,
            found,
        })
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! compound {
    ($trait:ident, $method:ident) => {
        impl<C: ser::$trait> ser::$trait for Compound<'_, C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
                let found = self.found;
                self.inner.$method(&Finite { value, found })
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.inner.end()
            }
        }
    };
}

compound!(SerializeSeq, serialize_element);
compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);

impl<C: ser::SerializeMap> ser::SerializeMap for Compound<'_, C> {
    type Ok = C::Ok;
    type Error = C::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), C::Error> {
        let found = self.found;
        self.inner.serialize_key(&Finite { value: key, found })
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
        let found = self.found;
        self.inner.serialize_value(&Finite { value, found })
    }

    fn end(self) -> Result<C::Ok, C::Error> {
        self.inner.end()
    }
}

macro_rules! compound_struct {
    ($trait:ident) => {
        impl<C: ser::$trait> ser::$trait for Compound<'_, C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), C::Error> {
                let found = self.found;
                self.inner.serialize_field(key, &Finite { value, found })
            }

            fn skip_field(&mut self, key: &'static str) -> Result<(), C::Error> {
                self.inner.skip_field(key)
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.inner.end()
            }
        }
    };
}

compound_struct!(SerializeStruct);
compound_struct!(SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(serde::Serialize)]
    struct Reading {
        value: f64,
        history: Vec<f32>,
        extra: Option<std::collections::BTreeMap<String, f64>>,
    }

    #[test]
    fn finite_values_serialize_as_serde_json_does() {
        let reading = Reading {
            value: 1.5,
            history: vec![0.25, -3.0],
            extra: Some([("k".to_string(), 2.0)].into()),
        };
        assert_eq!(
            to_finite_json(&reading).unwrap(),
            serde_json::to_value(&reading).unwrap()
        );
        assert_eq!(
            to_finite_json(&json!({"a": [1, "x", null]})).unwrap(),
            json!({"a": [1, "x", null]})
        );
    }

    #[test]
    fn non_finite_floats_anywhere_are_refused() {
        for reading in [
            Reading {
                value: f64::NAN,
                history: vec![],
                extra: None,
            },
            Reading {
                value: 0.0,
                history: vec![1.0, f32::INFINITY],
                extra: None,
            },
            Reading {
                value: 0.0,
                history: vec![],
                extra: Some([("k".to_string(), f64::NEG_INFINITY)].into()),
            },
        ] {
            assert!(matches!(
                to_finite_json(&reading),
                Err(ToJsonError::NonFinite)
            ));
        }
    }

    #[test]
    fn other_failures_stay_serde_errors() {
        let bad_keys: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
        assert!(matches!(
            to_finite_json(&bad_keys),
            Err(ToJsonError::Serde(_))
        ));
    }
}
