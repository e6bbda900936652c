//! Forwarding one request: choose (or wait for) a ready pod, rewrite the hop-by-hop headers,
//! send it over a pooled connection of the same protocol the caller used (HTTP/1.1 or h2c),
//! stream both bodies through untouched, and splice upgraded connections (WebSocket).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::access::{Cidr, Refusal, check_caller};
use crate::early_answer::{CallerBody, PodIo, UploadState};
use crate::hold::{HoldContext, Pick};
use crate::metrics::{Metrics, Outcome, RefusedReason};
use crate::registry::{PortEntry, Registry};
use crate::tracker::{ConnectionSlot, Tracker};

/// How long a request for an app that is not served waits for its mode to turn `Activator`
/// before it is told to reconnect: the operator points the Service at the activator a moment
/// before the status saying so arrives here.
const SWITCH_WAIT: Duration = Duration::from_secs(1);

/// Body of every response the activator returns: the pod's, streamed, or a short one of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Body of every request sent to a pod: the caller's, streamed, or empty for a replay.
pub type OutBody = Either<CallerBody, Empty<Bytes>>;

/// The caller at the other end of one connection, worked out once per connection rather than
/// once per request.
#[derive(Debug)]
pub struct Caller {
    pub addr: SocketAddr,
    /// The source IP is in a `--trusted-callers` range: no caller check.
    pub trusted: bool,
    /// `X-Forwarded-For` for a request that carries none: the caller's IP (always a valid
    /// header value; `None` would give 400, as an invalid one did before).
    forwarded_for: Option<HeaderValue>,
    /// Notified when the connection should close after its current requests (the app is
    /// awake: the caller should reconnect through the Service).
    pub close: Notify,
    /// Whether an HTTP/1.1 request's body was read to its end, for an answer that comes first.
    pub upload: Arc<UploadState>,
    /// The connection's place under `--max-connections`: freed when the last holder of this
    /// `Caller` is gone, the connection or a tunnel it was upgraded to.
    _slot: Option<ConnectionSlot>,
}

impl Caller {
    pub fn new(addr: SocketAddr, trusted: bool) -> Self {
        Self {
            addr,
            trusted,
            forwarded_for: HeaderValue::try_from(addr.ip().to_string()).ok(),
            close: Notify::new(),
            upload: Arc::default(),
            _slot: None,
        }
    }

    /// A caller whose connection holds `slot` for as long as it (or its tunnel) lives.
    pub fn with_slot(addr: SocketAddr, trusted: bool, slot: ConnectionSlot) -> Self {
        Self {
            _slot: Some(slot),
            ..Self::new(addr, trusted)
        }
    }
}

/// Everything the request path needs.
pub struct Proxy {
    pub registry: Arc<Registry>,
    pub hold: HoldContext,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub retry_after: Duration,
    /// Upgraded tunnels outlive their request; a shutdown waits for them too.
    pub tracker: Tracker,
    /// Source ranges allowed without a caller check (`--trusted-callers`).
    pub trusted_callers: Vec<Cidr>,
    /// How long after an app's switch to `Pods` it is still served (`--awake-grace`).
    pub awake_grace: Duration,
}

