//! Listeners and connections: one listener per activator port the registry knows (bound and
//! closed as apps come and go), HTTP/1.1 and h2c on each, and the bookkeeping that lets a
//! shutdown stop accepting yet finish every request and tunnel already in flight.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::proxy::{Caller, Proxy};
use crate::tracker::Tracker;

/// How often a port that could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// How long a caller may take to send a request's headers, idle keep-alive time included.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Period of [`anchor_timers`]: shorter than [`HEADER_READ_TIMEOUT`].
const TIMER_ANCHOR_PERIOD: Duration = Duration::from_secs(10);

pub struct Server {
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    listen_ip: IpAddr,
    shutdown: watch::Sender<bool>,
    bound: watch::Sender<BTreeSet<u16>>,
}

impl Server {
    pub fn new(proxy: Arc<Proxy>, listen_ip: IpAddr) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(hyper_util::rt::TokioTimer::new());
        // Bounds how long a caller may take to send its headers, so a slow or broken client
        // cannot pin a connection forever.
        builder
            .http1()
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(1024 * 1024);
        builder.http2().timer(hyper_util::rt::TokioTimer::new());
        Self {
            proxy,
            builder,
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
        tokio::spawn(anchor_timers(self.shutdown.subscribe()));
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
                    Ok((stream, peer)) => self.serve(stream, peer, port),
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
    /// names the app).
    pub fn serve(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, port: u16) {
        let _ = stream.set_nodelay(true);
        let server = Arc::clone(self);
        let guard = self.proxy.tracker.track();
        tokio::spawn(async move {
            let _guard = guard;
            let proxy = Arc::clone(&server.proxy);
            let trusted = crate::access::trusted(&proxy.trusted_callers, peer.ip());
            let caller = Arc::new(Caller::new(peer, trusted));
            let service_caller = Arc::clone(&caller);
            let service = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                let caller = Arc::clone(&service_caller);
                async move { Ok::<_, Infallible>(proxy.handle(req, port, &caller).await) }
            });
            let conn = server
                .builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut shutdown = server.shutdown.subscribe();
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(err) = res {
                        tracing::debug!(port, %peer, error = %err, "connection ended with an error");
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

/// Keeps one timer pending that always expires before any header-read timer, until shutdown.
///
/// hyper arms a [`HEADER_READ_TIMEOUT`] timer each time a connection waits for a request. Tokio's
/// timer driver wakes its own thread (an eventfd write, then one more `epoll_wait`) whenever a
/// timer is armed that expires before every pending one, which, with no other timer pending,
/// is every time: on a quiet activator each request paid two extra syscalls for it. With this
/// tick pending, arming a header-read timer is silent.
async fn anchor_timers(mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TIMER_ANCHOR_PERIOD);
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
