//! Activity: how many connections are open on the app's port and when traffic was last seen,
//! read from the kernel's socket tables (`/proc/net/tcp`, `/proc/net/tcp6`) once a second.
//! The agent never sits in the request path. `GET /activity` on the activity port serves it.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crac_api::agent::{ACTIVITY_PATH, ActivityReport};

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

#[derive(Clone)]
pub struct Activity {
    report: Arc<Mutex<ActivityReport>>,
}

impl Activity {
    /// Starts polling `app_port` (if known) and serving `/activity` on `activity_port` (if not 0).
    /// The listener is close-on-exec (std's default) and is opened only after the JVM runs, so
    /// neither the JVM nor a CRIU dump ever sees it.
    pub fn start(
        base: ActivityReport,
        app_port: Option<u16>,
        activity_port: u16,
    ) -> std::io::Result<Activity> {
        let a = Activity {
            report: Arc::new(Mutex::new(base)),
        };
        if let Some(port) = app_port {
            let me = a.clone();
            std::thread::Builder::new()
                .name("activity-poll".into())
                .spawn(move || me.poll_loop(port))?;
        }
        if activity_port != 0 {
            let listener = TcpListener::bind(("0.0.0.0", activity_port))?;
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
                r.open_connections = now.established;
                if is_activity(&prev, &now) {
                    r.last_activity_time = Some(rfc3339(SystemTime::now()));
                }
            }
            prev = now;
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    pub fn snapshot(&self) -> ActivityReport {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn serve(&self, listener: TcpListener) {
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            if let Err(e) = self.answer(stream) {
                eprintln!("crac-agent: activity endpoint: {e}");
            }
        }
    }

    fn answer(&self, mut s: TcpStream) -> std::io::Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 2048];
        let mut len = 0;
        while len < buf.len() {
            let n = s.read(&mut buf[len..])?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&buf[..len]);
        let mut parts = head.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let (status, body) = if method == "GET" && path == ACTIVITY_PATH {
            (
                "200 OK",
                serde_json::to_string(&self.snapshot()).unwrap_or_else(|_| "{}".into()),
            )
        } else {
            (
                "404 Not Found",
                "{\"error\":\"try GET /activity\"}".to_string(),
            )
        };
        write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
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

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
    }
}