impl Proxy {
    /// Handles one request that arrived on `local_port` from `caller`.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        local_port: u16,
        caller: &Arc<Caller>,
    ) -> Response<ProxyBody> {
        let arrived = Instant::now();
        let route = match self.registry.route(local_port) {
            Some(PortEntry::App(route)) => route,
            Some(PortEntry::Contested) => {
                self.metrics.refused(RefusedReason::port_conflict).inc();
                return self.unavailable("this port is claimed by more than one app\n");
            }
            None => {
                self.metrics.unknown_port.inc();
                return plain(StatusCode::NOT_FOUND, "no app is served on this port\n");
            }
        };
        let app = route.app;
        // Before anything about the app is looked at: a refused caller wakes nothing and
        // learns nothing of its state.
        if !caller.trusted {
            let namespace = self.registry.caller_namespace(caller.addr.ip());
            if let Err(refusal) = check_caller(
                namespace.as_deref(),
                &app.key.namespace,
                &route.caller_namespaces,
            ) {
                let reason = match refusal {
                    Refusal::UnknownCaller => RefusedReason::unknown_caller,
                    Refusal::NamespaceNotAllowed => RefusedReason::namespace_not_allowed,
                };
                self.metrics.refused(reason).inc();
                tracing::debug!(app = %app.key, caller = %caller.addr, ?reason, "caller refused");
                return plain(StatusCode::FORBIDDEN, "caller not allowed\n");
            }
        }
        let h2 = req.version() == Version::HTTP_2;
        if !app.serves(arrived.into_std(), self.awake_grace)
            && !app.wait_served(self.awake_grace, SWITCH_WAIT).await
        {
            app.metrics.outcome(Outcome::app_awake).inc();
            return reconnect(caller, h2);
        }
        let upgrade = is_upgrade(&req);
        if let Err(status) = prepare_request(&mut req, caller, h2, upgrade) {
            return plain(status, "malformed request\n");
        }
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let mut req = req.map(|body| {
            Either::Left(if h2 {
                CallerBody::unwatched(body)
            } else {
                CallerBody::watched(body, &caller.upload)
            })
        });

        let mut refused: Vec<IpAddr> = Vec::new();
        loop {
            let pick = app.pick(&self.hold, &refused, arrived).await;
            let picked = arrived.elapsed();
            let (ip, held) = match pick {
                Pick::Ready { ip, held } => (ip, held),
                Pick::QueueFull => {
                    app.metrics.outcome(Outcome::queue_full).inc();
                    return self
                        .unavailable("too many requests are waiting for this app to wake\n");
                }
                Pick::HeldLimit => {
                    app.metrics.outcome(Outcome::held_limit).inc();
                    tracing::debug!(app = %app.key, "--max-held requests are held already");
                    return self.unavailable("too many requests are waiting for apps to wake\n");
                }
                Pick::Timeout => {
                    app.metrics.outcome(Outcome::wake_timeout).inc();
                    app.failed_at_zero(picked);
                    tracing::warn!(app = %app.key, "no ready pod before the wake deadline");
                    return self.unavailable("the app did not wake in time\n");
                }
                Pick::Failed(reason) => {
                    app.metrics.outcome(Outcome::wake_failed).inc();
                    app.failed_at_zero(picked);
                    tracing::warn!(app = %app.key, %reason, "wake failed");
                    return self.unavailable("the app could not be woken\n");
                }
            };
            let addr = SocketAddr::new(ip, route.target_port);
            match self.pool.send(addr, req, h2, upgrade).await {
                Ok(mut resp) => {
                    let outcome = if held {
                        // The answer's head is here: its first byte, as the caller will see it.
                        app.answered_at_zero(ip, arrived.elapsed(), picked);
                        Outcome::woken
                    } else {
                        Outcome::forwarded
                    };
                    app.metrics.outcome(outcome).inc();
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    if switching {
                        if let Some(client_upgrade) = client_upgrade {
                            let backend_upgrade = hyper::upgrade::on(&mut resp);
                            let guard = self.tracker.track();
                            // The tunnel keeps the caller's socket, so its connection slot.
                            let caller = Arc::clone(caller);
                            tokio::spawn(async move {
                                splice(client_upgrade, backend_upgrade).await;
                                drop(guard);
                                drop(caller);
                            });
                        }
                    } else {
                        strip_hop_by_hop(resp.headers_mut(), false);
                        if caller.upload.unfinished() {
                            // The pod answered before the upload was sent whole: the caller's
                            // connection cannot be reused, and the caller may stop sending.
                            resp.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                    }
                    return resp.map(Either::Left);
                }
                Err(SendError::NotSent(back, err)) => {
                    tracing::debug!(%addr, error = %err, "pod refused the connection; trying another");
                    refused.push(ip);
                    req = back;
                }
                Err(SendError::Failed(err)) => {
                    app.metrics.outcome(Outcome::bad_gateway).inc();
                    tracing::warn!(app = %app.key, %addr, error = %err, "forwarding failed");
                    return plain(StatusCode::BAD_GATEWAY, "the app's pod failed to answer\n");
                }
            }
        }
    }

    fn unavailable(&self, message: &'static str) -> Response<ProxyBody> {
        let mut resp = plain(StatusCode::SERVICE_UNAVAILABLE, message);
        let secs = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp
    }
}

/// The app is awake and the Service points at its pods: 503 with `Retry-After: 0` and the
/// connection closed after it (HTTP/1.1: `Connection: close`; h2: GOAWAY, which lets the
/// connection's other streams finish), so the caller reconnects through the Service.
fn reconnect(caller: &Caller, h2: bool) -> Response<ProxyBody> {
    let mut resp = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "the app is awake; reconnect through its Service\n",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
    if !h2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    caller.close.notify_one();
    resp
}

