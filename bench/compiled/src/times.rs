//! Instants as epoch milliseconds, as `worker/times.py` reads and writes them.
//!
//! Only a strict subset of ISO-8601 is read here; anything else is `Unhandled`, so the
//! caller hands the call to the Python path rather than guess what `fromisoformat` says.

use crate::{Unhandled, R};

/// `0001-01-01T00:00:00.000Z` and `9999-12-31T23:59:59.999Z` (worker.times).
pub const MIN_MS: i64 = -62_135_596_800_000;
pub const MAX_MS: i64 = 253_402_300_799_999;
const SECONDS_THRESHOLD: i128 = 31_557_600_000;
const MAX_EPOCH_DIGITS: usize = 20;
const DAY_MS: i64 = 86_400_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if month <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        month,
        day,
    )
}

/// `format_time`: RFC 3339 UTC with exactly three fractional digits.
pub fn format_time(ms: i64) -> String {
    let (days, in_day) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

/// Python's `str.isspace`: Rust's whitespace plus the four ASCII separators 0x1C-0x1F.
pub fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// `parse_iso_time` for `YYYY-MM-DD[(T|t| )HH:MM:SS[.fff|.ffffff][Z|z|+HH:MM|-HH:MM]]`,
/// surrounding ASCII whitespace allowed, years 2..9998 (so no range check can fail).
/// Every other text is `Unhandled`: this never says "invalid" where Python might not.
pub fn parse_iso(text: &str) -> R<i64> {
    let b = text
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(Unhandled);
    }
    let year = digits(&b[0..4]).ok_or(Unhandled)?;
    let month = digits(&b[5..7]).ok_or(Unhandled)?;
    let day = digits(&b[8..10]).ok_or(Unhandled)?;
    if !(2..=9998).contains(&year) || !(1..=12).contains(&month) {
        return Err(Unhandled);
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(Unhandled);
    }
    let mut ms = days_from_civil(year, month, day) * DAY_MS;
    let rest = &b[10..];
    if rest.is_empty() {
        return Ok(ms);
    }
    if rest.len() < 9
        || !matches!(rest[0], b'T' | b't' | b' ')
        || rest[3] != b':'
        || rest[6] != b':'
    {
        return Err(Unhandled);
    }
    let hour = digits(&rest[1..3]).ok_or(Unhandled)?;
    let minute = digits(&rest[4..6]).ok_or(Unhandled)?;
    let second = digits(&rest[7..9]).ok_or(Unhandled)?;
    if hour > 23 || minute > 59 || second > 59 {
        return Err(Unhandled);
    }
    ms += ((hour * 60 + minute) * 60 + second) * 1000;
    let mut rest = &rest[9..];
    if rest.first() == Some(&b'.') {
        let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n != 3 && n != 6 {
            return Err(Unhandled);
        }
        ms += digits(&rest[1..4]).ok_or(Unhandled)?;
        rest = &rest[1 + n..];
    }
    match rest {
        [] | [b'Z'] | [b'z'] => Ok(ms),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = digits(&[*h1, *h2]).ok_or(Unhandled)?;
            let minutes = digits(&[*m1, *m2]).ok_or(Unhandled)?;
            if hours > 23 || minutes > 59 {
                return Err(Unhandled);
            }
            let offset = (hours * 60 + minutes) * 60_000;
            Ok(if *sign == b'+' {
                ms - offset
            } else {
                ms + offset
            })
        }
        _ => Err(Unhandled),
    }
}

/// `parse_created_at` for a string; `Ok(None)` is a value Python surely reads as invalid.
pub fn parse_created_at_text(value: &str) -> R<Option<i64>> {
    let text = py_strip(value);
    if !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit()) {
        if text.len() > MAX_EPOCH_DIGITS {
            return Ok(None);
        }
        return Ok(epoch_to_ms(text.parse::<i128>().map_err(|_| Unhandled)?));
    }
    parse_iso(text).map(Some)
}

/// An epoch number: seconds below `SECONDS_THRESHOLD` in magnitude, else milliseconds.
pub fn epoch_to_ms(number: i128) -> Option<i64> {
    let ms = if number.abs() < SECONDS_THRESHOLD {
        number * 1000
    } else {
        number
    };
    (i128::from(MIN_MS)..=i128::from(MAX_MS))
        .contains(&ms)
        .then_some(ms as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_back() {
        for ms in [0, 1_704_067_200_000, 1_424_730_535_111, MIN_MS, MAX_MS, -1] {
            assert_eq!(parse_iso(&format_time(ms)).ok().unwrap_or(ms), ms);
        }
        assert_eq!(format_time(1_424_730_535_111), "2015-02-23T22:28:55.111Z");
        assert_eq!(format_time(MIN_MS), "0001-01-01T00:00:00.000Z");
        assert_eq!(
            parse_iso("2015-02-23T23:28:55.111+01:00").ok(),
            Some(1_424_730_535_111)
        );
    }
}
