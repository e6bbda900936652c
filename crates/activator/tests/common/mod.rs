//! Test helpers: real HTTP backends and clients on 127.0.0.1, a wake client that flips pods
//! ready the way the operator and kubelet would, and an activator started on real sockets.
#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use crac_activator::registry::Registry;
use crac_activator::routes::{AppConfig, AppKey, PortMapping};
use crac_activator::wake::{WakeClient, WakeError};
use crac_activator::{Activator, Config};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A port free on 127.0.0.1 right now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Shared state of a test backend, to observe what it saw.
#[derive(Default)]
pub struct BackendState {
    pub requests: AtomicUsize,
    /// Bytes of request bodies read so far by `/hash`.
    pub body_bytes: AtomicU64,
    /// `/stream` waits on this after its first chunk.
    pub stream_gate: Notify,
    pub last_xff: Mutex<Option<String>>,
}

pub struct Backend {
    pub port: u16,
    pub state: Arc<BackendState>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const STREAM_CHUNK: usize = 64 * 1024;

/// Deterministic bytes for chunk `i` of a stream.
pub fn chunk(i: usize) -> Bytes {
    Bytes::from(
        (0..STREAM_CHUNK)
            .map(|j| ((i * 31 + j * 7) % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

type BackendBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> BackendBody {
    Full::new(text.into()).boxed()
}

async fn backend_handle(
    state: Arc<BackendState>,
    mut req: Request<Incoming>,
) -> Response<BackendBody> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    *state.last_xff.lock().unwrap() = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let path = req.uri().path().to_owned();
    if let Some(id) = path.strip_prefix("/echo/") {
        return Response::new(full(format!("id:{id}")));
    }
    match path.as_str() {
        "/version" => Response::new(full(format!("{:?}", req.version()))),
        "/hash" => {
            let mut hasher = Sha256::new();
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Response::builder()
                        .status(400)
                        .body(full("body error"))
                        .unwrap();
                };
                if let Some(data) = frame.data_ref() {
                    state
                        .body_bytes
                        .fetch_add(data.len() as u64, Ordering::SeqCst);
                    hasher.update(data);
                }
            }
            Response::new(full(hex(&hasher.finalize())))
        }
        "/stream" => {
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(16);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                for i in 0..n {
                    if tx.send(Ok(Frame::data(chunk(i)))).await.is_err() {
                        return;
                    }
                    if i == 0 {
                        // The rest is sent only once the client has the first chunk: proves
                        // the activator streams instead of buffering the whole response.
                        state.stream_gate.notified().await;
                    }
                }
            });
            let stream =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                );
            Response::new(StreamBody::new(stream).boxed())
        }
        "/ws" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(full(""))
                .unwrap()
        }
        _ => Response::builder()
            .status(404)
            .body(full("no such path"))
            .unwrap(),
    }
}

/// A backend serving HTTP/1.1 and h2c (prior knowledge) on 127.0.0.1.
pub async fn start_backend(port: Option<u16>) -> Backend {
    start_backend_on(LOOPBACK, port.unwrap_or(0)).await
}

/// A backend on a given loopback address (a kwok pod's 127.100.x.y) and port.
pub async fn start_backend_on(ip: IpAddr, port: u16) -> Backend {
    assert!(ip.is_loopback(), "tests serve on loopback only");
    let mut tries = 0;
    let listener = loop {
        match TcpListener::bind((ip, port)).await {
            Ok(l) => break l,
            Err(e) if tries < 50 && port != 0 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("backend bind: {e}"),
        }
    };
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(BackendState::default());
    let st = Arc::clone(&state);
    let task = tokio::spawn(async move {
        // Connections live in this set, so stopping the backend closes them too (a pod that
        // went away).
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            while conns.try_join_next().is_some() {}
            let st = Arc::clone(&st);
            conns.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(backend_handle(st, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend { port, state, task }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the test wake client does when asked to wake.
#[derive(Clone)]
pub enum OnWake {
    /// After `delay`, the app's pod at 127.0.0.1 turns ready.
    Ready { delay: Duration },
    /// Nothing happens (the operator never wakes it).
    Never,
    /// The API server refuses the patch for good.
    Refuse,
}

/// A [`WakeClient`] standing in for the API server, operator and kubelet.
pub struct TestWaker {
    pub calls: AtomicUsize,
    pub on_wake: Mutex<OnWake>,
    registries: Mutex<Vec<Arc<Registry>>>,
}

impl TestWaker {
    pub fn new(on_wake: OnWake) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            on_wake: Mutex::new(on_wake),
            registries: Mutex::new(Vec::new()),
        })
    }

    /// Every activator whose pods this "cluster" updates (several replicas share one cluster).
    pub fn attach(&self, registry: Arc<Registry>) {
        self.registries.lock().unwrap().push(registry);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The cluster's view changed: the app's pods are these, on every attached activator.
    pub fn set_pods(&self, app: &AppKey, ips: Vec<IpAddr>) {
        for r in self.registries.lock().unwrap().iter() {
            r.set_ready_pods(app, ips.clone());
        }
    }
}

impl WakeClient for TestWaker {
    fn request_wake<'a>(&'a self, app: &'a AppKey) -> BoxFuture<'a, Result<(), WakeError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let on_wake = self.on_wake.lock().unwrap().clone();
        let registries = self.registries.lock().unwrap().clone();
        let app = app.clone();
        Box::pin(async move {
            match on_wake {
                OnWake::Ready { delay } => {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        for r in registries {
                            r.set_ready_pods(&app, vec![LOOPBACK]);
                        }
                    });
                    Ok(())
                }
                OnWake::Never => Ok(()),
                OnWake::Refuse => Err(WakeError {
                    permanent: true,
                    message: "cracapps.crac.dev \"x\" not found".into(),
                }),
            }
        })
    }
}