/// A short text response of the activator's own.
pub fn plain(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        message.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a header is one of those that describe one hop (RFC 9110 §7.6.1), or `Connection`,
/// which may name more.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::UPGRADE
        || name == header::TRANSFER_ENCODING
        || name == header::TRAILER
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes the headers that describe one hop (RFC 9110 §7.6.1), and those the `Connection`
/// header names. An upgrade keeps `Connection: upgrade` and `Upgrade`, which the pod needs.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests and many responses carry none of them: one pass over the few names present
    // is cheaper than a dozen hashed removals.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers_only = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .all(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    if !trailers_only {
        // `TE: trailers` is end-to-end for gRPC; any other TE is this hop's.
        headers.remove(header::TE);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
}

/// Rewrites a request for the pod: hop-by-hop headers out, `X-Forwarded-For` in, and the URI
/// in the form the outgoing protocol wants (origin-form plus Host for HTTP/1.1, absolute for h2).
/// The common case (an origin-form HTTP/1.1 request, an absolute `http` h2 request) keeps its
/// URI untouched; the others are rebuilt from their parts, never reparsed.
fn prepare_request<B>(
    req: &mut Request<B>,
    caller: &Caller,
    h2: bool,
    upgrade: bool,
) -> Result<(), StatusCode> {
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    // The activator's hyper server already answered `Expect: 100-continue`.
    headers.remove(header::EXPECT);
    let forwarded = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => {
            HeaderValue::try_from(format!("{prior}, {}", caller.addr.ip()))
                .map_err(|_| StatusCode::BAD_REQUEST)?
        }
        _ => caller
            .forwarded_for
            .clone()
            .ok_or(StatusCode::BAD_REQUEST)?,
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }

    let uri = req.uri();
    if h2 {
        if uri.scheme() != Some(&Scheme::HTTP) || uri.authority().is_none() {
            let authority = match uri.authority() {
                Some(a) => a.clone(),
                None => req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                    .ok_or(StatusCode::BAD_REQUEST)?,
            };
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority);
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(parts).map_err(|_| StatusCode::BAD_REQUEST)?;
        }
        *req.version_mut() = Version::HTTP_2;
    } else {
        if uri.scheme().is_some() || uri.authority().is_some() {
            // Absolute- or authority-form: the pod gets origin-form and the authority as Host.
            if let Some(authority) = uri.authority()
                && !req.headers().contains_key(header::HOST)
            {
                let host = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| StatusCode::BAD_REQUEST)?;
                req.headers_mut().insert(header::HOST, host);
            }
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
        }
        if req.version() != Version::HTTP_10 {
            *req.version_mut() = Version::HTTP_11;
        }
    }
    Ok(())
}

/// Copies bytes both ways between the caller's and the pod's upgraded connections until both
/// sides close.
async fn splice(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!(error = %err, "upgraded connection ended with an error");
    }
}

/// Why a request did not get a response from the pod. (Large, but returned only on the rare
/// failure path; boxing it would cost every request an allocation.)
#[allow(clippy::large_enum_variant)]
pub enum SendError {
    /// The request never left: the pod refused or did not accept the connection. The request
    /// comes back so it can go to another pod.
    NotSent(Request<OutBody>, String),
    /// The request was (at least partly) sent, so it cannot be replayed.
    Failed(hyper::Error),
}

/// Connections to pods, reused across requests: idle HTTP/1.1 connections per pod address,
/// and one multiplexed h2 connection per pod address.
pub struct Pool {
    h1_idle: Arc<IdleH1>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<OutBody>>>,
    connect_timeout: Duration,
    max_idle_per_backend: usize,
}

