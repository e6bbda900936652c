//! Side-by-side measurements on loopback, in one run:
//! 1. latency (p50, p99) of one caller calling a backend directly vs through the activator with
//!    the app awake (proxy mode), and the difference;
//! 2. throughput with 16 concurrent keep-alive callers, direct vs through the activator, against
//!    a backend that does nothing (the worst case: the proxy's own CPU competes with the caller
//!    and the backend on 2 cores) and against one that spends 100 us of CPU per request;
//! 3. time from a request arriving for an asleep app to its first response byte, when the wake
//!    itself is instant (the pod turns ready the moment it is asked for): the activator's own
//!    share of a wake, against the same fresh-connection request sent directly.
//!
//! Each of backend, activator and load generator runs on its own single-threaded runtime, so
//! on a 2-core machine they compete for the cores as three processes would. Request counts are
//! fixed; everything is on 127.0.0.1. Run with `cargo bench -p crac-activator`.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crac_activator::kube::{WakeClient, WakeError};
use crac_activator::registry::Registry;
use crac_activator::routes::{AppConfig, AppKey, PortMapping};
use crac_activator::{Activator, Config};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const SEQUENTIAL_REQUESTS: usize = 5_000;
const CONCURRENT_CALLERS: usize = 16;
const CONCURRENT_REQUESTS_EACH: usize = 1_500;
const WAKES: usize = 300;

fn runtime_thread(name: &str) -> tokio::runtime::Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        })
        .unwrap();
    rx.recv().unwrap()
}

/// CPU time a "busy" backend request takes, standing in for an app that does real work.
const BUSY_WORK: Duration = Duration::from_micros(100);

async fn start_backend() -> u16 {
    start_backend_with_work(Duration::ZERO).await
}

