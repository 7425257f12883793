//! JSON parameters written so that jsonb gives back an equal `serde_json::Value`.
//!
//! jsonb keeps numbers as `numeric` and prints them in positional notation, with as many
//! decimals as were written. serde_json writes large floats in exponent form (`1e+16`), which
//! jsonb then returns as the integer `10000000000000000`: a different `Value` (an integer, not a
//! float). [`Jsonb`] writes the integral floats that would come back inside the integer range
//! with one decimal (`10000000000000000.0`), which jsonb returns as written. Every other number
//! is written by serde_json as usual: integers come back as the same integers, and other floats
//! as long decimals that serde_json's `float_roundtrip` parser (enabled by this crate) reads back
//! to the same `f64`. The only change is the sign of zero: numeric has no `-0`, so `-0.0` comes
//! back as `0.0` (equal as a `Value`, since `-0.0 == 0.0`).
use bytes::{BufMut, BytesMut};
use postgres_types::{accepts, to_sql_checked, IsNull, ToSql, Type};
use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter};
use serde_json::Value;
use std::io;

/// Floats at least this large (in magnitude) are read back as floats whatever their notation:
/// their integer digits overflow u64 and i64, which makes serde_json parse them as `f64`.
/// (u64::MAX is about 1.8e19.)
const INTEGER_RANGE: f64 = 1e20;

/// serde_json's compact output, except for integral floats below [`INTEGER_RANGE`], which are
/// written in positional notation with one decimal so that jsonb keeps them floats.
struct RoundTrip;

impl Formatter for RoundTrip {
    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        if value.fract() == 0.0 && value.abs() < INTEGER_RANGE {
            // `{:.1}` prints the float's exact value (an integer here) and `.0`.
            write!(writer, "{value:.1}")
        } else {
            CompactFormatter.write_f64(writer, value)
        }
    }
}

/// Writes `value` as JSON text that PostgreSQL's jsonb returns equal.
fn write(value: &Value, out: &mut BytesMut) -> Result<(), serde_json::Error> {
    let mut serializer = serde_json::Serializer::with_formatter(out.writer(), RoundTrip);
    value.serialize(&mut serializer)
}

/// A JSON value bound as a `jsonb` (or `json`) parameter; see the module documentation.
#[derive(Debug)]
pub(crate) struct Jsonb(pub(crate) Value);

impl ToSql for Jsonb {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            // The jsonb binary format's version.
            out.put_u8(1);
        }
        write(&self.0, out)?;
        Ok(IsNull::No)
    }

    accepts!(JSON, JSONB);
    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(value: Value) -> String {
        let mut out = BytesMut::new();
        write(&value, &mut out).expect("serializes");
        String::from_utf8(out.to_vec()).expect("utf-8")
    }

    #[test]
    fn integral_floats_in_the_integer_range_keep_a_decimal() {
        assert_eq!(text(json!(1e16)), "10000000000000000.0");
        assert_eq!(text(json!(-1e16)), "-10000000000000000.0");
        assert_eq!(text(json!(9.223372036854776e18)), "9223372036854775808.0");
        assert_eq!(text(json!(1.8446744073709552e19)), "18446744073709551616.0");
        assert_eq!(text(json!(1.0)), "1.0");
        assert_eq!(text(json!(-0.0)), "-0.0");
    }

    #[test]
    fn other_numbers_and_everything_else_are_serde_json_output() {
        for value in [
            json!(1e20),
            json!(1.5e300),
            json!(f64::MAX),
            json!(5e-324),
            json!(0.1),
            json!(1.5e-10),
            json!(u64::MAX),
            json!(i64::MIN),
            json!({ "a": ["x\"\\\n\u{1}", null, true, 1e16], "é": {} }),
        ] {
            let plain = serde_json::to_string(&value).expect("serializes");
            if value.is_object() {
                assert_eq!(
                    text(value),
                    plain.replace("1e+16", "10000000000000000.0"),
                    "only the float changes"
                );
            } else {
                assert_eq!(text(value), plain);
            }
        }
    }
}