impl Pool {
    pub fn new(connect_timeout: Duration, max_idle_per_backend: usize) -> Self {
        Self {
            h1_idle: Arc::default(),
            h2: Mutex::default(),
            connect_timeout,
            max_idle_per_backend,
        }
    }

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Callers box this future: a new connection is the rare path, and its handshake state
    /// would otherwise make every request's future (moved into hyper per request) kilobytes
    /// larger.
    async fn connect_h1(
        &self,
        addr: SocketAddr,
        upgrades: bool,
    ) -> Result<http1::SendRequest<OutBody>, ConnectError> {
        let stream = self.connect(addr).await.map_err(ConnectError::Io)?;
        // A tunnel's copy ends on a failed write; an exchange reads the pod's answer first.
        let io = if upgrades {
            PodIo::plain(stream)
        } else {
            PodIo::reading_on(stream)
        };
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(ConnectError::Http)?;
        if upgrades {
            tokio::spawn(async move {
                if let Err(err) = conn.with_upgrades().await {
                    tracing::debug!(error = %err, "pod connection ended");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    tracing::debug!(error = %err, "pod connection ended");
                }
            });
        }
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<OutBody>, ConnectError> {
        let io = self.connect(addr).await.map_err(ConnectError::Io)?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(ConnectError::Http)?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "pod h2 connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends one request to `addr`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<OutBody>,
        h2: bool,
        upgrade: bool,
    ) -> Result<Response<Incoming>, SendError> {
        if upgrade {
            // An upgraded connection is never returned to the pool.
            let mut sender = match Box::pin(self.connect_h1(addr, true)).await {
                Ok(s) => s,
                Err(err) => return Err(err.not_sent(req)),
            };
            return sender.send_request(req).await.map_err(SendError::Failed);
        }
        if h2 {
            return self.send_h2(addr, req).await;
        }
        self.send_h1(addr, req).await
    }

    async fn send_h1(
        &self,
        addr: SocketAddr,
        mut req: Request<OutBody>,
    ) -> Result<Response<Incoming>, SendError> {
        // Idle connections first; one the pod closed meanwhile hands the request back unsent.
        while let Some(mut sender) = self.take_idle(addr) {
            // A reused connection may have been closed by the pod just as the request went
            // out (no response head came back). A bodiless idempotent request is then sent
            // again (RFC 9110 §9.2.2).
            let replay = replayable(&req).then(|| head_of(&req));
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.return_when_ready(addr, sender);
                    return Ok(resp);
                }
                Err(mut err) => match err.take_message() {
                    Some(back) => req = back,
                    None => {
                        let err = err.into_error();
                        match replay {
                            Some(head) => {
                                tracing::debug!(%addr, error = %err, "reused connection failed; sending again");
                                req = head;
                            }
                            None => return Err(SendError::Failed(err)),
                        }
                    }
                },
            }
        }
        let mut sender = match Box::pin(self.connect_h1(addr, false)).await {
            Ok(s) => s,
            Err(err) => return Err(err.not_sent(req)),
        };
        let replay = replayable(&req).then(|| head_of(&req));
        match sender.try_send_request(req).await {
            Ok(resp) => {
                self.return_when_ready(addr, sender);
                Ok(resp)
            }
            Err(mut err) => match (err.take_message(), replay) {
                (Some(back), _) => Err(SendError::NotSent(back, err.into_error().to_string())),
                // The pod dropped the connection without answering (it is going away): a
                // bodiless idempotent request may go to another pod.
                (None, Some(head)) => Err(SendError::NotSent(head, err.into_error().to_string())),
                (None, None) => Err(SendError::Failed(err.into_error())),
            },
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<OutBody>> {
        let mut idle = self.h1_idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&addr)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        idle.remove(&addr);
        None
    }

    /// Puts the connection back once the response body has been read to the end (HTTP/1.1
    /// carries one exchange at a time): at once when it is already (a short body that came
    /// with the head), else from a task that waits for it.
    fn return_when_ready(&self, addr: SocketAddr, mut sender: http1::SendRequest<OutBody>) {
        if sender.is_ready() {
            put_idle(&self.h1_idle, self.max_idle_per_backend, addr, sender);
            return;
        }
        let idle = Arc::clone(&self.h1_idle);
        let max = self.max_idle_per_backend;
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                put_idle(&idle, max, addr, sender);
            }
        });
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        mut req: Request<OutBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let cached = {
            let conns = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
            conns.get(&addr).filter(|s| !s.is_closed()).cloned()
        };
        if let Some(mut sender) = cached {
            if sender.ready().await.is_ok() {
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(resp),
                    Err(mut err) => match err.take_message() {
                        Some(back) => req = back,
                        None => return Err(SendError::Failed(err.into_error())),
                    },
                }
            }
            self.h2
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&addr);
        }
        let mut sender = match Box::pin(self.connect_h2(addr)).await {
            Ok(s) => s,
            Err(err) => return Err(err.not_sent(req)),
        };
        self.h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr, sender.clone());
        if let Err(err) = sender.ready().await {
            return Err(SendError::NotSent(req, err.to_string()));
        }
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut err) => match err.take_message() {
                Some(back) => Err(SendError::NotSent(back, err.into_error().to_string())),
                None => Err(SendError::Failed(err.into_error())),
            },
        }
    }
}

