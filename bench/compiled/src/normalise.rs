//! `worker/normalise.py`'s `normalise_traits`, for the values it can decide alone.
//!
//! A value outside the handled subset (a float, non-ASCII text where Python's Unicode
//! rules matter, an unusual URL) is `Unhandled`: the whole call goes to the Python path.
//! Phone numbers are handed to Python's `phonenumbers` through `phone` (memoised by the
//! caller), which is what libphonenumber's metadata needs.

use serde_json::{Map, Number, Value};

use crate::times::{format_time, parse_created_at_text, py_space, py_strip};
use crate::{Unhandled, R};

pub const DUPLICATE_TRAIT: &str = "duplicate_trait";
const INVALID_TYPE: &str = "invalid_type";
const INVALID_DATE: &str = "invalid_date";
const INVALID_EMAIL: &str = "invalid_email";
const INVALID_URL: &str = "invalid_url";
const INVALID_EMPLOYEES: &str = "invalid_employees";
const MAX_EMPLOYEES: u64 = (1 << 53) - 1;
const MAX_EMPLOYEES_DIGITS: usize = 16;

/// A dropped trait value: code, key as sent, value as sent.
pub struct Warning {
    pub code: &'static str,
    pub trait_: String,
    pub value: Value,
}

/// A normalised value, or the warning code that drops it.
type Norm = R<Result<Value, &'static str>>;

/// The ASCII letters and digits of a key, lower-cased: what reserved names match on.
fn fold(key: &str) -> String {
    key.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn reserved(key: &str) -> Option<&'static str> {
    Some(match fold(key).as_str() {
        "address" => "address",
        "avatar" => "avatar",
        "createdat" => "createdAt",
        "description" => "description",
        "email" => "email",
        "employees" => "employees",
        "id" => "id",
        "industry" => "industry",
        "name" => "name",
        "phone" => "phone",
        "plan" => "plan",
        "website" => "website",
        _ => return None,
    })
}

fn address_field(key: &str) -> Option<&'static str> {
    Some(match fold(key).as_str() {
        "city" => "city",
        "country" => "country",
        "postalcode" | "zip" | "zipcode" | "postcode" => "postalCode",
        "state" => "state",
        "street" => "street",
        _ => return None,
    })
}

/// `normalise_traits(traits)` with `phone_region=None`.
pub fn normalise_traits(
    traits: &Map<String, Value>,
    phone: &mut dyn FnMut(&str) -> R<String>,
) -> R<(Map<String, Value>, Vec<Warning>)> {
    let mut out = Map::new();
    let mut warnings = Vec::new();
    let mut claimed: Vec<&'static str> = Vec::new();
    for (key, value) in traits {
        let Some(name) = reserved(key) else {
            out.insert(key.clone(), value.clone());
            continue;
        };
        if key != name {
            if traits.contains_key(name) || claimed.contains(&name) {
                warnings.push(warning(DUPLICATE_TRAIT, key.clone(), value));
                continue;
            }
            claimed.push(name);
        }
        if value.is_null() {
            out.insert(name.to_owned(), Value::Null);
            continue;
        }
        let result = match name {
            "address" => address(value, key, &mut warnings)?,
            "phone" => phone_number(value, phone)?,
            "createdAt" => created_at(value)?,
            "email" => email(value)?,
            "employees" => employees(value)?,
            "website" => website(value)?,
            "avatar" => avatar(value)?,
            _ => text(value)?,
        };
        match result {
            Ok(v) => {
                out.insert(name.to_owned(), v);
            }
            Err(code) => warnings.push(warning(code, key.clone(), value)),
        }
    }
    Ok((out, warnings))
}

fn warning(code: &'static str, trait_: String, value: &Value) -> Warning {
    Warning {
        code,
        trait_,
        value: value.clone(),
    }
}

/// Whether a JSON number is an integer (serde_json's i64/u64; a float is never).
fn integer(n: &Number) -> R<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
        .ok_or(Unhandled)
}

