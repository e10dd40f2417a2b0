//! A YAML (or JSON) document read into a JSON value without losing anything on the way.
//!
//! Deserializing straight into [`serde_json::Value`] would turn YAML's `.nan` and `.inf`
//! into `null` (JSON has neither), so a limit written as `.inf` would silently become no
//! limit at all, and would keep only the last of two equal keys in a mapping. [`Strict`]
//! refuses both, with the offending key or number in the message (the YAML reader adds the
//! line and column).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A JSON value read strictly: no non-finite numbers, no duplicate keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Strict(pub Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v)
            .map(|v| Value::Number(v.into()))
            .or_else(|_| u64::try_from(v).map(|v| Value::Number(v.into())))
            .map_err(|_| E::custom(format_args!("{v} is out of range")))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v)
            .map(|v| Value::Number(v.into()))
            .map_err(|_| E::custom(format_args!("{v} is out of range")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| {
            E::custom(format_args!(
                "{} is not a finite number (no limit is written by leaving the field out)",
                match v {
                    v if v.is_nan() => ".nan",
                    v if v > 0.0 => ".inf",
                    _ => "-.inf",
                }
            ))
        })
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<Key>()? {
            let Strict(value) = map.next_value()?;
            if out.contains_key(&key.0) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {:?} (only one value can be kept)",
                    key.0
                )));
            }
            out.insert(key.0, value);
        }
        Ok(Value::Object(out))
    }
}

/// A mapping's key, as written: YAML's typing is not applied to keys (`TRUE`, `1.10`, `~`
/// or `0x1F` as an env name or label key stay that text), as when reading into JSON.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Key, E> {
                Ok(Key(v))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Value, String> {
        yaml_serde::from_str::<Strict>(text)
            .map(|s| s.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn values_read_as_json_would() {
        let v = read("a: 1\nb: -2\nc: 1.5\nd: [x, true, ~]\ne: {f: '80'}\n80: port\n").unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "b": -2, "c": 1.5, "d": ["x", true, null],
                "e": {"f": "80"}, "80": "port"})
        );
        // Keys stay as written, whatever YAML would make of them as values.
        let v = read("env: {NULL: a, TRUE: b, ~: c, 1.10: d, 0x1F: e, 1e3: f, +80: g, .inf: h}")
            .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"env": {"NULL": "a", "TRUE": "b", "~": "c", "1.10": "d",
                "0x1F": "e", "1e3": "f", "+80": "g", ".inf": "h"}})
        );
        let v = read(r#"{"a": [1, 2.5, "x"], "b": null}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, 2.5, "x"], "b": null}));
    }

    #[test]
    fn non_finite_numbers_are_refused_by_name() {
        for (text, shown) in [
            ("spec: {maxLifetimeSeconds: .nan}", ".nan"),
            ("cpu: .inf", ".inf"),
            ("cpu: -.inf", "-.inf"),
            ("list: [1, .NaN]", ".nan"),
        ] {
            let e = read(text).unwrap_err();
            assert!(
                e.contains(shown) && e.contains("not a finite number"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn duplicate_keys_are_refused_by_name() {
        let e = read("metadata: {name: a, name: b}").unwrap_err();
        assert!(e.contains("duplicate key \"name\""), "{e}");
        let e = read("mode: audit\nmode: enforce\n").unwrap_err();
        assert!(e.contains("duplicate key \"mode\""), "{e}");
        let e = read(r#"{"a": 1, "a": 2}"#).unwrap_err();
        assert!(e.contains("duplicate key \"a\""), "{e}");
    }
}
