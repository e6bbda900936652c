//! Readiness checks and warm-up requests: a minimal HTTP/1.1 client over std's TcpStream
//! (one request per connection, `Connection: close`, so no connection stays open in the JVM
//! when it is checkpointed).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::config::{Readiness, WarmupRequest};

fn connect(host: &str, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// GETs `path` and returns the status code and body (read to EOF).
pub fn http_get(
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = connect(host, port, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: crac-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.take(1 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    parse_response(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP response: {:?}", truncate(&text, 80)),
        )
    })
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Status code and body of an HTTP/1.x response (chunked bodies are returned raw).
pub fn parse_response(text: &str) -> Option<(u16, String)> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code: u16 = parts.next()?.parse().ok()?;
    Some((code, body.to_string()))
}

/// One readiness check.
pub fn check(r: &Readiness, timeout: Duration) -> Result<(), String> {
    match r {
        Readiness::Tcp { host, port } => connect(host, *port, timeout)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Readiness::Http { host, port, path } => match http_get(host, *port, path, timeout) {
            Ok((code, _)) if (200..400).contains(&code) => Ok(()),
            Ok((code, _)) => Err(format!("HTTP {code}")),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// Polls `r` until it passes, `deadline` passes, or `give_up` says the JVM is gone.
/// Returns the last error on failure.
pub fn wait_ready(
    r: &Readiness,
    deadline: Instant,
    mut give_up: impl FnMut() -> bool,
) -> Result<(), String> {
    // Short intervals: restore-to-ready is measured in tens of milliseconds.
    let mut interval = Duration::from_millis(2);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match check(
            r,
            left.clamp(Duration::from_millis(10), Duration::from_secs(2)),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if give_up() {
            return Err(format!("gave up ({err})"));
        }
        if Instant::now() + interval >= deadline {
            return Err(err);
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}

/// What the warm-up did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WarmupResult {
    pub sent: u32,
    pub failed: u32,
    pub first_error: Option<String>,
}

/// Sends every warm-up request (sequentially). Non-2xx/3xx answers count as failures.
pub fn warm_up(host: &str, port: u16, reqs: &[WarmupRequest], deadline: Instant) -> WarmupResult {
    let mut res = WarmupResult::default();
    for r in reqs {
        for _ in 0..r.count {
            if Instant::now() >= deadline {
                res.failed += 1;
                res.first_error
                    .get_or_insert_with(|| "checkpoint deadline reached during warm-up".into());
                continue;
            }
            res.sent += 1;
            match http_get(host, port, &r.path, Duration::from_secs(10)) {
                Ok((code, _)) if (200..400).contains(&code) => {}
                Ok((code, _)) => {
                    res.failed += 1;
                    res.first_error
                        .get_or_insert_with(|| format!("GET {} answered {code}", r.path));
                }
                Err(e) => {
                    res.failed += 1;
                    res.first_error
                        .get_or_insert_with(|| format!("GET {}: {e}", r.path));
                }
            }
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        assert_eq!(
            parse_response("HTTP/1.1 200 OK\r\nA: b\r\n\r\nhello 3\n"),
            Some((200, "hello 3\n".into()))
        );
        assert_eq!(
            parse_response("HTTP/1.0 503 X\r\n\r\n"),
            Some((503, String::new()))
        );
        assert_eq!(parse_response("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_response(""), None);
    }
}
