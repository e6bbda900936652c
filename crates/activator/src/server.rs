//! Listeners and connections: one listener per activator port the registry knows (bound and
//! closed as apps come and go), HTTP/1.1 and h2c on each, and the bookkeeping that lets a
//! shutdown stop accepting yet finish every request and tunnel already in flight.
//!
//! Hostile or broken callers are bounded here: a cap on open connections across all ports, a
//! deadline for the first request (protocol detection included) and for every HTTP/1.1 head, a
//! cap on the head's size, and for HTTP/2 a cap on concurrent streams, keep-alive pings and an
//! idle timeout.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::early_answer::CallerIo;
use crate::metrics::ConnectionTimeout;
use crate::proxy::{Caller, Proxy};
use crate::tracker::{ConnectionSlot, ConnectionSlots, Tracker};

/// How often a port that could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Longest period of [`anchor_timers`] (it is also never longer than the header timeout).
const TIMER_ANCHOR_PERIOD: Duration = Duration::from_secs(10);

/// hyper refuses a smaller HTTP/1.1 read buffer.
const MIN_HEADER_BYTES: usize = 8192;

/// What one caller connection may take, in time and in memory.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once across all ports; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// From accept to the first request (protocol detection included), and for each later
    /// HTTP/1.1 head, idle keep-alive time included.
    pub header_timeout: Duration,
    /// Largest HTTP/1.1 request head (beyond it 431) and HTTP/2 header list.
    pub max_header_bytes: usize,
    /// A connection with no request open for this long is closed (HTTP/2: GOAWAY). Zero: never.
    pub idle_timeout: Duration,
    /// HTTP/2 streams open at once on one connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: ping a connection that sent nothing for this long. Zero: never.
    pub h2_keepalive_interval: Duration,
    /// HTTP/2: close the connection when a ping is not answered within this.
    pub h2_keepalive_timeout: Duration,
}

pub struct Server {
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    slots: ConnectionSlots,
    listen_ip: IpAddr,
    shutdown: watch::Sender<bool>,
    bound: watch::Sender<BTreeSet<u16>>,
}

impl Server {
    pub fn new(proxy: Arc<Proxy>, listen_ip: IpAddr, limits: ConnectionLimits) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(hyper_util::rt::TokioTimer::new());
        // Bounds how long a caller may take to send its headers (hyper arms this per head, so
        // it also bounds idle keep-alive time), and how much of a head it may make us buffer:
        // the read buffer is the head's limit (431 beyond it).
        builder
            .http1()
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
        let header_list = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(header_list)
            .keep_alive_interval(nonzero(limits.h2_keepalive_interval))
            .keep_alive_timeout(limits.h2_keepalive_timeout);
        let slots = ConnectionSlots::new(limits.max_connections, proxy.metrics.connections.clone());
        Self {
            proxy,
            builder,
            limits,
            slots,
            listen_ip,
            shutdown: watch::channel(false).0,
            bound: watch::channel(BTreeSet::new()).0,
        }
    }

    /// The ports listening now.
    pub fn bound(&self) -> watch::Receiver<BTreeSet<u16>> {
        self.bound.subscribe()
    }

    pub fn tracker(&self) -> &Tracker {
        &self.proxy.tracker
    }

    /// Stops accepting on every port and asks every connection to close after its current
    /// requests (HTTP/1.1: after the response; h2: GOAWAY).
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Keeps one listener per wanted port until shutdown.
    pub async fn run_listeners(self: Arc<Self>, mut wanted: watch::Receiver<BTreeSet<u16>>) {
        let mut shutdown = self.shutdown.subscribe();
        let anchor = self
            .limits
            .header_timeout
            .min(TIMER_ANCHOR_PERIOD)
            .max(Duration::from_millis(1));
        tokio::spawn(anchor_timers(anchor, self.shutdown.subscribe()));
        let mut running: HashMap<u16, watch::Sender<bool>> = HashMap::new();
        loop {
            let want = wanted.borrow_and_update().clone();
            running.retain(|port, stop| {
                let keep = want.contains(port);
                if !keep {
                    stop.send_replace(true);
                    tracing::info!(port, "stopped listening");
                }
                keep
            });
            let mut failed = false;
            let missing: Vec<u16> = want
                .iter()
                .copied()
                .filter(|p| !running.contains_key(p))
                .collect();
            for port in missing {
                match std::net::TcpListener::bind(SocketAddr::new(self.listen_ip, port))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(TcpListener::from_std)
                {
                    Ok(listener) => {
                        let (stop, stop_rx) = watch::channel(false);
                        running.insert(port, stop);
                        tracing::info!(port, "listening");
                        tokio::spawn(Arc::clone(&self).accept_loop(listener, port, stop_rx));
                    }
                    Err(err) => {
                        failed = true;
                        self.proxy
                            .metrics
                            .bind_failures
                            .get_or_create(&crate::metrics::PortLabels { port })
                            .inc();
                        tracing::error!(port, error = %err, "cannot listen on activator port");
                    }
                }
            }
            let ports: BTreeSet<u16> = running.keys().copied().collect();
            self.bound.send_if_modified(|b| {
                let changed = *b != ports;
                *b = ports;
                changed
            });
            let retry = async {
                if failed {
                    tokio::time::sleep(BIND_RETRY).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { break },
                () = signalled(&mut shutdown) => break,
                () = retry => {}
            }
        }
        for stop in running.values() {
            stop.send_replace(true);
        }
        self.bound.send_replace(BTreeSet::new());
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        port: u16,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => match self.slots.try_take() {
                        Some(slot) => self.serve(stream, peer, port, slot),
                        None => {
                            // At the cap: closed at once, so the caller fails fast (and may
                            // retry another replica) instead of waiting in the backlog.
                            self.proxy.metrics.connections_refused.inc();
                            tracing::debug!(port, %peer, "at --max-connections; connection closed");
                            drop(stream);
                        }
                    },
                    Err(err) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        tracing::warn!(port, error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = signalled(&mut stop) => return,
                () = signalled(&mut shutdown) => return,
            }
        }
    }

    /// Serves one accepted connection on `port` (the port, not the address the caller dialled,
    /// names the app). `slot` is its place under `--max-connections`.
    pub fn serve(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        port: u16,
        slot: ConnectionSlot,
    ) {
        let _ = stream.set_nodelay(true);
        let server = Arc::clone(self);
        let guard = self.proxy.tracker.track();
        tokio::spawn(async move {
            let _guard = guard;
            let proxy = Arc::clone(&server.proxy);
            let trusted = crate::access::trusted(&proxy.trusted_callers, peer.ip());
            let caller = Arc::new(Caller::with_slot(peer, trusted, slot));
            let upload = Arc::clone(&caller.upload);
            let activity = Arc::new(Activity::new());
            let service_caller = Arc::clone(&caller);
            let service_activity = Arc::clone(&activity);
            let service = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                let caller = Arc::clone(&service_caller);
                let in_flight = InFlight::start(&service_activity);
                async move {
                    let resp = proxy.handle(req, port, &caller).await;
                    // The request counts as open until its response body is sent.
                    Ok::<_, Infallible>(resp.map(|body| Tracked {
                        body,
                        _in_flight: in_flight,
                    }))
                }
            });
            let conn = server.builder.serve_connection_with_upgrades(
                TokioIo::new(CallerIo::new(stream, upload)),
                service,
            );
            tokio::pin!(conn);
            let mut shutdown = server.shutdown.subscribe();
            let limits = &server.limits;
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(err) = res {
                        if err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                            // hyper's own deadline for a later HTTP/1.1 head.
                            server.proxy.metrics.connection_timeout(ConnectionTimeout::header).inc();
                        }
                        tracing::debug!(port, %peer, error = %err, "connection ended with an error");
                    }
                }
                timeout = watchdog(&activity, limits.header_timeout, nonzero(limits.idle_timeout)) => {
                    server.proxy.metrics.connection_timeout(timeout).inc();
                    match timeout {
                        // Nothing of value is open: close the socket now (dropping `conn`).
                        ConnectionTimeout::header => {
                            tracing::debug!(port, %peer, "no request head within the header timeout; closed");
                        }
                        ConnectionTimeout::idle => {
                            tracing::debug!(port, %peer, "idle connection closed");
                            conn.as_mut().graceful_shutdown();
                            if let Err(err) = conn.await {
                                tracing::debug!(port, %peer, error = %err, "connection ended with an error");
                            }
                        }
                    }
                }
                // Either the activator shuts down, or the caller was told to reconnect
                // elsewhere: finish the current requests, then close (h2: GOAWAY).
                () = async {
                    tokio::select! {
                        () = signalled(&mut shutdown) => {}
                        () = caller.close.notified() => {}
                    }
                } => {
                    conn.as_mut().graceful_shutdown();
                    if let Err(err) = conn.await {
                        tracing::debug!(port, %peer, error = %err, "connection ended with an error");
                    }
                }
            }
        });
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// What the requests of one connection are doing, for its timeouts. Updated with a few atomic
/// operations per request; read only by the connection's [`watchdog`] when its timer expires.
struct Activity {
    opened: Instant,
    /// Requests started so far.
    started: AtomicU64,
    /// Requests whose response has not been sent whole yet.
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds after `opened`.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    fn last_end(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire))
    }
}

