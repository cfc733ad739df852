//! A prototype, for measurement only: the per-call work of group-worker's keyed stage
//! (`worker.pipeline.process_record` for one group call, then `Processor._merge` and the
//! encoding of its outputs) as one compiled call over bytes.
//!
//! `Core.process` is the thin edge: it reads and writes the Python dicts that stand in
//! for the store (state and membership records as bytes, applied ids as arrival times).
//! Everything between is pure Rust over `serde_json` values. Any call outside the
//! handled subset returns `FALLBACK` before anything is written, and the caller runs
//! the Python path for it.

use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use serde_json::{Map, Value};

mod normalise;
mod state;
mod times;

use normalise::{normalise_traits, Warning};
use state::{merge_call, merge_membership, read_state, snapshot, state_record, Stamp};

/// Not handled here: the call goes to the Python path, which decides it.
pub struct Unhandled;
pub type R<T> = Result<T, Unhandled>;

const MAX_EVENT_BYTES: usize = 32_768; // worker.pipeline.Settings defaults
const MAX_MESSAGE_ID: usize = 100;
const PHONE_MEMO: usize = 16_384;

const ENRICHED: u8 = 0;
const DUPLICATE: u8 = 1;
const SKIPPED: u8 = 2;
const FALLBACK: u8 = 3;

/// A valid group call, normalised: everything the merge needs, and the enriched call
/// without its group snapshot.
struct Prepared {
    group_id: String,
    message_id: String,
    member_kind: &'static str,
    member_id: String,
    event_ms: i64,
    call: Map<String, Value>,
}

enum Step {
    Group(Prepared),
    Skipped,
}

/// `worker.pipeline._identifier`: strings as sent unless blank, integers as text.
fn identifier(value: Option<&Value>) -> R<Option<String>> {
    match value {
        Some(Value::String(s)) => Ok((!times::py_strip(s).is_empty()).then(|| s.clone())),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Ok(Some(i.to_string())),
            (_, Some(u)) => Ok(Some(u.to_string())),
            _ => Err(Unhandled), // a float: repr() rules
        },
        _ => Ok(None),
    }
}

/// Whether the document holds a number serde_json read as a float: orjson and
/// serde_json format floats differently, and serde_json reads integers beyond 64 bits
/// (which orjson refuses) as floats.
fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// Decode, validate, normalise (process_record + _enrich for one non-batch record).
fn prepare(
    raw: &[u8],
    topic: &str,
    partition: i64,
    offset: i64,
    phone: &mut dyn FnMut(&str) -> R<String>,
) -> R<Step> {
    if raw.is_empty() || raw.len() > MAX_EVENT_BYTES {
        return Err(Unhandled); // a dead letter
    }
    let Value::Object(mut call) = serde_json::from_slice(raw).map_err(|_| Unhandled)? else {
        return Err(Unhandled);
    };
    if call.contains_key("batch") && !call.contains_key("type") {
        return Err(Unhandled);
    }
    let call_type = match call.get("type") {
        Some(Value::String(t)) if t.is_ascii() => times::py_strip(t).to_ascii_lowercase(),
        _ => return Err(Unhandled),
    };
    if call_type.is_empty() {
        return Err(Unhandled);
    }
    if call_type != "group" {
        return Ok(Step::Skipped);
    }
    if call.values().any(has_float) {
        return Err(Unhandled);
    }
    let group_id = identifier(call.get("groupId"))?.ok_or(Unhandled)?;
    let user_id = identifier(call.get("userId"))?;
    let anonymous_id = identifier(call.get("anonymousId"))?;
    let traits = match call.get("traits") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(t)) => t.clone(),
        Some(_) => return Err(Unhandled),
    };
    let message_id = match call.get("messageId") {
        // A blank or missing messageId is derived (blake2b of the sorted call): left out.
        Some(Value::String(m))
            if !times::py_strip(m).is_empty() && m.chars().count() <= MAX_MESSAGE_ID =>
        {
            m.clone()
        }
        _ => return Err(Unhandled),
    };
    let (traits, warnings) = normalise_traits(&traits, phone)?;
    // event_time: only a valid `timestamp` is handled; the fallbacks stay in Python.
    let event_ms = times::parse_iso(
        call.get("timestamp")
            .and_then(Value::as_str)
            .ok_or(Unhandled)?,
    )?;
    let (member_kind, member_id) = match (&user_id, &anonymous_id) {
        (Some(u), _) => ("userId", u.clone()),
        (None, Some(a)) => ("anonymousId", a.clone()),
        (None, None) => return Err(Unhandled), // missing_identity
    };
    call.insert("type".into(), "group".into());
    call.insert("groupId".into(), group_id.clone().into());
    call.insert("messageId".into(), message_id.clone().into());
    call.insert("traits".into(), Value::Object(traits));
    call.insert("timestamp".into(), times::format_time(event_ms).into());
    call.insert(
        "enrichment".into(),
        enrichment(warnings, topic, partition, offset),
    );
    if let Some(u) = user_id {
        call.insert("userId".into(), u.into());
    }
    if let Some(a) = anonymous_id {
        call.insert("anonymousId".into(), a.into());
    }
    Ok(Step::Group(Prepared {
        group_id,
        message_id,
        member_kind,
        member_id,
        event_ms,
        call,
    }))
}

