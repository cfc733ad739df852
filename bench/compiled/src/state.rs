//! `worker/state.py`'s `merge_call` and state record (format 2), and `worker/members.py`'s
//! membership record, over JSON bytes. The group bound (`GroupBound`) is left out.
//!
//! A stored trait value is never looked at (but `address`): it is copied from the old
//! record's text to the new one.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::json::{write, write_fields, Field, Ordered};
use crate::times::{format_time, parse_iso};
use crate::{Unhandled, R};

/// `(event_ms, message_id)` of the call that wrote a register.
pub type Stamp = (i64, String);

#[derive(Default, Deserialize)]
pub struct Address {
    null: Option<Stamp>,
    object: Option<Stamp>,
    fields: Ordered<Stamp>,
}

#[derive(Deserialize)]
struct MergeIn {
    format: Option<i64>,
    stamps: Ordered<Stamp>,
    address: Option<Address>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordIn<'a> {
    group_id: String,
    #[serde(borrow)]
    traits: Ordered<&'a RawValue>,
    member_count: u64,
    event_count: u64,
    first_seen_at: String,
    last_seen_at: String,
    merge: MergeIn,
}

pub struct GroupState<'a> {
    pub group_id: String,
    pub traits: Ordered<Field<'a>>,
    stamps: Ordered<Stamp>,
    address: Option<Address>,
    pub member_count: u64,
    pub event_count: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// Read a state record this prototype or the worker wrote; `Unhandled` for anything else
/// (format 1, a malformed record): `state_from_record` decides those.
pub fn read_state(bytes: &[u8]) -> R<GroupState<'_>> {
    let record: RecordIn = serde_json::from_slice(bytes).map_err(|_| Unhandled)?;
    if record.merge.format != Some(2) {
        return Err(Unhandled);
    }
    Ok(GroupState {
        group_id: record.group_id,
        traits: Ordered(
            record
                .traits
                .0
                .into_iter()
                .map(|(k, v)| (k, Field::Raw(v)))
                .collect(),
        ),
        stamps: record.merge.stamps,
        address: record.merge.address,
        member_count: record.member_count,
        event_count: record.event_count,
        first_seen_ms: parse_iso(&record.first_seen_at)?,
        last_seen_ms: parse_iso(&record.last_seen_at)?,
    })
}