/// One request open on a connection, from the moment it reaches the service until its response
/// body is sent (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as open until it is sent or dropped.
struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Resolves when the connection should be closed: no request arrived within `header_timeout`
/// of the accept (a silent caller, one trickling its head, one that stops inside the HTTP/2
/// preface), or no request was open for `idle_timeout`. It sleeps between deadlines and reads
/// the counters when it wakes, so the request path arms no timer and wakes no task for it; an
/// idle connection is closed between one and two idle timeouts after its last request.
async fn watchdog(
    activity: &Activity,
    header_timeout: Duration,
    idle_timeout: Option<Duration>,
) -> ConnectionTimeout {
    loop {
        let now = Instant::now();
        let deadline = if activity.started.load(Ordering::Acquire) == 0 {
            let first_request = activity.opened + header_timeout;
            if first_request <= now {
                return ConnectionTimeout::header;
            }
            match idle_timeout {
                // Look again after one idle period, to start timing idleness if a request came.
                Some(idle) => first_request.min(now + idle),
                None => first_request,
            }
        } else {
            let Some(idle) = idle_timeout else {
                return std::future::pending().await;
            };
            if activity.in_flight.load(Ordering::Acquire) > 0 {
                now + idle
            } else {
                let idle_until = activity.last_end() + idle;
                if idle_until <= now {
                    return ConnectionTimeout::idle;
                }
                idle_until
            }
        };
        tokio::time::sleep_until(deadline).await;
    }
}

/// Keeps one timer pending that always expires before any header-read timer, until shutdown.
/// `period` is no longer than the header timeout.
///
/// hyper arms a header-timeout timer each time a connection waits for a request. Tokio's
/// timer driver wakes its own thread (an eventfd write, then one more `epoll_wait`) whenever a
/// timer is armed that expires before every pending one, which, with no other timer pending,
/// is every time: on a quiet activator each request paid two extra syscalls for it. With this
/// tick pending, arming a header-read timer is silent.
async fn anchor_timers(period: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = signalled(&mut shutdown) => return,
        }
    }
}

/// Resolves once the flag is set (or its sender is gone).
async fn signalled(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