fn enrichment(warnings: Vec<Warning>, topic: &str, partition: i64, offset: i64) -> Value {
    let warnings: Vec<Value> = warnings
        .into_iter()
        .map(|w| {
            let mut m = Map::new();
            m.insert("code".into(), w.code.into());
            m.insert("trait".into(), w.trait_.into());
            m.insert("value".into(), w.value);
            Value::Object(m)
        })
        .collect();
    let mut source = Map::new();
    source.insert("topic".into(), topic.into());
    source.insert("partition".into(), partition.into());
    source.insert("offset".into(), offset.into());
    let mut out = Map::new();
    out.insert("warnings".into(), Value::Array(warnings));
    out.insert("source".into(), Value::Object(source));
    Value::Object(out)
}

/// What one applied call writes: the enriched call, the new state record, and the new
/// membership record when the member's first or last seen moved.
struct Merged {
    enriched: Vec<u8>,
    state: Vec<u8>,
    member: Option<Vec<u8>>,
}

/// `Processor._merge` after the dedupe check, and the encoding of every output.
fn merge(mut p: Prepared, state: Option<&[u8]>, member: Option<&[u8]>, now_ms: i64) -> R<Merged> {
    let current = state.map(read_state).transpose()?;
    let stamp: Stamp = (p.event_ms, p.message_id);
    let traits = p
        .call
        .get("traits")
        .and_then(Value::as_object)
        .ok_or(Unhandled)?;
    let merged = merge_call(current, &p.group_id, &stamp, traits, member.is_none())?;
    let moved = merge_membership(member, &p.group_id, p.member_kind, &p.member_id, p.event_ms)?;
    p.call.insert("group".into(), snapshot(&merged));
    let encode = |v: &Value| serde_json::to_vec(v).map_err(|_| Unhandled);
    Ok(Merged {
        enriched: encode(&Value::Object(p.call))?,
        state: encode(&state_record(merged, now_ms))?,
        member: moved.as_ref().map(encode).transpose()?,
    })
}

/// What `Core.process` returns: an outcome code, and the enriched record's key and value.
type Processed<'py> = (u8, Option<Bound<'py, PyBytes>>, Option<Bound<'py, PyBytes>>);

/// One input partition's stage, over dicts standing in for its store.
///
/// `states` maps groupId to state record bytes, `members` the membership key to
/// membership record bytes, `seen` `(groupId, messageId)` to arrival ms. Each write is
/// also put in the store's change set, which the caller produces and clears at each
/// commit: `changed_states` and `changed_members` by key, `changed_seen` by dedupe-topic
/// key (`["<groupId>","<messageId>"]`) to arrival ms. `phone` is Python's normaliser for one
/// phone number (text in, text out), remembered here.
#[pyclass(unsendable)]
struct Core {
    topic: String,
    window_ms: i64,
    phone: Py<PyAny>,
    phones: HashMap<String, String>,
    states: Py<PyDict>,
    members: Py<PyDict>,
    seen: Py<PyDict>,
    changed_states: Py<PyDict>,
    changed_members: Py<PyDict>,
    changed_seen: Py<PyDict>,
}