fn text(value: &Value) -> Norm {
    match value {
        Value::String(s) => Ok(Ok(Value::String(py_strip(s).to_owned()))),
        Value::Number(n) => Ok(Ok(Value::String(integer(n)?.to_string()))),
        _ => Ok(Err(INVALID_TYPE)),
    }
}

fn created_at(value: &Value) -> Norm {
    let ms = match value {
        Value::String(s) => parse_created_at_text(s)?,
        Value::Number(n) => crate::times::epoch_to_ms(integer(n)?),
        _ => return Ok(Err(INVALID_TYPE)),
    };
    Ok(ms
        .map(|ms| Value::String(format_time(ms)))
        .ok_or(INVALID_DATE))
}

/// ASCII text, trimmed; `Unhandled` for non-ASCII, where Python's Unicode rules decide.
fn ascii_trimmed(s: &str) -> R<&str> {
    if s.is_ascii() {
        Ok(py_strip(s))
    } else {
        Err(Unhandled)
    }
}

fn email(value: &Value) -> Norm {
    let Value::String(s) = value else {
        return Ok(Err(INVALID_TYPE));
    };
    let email = ascii_trimmed(s)?.to_ascii_lowercase();
    let Some((local, domain)) = email.split_once('@') else {
        return Ok(Err(INVALID_EMAIL));
    };
    if local.is_empty() || domain.contains('@') || email.contains(py_space) || !is_domain(domain) {
        return Ok(Err(INVALID_EMAIL));
    }
    Ok(Ok(Value::String(email)))
}

/// `_is_domain` for ASCII text.
fn is_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    let last = labels[labels.len() - 1];
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
        return false;
    }
    if last.bytes().all(|c| c.is_ascii_digit()) {
        return false;
    }
    domain
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        && domain.bytes().any(|c| c.is_ascii_alphanumeric())
}

/// What `urllib.parse.urlsplit` makes of an ASCII URL without whitespace or controls:
/// `(scheme, hostname, port is valid, has userinfo)`. `Unhandled` for brackets
/// (IPv6 literals) and `%` in the host, which this does not follow.
fn split_url(url: &str) -> R<(String, Option<String>, bool, bool)> {
    if url.bytes().any(|c| !(0x21..=0x7e).contains(&c)) {
        return Err(Unhandled);
    }
    let mut scheme = String::new();
    let mut rest = url;
    if let Some(i) = url.find(':') {
        let head = &url[..i];
        if i > 0
            && url.as_bytes()[0].is_ascii_alphabetic()
            && head
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
        {
            scheme = head.to_ascii_lowercase();
            rest = &url[i + 1..];
        }
    }
    let Some(after) = rest.strip_prefix("//") else {
        return Ok((scheme, None, true, false));
    };
    let netloc = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
    if netloc.contains(['[', ']']) {
        return Err(Unhandled);
    }
    let (userinfo, hostinfo) = match netloc.rfind('@') {
        Some(i) => (true, &netloc[i + 1..]),
        None => (false, netloc),
    };
    let (host, port) = hostinfo.split_once(':').unwrap_or((hostinfo, ""));
    if host.contains('%') {
        return Err(Unhandled);
    }
    let port_ok = port.is_empty()
        || (port.bytes().all(|c| c.is_ascii_digit())
            && port.trim_start_matches('0').len() <= 5
            && port.parse::<u32>().is_ok_and(|p| p <= 65_535));
    let hostname = (!host.is_empty()).then(|| host.to_ascii_lowercase());
    Ok((scheme, hostname, port_ok, userinfo))
}

fn is_http_url(url: &str) -> R<bool> {
    if url.is_empty() || url.contains(py_space) {
        return Ok(false);
    }
    let (scheme, hostname, port_ok, _) = split_url(url)?;
    Ok(port_ok && (scheme == "http" || scheme == "https") && hostname.is_some())
}

