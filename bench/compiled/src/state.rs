//! `worker/state.py`'s `merge_call` and state record (format 2), and `worker/members.py`'s
//! membership record, over JSON bytes. The group bound (`GroupBound`) is left out.

use serde_json::{json, Map, Value};

use crate::times::{format_time, parse_iso};
use crate::{Unhandled, R};

/// `(event_ms, message_id)` of the call that wrote a register.
pub type Stamp = (i64, String);

#[derive(Default)]
pub struct Address {
    pub null: Option<Stamp>,
    pub object: Option<Stamp>,
    pub fields: Vec<(String, Stamp)>,
}

pub struct GroupState {
    pub group_id: String,
    pub traits: Map<String, Value>,
    pub stamps: Map<String, Value>, // trait -> [ms, mid], kept as JSON: written back as read
    pub address: Option<Address>,
    pub member_count: u64,
    pub event_count: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

fn stamp_of(value: &Value) -> R<Stamp> {
    match value {
        Value::Array(pair) if pair.len() == 2 => Ok((
            pair[0].as_i64().ok_or(Unhandled)?,
            pair[1].as_str().ok_or(Unhandled)?.to_owned(),
        )),
        _ => Err(Unhandled),
    }
}

fn stamp_json(stamp: &Stamp) -> Value {
    json!([stamp.0, stamp.1])
}

fn time_of(record: &Map<String, Value>, key: &str) -> R<i64> {
    parse_iso(record.get(key).and_then(Value::as_str).ok_or(Unhandled)?)
}

fn take_object(record: &mut Map<String, Value>, key: &str) -> R<Map<String, Value>> {
    match record.get_mut(key).map(Value::take) {
        Some(Value::Object(map)) => Ok(map),
        _ => Err(Unhandled),
    }
}

/// Read a state record this prototype or the worker wrote; `Unhandled` for anything else
/// (format 1, a malformed record): `state_from_record` decides those.
pub fn read_state(bytes: &[u8]) -> R<GroupState> {
    let Value::Object(mut record) = serde_json::from_slice(bytes).map_err(|_| Unhandled)? else {
        return Err(Unhandled);
    };
    let mut merge = take_object(&mut record, "merge")?;
    if merge.get("format").and_then(Value::as_i64) != Some(2) {
        return Err(Unhandled);
    }
    let address = match merge.get("address") {
        None => None,
        Some(Value::Object(raw)) => {
            let fields = match raw.get("fields") {
                Some(Value::Object(f)) => f
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), stamp_of(v)?)))
                    .collect::<R<_>>()?,
                _ => return Err(Unhandled),
            };
            Some(Address {
                null: raw.get("null").map(stamp_of).transpose()?,
                object: raw.get("object").map(stamp_of).transpose()?,
                fields,
            })
        }
        Some(_) => return Err(Unhandled),
    };
    Ok(GroupState {
        group_id: record
            .get("groupId")
            .and_then(Value::as_str)
            .ok_or(Unhandled)?
            .to_owned(),
        traits: take_object(&mut record, "traits")?,
        stamps: take_object(&mut merge, "stamps")?,
        address,
        member_count: record
            .get("memberCount")
            .and_then(Value::as_u64)
            .ok_or(Unhandled)?,
        event_count: record
            .get("eventCount")
            .and_then(Value::as_u64)
            .ok_or(Unhandled)?,
        first_seen_ms: time_of(&record, "firstSeenAt")?,
        last_seen_ms: time_of(&record, "lastSeenAt")?,
    })
}

/// `merge_call` without a bound: `state` is `None` for a group never seen.
pub fn merge_call(
    state: Option<GroupState>,
    group_id: &str,
    stamp: &Stamp,
    traits: &Map<String, Value>,
    new_member: bool,
) -> R<GroupState> {
    let mut state = match state {
        Some(s) if s.group_id != group_id => return Err(Unhandled),
        Some(s) => GroupState {
            first_seen_ms: s.first_seen_ms.min(stamp.0),
            last_seen_ms: s.last_seen_ms.max(stamp.0),
            ..s
        },
        None => GroupState {
            group_id: group_id.to_owned(),
            traits: Map::new(),
            stamps: Map::new(),
            address: None,
            member_count: 0,
            event_count: 0,
            first_seen_ms: stamp.0,
            last_seen_ms: stamp.0,
        },
    };
    for (name, value) in traits {
        if name == "address" {
            merge_address(&mut state, value, stamp)?;
            continue;
        }
        if let Some(old) = state.stamps.get(name) {
            if *stamp <= stamp_of(old)? {
                continue;
            }
        }
        state.traits.insert(name.clone(), value.clone());
        state.stamps.insert(name.clone(), stamp_json(stamp));
    }
    state.member_count += u64::from(new_member);
    state.event_count += 1;
    Ok(state)
}