async fn start_backend_with_work(work: Duration) -> u16 {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    if !work.is_zero() {
                        let started = Instant::now();
                        while started.elapsed() < work {
                            std::hint::spin_loop();
                        }
                    }
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello from the app\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// The pod turns ready the moment the wake is asked for.
struct InstantWaker {
    registry: Mutex<Option<Arc<Registry>>>,
}

impl WakeClient for InstantWaker {
    fn request_wake<'a>(&'a self, app: &'a AppKey) -> BoxFuture<'a, Result<(), WakeError>> {
        if let Some(registry) = self.registry.lock().unwrap().as_ref() {
            registry.set_ready_pods(app, vec![LOOPBACK]);
        }
        Box::pin(async { Ok(()) })
    }
}

async fn connect(port: u16) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(SocketAddr::new(LOOPBACK, port))
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn call(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> Duration {
    let started = Instant::now();
    sender.ready().await.unwrap();
    let req = Request::get("/")
        .header("host", "demo")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn sequential(port: u16, n: usize) -> Vec<Duration> {
    let mut sender = connect(port).await;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(call(&mut sender).await);
    }
    samples.sort();
    samples
}

async fn concurrent(port: u16, each: usize) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT_CALLERS)
        .map(|_| {
            tokio::spawn(async move {
                let mut sender = connect(port).await;
                let mut samples = Vec::with_capacity(each);
                for _ in 0..each {
                    samples.push(call(&mut sender).await);
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rps = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (rps, all)
}

/// Fresh connection, one request, time to the response head (first byte).
async fn first_byte(port: u16) -> Duration {
    let started = Instant::now();
    let mut sender = connect(port).await;
    let req = Request::get("/")
        .header("host", "demo")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    elapsed
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run quickly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let scale = if quick { 20 } else { 1 };

    let backend_rt = runtime_thread("backend");
    let activator_rt = runtime_thread("activator");
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let backend_port = backend_rt.block_on(start_backend());
    let busy_rt = runtime_thread("busy-backend");
    let busy_port = busy_rt.block_on(start_backend_with_work(BUSY_WORK));
    let busy_key = AppKey::new("bench", "busy");
    let waker = Arc::new(InstantWaker {
        registry: Mutex::new(None),
    });
    let key = AppKey::new("bench", "demo");
    let (activator, proxy_port, busy_proxy_port) = activator_rt.block_on({
        let waker = Arc::clone(&waker);
        let key = key.clone();
        let busy_key = busy_key.clone();
        async move {
            let activator = Activator::new(
                Config {
                    listen_ip: LOOPBACK,
                    ..Config::default()
                },
                waker.clone() as Arc<dyn WakeClient>,
            );
            *waker.registry.lock().unwrap() = Some(Arc::clone(activator.registry()));
            activator.start();
            let port = std::net::TcpListener::bind((LOOPBACK, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            activator.registry().upsert_app(AppConfig {
                key,
                ports: vec![PortMapping {
                    activator_port: port,
                    target_port: backend_port,
                }],
                wake_timeout: Duration::from_secs(30),
                serving_mode: None,
            });
            assert!(activator.wait_listening(port, Duration::from_secs(5)).await);
            let busy = std::net::TcpListener::bind((LOOPBACK, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            activator.registry().upsert_app(AppConfig {
                key: busy_key,
                ports: vec![PortMapping {
                    activator_port: busy,
                    target_port: busy_port,
                }],
                wake_timeout: Duration::from_secs(30),
                serving_mode: None,
            });
            assert!(activator.wait_listening(busy, Duration::from_secs(5)).await);
            (activator, port, busy)
        }
    });
    activator.registry().set_ready_pods(&key, vec![LOOPBACK]);
    activator
        .registry()
        .set_ready_pods(&busy_key, vec![LOOPBACK]);

    client_rt.block_on(async {
        // Warm both paths (connections, allocator, caches).
        sequential(backend_port, 1000 / scale).await;
        sequential(proxy_port, 1000 / scale).await;

        println!("crac-activator benchmark (loopback, {} cores)", std::thread::available_parallelism().map_or(0, |n| n.get()));
        println!();
        println!("1. one caller, keep-alive, {} requests each (latency)", SEQUENTIAL_REQUESTS / scale);
        let direct = sequential(backend_port, SEQUENTIAL_REQUESTS / scale).await;
        let proxied = sequential(proxy_port, SEQUENTIAL_REQUESTS / scale).await;
        for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
            let d = percentile(&direct, p);
            let v = percentile(&proxied, p);
            println!(
                "   {name}: direct {:>7.1} us   via activator {:>7.1} us   added {:>7.1} us",
                us(d),
                us(v),
                us(v) - us(d)
            );
        }

        println!();
        println!(
            "2. {CONCURRENT_CALLERS} concurrent callers, keep-alive, {} requests each (throughput)",
            CONCURRENT_REQUESTS_EACH / scale
        );
        let (direct_rps, direct_lat) = concurrent(backend_port, CONCURRENT_REQUESTS_EACH / scale).await;
        let (proxy_rps, proxy_lat) = concurrent(proxy_port, CONCURRENT_REQUESTS_EACH / scale).await;
        println!(
            "   direct {:>8.0} req/s (p99 {:>7.1} us)   via activator {:>8.0} req/s (p99 {:>7.1} us)   ratio {:.2}",
            direct_rps,
            us(percentile(&direct_lat, 0.99)),
            proxy_rps,
            us(percentile(&proxy_lat, 0.99)),
            proxy_rps / direct_rps
        );

        println!();
        println!(
            "2b. the same against an app spending {} us of CPU per request",
            BUSY_WORK.as_micros()
        );
        let (direct_rps, direct_lat) = concurrent(busy_port, CONCURRENT_REQUESTS_EACH / scale / 3).await;
        let (proxy_rps, proxy_lat) = concurrent(busy_proxy_port, CONCURRENT_REQUESTS_EACH / scale / 3).await;
        println!(
            "   direct {:>8.0} req/s (p99 {:>7.1} us)   via activator {:>8.0} req/s (p99 {:>7.1} us)   ratio {:.2}",
            direct_rps,
            us(percentile(&direct_lat, 0.99)),
            proxy_rps,
            us(percentile(&proxy_lat, 0.99)),
            proxy_rps / direct_rps
        );

        println!();
        println!("3. asleep app, instant wake, fresh connection, {} requests (time to first response byte)", WAKES / scale);
        let mut direct_fb = Vec::new();
        let mut wake_fb = Vec::new();
        for _ in 0..WAKES / scale {
            direct_fb.push(first_byte(backend_port).await);
            activator.registry().set_ready_pods(&key, vec![]);
            wake_fb.push(first_byte(proxy_port).await);
        }
        direct_fb.sort();
        wake_fb.sort();
        for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
            let d = percentile(&direct_fb, p);
            let w = percentile(&wake_fb, p);
            println!(
                "   {name}: direct {:>7.1} us   asleep via activator {:>7.1} us   activator's share of a wake {:>7.1} us",
                us(d),
                us(w),
                us(w) - us(d)
            );
        }
        let wakes = activator
            .metrics()
            .encode()
            .lines()
            .find(|l| l.starts_with("crac_activator_wakes_total{"))
            .map(String::from)
            .unwrap_or_default();
        println!("   ({wakes})");
    });
}
