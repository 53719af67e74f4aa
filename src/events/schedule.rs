//! When a failed delivery is tried again: the schedule of the contract (after 5 s, 5 min,
//! 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h; given up after the tenth attempt), each delay
//! with ±20 % jitter so that the retries of many deliveries that failed together do not come
//! back together, no earlier than an endpoint's `Retry-After` on 429 and 503, all times
//! `WEBHOOK_RETRY_SCALE` (1 in production; tests run the whole schedule in seconds).

use std::time::{Duration, SystemTime};

/// The delay before each retry: the n-th entry follows the n-th failed attempt.
pub const RETRY_DELAYS: [Duration; 9] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(14 * 3600),
    Duration::from_secs(20 * 3600),
    Duration::from_secs(24 * 3600),
];

/// An endpoint failing every attempt for this long in a row is disabled.
pub const DISABLE_AFTER: Duration = Duration::from_secs(5 * 24 * 3600);

/// The most a `Retry-After` may push an attempt back (a day, like the longest step).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How much each delay varies, either way.
const JITTER: f64 = 0.2;

/// The delay before the next attempt after `failed` attempts failed (this one included), or
/// `None` when that was the last. `retry_after`: what the endpoint asked for (429 or 503).
pub fn next_delay(failed: u32, retry_after: Option<Duration>, scale: f64) -> Option<Duration> {
    let base = *RETRY_DELAYS.get(failed.checked_sub(1)? as usize)?;
    let jittered = base.mul_f64(1.0 + JITTER * (2.0 * super::random_unit() - 1.0));
    let wanted = retry_after.map_or(jittered, |asked| jittered.max(asked.min(MAX_RETRY_AFTER)));
    Some(wanted.mul_f64(scale))
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 9110 10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    httpdate(value).map(|at| at.duration_since(now).unwrap_or_default())
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP senders must use.
fn httpdate(text: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = text.split([' ', ':']).collect();
    let [_, day, month, year, hour, minute, second, "GMT"] = parts[..] else { return None };
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == month)? as i64
        + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let (hour, minute, second): (u64, u64, u64) = (hour.parse().ok()?, minute.parse().ok()?, second.parse().ok()?);
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = u64::try_from(days).ok()? * 86_400 + hour * 3600 + minute * 60 + second;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_schedule_with_jitter_and_end() {
        for (n, base) in RETRY_DELAYS.iter().enumerate() {
            let delay = next_delay(n as u32 + 1, None, 1.0).unwrap();
            assert!(delay >= base.mul_f64(0.8) && delay <= base.mul_f64(1.2), "{n}: {delay:?}");
        }
        assert_eq!(next_delay(10, None, 1.0), None);
        assert_eq!(next_delay(0, None, 1.0), None);
        assert!(next_delay(9, None, 0.001).unwrap() <= Duration::from_secs(104));
    }

    #[test]
    fn retry_after_pushes_the_next_attempt_back_within_a_day() {
        let delay = next_delay(1, Some(Duration::from_secs(120)), 1.0).unwrap();
        assert_eq!(delay, Duration::from_secs(120));
        let capped = next_delay(1, Some(Duration::from_secs(9 * 24 * 3600)), 1.0).unwrap();
        assert_eq!(capped, MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
