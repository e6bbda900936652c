//! Activity: how many connections are open on the app's port and when traffic was last seen,
//! read from the kernel's socket tables (`/proc/net/tcp`, `/proc/net/tcp6`) once a second.
//! The agent never sits in the request path. `GET /activity` on the activity port serves it.
//!
//! The endpoint is reachable by anything in the cluster network and by the app itself, so it
//! assumes hostile callers: each connection gets its own thread (at most [`MAX_CONNECTIONS`] at
//! once; more are closed at once), the request head must arrive whole within [`HEAD_TIMEOUT`]
//! and fit in [`MAX_HEAD_BYTES`], and the answer must be taken within [`WRITE_TIMEOUT`]. The
//! port is bound before the JVM starts and held for the pod's life ([`listen`]).
//!
//! In restore mode the same port serves `POST /sleep` and `POST /wake` (sleep in place), which
//! the `control` module decides; this module only parses the request for it ([`Request`]) and
//! reads and drops a body of at most [`MAX_BODY_BYTES`], within the same deadline as the head.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crac_api::agent::{ACTIVITY_PATH, ActivityReport, mode};

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// One row of `/proc/net/tcp{,6}` (the fields we use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRow {
    pub local_port: u16,
    /// Remote address and port, as the kernel prints them (hex).
    pub remote: String,
    pub state: u8,
    pub tx_queue: u64,
    pub rx_queue: u64,
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6`; malformed lines are skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<TcpRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let (_, port_hex) = f[1].rsplit_once(':')?;
            let local_port = u16::from_str_radix(port_hex, 16).ok()?;
            let state = u8::from_str_radix(f[3], 16).ok()?;
            let (tx, rx) = f[4].split_once(':')?;
            Some(TcpRow {
                local_port,
                remote: f[2].to_string(),
                state,
                tx_queue: u64::from_str_radix(tx, 16).ok()?,
                rx_queue: u64::from_str_radix(rx, 16).ok()?,
            })
        })
        .collect()
}

/// What one poll of the socket tables saw on the app's port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// ESTABLISHED connections accepted on the app's port.
    pub established: u32,
    /// Every non-listening socket on the app's port, by remote address: a key that was not
    /// there at the previous poll is a connection that happened (even a short one, which
    /// leaves a TIME_WAIT or a closing state behind).
    pub peers: HashSet<String>,
    /// Bytes waiting in a send or receive queue.
    pub queued: bool,
}

pub fn sample(rows: &[TcpRow], app_port: u16) -> Sample {
    let mut s = Sample::default();
    for r in rows
        .iter()
        .filter(|r| r.local_port == app_port && r.state != TCP_LISTEN)
    {
        if r.state == TCP_ESTABLISHED {
            s.established += 1;
        }
        if r.tx_queue > 0 || r.rx_queue > 0 {
            s.queued = true;
        }
        s.peers.insert(r.remote.clone());
    }
    s
}

/// Whether `now` shows traffic compared to `prev`: open connections, queued bytes, or a
/// connection we had not seen.
pub fn is_activity(prev: &Sample, now: &Sample) -> bool {
    now.established > 0 || now.queued || now.peers.difference(&prev.peers).next().is_some()
}

fn read_rows() -> Vec<TcpRow> {
    let mut rows = Vec::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            rows.extend(parse_proc_net_tcp(&text));
        }
    }
    rows
}

fn read_sample(app_port: u16) -> Sample {
    sample(&read_rows(), app_port)
}

const TCP_TIME_WAIT: u8 = 0x06;

/// Sockets the app still holds on its port besides the listener: established ones and ones
/// still closing (CLOSE_WAIT, LAST_ACK, ...). TIME_WAIT belongs to no process.
pub fn app_held_connections(rows: &[TcpRow], app_port: u16) -> usize {
    rows.iter()
        .filter(|r| r.local_port == app_port && r.state != TCP_LISTEN && r.state != TCP_TIME_WAIT)
        .count()
}

/// Waits up to `limit` until the app holds no connection on its port. CRIU cannot dump an
/// open TCP connection without repairing it (which needs iptables and more privileges), and
/// a server may close its side of a finished request a moment after the client did.
pub fn wait_for_closed_connections(app_port: u16, limit: std::time::Duration) -> usize {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let held = app_held_connections(&read_rows(), app_port);
        if held == 0 || std::time::Instant::now() >= deadline {
            return held;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// RFC 3339 in UTC, second precision, without a date library.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a caller has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a caller has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head read; the rest is not.
pub const MAX_HEAD_BYTES: usize = 2048;
/// Largest request body read (and dropped) for the control endpoints; a larger one gets 413.
pub const MAX_BODY_BYTES: u64 = 1024;

/// A request the control endpoints may answer, as parsed from its head.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The value of the first `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// When its head had arrived whole.
    pub received: Instant,
}

