//! Side-by-side measurements on loopback, in one run:
//! 1. latency (p50, p99) of one caller calling a backend directly vs through the activator with
//!    the app awake (proxy mode), and the difference;
//! 2. throughput with 16 concurrent keep-alive callers, direct vs through the activator,
//!    against three backends:
//!
//!    - one that does nothing: the worst case. The activator does about as much HTTP work per
//!      request as the caller and the backend together, and on 2 cores all three compete for
//!      the CPU, so the ratio is bounded near (caller + backend CPU) / (caller + activator +
//!      backend CPU), about 0.5, however cheap the proxy is made. The CPU each party spent per
//!      request is printed to show it;
//!    - one that spends 100 us of CPU per request;
//!    - a real JVM: `examples/hello-app` (JDK `HttpServer`), compiled with `javac` and run as a
//!      plain `java` process on 127.0.0.1, warmed up, then measured direct, via the activator,
//!      via the activator, direct (the two of each averaged, so JIT drift favours neither).
//!      Skipped, with a message, when `java` or `javac` is missing;
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
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crac_activator::registry::Registry;
use crac_activator::routes::{AppConfig, AppKey, PortMapping};
use crac_activator::wake::{WakeClient, WakeError};
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
/// Requests each caller sends to warm the JVM up (JIT) before it is measured.
const JVM_WARMUP_EACH: usize = 2_000;
/// The cores the bench assumes it shares (the machine).
const CORES: f64 = 2.0;

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

/// CPU time the calling thread has run so far (Linux `schedstat`; zero elsewhere).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time of a runtime's thread (each bench runtime has exactly one).
async fn runtime_cpu(rt: &tokio::runtime::Handle) -> Duration {
    rt.spawn(async { thread_cpu() }).await.unwrap()
}

/// CPU time of a whole process, all its threads (Linux `/proc/<pid>/stat`, in clock ticks of
/// 10 ms; zero elsewhere).
fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Where CPU went during one measured run.
#[derive(Clone, Copy)]
struct Cpu {
    caller: Duration,
    activator: Duration,
    backend: Duration,
}

/// Reads the CPU time of the caller (this thread), the activator's runtime and the backend.
struct CpuProbe<'a> {
    activator: &'a tokio::runtime::Handle,
    backend: Backend<'a>,
}

#[derive(Clone, Copy)]
enum Backend<'a> {
    Runtime(&'a tokio::runtime::Handle),
    Process(u32),
}

impl CpuProbe<'_> {
    async fn read(&self) -> Cpu {
        Cpu {
            caller: thread_cpu(),
            activator: runtime_cpu(self.activator).await,
            backend: match self.backend {
                Backend::Runtime(rt) => runtime_cpu(rt).await,
                Backend::Process(pid) => process_cpu(pid),
            },
        }
    }

    /// Throughput of `concurrent`, and the CPU each party spent per request.
    async fn concurrent(&self, port: u16, each: usize) -> (f64, Vec<Duration>, Cpu) {
        let before = self.read().await;
        let (rps, latencies) = concurrent(port, each).await;
        let after = self.read().await;
        let cpu = per_request(before, after, latencies.len());
        (rps, latencies, cpu)
    }
}

/// One throughput comparison, printed side by side.
struct Throughput {
    direct_rps: f64,
    direct_p99: Duration,
    direct_cpu: Cpu,
    proxy_rps: f64,
    proxy_p99: Duration,
    proxy_cpu: Cpu,
}

impl Throughput {
    fn print(&self) {
        println!(
            "   direct {:>8.0} req/s (p99 {:>7.1} us)   via activator {:>8.0} req/s (p99 {:>7.1} us)   ratio {:.2}",
            self.direct_rps,
            us(self.direct_p99),
            self.proxy_rps,
            us(self.proxy_p99),
            self.proxy_rps / self.direct_rps
        );
        let (d, p) = (self.direct_cpu, self.proxy_cpu);
        let direct_total = d.caller + d.backend;
        let proxy_total = p.caller + p.activator + p.backend;
        println!(
            "   CPU per request: direct caller {:.1} + backend {:.1} = {:.1} us;   via activator caller {:.1} + activator {:.1} + backend {:.1} = {:.1} us",
            us(d.caller),
            us(d.backend),
            us(direct_total),
            us(p.caller),
            us(p.activator),
            us(p.backend),
            us(proxy_total),
        );
        // Each party is one thread (the JVM: one handler thread, plus GC and JIT): it can use
        // one core at most, and all together two.
        let bound = |parts: &[Duration], total: Duration| {
            let busiest = parts.iter().max().copied().unwrap_or_default();
            1.0 / us(busiest).max(us(total) / CORES)
        };
        let ceiling = bound(&[p.caller, p.activator, p.backend], proxy_total)
            / bound(&[d.caller, d.backend], direct_total);
        println!(
            "   ratio these CPU costs allow: {:.2} with {CORES} idle cores, {:.2} when the cores are saturated (shared machine)",
            ceiling.min(1.0),
            us(direct_total) / us(proxy_total)
        );
    }
}

