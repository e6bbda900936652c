//! Callers: HTTP/1.1 requests on fresh connections through [`Service`], each answer checked
//! for its exact status and body, and the tally the scenario lines are made of.

use super::pods::body_byte;
use super::service::{Route, Service};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Size of an upload.
pub const UPLOAD_BYTES: usize = 10 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Get,
    /// 10 MB the app reads and checks.
    Upload,
    /// 10 MB the app answers (413) before reading.
    Early,
}

/// What became of one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The app's answer: the right status and the exact body.
    Answered,
    /// An answer, but not the app's (an error status from the activator, e.g. 502 or 503).
    ErrorStatus(u16),
    /// Some other status or body than the app's.
    Wrong(String),
    /// The connection closed (or was reset) without a whole answer.
    Closed(String),
    /// No answer within the deadline.
    Hung,
    /// Not sent: the Service had no endpoint or every connection attempt was refused until
    /// the deadline.
    NotSent,
}

/// The counts of one scenario's requests.
#[derive(Default)]
pub struct Tally {
    pub sent: u64,
    pub answered: u64,
    pub error_status: u64,
    pub wrong: u64,
    pub closed: u64,
    pub hung: u64,
    pub not_sent: u64,
    /// Connection attempts refused and tried again through the Service (nothing was sent).
    pub refused: u64,
    /// Per kind: (sent, answered).
    pub gets: (u64, u64),
    pub uploads: (u64, u64),
    pub early: (u64, u64),
    /// Through the activator / straight to a pod (the first route of each request).
    pub via_activator: u64,
    pub via_pods: u64,
    pub slowest: Duration,
    /// The first few failures, for the log.
    pub examples: Vec<String>,
}

impl Tally {
    pub fn lost(&self) -> u64 {
        self.sent - self.answered
    }

    fn add(
        &mut self,
        kind: Kind,
        route: Option<Route>,
        outcome: &Outcome,
        took: Duration,
        refused: u64,
    ) {
        self.sent += 1;
        self.refused += refused;
        self.slowest = self.slowest.max(took);
        match route {
            Some(Route::Activator(_)) => self.via_activator += 1,
            Some(Route::Pod(_)) => self.via_pods += 1,
            None => {}
        }
        let per_kind = match kind {
            Kind::Get => &mut self.gets,
            Kind::Upload => &mut self.uploads,
            Kind::Early => &mut self.early,
        };
        per_kind.0 += 1;
        match outcome {
            Outcome::Answered => {
                per_kind.1 += 1;
                self.answered += 1;
                return;
            }
            Outcome::ErrorStatus(_) => self.error_status += 1,
            Outcome::Wrong(_) => self.wrong += 1,
            Outcome::Closed(_) => self.closed += 1,
            Outcome::Hung => self.hung += 1,
            Outcome::NotSent => self.not_sent += 1,
        }
        if self.examples.len() < 20 {
            self.examples.push(format!(
                "{kind:?} via {route:?} after {} ms: {outcome:?}",
                took.as_millis()
            ));
        }
    }

    /// The fields after `sent N, answered N, lost L`.
    pub fn fields(&self) -> String {
        let mut s = format!(
            "sent {}, answered {}, lost {}, error-status {}, wrong {}, closed {}, hung {}, not-sent {}, refused-retried {}, \
             gets {}/{}, uploads {}/{}, early-413 {}/{}, via-activator {}, via-pods {}, slowest-ms {}",
            self.sent,
            self.answered,
            self.lost(),
            self.error_status,
            self.wrong,
            self.closed,
            self.hung,
            self.not_sent,
            self.refused,
            self.gets.1,
            self.gets.0,
            self.uploads.1,
            self.uploads.0,
            self.early.1,
            self.early.0,
            self.via_activator,
            self.via_pods,
            self.slowest.as_millis()
        );
        s.retain(|c| c != '\n');
        s
    }

    pub fn log_examples(&self, scenario: &str) {
        for e in &self.examples {
            eprintln!("chaos: {scenario}: {e}");
        }
    }
}

/// What callers send and how long they wait.
#[derive(Clone, Copy)]
pub struct Load {
    pub callers: usize,
    /// Of every 100 requests: uploads, then early-answered uploads (the rest are GETs).
    pub uploads: u64,
    pub early: u64,
    /// Callers start their requests within the first `burst` of every `period` (quiet the
    /// rest), so the app's open connections end now and then and a drain can finish.
    pub period: Duration,
    pub burst: Duration,
    /// A request not answered by then is counted as hung.
    pub deadline: Duration,
}

/// Callers running until [`Callers::stop`].
pub struct Callers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    tally: Arc<Mutex<Tally>>,
}