fn website(value: &Value) -> Norm {
    let Value::String(s) = value else {
        return Ok(Err(INVALID_TYPE));
    };
    let url = ascii_trimmed(s)?;
    let good = if url.contains("://") {
        is_http_url(url)?
    } else if url.is_empty() || url.contains(py_space) {
        false
    } else {
        let (_, hostname, port_ok, userinfo) = split_url(&format!("http://{url}"))?;
        port_ok && !userinfo && hostname.is_some_and(|h| is_domain(&h))
    };
    Ok(if good {
        Ok(Value::String(url.to_owned()))
    } else {
        Err(INVALID_URL)
    })
}

fn avatar(value: &Value) -> Norm {
    let Value::String(s) = value else {
        return Ok(Err(INVALID_TYPE));
    };
    let url = ascii_trimmed(s)?;
    Ok(if is_http_url(url)? {
        Ok(Value::String(url.to_owned()))
    } else {
        Err(INVALID_URL)
    })
}

fn count(number: i128) -> Result<Value, &'static str> {
    if (0..=i128::from(MAX_EMPLOYEES)).contains(&number) {
        Ok(Value::from(number as u64))
    } else {
        Err(INVALID_EMPLOYEES)
    }
}

fn count_text(digits: &str) -> Result<Value, &'static str> {
    let significant = digits.trim_start_matches('0');
    if significant.len() > MAX_EMPLOYEES_DIGITS {
        return Err(INVALID_EMPLOYEES);
    }
    count(significant.parse::<i128>().unwrap_or(0))
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

/// `_GROUPED_INTEGER` (ASCII separators only): `[0-9]{1,3}(?:[, ][0-9]{3})+`.
fn grouped(s: &str) -> bool {
    let groups: Vec<&str> = s.split([',', ' ']).collect();
    groups.len() >= 2
        && (1..=3).contains(&groups[0].len())
        && all_digits(groups[0])
        && groups[1..].iter().all(|g| g.len() == 3 && all_digits(g))
}

fn is_number(text: &str) -> bool {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if !fraction.is_empty() && !all_digits(fraction) {
        return false;
    }
    all_digits(whole) || grouped(whole)
}

fn employees(value: &Value) -> Norm {
    match value {
        Value::String(s) => {
            let text = ascii_trimmed(s)?;
            Ok(if all_digits(text) {
                count_text(text)
            } else if grouped(text) {
                count_text(&text.replace([',', ' '], ""))
            } else if text.is_empty()
                || (text.starts_with('-') && is_number(py_strip_start(&text[1..])))
            {
                Err(INVALID_EMPLOYEES)
            } else {
                Ok(Value::String(text.to_owned()))
            })
        }
        Value::Number(n) => Ok(count(integer(n)?)),
        _ => Ok(Err(INVALID_TYPE)),
    }
}

fn py_strip_start(s: &str) -> &str {
    s.trim_start_matches(py_space)
}

fn phone_number(value: &Value, phone: &mut dyn FnMut(&str) -> R<String>) -> Norm {
    let text = match value {
        Value::String(s) => py_strip(s).to_owned(),
        Value::Number(n) => integer(n)?.to_string(),
        _ => return Ok(Err(INVALID_TYPE)),
    };
    Ok(Ok(Value::String(phone(&text)?)))
}

fn address(value: &Value, key: &str, warnings: &mut Vec<Warning>) -> Norm {
    let Value::Object(fields) = value else {
        return Ok(Err(INVALID_TYPE));
    };
    let mut out = Map::new();
    let mut claimed: Vec<&'static str> = Vec::new();
    for (sub, item) in fields {
        let Some(name) = address_field(sub) else {
            out.insert(sub.clone(), item.clone());
            continue;
        };
        if sub != name {
            if fields.contains_key(name) || claimed.contains(&name) {
                warnings.push(warning(DUPLICATE_TRAIT, format!("{key}.{sub}"), item));
                continue;
            }
            claimed.push(name);
        }
        if item.is_null() {
            out.insert(name.to_owned(), Value::Null);
            continue;
        }
        match text(item)? {
            Ok(v) => {
                out.insert(name.to_owned(), v);
            }
            Err(code) => warnings.push(warning(code, format!("{key}.{sub}"), item)),
        }
    }
    Ok(Ok(Value::Object(out)))
}