/// CPU per request between two readings.
fn per_request(before: Cpu, after: Cpu, requests: usize) -> Cpu {
    let each = |a: Duration, b: Duration| b.saturating_sub(a) / requests.max(1) as u32;
    Cpu {
        caller: each(before.caller, after.caller),
        activator: each(before.activator, after.activator),
        backend: each(before.backend, after.backend),
    }
}

/// `examples/hello-app` running as a plain `java` process on 127.0.0.1; killed on drop.
struct HelloApp {
    child: std::process::Child,
    classes: PathBuf,
    port: u16,
}

impl HelloApp {
    /// Compiles and starts the app, or says why it cannot.
    fn start() -> Result<HelloApp, String> {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-app/src/Hello.java");
        let classes =
            std::env::temp_dir().join(format!("crac-activator-bench-hello-{}", std::process::id()));
        std::fs::create_dir_all(&classes)
            .map_err(|e| format!("creating {}: {e}", classes.display()))?;
        let javac = Command::new("javac")
            .arg("-d")
            .arg(&classes)
            .arg(&src)
            .status()
            .map_err(|e| format!("javac not runnable ({e}); install a JDK 17+"))?;
        if !javac.success() {
            return Err(format!("javac failed on {}", src.display()));
        }
        let port = std::net::TcpListener::bind((LOOPBACK, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // As hello-app's README runs it, plus TCP_NODELAY: the JDK HttpServer leaves Nagle on
        // by default and writes each response as two segments (head, then body), so on a
        // keep-alive connection every response waits for the caller's delayed ACK (~40 ms on
        // Linux), direct or proxied alike: about 350 req/s for 16 callers, which measures the
        // ACK timer, not the app. Servers apps run on (Tomcat, Netty) set TCP_NODELAY.
        let child = Command::new("java")
            .args([
                "-XX:-UsePerfData",
                "-Dsun.net.httpserver.nodelay=true",
                "-cp",
            ])
            .arg(&classes)
            .args(["Hello", &port.to_string()])
            .env("HELLO_HOST", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("java not runnable ({e}); install a JDK 17+"))?;
        let mut app = HelloApp {
            child,
            classes,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((LOOPBACK, port)).is_err() {
            if let Ok(Some(status)) = app.child.try_wait() {
                return Err(format!("hello-app exited at start: {status}"));
            }
            if Instant::now() > deadline {
                return Err("hello-app did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(app)
    }
}

impl Drop for HelloApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.classes);
    }
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

/// Serves `key` on a new activator port forwarding to `target_port` on 127.0.0.1, its pod
/// ready; returns the activator port.
async fn add_app(activator: &Activator, key: AppKey, target_port: u16) -> u16 {
    let port = std::net::TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    activator.registry().upsert_app(AppConfig {
        key: key.clone(),
        ports: vec![PortMapping {
            activator_port: port,
            target_port,
        }],
        wake_timeout: Duration::from_secs(30),
        // Requests that land on the activator are served while the app sleeps or wakes.
        serving_mode: Some(crac_api::cracapp::ServingMode::Activator),
        caller_namespaces: Vec::new(),
        probe: None,
        in_place_uid: None,
    });
    assert!(activator.wait_listening(port, Duration::from_secs(5)).await);
    activator.registry().set_ready_pods(&key, vec![LOOPBACK]);
    port
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run quickly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let scale = if quick { 20 } else { 1 };

    let backend_rt = runtime_thread("backend");
    let busy_rt = runtime_thread("busy-backend");
    let activator_rt = runtime_thread("activator");
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let backend_port = backend_rt.block_on(start_backend());
    let busy_port = busy_rt.block_on(start_backend_with_work(BUSY_WORK));
    let hello = HelloApp::start();
    let waker = Arc::new(InstantWaker {
        registry: Mutex::new(None),
    });
    let activator = Activator::new(
        Config {
            listen_ip: LOOPBACK,
            ..Config::default()
        },
        waker.clone() as Arc<dyn WakeClient>,
    );
    *waker.registry.lock().unwrap() = Some(Arc::clone(activator.registry()));
    // The callers (on 127.0.0.1) are a pod of the apps' namespace, so every request pays for
    // the caller check as it would in a cluster.
    activator
        .registry()
        .apply_caller_pod(crac_activator::access::PodAddresses {
            namespace: "bench".into(),
            name: "client".into(),
            ips: vec![LOOPBACK],
        });
    let key = AppKey::new("bench", "demo");
    let (proxy_port, busy_proxy_port, hello_proxy_port) = activator_rt.block_on({
        let activator = Arc::clone(&activator);
        let key = key.clone();
        let hello_port = hello.as_ref().ok().map(|h| h.port);
        async move {
            activator.start();
            let proxy = add_app(&activator, key, backend_port).await;
            let busy = add_app(&activator, AppKey::new("bench", "busy"), busy_port).await;
            let hello = match hello_port {
                Some(port) => Some(add_app(&activator, AppKey::new("bench", "hello"), port).await),
                None => None,
            };
            (proxy, busy, hello)
        }
    });

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
            "2. {CONCURRENT_CALLERS} concurrent callers, keep-alive, {} requests each (throughput), against a backend that does nothing",
            CONCURRENT_REQUESTS_EACH / scale
        );
        let probe = CpuProbe {
            activator: &activator_rt,
            backend: Backend::Runtime(&backend_rt),
        };
        let (direct_rps, direct_lat, direct_cpu) = probe.concurrent(backend_port, CONCURRENT_REQUESTS_EACH / scale).await;
        let (proxy_rps, proxy_lat, proxy_cpu) = probe.concurrent(proxy_port, CONCURRENT_REQUESTS_EACH / scale).await;
        Throughput {
            direct_rps,
            direct_p99: percentile(&direct_lat, 0.99),
            direct_cpu,
            proxy_rps,
            proxy_p99: percentile(&proxy_lat, 0.99),
            proxy_cpu,
        }
        .print();

        println!();
        println!(
            "2b. the same against an app spending {} us of CPU per request",
            BUSY_WORK.as_micros()
        );
        let probe = CpuProbe {
            activator: &activator_rt,
            backend: Backend::Runtime(&busy_rt),
        };
        let (direct_rps, direct_lat, direct_cpu) = probe.concurrent(busy_port, CONCURRENT_REQUESTS_EACH / scale / 3).await;
        let (proxy_rps, proxy_lat, proxy_cpu) = probe.concurrent(busy_proxy_port, CONCURRENT_REQUESTS_EACH / scale / 3).await;
        Throughput {
            direct_rps,
            direct_p99: percentile(&direct_lat, 0.99),
            direct_cpu,
            proxy_rps,
            proxy_p99: percentile(&proxy_lat, 0.99),
            proxy_cpu,
        }
        .print();

        println!();
        match (&hello, hello_proxy_port) {
            (Ok(app), Some(hello_proxy_port)) => {
                let each = CONCURRENT_REQUESTS_EACH / scale;
                println!(
                    "2c. the same against a real JVM (examples/hello-app, `java` on 127.0.0.1), after {} warm-up requests each way; direct, via, via, direct, {each} requests each run",
                    CONCURRENT_CALLERS * JVM_WARMUP_EACH / scale
                );
                concurrent(app.port, JVM_WARMUP_EACH / scale).await;
                concurrent(hello_proxy_port, JVM_WARMUP_EACH / scale).await;
                let probe = CpuProbe {
                    activator: &activator_rt,
                    backend: Backend::Process(app.child.id()),
                };
                let d1 = probe.concurrent(app.port, each).await;
                let p1 = probe.concurrent(hello_proxy_port, each).await;
                let p2 = probe.concurrent(hello_proxy_port, each).await;
                let d2 = probe.concurrent(app.port, each).await;
                let mean_cpu = |a: Cpu, b: Cpu| Cpu {
                    caller: (a.caller + b.caller) / 2,
                    activator: (a.activator + b.activator) / 2,
                    backend: (a.backend + b.backend) / 2,
                };
                let p99 = |a: &[Duration], b: &[Duration]| {
                    let mut all: Vec<Duration> = a.iter().chain(b).copied().collect();
                    all.sort();
                    percentile(&all, 0.99)
                };
                Throughput {
                    direct_rps: (d1.0 + d2.0) / 2.0,
                    direct_p99: p99(&d1.1, &d2.1),
                    direct_cpu: mean_cpu(d1.2, d2.2),
                    proxy_rps: (p1.0 + p2.0) / 2.0,
                    proxy_p99: p99(&p1.1, &p2.1),
                    proxy_cpu: mean_cpu(p1.2, p2.2),
                }
                .print();
                println!(
                    "   (runs: direct {:.0} / {:.0} req/s, via activator {:.0} / {:.0} req/s; the JVM's CPU is its whole process, counted in 10 ms ticks)",
                    d1.0, d2.0, p1.0, p2.0
                );
            }
            _ => {
                let why = hello.as_ref().err().map_or("not registered", String::as_str);
                println!("2c. real JVM backend: SKIPPED: {why}");
            }
        }

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
            .find(|l| l.starts_with("crac_activator_wakes_total{") && l.contains("app=\"demo\""))
            .map(String::from)
            .unwrap_or_default();
        println!("   ({wakes})");
    });
    drop(hello);
}
