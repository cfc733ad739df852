//! `worker/state.py`'s `merge_call` and state record (format 3; formats 2 and 3 read),
//! and `worker/members.py`'s membership record, over JSON bytes. The group bound
//! (`GroupBound`) is left out.
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

/// The format written (`worker.profile.FORMAT`).
const FORMAT: i64 = 3;

#[derive(Default)]
pub struct Address {
    null: Option<Stamp>,
    object: Option<Stamp>,
    fields: Ordered<Stamp>,
}

/// `merge.address` as a record holds it: `S` is a stamp (format 2) or an index into
/// `merge.calls` (format 3).
#[derive(Deserialize)]
struct AddressIn<S> {
    null: Option<S>,
    object: Option<S>,
    fields: Ordered<S>,
}

#[derive(Deserialize)]
struct MergeIn<'a> {
    format: Option<i64>,
    #[serde(borrow)]
    stamps: &'a RawValue,
    #[serde(borrow)]
    address: Option<&'a RawValue>,
    calls: Option<Vec<Stamp>>,
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
    #[serde(borrow)]
    merge: MergeIn<'a>,
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

fn parse<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> R<T> {
    serde_json::from_str(raw.get()).map_err(|_| Unhandled)
}

/// `merge.stamps` and `merge.address` with every stamp in place.
fn read_registers(merge: &MergeIn) -> R<(Ordered<Stamp>, Option<Address>)> {
    match (merge.format, &merge.calls) {
        (Some(2), _) => {
            let stamps = parse(merge.stamps)?;
            let address = merge
                .address
                .map(parse::<AddressIn<Stamp>>)
                .transpose()?
                .map(|a| Address {
                    null: a.null,
                    object: a.object,
                    fields: a.fields,
                });
            Ok((stamps, address))
        }
        (Some(FORMAT), Some(calls)) => {
            let at = |i: usize| calls.get(i).cloned().ok_or(Unhandled);
            let resolve = |o: Ordered<usize>| -> R<Ordered<Stamp>> {
                let stamps = o.0.into_iter().map(|(k, i)| Ok((k, at(i)?)));
                Ok(Ordered(stamps.collect::<R<_>>()?))
            };
            let stamps = resolve(parse(merge.stamps)?)?;
            let address = match merge.address {
                None => None,
                Some(raw) => {
                    let a: AddressIn<usize> = parse(raw)?;
                    Some(Address {
                        null: a.null.map(at).transpose()?,
                        object: a.object.map(at).transpose()?,
                        fields: resolve(a.fields)?,
                    })
                }
            };
            Ok((stamps, address))
        }
        _ => Err(Unhandled),
    }
}

/// Read a state record this prototype or the worker wrote (formats 2 and 3); `Unhandled`
/// for anything else (format 1, a malformed record): `state_from_record` decides those.
pub fn read_state(bytes: &[u8]) -> R<GroupState<'_>> {
    let record: RecordIn = serde_json::from_slice(bytes).map_err(|_| Unhandled)?;
    let (stamps, address) = read_registers(&record.merge)?;
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
        stamps,
        address,
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

/// Each distinct stamp once, ascending (tuple order: `String` orders by bytes, which in
/// UTF-8 is the code point order Python compares `str` by).
fn distinct_stamps<'s>(state: &'s GroupState<'_>) -> Vec<&'s Stamp> {
    let mut calls: Vec<&Stamp> = state.stamps.0.iter().map(|(_, s)| s).collect();
    if let Some(regs) = &state.address {
        calls.extend(regs.null.iter().chain(regs.object.iter()));
        calls.extend(regs.fields.0.iter().map(|(_, s)| s));
    }
    calls.sort_unstable();
    calls.dedup();
    calls
}

fn index_of(calls: &[&Stamp], stamp: &Stamp) -> usize {
    calls
        .binary_search(&stamp)
        .expect("every stamp is in calls")
}

fn write_indexes(out: &mut Vec<u8>, stamps: &Ordered<Stamp>, calls: &[&Stamp]) {
    out.push(b'{');
    for (n, (key, stamp)) in stamps.0.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write(out, key.as_str());
        out.extend_from_slice(format!(":{}", index_of(calls, stamp)).as_bytes());
    }
    out.push(b'}');
}

