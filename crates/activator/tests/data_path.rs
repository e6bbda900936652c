//! The data path: the real activator on real sockets, real HTTP backends, all on 127.0.0.1.
//! The cluster is replaced by `TestWaker`, which turns the app's pod ready when asked to wake.
//! Time limits here are generous deadlines against hangs, not performance claims.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use crac_activator::Config;
use crac_activator::access::PodAddresses;
use crac_activator::routes::{AppConfig, AppKey};
use crac_api::cracapp::ServingMode;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::Request;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(30);

async fn wait_held(activator: &crac_activator::Activator, n: usize) {
    wait_held_for(activator, &app_key(), n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_requests_held_while_asleep_each_get_one_correct_answer_after_one_wake() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(300),
    });
    let (activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;

    let started = Instant::now();
    let calls: Vec<_> = (0..50)
        .map(|i| tokio::spawn(async move { (i, get(port, &format!("/echo/{i}")).await) }))
        .collect();
    for call in calls {
        let (i, answer) = within(LONG, "held request", call).await.unwrap();
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200, "request {i}");
        assert_eq!(
            answer.body,
            format!("id:{i}"),
            "request {i} got another's answer"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "answers came before the pod was ready"
    );
    assert_eq!(
        backend.state.requests.load(Ordering::SeqCst),
        50,
        "each request reached the pod exactly once"
    );
    assert_eq!(waker.calls(), 1, "one wake request for the whole burst");
    assert_eq!(metric(&activator, "crac_activator_wakes_total{"), 1.0);
    assert_eq!(
        metric(
            &activator,
            "crac_activator_requests_total{namespace=\"shop\",app=\"demo\",outcome=\"woken\"}"
        ),
        50.0
    );
    assert_eq!(metric(&activator, "crac_activator_held_requests{"), 0.0);
    assert!(
        activator.metrics().encode().contains(
            "crac_activator_wake_duration_seconds_count{namespace=\"shop\",app=\"demo\"} 1"
        )
    );
    assert_eq!(
        backend.state.last_xff.lock().unwrap().as_deref(),
        Some("127.0.0.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_the_switch_to_sleep_and_the_wake_all_succeed() {
    let backend_port = free_port();
    let mut backend = Some(start_backend(Some(backend_port)).await);
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, backend_port, Duration::from_secs(20)).await;
    let key = app_key();
    // Awake, yet traffic reaches the activator (the operator flipped the Service early).
    waker.set_pods(&key, vec![LOOPBACK]);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let id = format!("{c}-{n}");
                    results.push((id.clone(), get(port, &format!("/echo/{id}")).await));
                    n += 1;
                }
                results
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(waker.calls(), 0, "no wake while pods are ready");
    for cycle in 0..2 {
        // Sleep: the pod's process goes away a moment before the watch says so.
        backend.take().unwrap().stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        waker.set_pods(&key, vec![]);
        let calls_before = waker.calls();
        within(LONG, "a wake request", async {
            while waker.calls() == calls_before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // Wake: the pod restores and turns ready.
        tokio::time::sleep(Duration::from_millis(150)).await;
        backend = Some(start_backend(Some(backend_port)).await);
        waker.set_pods(&key, vec![LOOPBACK]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(waker.calls() > calls_before, "cycle {cycle} woke the app");
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for client in clients {
        for (id, answer) in within(LONG, "clients", client).await.unwrap() {
            let answer = answer.unwrap_or_else(|e| panic!("request {id} failed: {e}"));
            assert_eq!(answer.status, 200, "request {id}: {:?}", answer.body);
            assert_eq!(answer.body, format!("id:{id}"));
            total += 1;
        }
    }
    assert!(total > 20, "the load ran ({total} requests)");
    assert!(
        metric(
            &activator,
            "crac_activator_requests_total{namespace=\"shop\",app=\"demo\",outcome=\"woken\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_timeout_gives_503_with_retry_after_at_the_deadline() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(1)).await;
    let started = Instant::now();
    let answers = futures::future::join_all((0..5).map(|i| get(port, format!("/echo/{i}")))).await;
    let elapsed = started.elapsed();
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.headers["retry-after"], "5");
    }
    assert!(
        elapsed >= Duration::from_millis(900),
        "503 before the deadline: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "503 long after the deadline: {elapsed:?}"
    );
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 0);
    assert_eq!(
        metric(
            &activator,
            "crac_activator_requests_total{namespace=\"shop\",app=\"demo\",outcome=\"wake_timeout\"}"
        ),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_wake_gives_503_at_once_not_at_the_deadline() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Refuse);
    let (_activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    let started = Instant::now();
    let answer = within(LONG, "refused wake", get(port, "/echo/1"))
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    assert!(answer.headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited for the deadline anyway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gives_503_at_once_and_the_held_still_succeed() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let config = Config {
        max_queue: 5,
        ..test_config()
    };
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;
    let held: Vec<_> = (0..5)
        .map(|i| tokio::spawn(get(port, format!("/echo/{i}"))))
        .collect();
    wait_held(&activator, 5).await;

    let started = Instant::now();
    let rejected = within(LONG, "queue full", get(port, "/echo/x"))
        .await
        .unwrap();
    assert_eq!(rejected.status, 503);
    assert_eq!(rejected.headers["retry-after"], "5");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the full queue made the caller wait"
    );
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "held requests were answered early"
    );

    waker.set_pods(&app_key(), vec![LOOPBACK]);
    for (i, h) in held.into_iter().enumerate() {
        let answer = within(LONG, "held", h).await.unwrap().unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, format!("id:{i}"));
    }
    assert_eq!(
        metric(
            &activator,
            "crac_activator_requests_total{namespace=\"shop\",app=\"demo\",outcome=\"queue_full\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_body_streams_through_a_wake_intact() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(200),
    });
    let (_activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;

    const CHUNKS: usize = 512; // 32 MiB
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    let req = Request::post("/hash")
        .header("host", "demo")
        .body(body)
        .unwrap();
    let call = tokio::spawn(request(port, req));
    let mut expected = Sha256::new();
    for i in 0..CHUNKS {
        let data = chunk(i);
        expected.update(&data);
        tx.send(Ok(Frame::data(data))).await.unwrap();
        if i == 16 {
            // The pod must see the body before the caller has finished sending it.
            within(LONG, "the pod to receive the first bytes", async {
                while backend.state.body_bytes.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
        }
    }
    drop(tx);
    let answer = within(LONG, "hash", call).await.unwrap().unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, hex(&expected.finalize()));
    assert_eq!(
        backend.state.body_bytes.load(Ordering::SeqCst),
        (CHUNKS * STREAM_CHUNK) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_response_arrives_incrementally_and_intact() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let (_activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    waker.set_pods(&app_key(), vec![LOOPBACK]);

    let stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/stream?n=64")
        .header("host", "demo")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = within(LONG, "response head", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    // The pod holds the rest back until we have the first chunk.
    while got.len() < STREAM_CHUNK {
        let frame = within(LONG, "first chunk", body.frame())
            .await
            .unwrap()
            .unwrap();
        got.extend_from_slice(frame.data_ref().unwrap());
    }
    backend.state.stream_gate.notify_one();
    while let Some(frame) = within(LONG, "rest of the stream", body.frame()).await {
        if let Some(data) = frame.unwrap().data_ref() {
            got.extend_from_slice(data);
        }
    }
    let expected: Vec<u8> = (0..64).flat_map(|i| chunk(i).to_vec()).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "stream content differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_passes_through_both_ways() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(100),
    });
    let (_activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;

    let stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let calls = (0..20).map(|i| {
        let mut sender = sender.clone();
        async move {
            let path = if i == 0 {
                "/version".to_string()
            } else {
                format!("/echo/{i}")
            };
            let req = Request::get(format!("http://demo.shop{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let status = resp.status();
            (
                i,
                status,
                resp.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    });
    for (i, status, body) in within(LONG, "h2 requests", futures::future::join_all(calls)).await {
        assert_eq!(status, 200);
        if i == 0 {
            assert_eq!(body, "HTTP/2.0", "the pod was not spoken to in HTTP/2");
        } else {
            assert_eq!(body, format!("id:{i}"));
        }
    }
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert!(
            n > 0,
            "connection closed before the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_is_held_through_a_wake_then_spliced() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(100),
    });
    let (_activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;

    let mut stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: demo\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let head = within(LONG, "101", read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    for message in ["hello activator", "second message, after the first"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        within(LONG, "echo", stream.read_exact(&mut echoed))
            .await
            .unwrap();
        assert_eq!(echoed, message.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_other_callers_are_undisturbed() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(200),
    });
    let (_activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;

    // Some good callers are held through a wake while the bad ones arrive.
    let good: Vec<_> = (0..20)
        .map(|i| tokio::spawn(get(port, format!("/echo/{i}"))))
        .collect();
    let garbage: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: demo\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: demo\r\nBad Header Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: demo\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    for bad in garbage {
        let mut stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
        stream.write_all(bad).await.unwrap();
        let mut response = Vec::new();
        let _ = within(LONG, "4xx", stream.read_to_end(&mut response)).await;
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.starts_with("HTTP/1.1 4"),
            "{:?} got {text:?}",
            String::from_utf8_lossy(bad)
        );
    }
    for (i, g) in good.into_iter().enumerate() {
        let answer = within(LONG, "good caller", g).await.unwrap().unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, format!("id:{i}"));
    }
    // And the activator still serves new callers.
    assert_eq!(get(port, "/echo/after").await.unwrap().body, "id:after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stops_accepting_and_completes_held_requests() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    let held: Vec<_> = (0..10)
        .map(|i| tokio::spawn(get(port, format!("/echo/{i}"))))
        .collect();
    wait_held(&activator, 10).await;

    let shutting = {
        let activator = Arc::clone(&activator);
        tokio::spawn(async move { activator.shutdown().await })
    };
    within(LONG, "listener to close", async {
        while TcpStream::connect((LOOPBACK, port)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(!activator.ready(), "still ready while draining");
    assert!(
        !shutting.is_finished(),
        "shutdown returned with requests still held"
    );

    waker.set_pods(&app_key(), vec![LOOPBACK]);
    for (i, h) in held.into_iter().enumerate() {
        let answer = within(LONG, "held during shutdown", h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, format!("id:{i}"));
    }
    assert!(
        within(LONG, "shutdown", shutting).await.unwrap(),
        "drain timed out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_activator_replicas_hold_and_forward_at_once() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(300),
    });
    let (a, port_a) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    let (b, port_b) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let port = if i % 2 == 0 { port_a } else { port_b };
            tokio::spawn(async move { (i, get(port, &format!("/echo/{i}")).await) })
        })
        .collect();
    for call in calls {
        let (i, answer) = within(LONG, "replica request", call).await.unwrap();
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, format!("id:{i}"));
    }
    assert_eq!(waker.calls(), 2, "each replica asks once");
    for activator in [&a, &b] {
        assert_eq!(
            metric(
                activator,
                "crac_activator_requests_total{namespace=\"shop\",app=\"demo\",outcome=\"woken\"}"
            ),
            20.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_app_stops_listening_and_fails_its_held_requests() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    let held = tokio::spawn(get(port, "/echo/1"));
    wait_held(&activator, 1).await;
    activator.registry().remove_app(&app_key());
    let answer = within(LONG, "held request of a deleted app", held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 503);
    within(LONG, "listener to close", async {
        while TcpStream::connect((LOOPBACK, port)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

const SAME_NAMESPACE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const OTHER_NAMESPACE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const LISTED_NAMESPACE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
const NO_POD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));

fn caller_pod(namespace: &str, name: &str, ip: IpAddr) -> PodAddresses {
    PodAddresses {
        namespace: namespace.into(),
        name: name.into(),
        ips: vec![ip],
    }
}

fn refused(activator: &crac_activator::Activator, reason: &str) -> f64 {
    metric(
        activator,
        &format!("crac_activator_requests_refused_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_from_other_namespaces_get_403_and_wake_nothing_own_and_listed_are_served() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(100),
    });
    let (activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    let registry = activator.registry();
    registry.upsert_app(AppConfig {
        caller_namespaces: vec!["frontend".into()],
        ..app_config(port, backend.port, Duration::from_secs(20))
    });
    registry.apply_caller_pod(caller_pod("shop", "client", SAME_NAMESPACE));
    registry.apply_caller_pod(caller_pod("evil", "intruder", OTHER_NAMESPACE));
    registry.apply_caller_pod(caller_pod("frontend", "web", LISTED_NAMESPACE));

    // The app sleeps: refused callers must not wake it.
    for source in [OTHER_NAMESPACE, NO_POD] {
        let answer = within(LONG, "refused caller", get_from(source, port, "/echo/x"))
            .await
            .unwrap();
        assert_eq!(answer.status, 403, "from {source}");
        assert_eq!(answer.body, "caller not allowed\n");
    }
    assert_eq!(waker.calls(), 0, "a refused caller woke the app");
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 0);
    assert_eq!(refused(&activator, "namespace_not_allowed"), 1.0);
    assert_eq!(refused(&activator, "unknown_caller"), 1.0);

    // The app's own namespace and a listed one are held through the wake and answered.
    for (i, source) in [SAME_NAMESPACE, LISTED_NAMESPACE].into_iter().enumerate() {
        let answer = within(
            LONG,
            "allowed caller",
            get_from(source, port, format!("/echo/{i}")),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200, "from {source}");
        assert_eq!(answer.body, format!("id:{i}"));
        assert_eq!(
            backend.state.last_xff.lock().unwrap().as_deref(),
            Some(source.to_string().as_str())
        );
    }
    assert_eq!(waker.calls(), 1);

    // Awake or not, the other namespace stays out.
    let answer = get_from(OTHER_NAMESPACE, port, "/echo/y").await.unwrap();
    assert_eq!(answer.status, 403);
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 2);

    // The intruder's pod goes and its IP goes to a pod of the app's namespace.
    registry.delete_caller_pod("evil", "intruder");
    assert_eq!(
        get_from(OTHER_NAMESPACE, port, "/echo/z")
            .await
            .unwrap()
            .status,
        403,
        "a deleted pod's IP is nobody's"
    );
    registry.apply_caller_pod(caller_pod("shop", "successor", OTHER_NAMESPACE));
    let answer = get_from(OTHER_NAMESPACE, port, "/echo/z").await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "id:z");
    assert_eq!(refused(&activator, "unknown_caller"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awake_app_is_served_for_the_grace_then_told_to_reconnect_and_held_requests_complete() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let grace = Duration::from_millis(500);
    let config = Config {
        awake_grace: grace,
        ..test_config()
    };
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;
    let registry = activator.registry();
    let mode = |serving_mode| {
        registry.upsert_app(AppConfig {
            serving_mode: Some(serving_mode),
            ..app_config(port, backend.port, Duration::from_secs(20))
        });
    };

    // Held while asleep; the app switches to Pods and the grace passes before a pod is
    // ready (to this activator): the held request is not dropped.
    let held = tokio::spawn(get(port, "/echo/held"));
    wait_held(&activator, 1).await;
    mode(ServingMode::Pods);
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    waker.set_pods(&app_key(), vec![LOOPBACK]);
    let answer = within(LONG, "held request", held).await.unwrap().unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "id:held");

    // A new request now: 503, told to come back at once, and the connection closes.
    let mut stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    stream
        .write_all(b"GET /echo/late HTTP/1.1\r\nHost: demo\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    within(
        LONG,
        "the activator to close",
        stream.read_to_end(&mut response),
    )
    .await
    .unwrap();
    let response = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 503"), "{response}");
    assert!(response.contains("retry-after: 0\r\n"), "{response}");
    assert!(response.contains("connection: close\r\n"), "{response}");
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 1);

    // h2: the same answer, then GOAWAY ends the connection.
    let stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("http://demo.shop/echo/h2")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "0");
    within(LONG, "h2 connection to close", conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(
            &activator,
            "crac_activator_requests_total{namespace=\"shop\",app=\"demo\",outcome=\"app_awake\"}"
        ),
        2.0
    );

    // Asleep again then awake: a request within the new grace is forwarded.
    mode(ServingMode::Activator);
    mode(ServingMode::Pods);
    let answer = get(port, "/echo/in-grace").await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "id:in-grace");

    // A request that raced the switch to sleep (the Service already points here, the status
    // has not arrived yet) waits for it rather than being sent away.
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let racing = tokio::spawn(get(port, "/echo/racing"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    mode(ServingMode::Activator);
    let answer = within(LONG, "racing request", racing)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "id:racing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_two_apps_claim_serves_neither_until_one_claim_goes() {
    let backend = start_backend(None).await;
    let thief_backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    waker.set_pods(&app_key(), vec![LOOPBACK]);
    assert_eq!(get(port, "/echo/1").await.unwrap().status, 200);

    // Another namespace's app forges a claim on the port in its status.
    let thief = AppKey::new("evil", "thief");
    activator.registry().upsert_app(AppConfig {
        key: thief.clone(),
        ..app_config(port, thief_backend.port, Duration::from_secs(20))
    });
    activator.registry().set_ready_pods(&thief, vec![LOOPBACK]);
    let answer = get(port, "/echo/2").await.unwrap();
    assert_eq!(answer.status, 503);
    assert!(answer.headers.contains_key("retry-after"));
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 1);
    assert_eq!(thief_backend.state.requests.load(Ordering::SeqCst), 0);
    assert_eq!(metric(&activator, "crac_activator_port_conflicts "), 1.0);
    assert_eq!(refused(&activator, "port_conflict"), 1.0);

    // The operator removes the forged entry: the owner is served again.
    activator.registry().remove_app(&thief);
    let answer = get(port, "/echo/3").await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "id:3");
    assert_eq!(metric(&activator, "crac_activator_port_conflicts "), 0.0);
}

// ---- Hostile and broken callers: connection cap, header timeout and size, HTTP/2 limits, the
// overall cap on held requests.

async fn wait_held_for(activator: &crac_activator::Activator, key: &AppKey, n: usize) {
    let app = activator.registry().app(key).unwrap();
    within(LONG, "requests to be held", async {
        while app.held() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once_and_counted_while_open_ones_go_on() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let mut config = test_config();
    config.connections.max_connections = 8;
    config.connections.header_timeout = LONG;
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;
    waker.set_pods(&app_key(), vec![LOOPBACK]);

    // One caller on a keep-alive connection, seven that say nothing: the cap is reached.
    let stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut keep_alive_get = async |path: &str| {
        let req = Request::get(path)
            .header("host", "demo")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    };
    assert_eq!(keep_alive_get("/echo/a").await.1, "id:a");
    let mut silent = Vec::new();
    for _ in 0..7 {
        silent.push(TcpStream::connect((LOOPBACK, port)).await.unwrap());
    }
    within(LONG, "eight connections open", async {
        while metric(&activator, "crac_activator_connections ") < 8.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    for i in 0..3 {
        let mut extra = TcpStream::connect((LOOPBACK, port)).await.unwrap();
        let _ = extra
            .write_all(b"GET /echo/x HTTP/1.1\r\nHost: demo\r\n\r\n")
            .await;
        let answer = closed_within(&mut extra, Duration::from_secs(2)).await;
        assert_eq!(
            answer.as_deref(),
            Some(&b""[..]),
            "connection {i} over the cap was served or kept open"
        );
    }
    assert_eq!(
        metric(&activator, "crac_activator_connections_refused_total"),
        3.0
    );
    // The open ones are unaffected.
    assert_eq!(keep_alive_get("/echo/b").await.1, "id:b");

    // Room again once callers leave.
    silent.truncate(5);
    within(LONG, "a slot to free", async {
        while metric(&activator, "crac_activator_connections ") > 6.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(get(port, "/echo/after").await.unwrap().body, "id:after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_trickling_and_half_preface_callers_are_closed_at_the_header_timeout_others_served()
{
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let mut config = test_config();
    config.connections.header_timeout = Duration::from_secs(1);
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;
    waker.set_pods(&app_key(), vec![LOOPBACK]);

    let opened = Instant::now();
    let mut silent = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    // Protocol detection waits for the 24 bytes of the HTTP/2 preface: stop inside it.
    let mut half_preface = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // An HTTP/1.1 head, one byte every 100 ms: never complete within the timeout.
    let trickle = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let (mut trickle_read, mut trickle_write) = trickle.into_split();
    let writer = tokio::spawn(async move {
        for &b in b"GET /echo/slow HTTP/1.1\r\nHost: demo\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if trickle_write.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Meanwhile a caller that means well is answered.
    let answer = within(LONG, "normal request", get(port, "/echo/fast"))
        .await
        .unwrap();
    assert_eq!(answer.body, "id:fast");
    assert!(
        opened.elapsed() < Duration::from_millis(900),
        "test too slow to tell"
    );

    let limit = Duration::from_secs(5);
    assert!(
        closed_within(&mut silent, limit).await.is_some(),
        "silent caller kept"
    );
    let silent_closed = opened.elapsed();
    assert!(
        closed_within(&mut half_preface, limit).await.is_some(),
        "half preface kept"
    );
    let mut buf = Vec::new();
    let trickled = tokio::time::timeout(limit, trickle_read.read_to_end(&mut buf)).await;
    assert!(trickled.is_ok(), "trickling caller kept");
    let all_closed = opened.elapsed();
    writer.abort();
    assert!(
        silent_closed >= Duration::from_millis(900),
        "closed before the timeout: {silent_closed:?}"
    );
    assert!(
        all_closed < Duration::from_secs(4),
        "closed long after the timeout: {all_closed:?}"
    );
    assert_eq!(
        metric(
            &activator,
            "crac_activator_connection_timeouts_total{kind=\"header\"}"
        ),
        3.0
    );
    // And the activator still serves.
    assert_eq!(get(port, "/echo/after").await.unwrap().body, "id:after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_size_cap_gets_431_and_one_under_it_is_served() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let (_activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(20)).await;
    waker.set_pods(&app_key(), vec![LOOPBACK]);

    let req = Request::get("/echo/under")
        .header("host", "demo")
        .header("x-pad", "a".repeat(20 * 1024))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(request(port, req).await.unwrap().body, "id:under");

    let mut head = b"GET /echo/over HTTP/1.1\r\nHost: demo\r\nX-Pad: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 40 * 1024));
    head.extend_from_slice(b"\r\n\r\n");
    let mut stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let _ = stream.write_all(&head).await;
    let answer = closed_within(&mut stream, LONG).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 431"), "got {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_per_connection_are_capped() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let mut config = test_config();
    config.connections.h2_max_concurrent_streams = 4;
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;

    let stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Let the SETTINGS exchange finish, so the client knows the limit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let req = Request::get(format!("http://demo.shop/echo/{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status();
                (status, resp.into_body().collect().await.unwrap().to_bytes())
            })
        })
        .collect();
    wait_held(&activator, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = activator.registry().app(&app_key()).unwrap();
    assert_eq!(app.held(), 4, "more streams open than the cap");

    waker.set_pods(&app_key(), vec![LOOPBACK]);
    for (i, call) in calls.into_iter().enumerate() {
        let (status, body) = within(LONG, "h2 request", call).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("id:{i}"));
    }
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_that_does_not_answer_pings_is_closed() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let mut config = test_config();
    config.connections.h2_keepalive_interval = Duration::from_millis(300);
    config.connections.h2_keepalive_timeout = Duration::from_millis(300);
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;

    // A hand-made h2c client: preface, empty SETTINGS, then GET /echo/p (HPACK: indexed
    // :method GET, :scheme http; :path and :authority as literals), held while the app sleeps.
    let mut stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    let mut block = vec![0x82, 0x86, 0x04, 7];
    block.extend_from_slice(b"/echo/p");
    block.extend_from_slice(&[0x01, 4]);
    block.extend_from_slice(b"demo");
    out.extend(h2_frame(0x1, 0x5, 1, &block));
    stream.write_all(&out).await.unwrap();
    wait_held(&activator, 1).await;

    // Acknowledge the server's SETTINGS, never its PINGs; read until it closes.
    let started = Instant::now();
    let mut pings = 0;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut header = [0u8; 9];
        loop {
            if stream.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = (usize::from(header[0]) << 16)
                | (usize::from(header[1]) << 8)
                | usize::from(header[2]);
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return;
            }
            match (header[3], header[4] & 0x1) {
                (0x4, 0) => {
                    let _ = stream.write_all(&h2_frame(0x4, 0x1, 0, &[])).await;
                }
                (0x6, 0) => pings += 1,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection outlived unanswered pings");
    assert!(pings >= 1, "no ping was sent");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout_but_not_while_a_request_is_held()
{
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(1500),
    });
    let mut config = test_config();
    config.connections.idle_timeout = Duration::from_secs(1);
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;

    let stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Held for 1.5 s, longer than the idle timeout: an open request is not idleness.
    let req = Request::get("http://demo.shop/echo/held")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = within(LONG, "held h2 request", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "id:held"
    );
    let answered = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the idle connection was kept");
    assert!(
        answered.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout: {:?}",
        answered.elapsed()
    );
    assert_eq!(
        metric(
            &activator,
            "crac_activator_connection_timeouts_total{kind=\"idle\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_capped_across_all_apps() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let config = Config {
        max_held: 5,
        ..test_config()
    };
    let (activator, port) =
        start_activator(config, &waker, backend.port, Duration::from_secs(20)).await;
    let other = AppKey::new("shop", "other");
    let other_port = free_port();
    activator.registry().upsert_app(AppConfig {
        key: other.clone(),
        ..app_config(other_port, backend.port, Duration::from_secs(20))
    });
    assert!(
        activator
            .wait_listening(other_port, Duration::from_secs(5))
            .await
    );

    let mut held: Vec<_> = (0..3)
        .map(|i| tokio::spawn(get(port, format!("/echo/demo-{i}"))))
        .collect();
    held.extend((0..2).map(|i| tokio::spawn(get(other_port, format!("/echo/other-{i}")))));
    wait_held_for(&activator, &app_key(), 3).await;
    wait_held_for(&activator, &other, 2).await;

    // Both queues have room (--max-queue is 1000), the activator as a whole has none.
    let started = Instant::now();
    let rejected = tokio::time::timeout(Duration::from_secs(3), get(port, "/echo/sixth"))
        .await
        .expect("the request over --max-held was held")
        .unwrap();
    assert_eq!(rejected.status, 503);
    assert_eq!(rejected.headers["retry-after"], "5");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        metric(
            &activator,
            "crac_activator_requests_total{namespace=\"shop\",app=\"demo\",outcome=\"held_limit\"}"
        ),
        1.0
    );

    waker.set_pods(&app_key(), vec![LOOPBACK]);
    waker.set_pods(&other, vec![LOOPBACK]);
    for h in held {
        let answer = within(LONG, "held", h).await.unwrap().unwrap();
        assert_eq!(answer.status, 200);
    }
    // The slots came back.
    assert_eq!(get(port, "/echo/after").await.unwrap().body, "id:after");
}

// ---- An app that answers an upload before reading it (an early 401 or 413).

/// How the fake app ends a connection after its early answer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum EarlyClose {
    /// Shuts its write side, then discards input until EOF or a short deadline, then closes
    /// (what careful servers do).
    Graceful,
    /// Closes at once with the upload unread: the kernel sends RST.
    Abrupt,
}

const EARLY_STATUS: &str = "413";

/// The early answer's body: a few KiB the caller must get whole.
fn early_body() -> Vec<u8> {
    (0..6000).map(|i| b'a' + (i % 26) as u8).collect()
}

/// An app on 127.0.0.1 that reads each request's head only, answers 413 at once and ends the
/// connection as `close` says. One request per connection.
async fn start_early_answerer(close: EarlyClose) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            while conns.try_join_next().is_some() {}
            conns.spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                // The head only: the body that follows it in the same read is left alone too.
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = early_body();
                let mut answer = format!(
                    "HTTP/1.1 {EARLY_STATUS} Payload Too Large\r\ncontent-type: text/plain\r\n\
                     content-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                answer.extend_from_slice(&body);
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
                match close {
                    EarlyClose::Abrupt => drop(stream),
                    EarlyClose::Graceful => {
                        let _ = stream.shutdown().await;
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            let mut sink = vec![0u8; 64 * 1024];
                            while let Ok(n) = stream.read(&mut sink).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                }
            });
        }
    });
    (port, task)
}

/// What a caller uploading `body_len` bytes got back.
#[derive(Debug, PartialEq)]
enum UploadAnswer {
    /// The early answer, whole; its head, lowercased.
    Complete(String),
    /// Something else: another status, a cut body, a reset or no answer.
    Lost(String),
}

/// A raw HTTP/1.1 caller: sends a POST head, streams `body_len` bytes from a task of its own
/// (its write errors ignored, as a careful client does), and reads the answer at the same time
/// until its `Content-Length` is complete.
async fn upload_expecting_early_answer(port: u16, body_len: usize) -> UploadAnswer {
    let stream = match TcpStream::connect((LOOPBACK, port)).await {
        Ok(s) => s,
        Err(e) => return UploadAnswer::Lost(format!("connect: {e}")),
    };
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: demo\r\ncontent-type: application/octet-stream\r\n\
             content-length: {body_len}\r\n\r\n"
        );
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![7u8; 64 * 1024];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(chunk.len());
            if writer.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        // Keep the socket open (no FIN) until the answer is read: the reader drops it.
        std::future::pending::<()>().await;
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let expected = early_body();
    let outcome = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let body = &got[end + 4..];
            if !head.starts_with(&format!("http/1.1 {EARLY_STATUS}")) {
                break UploadAnswer::Lost(format!("head {head:?}"));
            }
            if body.len() >= expected.len() {
                break if body[..expected.len()] == expected[..] {
                    UploadAnswer::Complete(head)
                } else {
                    UploadAnswer::Lost("body differs".into())
                };
            }
        }
        match tokio::time::timeout(LONG, reader.read(&mut buf)).await {
            Err(_) => break UploadAnswer::Lost(format!("no answer after {} bytes", got.len())),
            Ok(Ok(0)) => break UploadAnswer::Lost(format!("EOF after {} bytes", got.len())),
            Ok(Err(e)) => break UploadAnswer::Lost(format!("{e} after {} bytes", got.len())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    sender.abort();
    outcome
}

/// A caller that sends its whole upload before it reads anything (as many simple clients do):
/// the answer counts only if the upload was accepted without a reset and the answer is whole.
async fn upload_then_read(port: u16, body_len: usize) -> UploadAnswer {
    let mut stream = match TcpStream::connect((LOOPBACK, port)).await {
        Ok(s) => s,
        Err(e) => return UploadAnswer::Lost(format!("connect: {e}")),
    };
    let head = format!("POST /upload HTTP/1.1\r\nhost: demo\r\ncontent-length: {body_len}\r\n\r\n");
    let mut upload = head.into_bytes();
    upload.resize(upload.len() + body_len, 7);
    if let Err(e) = stream.write_all(&upload).await {
        return UploadAnswer::Lost(format!("upload refused: {e}"));
    }
    let mut got = Vec::new();
    if let Err(e) = tokio::time::timeout(LONG, stream.read_to_end(&mut got))
        .await
        .unwrap()
    {
        return UploadAnswer::Lost(format!("{e} after {} bytes", got.len()));
    }
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return UploadAnswer::Lost(format!("no head in {} bytes", got.len()));
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    if head.starts_with(&format!("http/1.1 {EARLY_STATUS}")) && got[end + 4..] == early_body()[..] {
        UploadAnswer::Complete(head)
    } else {
        UploadAnswer::Lost(format!("head {head:?}, {} body bytes", got.len() - end - 4))
    }
}

/// `n` uploads at once, then `n` one after another; returns the failures as text. Through the
/// activator (`via_activator`), an answer to an upload too large for the sockets' buffers (so
/// the activator cannot have read it whole) must also say `Connection: close`.
async fn early_answer_rounds(port: u16, body_len: usize, n: usize) -> Vec<String> {
    early_answer_rounds_via(port, body_len, n, false).await
}

async fn early_answer_rounds_via(
    port: u16,
    body_len: usize,
    n: usize,
    via_activator: bool,
) -> Vec<String> {
    let check = |answer: UploadAnswer, how: &str, lost: &mut Vec<String>| match answer {
        UploadAnswer::Lost(why) => lost.push(format!("{how}: {why}")),
        UploadAnswer::Complete(head) => {
            if via_activator && body_len >= 10 * MIB && !head.contains("connection: close") {
                lost.push(format!("{how}: no connection: close in {head:?}"));
            }
        }
    };
    let mut lost = Vec::new();
    let parallel: Vec<_> = (0..n)
        .map(|_| tokio::spawn(upload_expecting_early_answer(port, body_len)))
        .collect();
    for call in parallel {
        check(
            within(LONG, "upload", call).await.unwrap(),
            "parallel",
            &mut lost,
        );
    }
    for _ in 0..n {
        let answer = within(
            LONG,
            "upload",
            upload_expecting_early_answer(port, body_len),
        )
        .await;
        check(answer, "sequential", &mut lost);
    }
    lost
}

const MIB: usize = 1024 * 1024;

/// The same uploads straight to the app (no activator): what the kernel itself loses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_straight_from_the_app_for_comparison() {
    for close in [EarlyClose::Graceful, EarlyClose::Abrupt] {
        let (app_port, app) = start_early_answerer(close).await;
        for body_len in [MIB, 10 * MIB] {
            let lost = early_answer_rounds(app_port, body_len, 50).await;
            eprintln!(
                "direct, {close:?}, {} MiB: {} of 100 lost {:?}",
                body_len / MIB,
                lost.len(),
                lost.iter().take(3).collect::<Vec<_>>()
            );
            if close == EarlyClose::Graceful {
                assert!(
                    lost.is_empty(),
                    "a graceful app's answer was lost: {lost:?}"
                );
            }
        }
        app.abort();
    }
}

async fn early_answer_through_an_awake_app(close: EarlyClose) {
    let (app_port, app) = start_early_answerer(close).await;
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, app_port, Duration::from_secs(20)).await;
    waker.set_pods(&app_key(), vec![LOOPBACK]);
    let mut lost = Vec::new();
    for body_len in [MIB, 10 * MIB] {
        let round = early_answer_rounds_via(port, body_len, 50, true).await;
        eprintln!(
            "activator, awake, {close:?}, {} MiB: {} of 100 lost {:?}",
            body_len / MIB,
            round.len(),
            round.iter().take(3).collect::<Vec<_>>()
        );
        lost.extend(round);
    }
    // A caller that reads only once its upload is sent: the activator reads and discards the
    // rest of the upload (up to a bound) instead of resetting the connection under it.
    let naive: Vec<_> = (0..20)
        .map(|_| tokio::spawn(upload_then_read(port, 4 * MIB)))
        .collect();
    let mut naive_lost = Vec::new();
    for call in naive {
        if let UploadAnswer::Lost(why) = within(LONG, "upload then read", call).await.unwrap() {
            naive_lost.push(why);
        }
    }
    eprintln!(
        "activator, awake, {close:?}, upload then read 4 MiB: {} of 20 lost {:?}",
        naive_lost.len(),
        naive_lost.iter().take(3).collect::<Vec<_>>()
    );
    lost.extend(naive_lost);
    assert!(
        lost.is_empty(),
        "{} early answers lost: {lost:?}",
        lost.len()
    );
    assert_eq!(
        metric(&activator, "crac_activator_held_requests{"),
        0.0,
        "nothing stays held"
    );
    app.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_reaches_the_caller_whole_from_a_graceful_app() {
    early_answer_through_an_awake_app(EarlyClose::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_reaches_the_caller_whole_from_an_app_that_resets() {
    early_answer_through_an_awake_app(EarlyClose::Abrupt).await;
}

async fn early_answer_to_held_uploads(close: EarlyClose) {
    let (app_port, app) = start_early_answerer(close).await;
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, app_port, Duration::from_secs(20)).await;
    let mut lost = Vec::new();
    for (wake, body_len) in [MIB, 10 * MIB].into_iter().enumerate() {
        let calls: Vec<_> = (0..50)
            .map(|_| tokio::spawn(upload_expecting_early_answer(port, body_len)))
            .collect();
        wait_held(&activator, 50).await;
        waker.set_pods(&app_key(), vec![LOOPBACK]);
        let mut round = Vec::new();
        for call in calls {
            match within(LONG, "held upload", call).await.unwrap() {
                UploadAnswer::Lost(why) => round.push(why),
                UploadAnswer::Complete(head)
                    if body_len >= 10 * MIB && !head.contains("connection: close") =>
                {
                    round.push(format!("no connection: close in {head:?}"));
                }
                UploadAnswer::Complete(_) => {}
            }
        }
        eprintln!(
            "activator, held, {close:?}, wake {wake}, {} MiB: {} of 50 lost {:?}",
            body_len / MIB,
            round.len(),
            round.iter().take(3).collect::<Vec<_>>()
        );
        lost.extend(round);
        // Asleep again for the next round.
        waker.set_pods(&app_key(), vec![]);
    }
    assert!(
        lost.is_empty(),
        "{} early answers lost: {lost:?}",
        lost.len()
    );
    app.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_uploads_get_a_graceful_apps_early_answer_whole_after_the_wake() {
    early_answer_to_held_uploads(EarlyClose::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_uploads_get_an_early_answer_whole_after_the_wake_from_an_app_that_resets() {
    early_answer_to_held_uploads(EarlyClose::Abrupt).await;
}

/// A woken pod that runs but is not Ready yet: the activator probes its app itself (here the
/// readiness path, an HTTP GET) and sends the held requests there the moment it answers,
/// although the watch never reports the pod Ready. Without a probe they wait for Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_go_to_a_starting_pod_as_soon_as_its_app_answers() {
    use crac_activator::early::AppProbe;
    let backend_port = free_port();
    // The cluster never says the pod is Ready.
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) = start_activator(test_config(), &waker, backend_port, LONG).await;
    let key = app_key();
    activator.registry().upsert_app(AppConfig {
        probe: Some(AppProbe::Http {
            port: backend_port,
            path: "/echo/ready".into(),
        }),
        ..app_config(port, backend_port, LONG)
    });
    let held = tokio::spawn(futures::future::join_all(
        (0..3).map(move |i| get(port, format!("/echo/{i}"))),
    ));
    wait_held(&activator, 3).await;
    // The pod has an address; its app is still restoring.
    activator
        .registry()
        .set_starting_pods(&key, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)], vec![]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "answered before the app was up");
    // The app comes up: the held requests are answered, Ready or not.
    let backend = start_backend(Some(backend_port)).await;
    let answers = within(Duration::from_secs(5), "the held requests", held)
        .await
        .unwrap();
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, format!("id:{i}"));
    }
    assert_eq!(
        metric(
            &activator,
            "crac_activator_pods_answered_early_total{namespace=\"shop\",app=\"demo\"}"
        ),
        1.0
    );
    assert!(
        backend.state.requests.load(Ordering::SeqCst) > 3,
        "the probe reached the app too"
    );

    // The pod goes away before it is Ready: it is no backend any more, and a new request
    // waits (for a wake) instead of going there.
    activator.registry().set_starting_pods(&key, vec![], vec![]);
    let answer = get(port, "/echo/late");
    let late = tokio::time::timeout(Duration::from_millis(500), answer).await;
    assert!(late.is_err(), "sent to a pod that is gone: {late:?}");
}

/// Without a probe (an app with no port to ask), a starting pod is left to the kubelet: held
/// requests wait for Ready, here until their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_probe_held_requests_wait_for_ready() {
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Never);
    let (activator, port) =
        start_activator(test_config(), &waker, backend.port, Duration::from_secs(1)).await;
    activator.registry().set_starting_pods(
        &app_key(),
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        vec![],
    );
    let answer = get(port, "/echo/x").await.unwrap();
    assert_eq!(answer.status, 503, "{:?}", answer.body);
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 0);
}

/// A request at zero is recorded in one histogram, by how the answering pod's app started (its
/// agent says, on the agent's port): arrival → first byte, the time held, and the restore.
/// One that got a 503 is recorded as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_zero_is_recorded_with_how_the_pod_started() {
    let agent = tokio::net::TcpListener::bind(("127.0.0.1", 9901))
        .await
        .expect("the agent's port on 127.0.0.1 is free");
    let agent_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = agent.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = r#"{"mode":"restored","openConnections":0,"startMs":120}"#;
            let _ = s
                .write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes())
                .await;
        }
    });
    let backend = start_backend(None).await;
    let waker = TestWaker::new(OnWake::Ready {
        delay: Duration::from_millis(200),
    });
    let (activator, port) = start_activator(test_config(), &waker, backend.port, LONG).await;
    let answer = get(port, "/echo/zero").await.unwrap();
    assert_eq!(answer.status, 200);
    let series = |outcome: &str, part: &str, what: &str| {
        format!(
            "crac_activator_request_at_zero_seconds_{what}{{namespace=\"shop\",app=\"demo\",mode=\"recreate\",outcome=\"{outcome}\",part=\"{part}\"}}"
        )
    };
    within(Duration::from_secs(5), "the wake recorded", async {
        while metric(&activator, &series("restored", "restore", "count")) < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        metric(&activator, &series("restored", "first_byte", "count")),
        1.0
    );
    assert!(
        metric(&activator, &series("restored", "held", "sum")) >= 0.2,
        "held through the wake"
    );
    assert!(
        metric(&activator, &series("restored", "first_byte", "sum"))
            >= metric(&activator, &series("restored", "held", "sum"))
    );
    assert_eq!(
        metric(&activator, &series("restored", "restore", "sum")),
        0.12
    );
    agent_task.abort();

    // The app goes back to sleep and its wake never comes: a 503, recorded as failed.
    *waker.on_wake.lock().unwrap() = OnWake::Never;
    waker.set_pods(&app_key(), vec![]);
    activator
        .registry()
        .upsert_app(app_config(port, backend.port, Duration::from_millis(500)));
    let answer = get(port, "/echo/never").await.unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(
        metric(&activator, &series("failed", "first_byte", "count")),
        1.0
    );
}

/// A fake agent on `ip`'s agent port: `POST /wake` carrying `Bearer <token>` starts the app
/// (an echo backend on `ip:app_port`) and answers as a restore in place does; anything else
/// gets 401. Returns the calls it saw (their Authorization headers) and the backend, once up.
async fn agent_sleeping_in_place(
    ip: IpAddr,
    app_port: u16,
    token: String,
) -> (
    Arc<std::sync::Mutex<Vec<String>>>,
    Arc<tokio::sync::OnceCell<Backend>>,
) {
    let listener = tokio::net::TcpListener::bind((ip, 9901))
        .await
        .expect("the agent port on this loopback address is free");
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = Arc::new(tokio::sync::OnceCell::new());
    let (seen, started) = (Arc::clone(&calls), Arc::clone(&app));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let auth = head
                .lines()
                .find_map(|l| l.strip_prefix("Authorization: "))
                .unwrap_or("")
                .trim()
                .to_string();
            seen.lock().unwrap().push(auth.clone());
            let answer = if head.starts_with("POST /wake ") && auth == format!("Bearer {token}") {
                started.get_or_init(|| start_backend_on(ip, app_port)).await;
                "HTTP/1.0 200 OK\r\n\r\n{\"mode\":\"restored\",\"restoreMs\":80}"
            } else {
                "HTTP/1.0 401 Unauthorized\r\n\r\n{\"error\":\"a valid bearer token is required\"}"
            };
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    (calls, app)
}

/// An app that sleeps in place: its pods stay, each with only its agent running. A request at
/// zero makes the activator wake them itself (`POST /wake` with the app's control token, the
/// HMAC of its UID under the cluster key) and go to the pod the moment the agent says the JVM
/// is back, the cluster never saying the pod is Ready. Under another key the token is wrong:
/// the agent wakes nothing and the request gets its 503 at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_wake_pods_sleeping_in_place_with_the_apps_token() {
    let key: Arc<[u8]> = Arc::from(&b"0123456789abcdef0123456789abcdef"[..]);
    for (pod, cluster_key, woken) in [
        ("127.0.0.3", Arc::clone(&key), true),
        (
            "127.0.0.4",
            Arc::from(&b"another cluster's key, not ours"[..]),
            false,
        ),
    ] {
        let pod: IpAddr = pod.parse().unwrap();
        let backend_port = free_port();
        let waker = TestWaker::new(OnWake::Never);
        let deadline = if woken { LONG } else { Duration::from_secs(2) };
        let (activator, port) =
            start_activator(test_config(), &waker, backend_port, deadline).await;
        let registry = activator.registry();
        registry.upsert_app(AppConfig {
            in_place_uid: Some("uid-1".into()),
            ..app_config(port, backend_port, deadline)
        });
        let token = crac_api::control::app_token(&key, "uid-1");
        let (calls, app) = agent_sleeping_in_place(pod, backend_port, token.clone()).await;
        registry.set_control_key(cluster_key);
        registry.set_starting_pods(&app_key(), vec![pod], vec![pod]);

        let answer = within(
            deadline + Duration::from_secs(3),
            "the held request",
            get(port, "/echo/7"),
        )
        .await
        .unwrap();
        let calls = calls.lock().unwrap().clone();
        assert!(!calls.is_empty(), "the agent was asked");
        if woken {
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            assert_eq!(answer.body, "id:7");
            assert_eq!(
                calls,
                vec![format!("Bearer {token}")],
                "one wake, with the app's token"
            );
            assert_eq!(
                metric(
                    &activator,
                    "crac_activator_pods_woken_in_place_total{namespace=\"shop\",app=\"demo\"}"
                ),
                1.0
            );
        } else {
            assert_eq!(answer.status, 503, "{:?}", answer.body);
            assert!(app.get().is_none(), "the app was started without the token");
            assert!(calls.iter().all(|c| c != &format!("Bearer {token}")));
        }
    }
}
