//! Hostile callers at one activator's app port, all at once and bounded in number: slow heads
//! (a byte a second), oversized heads (64 KiB, over the activator's 32 KiB default), silent
//! sockets, and a flood of connections held open; meanwhile the activators' resident memory is
//! sampled from /proc every 100 ms.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const SLOW: usize = 50;
const OVERSIZED: usize = 50;
const SILENT: usize = 200;
/// The flood's size at most (file descriptors allowing): under the activator's default
/// --max-connections (4096) with the rest, so the normal callers still get in.
const FLOOD: usize = 2000;

#[derive(Default)]
struct Counts {
    /// Slow heads the activator closed, and the longest it took.
    slow_closed: AtomicU64,
    slow_longest_ms: AtomicU64,
    /// Oversized heads answered 431, or closed without it.
    oversized_431: AtomicU64,
    oversized_closed: AtomicU64,
    silent_closed: AtomicU64,
    silent_connect_errors: AtomicU64,
    silent_longest_ms: AtomicU64,
    flood_opened: AtomicU64,
    flood_failed: AtomicU64,
    peak_rss_kib: AtomicU64,
}

pub struct Attack {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    tasks: Vec<JoinHandle<()>>,
    flood: usize,
}

pub struct Report {
    pub peak_rss_kib: u64,
    fields: Vec<(String, String)>,
}

impl Report {
    pub fn fields(&self) -> Vec<(String, String)> {
        self.fields.clone()
    }
}

/// The soft limit on open files of this process.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()
        })
        .unwrap_or(1024)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Reads until the peer closes (or `limit`): how long it took, `None` past `limit`, and what came.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return (None, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(start.elapsed()), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn max(counter: &AtomicU64, value: u64) {
    counter.fetch_max(value, Ordering::Relaxed);
}

impl Attack {
    pub fn start(target: SocketAddr, activator_pids: Vec<u32>) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let flood = FLOOD.min(open_files_limit().saturating_sub(2000) / 2);
        let mut tasks = Vec::new();
        // Memory.
        {
            let (stop, counts) = (stop.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    for pid in &activator_pids {
                        max(&counts.peak_rss_kib, rss_kib(*pid));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        // Slow heads: a byte a second until the activator closes them.
        for _ in 0..SLOW {
            let (stop, counts) = (stop.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(target).await else { return };
                let start = Instant::now();
                let head = b"GET /get/slow HTTP/1.1\r\nHost: app\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                for b in head {
                    if stop.load(Ordering::Acquire) || s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    // A closed connection shows as a read of 0 within the second.
                    let mut buf = [0u8; 512];
                    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            counts.slow_closed.fetch_add(1, Ordering::Relaxed);
                            max(&counts.slow_longest_ms, start.elapsed().as_millis() as u64);
                            return;
                        }
                        _ => {}
                    }
                }
            }));
        }
        // Oversized heads.
        for _ in 0..OVERSIZED {
            let counts = counts.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(target).await else {
                    return;
                };
                let mut head = b"GET /get/big HTTP/1.1\r\nHost: app\r\n".to_vec();
                for i in 0..1024 {
                    head.extend_from_slice(
                        format!("X-Big-{i:04}: {}\r\n", "b".repeat(50)).as_bytes(),
                    );
                }
                head.extend_from_slice(b"\r\n");
                let _ = s.write_all(&head).await;
                let (_, got) = until_closed(&mut s, Duration::from_secs(30)).await;
                if got.starts_with(b"HTTP/1.1 431") {
                    counts.oversized_431.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.oversized_closed.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Silent sockets: connect, say nothing.
        for _ in 0..SILENT {
            let counts = counts.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(target).await else {
                    counts.silent_connect_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if let (Some(took), _) = until_closed(&mut s, Duration::from_secs(60)).await {
                    counts.silent_closed.fetch_add(1, Ordering::Relaxed);
                    max(&counts.silent_longest_ms, took.as_millis() as u64);
                }
            }));
        }
        // The flood: connections opened as fast as they go, each held until the activator
        // closes it (its header timeout) or the attack ends, then opened again.
        for _ in 0..flood {
            let (stop, counts) = (stop.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    match TcpStream::connect(target).await {
                        Ok(mut s) => {
                            counts.flood_opened.fetch_add(1, Ordering::Relaxed);
                            let mut buf = [0u8; 64];
                            while !stop.load(Ordering::Acquire) {
                                match tokio::time::timeout(
                                    Duration::from_millis(500),
                                    s.read(&mut buf),
                                )
                                .await
                                {
                                    Ok(Ok(0)) | Ok(Err(_)) => break,
                                    _ => {}
                                }
                            }
                        }
                        Err(_) => {
                            counts.flood_failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
        Attack {
            stop,
            counts,
            tasks,
            flood,
        }
    }

    pub async fn stop(self) -> Report {
        self.stop.store(true, Ordering::Release);
        // Slow heads and silent sockets end when the activator closes them (its header
        // timeout); whatever is still open by then is dropped.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(35);
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
            }
        }
        let c = &self.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let peak = get(&c.peak_rss_kib);
        let fields = [
            (
                "slow-heads-closed",
                format!("{}/{SLOW}", get(&c.slow_closed)),
            ),
            (
                "slow-closed-max-s",
                format!("{:.1}", get(&c.slow_longest_ms) as f64 / 1e3),
            ),
            (
                "oversized-431",
                format!("{}/{OVERSIZED}", get(&c.oversized_431)),
            ),
            (
                "oversized-closed-without",
                get(&c.oversized_closed).to_string(),
            ),
            (
                "silent-closed",
                format!("{}/{SILENT}", get(&c.silent_closed)),
            ),
            (
                "silent-connect-errors",
                get(&c.silent_connect_errors).to_string(),
            ),
            (
                "silent-closed-max-s",
                format!("{:.1}", get(&c.silent_longest_ms) as f64 / 1e3),
            ),
            ("flood-sockets", self.flood.to_string()),
            ("flood-connects", get(&c.flood_opened).to_string()),
            ("flood-connect-errors", get(&c.flood_failed).to_string()),
            (
                "activator-peak-rss-mib",
                format!("{:.0}", peak as f64 / 1024.0),
            ),
        ];
        Report {
            peak_rss_kib: peak,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }
}
