//! Go-style durations (`30s`, `15m`, `1h30m`, `250ms`), the format Kubernetes users know from
//! every other controller and the one CEL's `duration()` accepts, so the API server and the
//! operator agree on what a value means.

use std::time::Duration;

/// The pattern the CRD schema enforces on duration fields.
pub const PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// Parses a Go-style duration made of whole-number parts. Returns `None` when malformed.
pub fn parse(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(value).ok()?)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1m30s"), Some(Duration::from_secs(90)));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in ["", "10", "m", "1d", "-5s", "1.5h", "5 s"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