type IdleH1 = Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<OutBody>>>>;

fn put_idle(idle: &IdleH1, max: usize, addr: SocketAddr, sender: http1::SendRequest<OutBody>) {
    let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
    let list = idle.entry(addr).or_default();
    if list.len() < max {
        list.push(sender);
    }
}

/// Whether a request can be sent again after a pod dropped it unanswered: an idempotent
/// method and no body.
fn replayable(req: &Request<OutBody>) -> bool {
    req.method().is_idempotent() && req.body().is_end_stream()
}

/// A bodiless copy of a request.
fn head_of(req: &Request<OutBody>) -> Request<OutBody> {
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

enum ConnectError {
    Io(std::io::Error),
    Http(hyper::Error),
}

impl ConnectError {
    fn not_sent(self, req: Request<OutBody>) -> SendError {
        match self {
            ConnectError::Io(err) => SendError::NotSent(req, err.to_string()),
            ConnectError::Http(err) => SendError::NotSent(req, err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], uri: &str) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request")
    }

    fn peer() -> Caller {
        Caller::new("127.0.0.1:4000".parse().expect("addr"), false)
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_forwarded_for_added() {
        let mut req = request(
            &[
                ("host", "demo.shop"),
                ("connection", "keep-alive, x-secret"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("te", "gzip"),
                ("transfer-encoding", "chunked"),
                ("proxy-authorization", "Basic x"),
                ("x-forwarded-for", "10.1.1.1"),
                ("x-app", "kept"),
            ],
            "/a?b=c",
        );
        prepare_request(&mut req, &peer(), false, false).expect("prepare");
        let h = req.headers();
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h["host"], "demo.shop");
        assert_eq!(req.uri(), "/a?b=c");
    }

    #[test]
    fn upgrade_keeps_upgrade_headers_and_te_trailers_survives() {
        let mut req = request(
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("te", "trailers"),
            ],
            "/ws",
        );
        assert!(is_upgrade(&req));
        prepare_request(&mut req, &peer(), false, true).expect("prepare");
        assert_eq!(req.headers()["connection"], "upgrade");
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert_eq!(req.headers()["te"], "trailers");
        assert!(!is_upgrade(&request(&[("upgrade", "websocket")], "/")));
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_host_for_http1_and_absolute_for_h2() {
        let mut req = request(&[], "http://demo.shop:8080/x");
        prepare_request(&mut req, &peer(), false, false).expect("prepare");
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()["host"], "demo.shop:8080");

        let mut req = request(&[("host", "demo.shop")], "/y");
        prepare_request(&mut req, &peer(), true, false).expect("prepare");
        assert_eq!(req.uri(), "http://demo.shop/y");
        assert_eq!(req.version(), Version::HTTP_2);

        let mut req = request(&[], "/z");
        assert_eq!(
            prepare_request(&mut req, &peer(), true, false),
            Err(StatusCode::BAD_REQUEST)
        );

        // An h2 caller's own scheme is replaced: the pod is spoken to in cleartext.
        let mut req = request(&[], "https://demo.shop/s?q=1");
        prepare_request(&mut req, &peer(), true, false).expect("prepare");
        assert_eq!(req.uri(), "http://demo.shop/s?q=1");

        // Authority-form (CONNECT) becomes `/` with the authority as Host.
        let mut req = request(&[], "demo.shop:443");
        prepare_request(&mut req, &peer(), false, false).expect("prepare");
        assert_eq!(req.uri(), "/");
        assert_eq!(req.headers()["host"], "demo.shop:443");
    }

    #[test]
    fn a_request_without_hop_by_hop_headers_keeps_everything_and_gains_forwarded_headers() {
        let mut req = request(&[("host", "demo"), ("accept", "*/*"), ("x-a", "1")], "/p?q");
        prepare_request(&mut req, &peer(), false, false).expect("prepare");
        let h = req.headers();
        assert_eq!(h.len(), 5);
        assert_eq!(h["host"], "demo");
        assert_eq!(h["accept"], "*/*");
        assert_eq!(h["x-a"], "1");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(req.uri(), "/p?q");
        assert_eq!(req.version(), Version::HTTP_11);
    }
}
