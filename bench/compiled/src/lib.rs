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

// Many small, short-lived allocations per call (one per JSON string and map): glibc's
// malloc took a quarter of the prototype's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod json;
mod normalise;
mod state;
mod times;

use json::{Field, Ordered};
use normalise::{normalise_traits, Warning};
use serde_json::value::RawValue;
use state::{encode_state, merge_call, merge_membership, read_state, Stamp};

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
/// without its group snapshot (members the call does not change keep their input text).
struct Prepared<'a> {
    group_id: String,
    message_id: String,
    member_kind: &'static str,
    member_id: String,
    event_ms: i64,
    traits: Map<String, Value>,
    call: Ordered<Field<'a>>,
}

enum Step<'a> {
    Group(Prepared<'a>),
    Skipped,
}

/// `worker.pipeline._identifier`: strings as sent unless blank, integers as text.
fn identifier(value: Option<Value>) -> R<Option<String>> {
    match value {
        Some(Value::String(s)) => Ok((!times::py_strip(&s).is_empty()).then_some(s)),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Ok(Some(i.to_string())),
            (_, Some(u)) => Ok(Some(u.to_string())),
            _ => Err(Unhandled), // a float: repr() rules
        },
        _ => Ok(None),
    }
}

/// The members the enriched call replaces whatever they held: never copied.
const REPLACED: [&str; 7] = [
    "type",
    "groupId",
    "messageId",
    "traits",
    "timestamp",
    "enrichment",
    "group",
];

/// Decode, validate, normalise (process_record + _enrich for one non-batch record).
fn prepare<'a>(
    raw: &'a [u8],
    topic: &str,
    partition: i64,
    offset: i64,
    phone: &mut dyn FnMut(&str) -> R<String>,
) -> R<Step<'a>> {
    if raw.is_empty() || raw.len() > MAX_EVENT_BYTES {
        return Err(Unhandled); // a dead letter
    }
    let top: Ordered<&RawValue> = serde_json::from_slice(raw).map_err(|_| Unhandled)?;
    let member = |key: &str| -> R<Option<Value>> {
        top.get(key)
            .map(|raw| serde_json::from_str(raw.get()).map_err(|_| Unhandled))
            .transpose()
    };
    if top.get("batch").is_some() && top.get("type").is_none() {
        return Err(Unhandled);
    }
    let call_type = match member("type")? {
        Some(Value::String(t)) if t.is_ascii() => times::py_strip(&t).to_ascii_lowercase(),
        _ => return Err(Unhandled),
    };
    if call_type.is_empty() {
        return Err(Unhandled);
    }
    if call_type != "group" {
        return Ok(Step::Skipped);
    }
    let group_id = identifier(member("groupId")?)?.ok_or(Unhandled)?;
    let user_id = identifier(member("userId")?)?;
    let anonymous_id = identifier(member("anonymousId")?)?;
    let traits = match member("traits")? {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(t)) if !t.values().any(json::has_float) => t,
        Some(_) => return Err(Unhandled),
    };
    let message_id = match member("messageId")? {
        // A blank or missing messageId is derived (blake2b of the sorted call): left out.
        Some(Value::String(m))
            if !times::py_strip(&m).is_empty() && m.chars().count() <= MAX_MESSAGE_ID =>
        {
            m
        }
        _ => return Err(Unhandled),
    };
    let (traits, warnings) = normalise_traits(&traits, phone)?;
    // event_time: only a valid `timestamp` is handled; the fallbacks stay in Python.
    let event_ms = match member("timestamp")? {
        Some(Value::String(t)) => times::parse_iso(&t)?,
        _ => return Err(Unhandled),
    };
    let (member_kind, member_id) = match (&user_id, &anonymous_id) {
        (Some(u), _) => ("userId", u.clone()),
        (None, Some(a)) => ("anonymousId", a.clone()),
        (None, None) => return Err(Unhandled), // missing_identity
    };
    let mut call = Ordered(Vec::with_capacity(top.0.len() + 2));
    for (key, raw) in top.0 {
        let field = if REPLACED.contains(&key.as_str()) {
            Field::Raw(raw) // about to be replaced
        } else {
            Field::canonical(raw)?
        };
        call.0.push((key, field));
    }
    let text = |s: &str| Field::Value(Value::String(s.to_owned()));
    call.set("type", text("group"));
    call.set("groupId", text(&group_id));
    call.set("messageId", text(&message_id));
    call.set("traits", Field::Value(Value::Null)); // the traits go in last, after the merge
    call.set("timestamp", text(&times::format_time(event_ms)));
    call.set(
        "enrichment",
        Field::Value(enrichment(warnings, topic, partition, offset)),
    );
    if let Some(u) = &user_id {
        call.set("userId", text(u));
    }
    if let Some(a) = &anonymous_id {
        call.set("anonymousId", text(a));
    }
    let call = call;
    Ok(Step::Group(Prepared {
        group_id,
        message_id,
        member_kind,
        member_id,
        event_ms,
        traits,
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
fn merge(p: Prepared, state: Option<&[u8]>, member: Option<&[u8]>, now_ms: i64) -> R<Merged> {
    let current = state.map(read_state).transpose()?;
    let Prepared {
        group_id,
        message_id,
        member_kind,
        member_id,
        event_ms,
        traits,
        mut call,
    } = p;
    let stamp: Stamp = (event_ms, message_id);
    let merged = merge_call(current, &group_id, &stamp, &traits, member.is_none())?;
    let moved = merge_membership(member, &group_id, member_kind, &member_id, event_ms)?;
    let (group, state) = encode_state(&merged, now_ms);
    call.set("traits", Field::Value(Value::Object(traits)));
    call.set("group", Field::Encoded(group));
    let mut enriched = Vec::with_capacity(4096);
    json::write_fields(&mut enriched, &call.0);
    Ok(Merged {
        enriched,
        state,
        member: moved,
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
        let bytes_of = |v: &Option<Bound<'py, PyAny>>| -> PyResult<Option<Bound<'py, PyBytes>>> {
            v.as_ref()
                .map(|b| Ok(b.cast::<PyBytes>()?.clone()))
                .transpose()
        };
        let (state, member) = (bytes_of(&state)?, bytes_of(&member)?);
        let (group_id, message_id) = (prepared.group_id.clone(), prepared.message_id.clone());
        let (state, member) = (
            state.as_ref().map(|b| b.as_bytes()),
            member.as_ref().map(|b| b.as_bytes()),
        );
        let Ok(merged) = merge(prepared, state, member, now_ms) else {
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