/// Answers a request (status and JSON body), or `None` for "not mine" (the usual 404).
pub type Handler = Arc<dyn Fn(&Request<'_>) -> Option<(u16, String)> + Send + Sync>;

/// Binds the activity port on every address (IPv4 and IPv6) before the JVM starts: the app can
/// then never bind it (no `SO_REUSEPORT`), so it cannot answer in the agent's name. The
/// listener is close-on-exec, so neither the JVM nor CRIU inherits it, and the agent is never
/// dumped. Connections wait in its backlog until [`Activity::start`] serves them.
pub fn listen(activity_port: u16) -> io::Result<TcpListener> {
    crate::sys::listen_all_addresses(activity_port)
}

#[derive(Clone)]
pub struct Activity {
    report: Arc<Mutex<ActivityReport>>,
    control: Option<Handler>,
}

impl Activity {
    /// Starts polling `app_port` (if known) and serving `/activity` on `listener` (if any),
    /// with `control` (if any) asked about every other request. Called once the JVM is up: no
    /// thread is spawned (and no pid spent) before a restore.
    pub fn start(
        base: ActivityReport,
        app_port: Option<u16>,
        listener: Option<TcpListener>,
        control: Option<Handler>,
    ) -> io::Result<Activity> {
        let a = Activity {
            report: Arc::new(Mutex::new(base)),
            control,
        };
        if let Some(port) = app_port {
            let me = a.clone();
            std::thread::Builder::new()
                .name("activity-poll".into())
                .spawn(move || me.poll_loop(port))?;
        }
        if let Some(listener) = listener {
            let me = a.clone();
            std::thread::Builder::new()
                .name("activity-http".into())
                .spawn(move || me.serve(listener))?;
        }
        Ok(a)
    }

    fn poll_loop(&self, port: u16) {
        let mut prev = Sample::default();
        loop {
            let now = read_sample(port);
            {
                let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
                // Asleep, no JVM holds the port: what lingers there (TIME_WAIT) is not traffic.
                if r.mode == mode::SLEEPING {
                    r.open_connections = 0;
                    prev = now;
                    drop(r);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                r.open_connections = now.established;
                if is_activity(&prev, &now) {
                    r.last_activity_time = Some(rfc3339(SystemTime::now()));
                }
            }
            prev = now;
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Changes the report (sleep and wake in place).
    pub fn update(&self, change: impl FnOnce(&mut ActivityReport)) {
        change(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn snapshot(&self) -> ActivityReport {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Accepts forever; each connection is answered on its own thread, at most
    /// [`MAX_CONNECTIONS`] at once. A caller's errors (timeouts, resets) are its own: they are
    /// not logged, so no caller can fill the container's log.
    fn serve(&self, listener: TcpListener) {
        let active = Arc::new(AtomicUsize::new(0));
        for conn in listener.incoming() {
            let Ok(stream) = conn else {
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            let slot = Slot(active.clone());
            let me = self.clone();
            // On failure the closure (and with it the slot and the stream) is dropped.
            let _ = std::thread::Builder::new()
                .name("activity-conn".into())
                .spawn(move || {
                    let _slot = slot;
                    let _ = me.answer(stream);
                });
        }
    }

    fn answer(&self, mut s: TcpStream) -> io::Result<()> {
        let deadline = Instant::now() + HEAD_TIMEOUT;
        let raw = read_head(&mut s, deadline)?;
        let received = Instant::now();
        s.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let text = String::from_utf8_lossy(&raw);
        let head_len = text.find("\r\n\r\n").map(|i| i + 4);
        let head = &text[..head_len.unwrap_or(text.len())];
        let mut parts = head.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let (status, body) = if method == "GET" && path == ACTIVITY_PATH {
            (
                200,
                serde_json::to_string(&self.snapshot()).unwrap_or_else(|_| "{}".into()),
            )
        } else {
            let req = Request {
                method,
                path,
                authorization: header(head, "authorization"),
                received,
            };
            match self.control.as_ref() {
                Some(c) => match body_within_limit(&mut s, head, raw.len(), head_len, deadline) {
                    Err(status) => (status, error_body(status)),
                    Ok(()) => c(&req).unwrap_or_else(|| (404, NOT_FOUND.into())),
                },
                None => (404, NOT_FOUND.into()),
            }
        };
        write!(
            s,
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n{body}",
            reason_phrase(status),
            body.len(),
            if status == 401 {
                "WWW-Authenticate: Bearer\r\n"
            } else {
                ""
            },
        )
    }
}

const NOT_FOUND: &str = "{\"error\":\"try GET /activity\"}";

fn error_body(status: u16) -> String {
    format!("{{\"error\":\"{}\"}}", reason_phrase(status))
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The value of header `name` (lowercase) in `head`: the first one, trimmed.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads and drops the request's body (`Content-Length`, at most [`MAX_BODY_BYTES`]) before
/// `deadline`, so that the answer is not lost to a reset for unread bytes. A chunked body gets
/// 411, a larger one 413, a malformed length 400, one not there in time 400.
fn body_within_limit(
    s: &mut TcpStream,
    head: &str,
    read: usize,
    head_len: Option<usize>,
    deadline: Instant,
) -> Result<(), u16> {
    if header(head, "transfer-encoding").is_some() {
        return Err(411);
    }
    let length: u64 = match header(head, "content-length") {
        None => 0,
        Some(v) => v.parse().map_err(|_| 400u16)?,
    };
    if length > MAX_BODY_BYTES {
        return Err(413);
    }
    let Some(head_len) = head_len else {
        // The head never ended (cut at MAX_HEAD_BYTES or at the caller's end): nothing to read.
        return Ok(());
    };
    let mut left = length.saturating_sub(read.saturating_sub(head_len) as u64);
    let mut buf = [0u8; MAX_BODY_BYTES as usize];
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || s.set_read_timeout(Some(wait)).is_err() {
            return Err(400);
        }
        match s.read(&mut buf[..left as usize]) {
            Ok(0) | Err(_) => return Err(400),
            Ok(n) => left -= n as u64,
        }
    }
    Ok(())
}

/// A connection's place among the [`MAX_CONNECTIONS`], given back when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads a request head (up to the blank line, or [`MAX_HEAD_BYTES`], or the caller's end of
/// the stream), all of it before `deadline`: a caller trickling bytes gets no more time than
/// one sending nothing.
fn read_head(s: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut len = 0;
    while len < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:D440 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
   4: 0100007F:1F91 0100007F:D441 01 00000010:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 20 4 30 10 -1
garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:E1C2 01 00000000:00000005 00:00000000 00000000     0        0 2001 1 0000000000000000 20 4 0 10 -1
";

    #[test]
    fn parses_rows() {
        let rows = parse_proc_net_tcp(TCP);
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0].local_port, 8080);
        assert_eq!(rows[0].state, TCP_LISTEN);
        assert_eq!(rows[4].tx_queue, 16);
        let rows6 = parse_proc_net_tcp(TCP6);
        assert_eq!(rows6.len(), 1);
        assert_eq!(rows6[0].rx_queue, 5);
    }

    #[test]
    fn closing_connections_are_held_but_time_wait_is_not() {
        let row = |port, state| TcpRow {
            local_port: port,
            remote: "0100007F:C350".into(),
            state,
            tx_queue: 0,
            rx_queue: 0,
        };
        let rows = [
            row(8080, TCP_LISTEN),
            row(8080, TCP_TIME_WAIT),
            row(8080, 0x08),
            row(9000, TCP_ESTABLISHED),
        ];
        assert_eq!(app_held_connections(&rows, 8080), 1, "CLOSE_WAIT only");
        assert_eq!(app_held_connections(&rows, 9000), 1);
    }

    #[test]
    fn counts_only_accepted_connections_on_the_app_port() {
        let mut rows = parse_proc_net_tcp(TCP);
        rows.extend(parse_proc_net_tcp(TCP6));
        let s = sample(&rows, 8080);
        // rows 1 (v4) and the v6 one; row 2 is the client side, row 3 TIME_WAIT, row 0 LISTEN.
        assert_eq!(s.established, 2);
        assert_eq!(s.peers.len(), 3);
        assert!(s.queued);
        assert_eq!(sample(&rows, 9999), Sample::default());
    }

    #[test]
    fn activity_rules() {
        let idle = Sample::default();
        assert!(!is_activity(&idle, &idle));
        let open = Sample {
            established: 1,
            peers: ["a".to_string()].into(),
            queued: false,
        };
        assert!(is_activity(&idle, &open));
        // A short connection seen only as TIME_WAIT is activity once, not while it lingers.
        let tw = Sample {
            established: 0,
            peers: ["b".to_string()].into(),
            queued: false,
        };
        assert!(is_activity(&idle, &tw));
        assert!(!is_activity(&tw, &tw));
        // Connections going away is not activity.
        assert!(!is_activity(&tw, &idle));
    }

    fn serving() -> (Activity, u16) {
        let listener = listen(0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let report = ActivityReport {
            mode: "running".into(),
            ..Default::default()
        };
        (
            Activity::start(report, None, Some(listener), None).unwrap(),
            port,
        )
    }

    fn get(port: u16, path: &str) -> io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_slow_caller_does_not_hold_up_others() {
        let (_a, port) = serving();
        // One caller sends nothing, another trickles a byte every 500 ms.
        let _silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut trickle = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let trickler = std::thread::spawn(move || {
            let start = Instant::now();
            for b in b"GET /activity HTTP/1.0\r\n\r\n" {
                if trickle.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            // The endpoint gave up on it after HEAD_TIMEOUT.
            let mut rest = Vec::new();
            let _ = trickle.read_to_end(&mut rest);
            (start.elapsed(), rest)
        });
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..3 {
            let t = Instant::now();
            let answer = get(port, "/activity").unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "answered after {:?}",
                t.elapsed()
            );
            assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
            assert!(answer.contains("\"mode\":\"running\""), "{answer}");
        }
        let (took, rest) = trickler.join().unwrap();
        assert!(rest.is_empty(), "a head that never finished got an answer");
        assert!(
            took < HEAD_TIMEOUT + Duration::from_secs(2),
            "the trickling caller was kept {took:?}"
        );
    }

    #[test]
    fn callers_beyond_the_cap_are_closed_at_once() {
        let (_a, port) = serving();
        let held: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        // Closed without an answer (EOF, or a reset), well before the head timeout.
        let n = extra.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0);
        // (Well before a silent caller's head timeout; generous for a loaded machine.)
        assert!(
            t.elapsed() < HEAD_TIMEOUT - Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // Once the silent callers time out, the endpoint answers again.
        std::thread::sleep(HEAD_TIMEOUT + Duration::from_millis(300));
        assert!(get(port, "/activity").unwrap().starts_with("HTTP/1.1 200"));
        drop(held);
    }

    #[test]
    fn a_huge_head_is_cut_short() {
        let (_a, port) = serving();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Only MAX_HEAD_BYTES are read and the request line decides; the connection is closed
        // at once (with the rest unread the kernel may reset it rather than deliver the answer).
        let t = Instant::now();
        let mut req = b"GET /activity HTTP/1.0\r\nX: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES * 4));
        let _ = s.write_all(&req);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        if !out.is_empty() {
            assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
        }
    }

    /// Serves with a control that answers `POST /x` (counting its calls) and nothing else.
    fn serving_control() -> (Activity, u16, Arc<AtomicUsize>) {
        let listener = listen(0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let control: Handler = Arc::new(move |r: &Request<'_>| {
            (r.path == "/x").then(|| {
                seen.fetch_add(1, Ordering::SeqCst);
                let auth = r.authorization.unwrap_or("-");
                (
                    if auth == "Bearer t" { 200 } else { 401 },
                    format!("{{\"method\":\"{}\"}}", r.method),
                )
            })
        });
        let report = ActivityReport {
            mode: "restored".into(),
            ..Default::default()
        };
        let a = Activity::start(report, None, Some(listener), Some(control)).unwrap();
        (a, port, calls)
    }

    fn send(port: u16, request: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn control_requests_reach_the_handler_with_small_bodies_only() {
        let (a, port, calls) = serving_control();
        let ok = send(
            port,
            b"POST /x HTTP/1.1\r\nauthorization:  Bearer t \r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("{\"method\":\"POST\"}"), "{ok}");
        let denied = send(port, b"POST /x HTTP/1.1\r\n\r\n");
        assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
        assert!(denied.contains("WWW-Authenticate: Bearer\r\n"), "{denied}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Too large, chunked or malformed: answered without asking the handler.
        for (req, status) in [
            (
                &b"POST /x HTTP/1.1\r\nContent-Length: 4096\r\n\r\n"[..],
                "413",
            ),
            (
                b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "411",
            ),
            (b"POST /x HTTP/1.1\r\nContent-Length: x\r\n\r\n", "400"),
        ] {
            let out = send(port, req);
            assert!(out.starts_with(&format!("HTTP/1.1 {status}")), "{out}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Not the control's: the usual 404; and GET /activity is never the control's.
        assert!(send(port, b"POST /y HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        let act = send(port, b"GET /activity HTTP/1.1\r\n\r\n");
        assert!(act.contains("\"mode\":\"restored\""), "{act}");
        // The report changes in place (sleep and wake).
        a.update(|r| r.mode = "sleeping".into());
        let act = send(port, b"GET /activity HTTP/1.1\r\n\r\n");
        assert!(act.contains("\"mode\":\"sleeping\""), "{act}");
    }

    #[test]
    fn without_a_control_every_post_is_not_found() {
        let (_a, port) = serving();
        let out = send(
            port,
            b"POST /wake HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n",
        );
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    }

    #[test]
    fn headers_are_found_case_insensitively() {
        let head = "POST /x HTTP/1.1\r\nHost: a\r\nAUTHORIZATION: Bearer z \r\n\r\n";
        assert_eq!(header(head, "authorization"), Some("Bearer z"));
        assert_eq!(header(head, "content-length"), None);
        // The request line is not a header.
        assert_eq!(header("POST /x: HTTP/1.1\r\n\r\n", "post /x"), None);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
    }
}