/// `_merge_address`: one `address` write into the registers and the shown address.
fn merge_address(state: &mut GroupState, value: &Value, stamp: &Stamp) -> R<()> {
    let regs = state.address.get_or_insert_with(Address::default);
    if regs.null.as_ref().is_some_and(|null| stamp <= null) {
        return Ok(());
    }
    match value {
        Value::Null => {
            if regs.object.as_ref().is_none_or(|obj| stamp > obj) {
                state.traits.insert("address".to_owned(), Value::Null);
                *regs = Address {
                    null: Some(stamp.clone()),
                    object: None,
                    fields: Vec::new(),
                };
                return Ok(());
            }
            regs.fields.retain(|(_, s)| s > stamp);
            let shown = state.traits.get("address").and_then(Value::as_object);
            let kept: Map<String, Value> = regs
                .fields
                .iter()
                .map(|(k, _)| {
                    Ok((
                        k.clone(),
                        shown.and_then(|m| m.get(k)).ok_or(Unhandled)?.clone(),
                    ))
                })
                .collect::<R<_>>()?;
            state
                .traits
                .insert("address".to_owned(), Value::Object(kept));
            regs.null = Some(stamp.clone());
        }
        Value::Object(items) => {
            let mut out = match state.traits.get("address") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            };
            for (key, item) in items {
                match regs.fields.iter_mut().find(|(k, _)| k == key) {
                    Some((_, old)) if stamp > old => *old = stamp.clone(),
                    Some(_) => continue,
                    None => regs.fields.push((key.clone(), stamp.clone())),
                }
                out.insert(key.clone(), item.clone());
            }
            state
                .traits
                .insert("address".to_owned(), Value::Object(out));
            if regs.object.as_ref().is_none_or(|obj| stamp > obj) {
                regs.object = Some(stamp.clone());
            }
        }
        _ => return Err(Unhandled),
    }
    Ok(())
}

/// The `group` object of an enriched call (`group_snapshot`).
pub fn snapshot(state: &GroupState) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), Value::String(state.group_id.clone()));
    out.insert("traits".into(), Value::Object(state.traits.clone()));
    out.insert("memberCount".into(), state.member_count.into());
    out.insert("eventCount".into(), state.event_count.into());
    out.insert(
        "firstSeenAt".into(),
        format_time(state.first_seen_ms).into(),
    );
    out.insert("lastSeenAt".into(), format_time(state.last_seen_ms).into());
    Value::Object(out)
}

/// The state-topic record (`state_record`), consuming the state.
pub fn state_record(state: GroupState, updated_ms: i64) -> Value {
    let mut merge = Map::new();
    merge.insert("format".into(), 2.into());
    merge.insert("stamps".into(), Value::Object(state.stamps));
    if let Some(regs) = state.address {
        let mut address = Map::new();
        if let Some(null) = &regs.null {
            address.insert("null".into(), stamp_json(null));
        }
        if let Some(obj) = &regs.object {
            address.insert("object".into(), stamp_json(obj));
        }
        let fields = regs
            .fields
            .iter()
            .map(|(k, s)| (k.clone(), stamp_json(s)))
            .collect();
        address.insert("fields".into(), Value::Object(fields));
        merge.insert("address".into(), Value::Object(address));
    }
    let mut out = Map::new();
    out.insert("groupId".into(), Value::String(state.group_id));
    out.insert("traits".into(), Value::Object(state.traits));
    out.insert("memberCount".into(), state.member_count.into());
    out.insert("eventCount".into(), state.event_count.into());
    out.insert(
        "firstSeenAt".into(),
        format_time(state.first_seen_ms).into(),
    );
    out.insert("lastSeenAt".into(), format_time(state.last_seen_ms).into());
    out.insert("updatedAt".into(), format_time(updated_ms).into());
    out.insert("merge".into(), Value::Object(merge));
    Value::Object(out)
}

/// `merge_membership` then `membership_record`: the new record, or `None` when nothing
/// moved. `current` is the stored record of the call's member in its group.
pub fn merge_membership(
    current: Option<&[u8]>,
    group_id: &str,
    kind: &str,
    member_id: &str,
    event_ms: i64,
) -> R<Option<Value>> {
    let (first, last) = match current {
        None => (event_ms, event_ms),
        Some(bytes) => {
            let Value::Object(record) = serde_json::from_slice(bytes).map_err(|_| Unhandled)?
            else {
                return Err(Unhandled);
            };
            let (first, last) = (
                time_of(&record, "firstSeenAt")?,
                time_of(&record, "lastSeenAt")?,
            );
            if first <= event_ms && event_ms <= last {
                return Ok(None);
            }
            (first.min(event_ms), last.max(event_ms))
        }
    };
    let mut out = Map::new();
    out.insert("groupId".into(), group_id.into());
    out.insert(kind.into(), member_id.into());
    out.insert("firstSeenAt".into(), format_time(first).into());
    out.insert("lastSeenAt".into(), format_time(last).into());
    Ok(Some(Value::Object(out)))
}