/// An activator on 127.0.0.1 that trusts callers from 127.0.0.1 (as a node's own health checks
/// would be): the tests of the data path call from there. The caller check's tests call from
/// other loopback addresses (127.0.0.2, …), which it does not trust.
pub fn test_config() -> Config {
    Config {
        listen_ip: LOOPBACK,
        drain_timeout: Duration::from_secs(20),
        // The shutdown delay has its own test (binary.rs); the others drain at once.
        shutdown_delay: Duration::ZERO,
        trusted_callers: crac_activator::access::parse_cidrs("127.0.0.1/32").unwrap(),
        ..Config::default()
    }
}

pub fn app_key() -> AppKey {
    AppKey::new("shop", "demo")
}

pub fn app_config(activator_port: u16, target_port: u16, wake_timeout: Duration) -> AppConfig {
    AppConfig {
        key: app_key(),
        ports: vec![PortMapping {
            activator_port,
            target_port,
        }],
        wake_timeout,
        serving_mode: Some(crac_api::cracapp::ServingMode::Activator),
        caller_namespaces: Vec::new(),
        probe: None,
        in_place_uid: None,
    }
}

/// An activator on 127.0.0.1 serving one app (asleep: no ready pods) on a fresh port.
pub async fn start_activator(
    config: Config,
    waker: &Arc<TestWaker>,
    target_port: u16,
    wake_timeout: Duration,
) -> (Arc<Activator>, u16) {
    let activator = Activator::new(config, Arc::clone(waker) as Arc<dyn WakeClient>);
    waker.attach(Arc::clone(activator.registry()));
    activator.start();
    let port = free_port();
    activator
        .registry()
        .upsert_app(app_config(port, target_port, wake_timeout));
    assert!(
        activator.wait_listening(port, Duration::from_secs(5)).await,
        "activator did not listen on {port}"
    );
    (activator, port)
}

/// A response read to the end.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// One HTTP/1.1 request on its own connection.
pub async fn request<B>(port: u16, req: Request<B>) -> Result<Answer, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    request_from(LOOPBACK, port, req).await
}

/// A connection to 127.0.0.1:`port` from `source` (any 127/8 address: Linux lets a socket bind
/// one without configuring it), so the activator sees that caller IP.
pub async fn connect_from(source: IpAddr, port: u16) -> std::io::Result<TcpStream> {
    assert!(source.is_loopback(), "tests call from loopback only");
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    socket.connect((LOOPBACK, port).into()).await
}

/// One HTTP/1.1 request on its own connection from `source`.
pub async fn request_from<B>(source: IpAddr, port: u16, req: Request<B>) -> Result<Answer, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = connect_from(source, port)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub async fn get(port: u16, path: impl Into<String>) -> Result<Answer, String> {
    get_from(LOOPBACK, port, path).await
}

/// A GET from another caller IP (127.0.0.2, …).
pub async fn get_from(
    source: IpAddr,
    port: u16,
    path: impl Into<String>,
) -> Result<Answer, String> {
    let req = Request::get(path.into())
        .header("host", "demo.shop.svc")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    request_from(source, port, req).await
}

/// Value of a counter or gauge line in the activator's metrics text, 0 when absent.
pub fn metric(activator: &Activator, line_prefix: &str) -> f64 {
    activator
        .metrics()
        .encode()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Fails the test instead of hanging it.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no result within {limit:?}"),
    }
}

/// A spawned binary, killed if the test fails before it exits.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Child {
    /// Sends SIGTERM, without waiting.
    pub fn sigterm(&self) {
        let pid = self.0.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits (`limit` at most) for the process to exit; returns its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        within(limit, "exit after SIGTERM", async {
            loop {
                if let Some(status) = self.0.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Sends SIGTERM and waits (15 s at most) for the process to exit; returns its status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(15)).await
    }
}

/// Reads until the activator closes `stream` (EOF or an error), at most `limit`; returns what
/// it sent first, or `None` when the connection was still open at the limit.
#[allow(dead_code)] // each test binary compiles this module and uses part of it
pub async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| got)
}