/// `merge` of a state record in format 3: `{"format":3,"stamps":{..},"address":{..},
/// "calls":[..]}`, as orjson writes the dict `state_record` builds.
fn write_merge(out: &mut Vec<u8>, state: &GroupState) {
    let calls = distinct_stamps(state);
    out.extend_from_slice(format!("{{\"format\":{FORMAT},\"stamps\":").as_bytes());
    write_indexes(out, &state.stamps, &calls);
    if let Some(regs) = &state.address {
        out.extend_from_slice(b",\"address\":{");
        if let Some(null) = &regs.null {
            out.extend_from_slice(format!("\"null\":{},", index_of(&calls, null)).as_bytes());
        }
        if let Some(obj) = &regs.object {
            out.extend_from_slice(format!("\"object\":{},", index_of(&calls, obj)).as_bytes());
        }
        out.extend_from_slice(b"\"fields\":");
        write_indexes(out, &regs.fields, &calls);
        out.push(b'}');
    }
    out.extend_from_slice(b",\"calls\":[");
    for (n, (ms, mid)) in calls.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("[{ms},").as_bytes());
        write(out, mid.as_str());
        out.push(b']');
    }
    out.extend_from_slice(b"]}");
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
    record.extend_from_slice(b",\"merge\":");
    write_merge(&mut record, state);
    record.push(b'}');
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

#[cfg(test)]
mod tests {
    use super::*;

    // What `codec.encode(state_record(state))` gives for these three calls (the worker,
    // merge_call with now_ms=5000).
    const RECORD: &str = concat!(
        r#"{"groupId":"g","traits":{"name":"x","address":{"city":"P"},"plan":"p","tier":1},"#,
        r#""memberCount":1,"eventCount":3,"firstSeenAt":"1970-01-01T00:00:01.000Z","#,
        r#""lastSeenAt":"1970-01-01T00:00:02.000Z","updatedAt":"1970-01-01T00:00:05.000Z","#,
        r#""merge":{"format":3,"stamps":{"name":2,"plan":0,"tier":1},"#,
        r#""address":{"null":0,"object":2,"fields":{"city":2}},"#,
        r#""calls":[[1000,"z"],[2000,"a"],[2000,"b"]]}}"#
    );

    fn record_of(state: &GroupState) -> String {
        String::from_utf8(encode_state(state, 5000).1).unwrap()
    }

    #[test]
    fn writes_format_3_as_the_worker_does_and_reads_formats_2_and_3() {
        let mut state = None;
        let calls = [
            (2000, "b", r#"{"name":"x","address":{"city":"P"}}"#),
            (1000, "z", r#"{"plan":"p","address":null}"#),
            (2000, "a", r#"{"name":"y","tier":1}"#),
        ];
        for (ms, mid, traits) in calls {
            let traits: Map<String, Value> = serde_json::from_str(traits).unwrap();
            let new = state.is_none();
            let stamp = (ms, mid.to_owned());
            state = merge_call(state, "g", &stamp, &traits, new).ok();
        }
        assert_eq!(record_of(&state.unwrap()), RECORD);
        assert_eq!(
            record_of(&read_state(RECORD.as_bytes()).ok().unwrap()),
            RECORD
        );

        let merge_2 = concat!(
            r#""merge":{"format":2,"stamps":{"name":[2000,"b"],"plan":[1000,"z"],"#,
            r#""tier":[2000,"a"]},"address":{"null":[1000,"z"],"object":[2000,"b"],"#,
            r#""fields":{"city":[2000,"b"]}}}}"#
        );
        let format_2 = format!("{}{merge_2}", &RECORD[..RECORD.find("\"merge\"").unwrap()]);
        assert_eq!(
            record_of(&read_state(format_2.as_bytes()).ok().unwrap()),
            RECORD
        );

        // Left to the worker: format 1, an index outside merge.calls.
        let format_1 = format_2.replace(r#""format":2,"#, "");
        assert!(read_state(format_1.as_bytes()).is_err());
        let outside = RECORD.replace(r#""tier":1},"address""#, r#""tier":3},"address""#);
        assert!(read_state(outside.as_bytes()).is_err());
    }
}