/// `merge_call` without a bound: `state` is `None` for a group never seen.
pub fn merge_call<'a>(
    state: Option<GroupState<'a>>,
    group_id: &str,
    stamp: &Stamp,
    traits: &Map<String, Value>,
    new_member: bool,
) -> R<GroupState<'a>> {
    let mut state = match state {
        Some(s) if s.group_id != group_id => return Err(Unhandled),
        Some(s) => GroupState {
            first_seen_ms: s.first_seen_ms.min(stamp.0),
            last_seen_ms: s.last_seen_ms.max(stamp.0),
            ..s
        },
        None => GroupState {
            group_id: group_id.to_owned(),
            traits: Ordered(Vec::new()),
            stamps: Ordered(Vec::new()),
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
        match state.stamps.get_mut(name) {
            Some(old) if stamp <= old => continue,
            Some(old) => *old = stamp.clone(),
            None => state.stamps.0.push((name.clone(), stamp.clone())),
        }
        state.traits.set(name, Field::Value(value.clone()));
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
    let shown = match state.traits.get("address") {
        Some(field) => field.value()?,
        None => Value::Null,
    };
    match value {
        Value::Null => {
            if regs.object.as_ref().is_none_or(|obj| stamp > obj) {
                state.traits.set("address", Field::Value(Value::Null));
                *regs = Address {
                    null: Some(stamp.clone()),
                    ..Address::default()
                };
                return Ok(());
            }
            regs.fields.0.retain(|(_, s)| s > stamp);
            let kept: Map<String, Value> = regs
                .fields
                .0
                .iter()
                .map(|(k, _)| Ok((k.clone(), shown.get(k).ok_or(Unhandled)?.clone())))
                .collect::<R<_>>()?;
            state
                .traits
                .set("address", Field::Value(Value::Object(kept)));
            regs.null = Some(stamp.clone());
        }
        Value::Object(items) => {
            let mut out = match shown {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            for (key, item) in items {
                match regs.fields.get_mut(key) {
                    Some(old) if stamp > old => *old = stamp.clone(),
                    Some(_) => continue,
                    None => regs.fields.0.push((key.clone(), stamp.clone())),
                }
                out.insert(key.clone(), item.clone());
            }
            state
                .traits
                .set("address", Field::Value(Value::Object(out)));
            if regs.object.as_ref().is_none_or(|obj| stamp > obj) {
                regs.object = Some(stamp.clone());
            }
        }
        _ => return Err(Unhandled),
    }
    Ok(())
}

fn write_stamps(out: &mut Vec<u8>, stamps: &Ordered<Stamp>) {
    out.push(b'{');
    for (n, (key, (ms, mid))) in stamps.0.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write(out, key.as_str());
        out.extend_from_slice(format!(":[{ms},").as_bytes());
        write(out, mid.as_str());
        out.push(b']');
    }
    out.push(b'}');
}

fn write_stamp(out: &mut Vec<u8>, name: &str, (ms, mid): &Stamp) {
    out.extend_from_slice(format!("\"{name}\":[{ms},").as_bytes());
    write(out, mid.as_str());
    out.extend_from_slice(b"],");
}

/// The `group` object of an enriched call (`group_snapshot`) and the state-topic record
/// (`state_record`), encoded; the traits are encoded once for both.
pub fn encode_state(state: &GroupState, updated_ms: i64) -> (Vec<u8>, Vec<u8>) {
    let mut traits = Vec::with_capacity(1024);
    write_fields(&mut traits, &state.traits.0);
    let counts = format!(
        ",\"memberCount\":{},\"eventCount\":{},\"firstSeenAt\":\"{}\",\"lastSeenAt\":\"{}\"",
        state.member_count,
        state.event_count,
        format_time(state.first_seen_ms),
        format_time(state.last_seen_ms)
    );
    let mut group = Vec::with_capacity(traits.len() + 200);
    group.extend_from_slice(b"{\"id\":");
    write(&mut group, state.group_id.as_str());
    group.extend_from_slice(b",\"traits\":");
    group.extend_from_slice(&traits);
    group.extend_from_slice(counts.as_bytes());
    group.push(b'}');

    let mut record = Vec::with_capacity(2 * traits.len() + 300);
    record.extend_from_slice(b"{\"groupId\":");
    write(&mut record, state.group_id.as_str());
    record.extend_from_slice(b",\"traits\":");
    record.extend_from_slice(&traits);
    record.extend_from_slice(counts.as_bytes());
    record.extend_from_slice(format!(",\"updatedAt\":\"{}\"", format_time(updated_ms)).as_bytes());
    record.extend_from_slice(b",\"merge\":{\"format\":2,\"stamps\":");
    write_stamps(&mut record, &state.stamps);
    if let Some(regs) = &state.address {
        record.extend_from_slice(b",\"address\":{");
        if let Some(null) = &regs.null {
            write_stamp(&mut record, "null", null);
        }
        if let Some(obj) = &regs.object {
            write_stamp(&mut record, "object", obj);
        }
        record.extend_from_slice(b"\"fields\":");
        write_stamps(&mut record, &regs.fields);
        record.push(b'}');
    }
    record.extend_from_slice(b"}}");
    (group, record)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MembershipIn {
    first_seen_at: String,
    last_seen_at: String,
}

/// `merge_membership` then `membership_record`: the new record, or `None` when nothing
/// moved. `current` is the stored record of the call's member in its group.
pub fn merge_membership(
    current: Option<&[u8]>,
    group_id: &str,
    kind: &str,
    member_id: &str,
    event_ms: i64,
) -> R<Option<Vec<u8>>> {
    let (first, last) = match current {
        None => (event_ms, event_ms),
        Some(bytes) => {
            let record: MembershipIn = serde_json::from_slice(bytes).map_err(|_| Unhandled)?;
            let (first, last) = (
                parse_iso(&record.first_seen_at)?,
                parse_iso(&record.last_seen_at)?,
            );
            if first <= event_ms && event_ms <= last {
                return Ok(None);
            }
            (first.min(event_ms), last.max(event_ms))
        }
    };
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(b"{\"groupId\":");
    write(&mut out, group_id);
    out.push(b',');
    write(&mut out, kind);
    out.push(b':');
    write(&mut out, member_id);
    out.extend_from_slice(
        format!(
            ",\"firstSeenAt\":\"{}\",\"lastSeenAt\":\"{}\"}}",
            format_time(first),
            format_time(last)
        )
        .as_bytes(),
    );
    Ok(Some(out))
}
