//! A call's deadline, as the client sent it in the `grpc-timeout` header.
//!
//! tonic's server enforces that header only until the response headers are sent, so a tier
//! whose answer is a stream reads the deadline itself ([`deadline`]) and ends the stream with
//! DEADLINE_EXCEEDED when it passes; a tier that calls another passes on what is left of it
//! ([`Request::set_timeout`](tonic::Request::set_timeout)).

use std::time::Duration;

use tokio::time::Instant;

/// The header a gRPC client states its timeout in.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value: at most 8 ASCII digits and a unit (`H`, `M`, `S`, `m`
/// milliseconds, `u` microseconds, `n` nanoseconds), as in the gRPC over HTTP/2 spec. `None`
/// for anything else.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at_checked(split)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The timeout the client of `metadata` stated, if any (a malformed header counts as none, as
/// tonic's own server treats it).
pub fn timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get(GRPC_TIMEOUT_HEADER)?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// When the call of `request` must be over, counted from now (the call's arrival, when read in
/// the handler).
pub fn deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    timeout(request.metadata()).map(|timeout| Instant::now() + timeout)
}

/// Waits until `deadline`, or forever when there is none (for one arm of a `select!`).
pub async fn expired(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What is left until `deadline` (zero once it passed).
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_refuses_the_rest() {
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S", "1 S", "１S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_what_tonic_clients_send() {
        let mut request = tonic::Request::new(());
        request.set_timeout(Duration::from_millis(250));
        let timeout = timeout(request.metadata()).expect("a timeout");
        assert_eq!(timeout, Duration::from_millis(250));
        assert!(deadline(&tonic::Request::new(())).is_none());
    }
}