#[pymethods]
impl Core {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        topic: String,
        window_ms: i64,
        phone: Py<PyAny>,
        states: Py<PyDict>,
        members: Py<PyDict>,
        seen: Py<PyDict>,
        changed_states: Py<PyDict>,
        changed_members: Py<PyDict>,
        changed_seen: Py<PyDict>,
    ) -> Self {
        let phones = HashMap::new();
        Core {
            topic,
            window_ms,
            phone,
            phones,
            states,
            members,
            seen,
            changed_states,
            changed_members,
            changed_seen,
        }
    }

    /// Process one record's value: `(ENRICHED, groupId, enriched call)` as the enriched
    /// record's key and value, `(DUPLICATE, None, None)`, `(SKIPPED, None, None)`, or
    /// `(FALLBACK, None, None)` with nothing written.
    fn process<'py>(
        &mut self,
        py: Python<'py>,
        value: &[u8],
        partition: i64,
        offset: i64,
        arrival_ms: i64,
        now_ms: i64,
    ) -> PyResult<Processed<'py>> {
        let (phone, phones) = (&self.phone, &mut self.phones);
        let mut lookup = |text: &str| -> R<String> {
            if let Some(hit) = phones.get(text) {
                return Ok(hit.clone());
            }
            let out: String = phone
                .call1(py, (text,))
                .and_then(|v| v.extract(py))
                .map_err(|_| Unhandled)?;
            if phones.len() >= PHONE_MEMO {
                phones.clear();
            }
            phones.insert(text.to_owned(), out.clone());
            Ok(out)
        };
        let prepared = match prepare(value, &self.topic, partition, offset, &mut lookup) {
            Ok(Step::Group(p)) => p,
            Ok(Step::Skipped) => return Ok((SKIPPED, None, None)),
            Err(Unhandled) => return Ok((FALLBACK, None, None)),
        };
        let seen_key = PyTuple::new(py, [&prepared.group_id, &prepared.message_id])?;
        let seen = self.seen.bind(py);
        if let Some(applied) = seen.get_item(&seen_key)? {
            if (arrival_ms - applied.extract::<i64>()?).abs() < self.window_ms {
                return Ok((DUPLICATE, None, None));
            }
        }
        let member_key = serde_json::to_string(&[
            prepared.group_id.as_str(),
            prepared.member_kind,
            prepared.member_id.as_str(),
        ])
        .expect("strings encode");
        let states = self.states.bind(py);
        let members = self.members.bind(py);
        let state = states.get_item(&prepared.group_id)?;
        let member = members.get_item(&member_key)?;
        let as_bytes = |v: &Option<Bound<'py, PyAny>>| -> PyResult<Option<Vec<u8>>> {
            v.as_ref()
                .map(|b| Ok(b.cast::<PyBytes>()?.as_bytes().to_vec()))
                .transpose()
        };
        let (state, member) = (as_bytes(&state)?, as_bytes(&member)?);
        let (group_id, message_id) = (prepared.group_id.clone(), prepared.message_id.clone());
        let Ok(merged) = merge(prepared, state.as_deref(), member.as_deref(), now_ms) else {
            return Ok((FALLBACK, None, None));
        };
        let state = PyBytes::new(py, &merged.state);
        states.set_item(&group_id, &state)?;
        self.changed_states.bind(py).set_item(&group_id, &state)?;
        seen.set_item(seen_key, arrival_ms)?;
        let dedupe_key = serde_json::to_string(&[&group_id, &message_id]).expect("strings encode");
        self.changed_seen
            .bind(py)
            .set_item(dedupe_key, arrival_ms)?;
        if let Some(record) = merged.member {
            let record = PyBytes::new(py, &record);
            members.set_item(&member_key, &record)?;
            self.changed_members
                .bind(py)
                .set_item(&member_key, &record)?;
        }
        let key = PyBytes::new(py, group_id.as_bytes());
        Ok((
            ENRICHED,
            Some(key),
            Some(PyBytes::new(py, &merged.enriched)),
        ))
    }
}

#[pymodule]
fn group_worker_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Core>()?;
    m.add("ENRICHED", ENRICHED)?;
    m.add("DUPLICATE", DUPLICATE)?;
    m.add("SKIPPED", SKIPPED)?;
    m.add("FALLBACK", FALLBACK)?;
    Ok(())
}