impl Callers {
    pub fn start(service: &Service, load: Load, seed: u64) -> Callers {
        let stop = Arc::new(AtomicBool::new(false));
        let tally: Arc<Mutex<Tally>> = Arc::default();
        let ids = Arc::new(AtomicU64::new(seed * 1_000_000));
        let epoch = Instant::now();
        let tasks = (0..load.callers)
            .map(|i| {
                let (stop, tally, ids, service) =
                    (stop.clone(), tally.clone(), ids.clone(), service.clone());
                let mut rng = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Acquire) {
                        // The next start: a random moment in the next burst.
                        let now = epoch.elapsed();
                        let period = load.period.as_millis() as u64;
                        let next = (now.as_millis() as u64 / period + 1) * period
                            + rng.below(load.burst.as_millis() as u64);
                        tokio::time::sleep_until((epoch + Duration::from_millis(next)).into())
                            .await;
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let roll = rng.below(100);
                        let kind = if roll < load.uploads {
                            Kind::Upload
                        } else if roll < load.uploads + load.early {
                            Kind::Early
                        } else {
                            Kind::Get
                        };
                        let id = ids.fetch_add(1, Ordering::Relaxed);
                        let started = Instant::now();
                        let (route, outcome, refused) =
                            call(&service, kind, id, load.deadline).await;
                        tally.lock().expect("tally lock").add(
                            kind,
                            route,
                            &outcome,
                            started.elapsed(),
                            refused,
                        );
                    }
                })
            })
            .collect();
        Callers { stop, tasks, tally }
    }

    /// Stops starting requests, waits for those under way and returns the tally.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            let _ = t.await;
        }
        std::mem::take(&mut *self.tally.lock().expect("tally lock"))
    }
}

/// A small xorshift: the load's randomness needs no more.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 { 0 } else { self.0 % n }
    }
}

/// One request through the Service: a refused connection (nothing sent) goes through the
/// Service again, until `deadline`. Returns the first route, the outcome and the refusals.
pub async fn call(
    service: &Service,
    kind: Kind,
    id: u64,
    deadline: Duration,
) -> (Option<Route>, Outcome, u64) {
    let until = Instant::now() + deadline;
    let mut refused = 0;
    let mut first = None;
    loop {
        let route = service.route();
        first = first.or(route);
        if let Some(route) = route {
            match tokio::time::timeout_at(until.into(), TcpStream::connect(route.addr())).await {
                Err(_) => return (first, Outcome::Hung, refused),
                Ok(Ok(stream)) => {
                    let outcome =
                        match tokio::time::timeout_at(until.into(), exchange(stream, kind, id))
                            .await
                        {
                            Ok(o) => o,
                            Err(_) => Outcome::Hung,
                        };
                    return (first, outcome, refused);
                }
                Ok(Err(_)) => refused += 1,
            }
        }
        if Instant::now() + Duration::from_millis(20) >= until {
            return (first, Outcome::NotSent, refused);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The request, and the check of its answer.
async fn exchange(stream: TcpStream, kind: Kind, id: u64) -> Outcome {
    let (path, length, status, body) = match kind {
        Kind::Get => (format!("/get/{id}"), 0, 200, format!("get {id}")),
        Kind::Upload => (
            format!("/upload/{id}"),
            UPLOAD_BYTES,
            200,
            format!("upload {id} {UPLOAD_BYTES} ok"),
        ),
        Kind::Early => (
            format!("/early/{id}"),
            UPLOAD_BYTES,
            413,
            format!("too large {id}"),
        ),
    };
    let method = if kind == Kind::Get { "GET" } else { "POST" };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n");
    if length > 0 {
        let _ = write!(head, "Content-Length: {length}\r\n");
    }
    head.push_str("\r\n");
    let (mut reader, mut writer) = stream.into_split();
    let send = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < length {
            let n = chunk.len().min(length - sent);
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = body_byte(id, sent + i);
            }
            writer.write_all(&chunk[..n]).await?;
            sent += n;
        }
        // Keep the write half open: some servers close on a half-closed caller.
        Ok::<_, std::io::Error>(writer)
    });
    let mut response = Vec::new();
    let read = reader.read_to_end(&mut response).await;
    // The answer is in (or the connection is over): what is left of the body does not matter.
    let wrote = if send.is_finished() {
        send.await.ok()
    } else {
        send.abort();
        None
    };
    let text = String::from_utf8_lossy(&response);
    let Some((head, got)) = text.split_once("\r\n\r\n") else {
        return Outcome::Closed(match (read, wrote) {
            (Err(e), _) => format!("read: {e} after {} bytes", response.len()),
            (_, Some(Err(e))) => format!("write: {e}; {} bytes back", response.len()),
            _ => format!("{} bytes back, no whole head", response.len()),
        });
    };
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let declared: Option<usize> = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok());
    if code == status && got == body && declared.is_none_or(|d| d == got.len()) {
        return Outcome::Answered;
    }
    let from_app = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("x-pod:"));
    if !from_app && code >= 400 {
        return Outcome::ErrorStatus(code);
    }
    if declared.is_some_and(|d| d != got.len()) {
        return Outcome::Closed(format!(
            "{code} with {} of {declared:?} body bytes",
            got.len()
        ));
    }
    Outcome::Wrong(format!(
        "{code} {:?}",
        got.chars().take(80).collect::<String>()
    ))
}
