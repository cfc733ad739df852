//! JSON pieces for copying what a call does not change straight through, and for writing
//! outputs byte for byte as the worker's codec (orjson) writes them.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::{Unhandled, R};

/// A JSON object's members in order, as a Python dict holds them: a repeated key keeps its
/// first place and takes its last value. Small objects only: lookups are linear.
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<T> Ordered<T> {
    pub fn get(&self, key: &str) -> Option<&T> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn set(&mut self, key: &str, value: T) {
        match self.get_mut(key) {
            Some(slot) => *slot = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Members<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<T>, A::Error> {
                let mut out = Ordered(Vec::with_capacity(map.size_hint().unwrap_or(16)));
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    out.set(&k, v);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// A member value: the input's own text when it is already as orjson would write it,
/// else a value to encode.
pub enum Field<'a> {
    Raw(&'a RawValue),
    Value(Value),
    Encoded(Vec<u8>),
}

impl Field<'_> {
    /// The value, parsed (for the few members the call's validation reads).
    pub fn value(&self) -> R<Value> {
        match self {
            Field::Raw(raw) => serde_json::from_str(raw.get()).map_err(|_| Unhandled),
            Field::Value(v) => Ok(v.clone()),
            Field::Encoded(bytes) => serde_json::from_slice(bytes).map_err(|_| Unhandled),
        }
    }

    /// Ready to copy to an output: `Unhandled` for a float anywhere in it (orjson and
    /// serde_json write floats differently; serde_json reads integers over 64 bits as
    /// floats, where orjson refuses the call).
    pub fn canonical(raw: &RawValue) -> R<Field<'_>> {
        if is_canonical(raw.get().as_bytes()) {
            return Ok(Field::Raw(raw));
        }
        let value: Value = serde_json::from_str(raw.get()).map_err(|_| Unhandled)?;
        if has_float(&value) {
            return Err(Unhandled);
        }
        Ok(Field::Value(value))
    }
}

pub fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// Whether valid JSON text is exactly what orjson writes for its value: no whitespace,
/// integers only (at most 18 digits, no `-0`), and only the escapes orjson makes.
fn is_canonical(text: &[u8]) -> bool {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                i += 1;
                while text[i] != b'"' {
                    if text[i] == b'\\' {
                        match text[i + 1] {
                            b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                            b'u' => {
                                let hex = &text[i + 2..i + 6];
                                let control = hex[0] == b'0'
                                    && hex[1] == b'0'
                                    && matches!(hex[2], b'0' | b'1')
                                    && matches!(hex[3], b'0'..=b'9' | b'a'..=b'f');
                                let short =
                                    matches!(hex, b"0008" | b"0009" | b"000a" | b"000c" | b"000d");
                                if !control || short {
                                    return false;
                                }
                                i += 6;
                            }
                            _ => return false,
                        }
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < text.len() && text[i].is_ascii_digit() {
                    i += 1;
                }
                let number = &text[start..i];
                if number == b"-0" || number.len() > 18 {
                    return false;
                }
                if i < text.len() && matches!(text[i], b'.' | b'e' | b'E') {
                    return false;
                }
            }
            b't' | b'n' => i += 4,
            b'f' => i += 5,
            b'{' | b'}' | b'[' | b']' | b',' | b':' => i += 1,
            _ => return false, // whitespace
        }
    }
    true
}

/// Append a value's compact JSON.
pub fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("JSON values encode");
}

/// Append an object's members, each as raw text or a value.
pub fn write_fields(out: &mut Vec<u8>, fields: &[(String, Field<'_>)]) {
    out.push(b'{');
    for (n, (key, field)) in fields.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write(out, key.as_str());
        out.push(b':');
        match field {
            Field::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
            Field::Value(v) => write(out, v),
            Field::Encoded(bytes) => out.extend_from_slice(bytes),
        }
    }
    out.push(b'}');
}
