//! The app's pods as the driver plays them: on every address of the driver's node the agent's
//! activity endpoint (reporting the app port's real open connections, so the operator's drain
//! waits for them), and the app's port on the addresses of live pods only. A pod's listener
//! opens when the pod watch shows a pod with that address and closes when that pod is being
//! deleted or gone, so a request sent to a dead pod is refused (or reset in the backlog), not
//! served by a socket no real pod would have. Connections already accepted finish, as a
//! gracefully stopping app would finish them.
//!
//! Sleeping in place ([`Pods::sleep_in_place`]): each address's agent also answers `POST /sleep`
//! (the app's listener closes, as a JVM ended in place stops listening) and `POST /wake` (it
//! opens again) when they carry the app's control token, 401 otherwise. The pod stays, Ready as
//! kwok keeps it, so a request sent to it while it sleeps is refused, as on a real node before
//! the kubelet's next probe.
//!
//! What the app answers (every response `Connection: close`):
//! - `GET /get/ID`: 200, body `get ID`;
//! - `POST /upload/ID` with a body: reads it all, checks every byte against [`body_byte`], 200,
//!   body `upload ID LEN ok` (or `... bad@OFFSET`);
//! - `POST /early/ID`: 413 with body `too large ID` as soon as the head is in, before reading
//!   the body, then reads and drops the body (a lingering close, so the answer is not lost to a
//!   reset).

use crac_api::agent::ActivityReport;
use crac_tests::activity::{ActivityServer, Control};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Api, Client, ResourceExt};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Byte `i` of request `id`'s upload body.
pub fn body_byte(id: u64, i: usize) -> u8 {
    (i as u64).wrapping_mul(31).wrapping_add(id) as u8
}

/// One address of the node.
struct Address {
    activity: ActivityServer,
    open: Arc<AtomicU32>,
    /// The pod that has this address, and the listener serving for it.
    owner: Option<(String, JoinHandle<()>)>,
    /// Asleep in place: its listener is closed, the pod stays.
    asleep: bool,
}

/// The node's addresses, and the app's ready pods (what the EndpointSlice would list if it took
/// loopback addresses).
#[derive(Clone)]
pub struct Pods {
    addresses: Arc<Mutex<HashMap<Ipv4Addr, Address>>>,
    ready: Arc<Mutex<HashMap<String, Ipv4Addr>>>,
    port: u16,
    net: [u8; 3],
}

impl Pods {
    /// The activity endpoints on every address of `net` (they serve until `self` is dropped).
    pub async fn start(net: [u8; 3], port: u16) -> Pods {
        let mut addresses = HashMap::new();
        for host in 1..=254u8 {
            let ip = Ipv4Addr::new(net[0], net[1], net[2], host);
            let idle = ActivityReport {
                mode: "restored".into(),
                ..Default::default()
            };
            let activity = ActivityServer::start(&ip.to_string(), idle).await;
            addresses.insert(
                ip,
                Address {
                    activity,
                    open: Arc::default(),
                    owner: None,
                    asleep: false,
                },
            );
        }
        Pods {
            addresses: Arc::new(Mutex::new(addresses)),
            ready: Arc::default(),
            port,
            net,
        }
    }

    /// Addresses of the app's ready pods, each with the app port.
    pub fn ready(&self) -> Vec<Ipv4Addr> {
        let ready = self.ready.lock().expect("pods lock");
        let mut ips: Vec<Ipv4Addr> = ready.values().copied().collect();
        ips.sort();
        ips
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn ours(&self, ip: &str) -> Option<Ipv4Addr> {
        let ip: Ipv4Addr = ip.parse().ok()?;
        (ip.octets()[..3] == self.net).then_some(ip)
    }

    /// Follows the app's restore pods until the task is aborted.
    pub fn follow(&self, client: &Client, ns: &str, app: &str) -> JoinHandle<()> {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let config =
            watcher::Config::default().labels(&crac_api::serving::restore_pods_selector(Some(app)));
        let pods = self.clone();
        tokio::spawn(async move {
            let mut stream = Box::pin(watch(api, config).default_backoff());
            while let Ok(Some(event)) = stream.try_next().await {
                match event {
                    Event::Apply(pod) | Event::InitApply(pod) => pods.seen(&pod),
                    Event::Delete(pod) => pods.gone(&pod.name_any()),
                    Event::Init | Event::InitDone => {}
                }
            }
        })
    }

    fn seen(&self, pod: &Pod) {
        let name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some() {
            return self.gone(&name);
        }
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| self.ours(ip))
        else {
            return;
        };
        {
            let mut addresses = self.addresses.lock().expect("pods lock");
            let address = addresses.get_mut(&ip).expect("an address of the node");
            if address.owner.as_ref().is_none_or(|(n, _)| *n != name) {
                if let Some((_, old)) = address.owner.take() {
                    old.abort();
                }
                let task = tokio::spawn(serve(
                    ip,
                    self.port,
                    address.open.clone(),
                    self.addresses.clone(),
                ));
                address.owner = Some((name.clone(), task));
                address.asleep = false;
                address.activity.set_mode("restored");
            }
        }
        let mut ready = self.ready.lock().expect("pods lock");
        if crac_api::serving::serving_address(pod).is_some() {
            ready.insert(name, ip);
        } else {
            ready.remove(&name);
        }
    }

    /// From now on every address's agent sleeps and wakes its pod's app on request, given
    /// `token`, and counts the wakes it did.
    pub fn sleep_in_place(&self, token: &str) -> Arc<AtomicU32> {
        let wakes = Arc::new(AtomicU32::new(0));
        let addresses = self.addresses.lock().expect("pods lock");
        for (&ip, address) in addresses.iter() {
            let (all, port, wakes) = (self.addresses.clone(), self.port, wakes.clone());
            let expected = format!("Bearer {token}");
            let control: Control = Arc::new(move |path, authorization| {
                if authorization != Some(expected.as_str()) {
                    return (
                        401,
                        r#"{"error":"a valid bearer token is required"}"#.into(),
                    );
                }
                let mut addresses = all.lock().expect("pods lock");
                let Some(a) = addresses.get_mut(&ip) else {
                    return (503, "{}".into());
                };
                match (path, a.asleep, &a.owner) {
                    ("/sleep", false, Some((_, task))) => {
                        task.abort();
                        a.asleep = true;
                        a.activity.set_mode("sleeping");
                        (200, r#"{"mode":"sleeping","sleepMs":1}"#.into())
                    }
                    ("/sleep", _, _) => (200, r#"{"mode":"sleeping"}"#.into()),
                    ("/wake", true, Some((name, _))) => {
                        let task = tokio::spawn(serve(ip, port, a.open.clone(), all.clone()));
                        a.owner = Some((name.clone(), task));
                        a.asleep = false;
                        a.activity.set_mode("restored");
                        wakes.fetch_add(1, Ordering::AcqRel);
                        (200, r#"{"mode":"restored","restoreMs":1}"#.into())
                    }
                    _ => (200, r#"{"mode":"restored"}"#.into()),
                }
            });
            address.activity.set_control(Some(control));
        }
        wakes
    }

    fn gone(&self, name: &str) {
        self.ready.lock().expect("pods lock").remove(name);
        let mut addresses = self.addresses.lock().expect("pods lock");
        for address in addresses.values_mut() {
            if address.owner.as_ref().is_some_and(|(n, _)| n == name)
                && let Some((_, task)) = address.owner.take()
            {
                // Aborting the accept loop drops (closes) the listener.
                task.abort();
            }
        }
    }
}

/// Keeps the activity report of `ip` equal to its open connections.
fn report_open(addresses: &Mutex<HashMap<Ipv4Addr, Address>>, ip: Ipv4Addr, open: u32) {
    if let Some(a) = addresses.lock().expect("pods lock").get(&ip) {
        a.activity.set(open, None);
    }
}

/// The app on `ip:port` until aborted. A freshly deleted pod's address may still be held by
/// its listener for a moment: binding is retried.
async fn serve(
    ip: Ipv4Addr,
    port: u16,
    open: Arc<AtomicU32>,
    addresses: Arc<Mutex<HashMap<Ipv4Addr, Address>>>,
) {
    let listener = loop {
        match TcpListener::bind((ip, port)).await {
            Ok(l) => break l,
            Err(e) => {
                eprintln!("chaos: bind {ip}:{port}: {e}; again");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    while let Ok((stream, _)) = listener.accept().await {
        let n = open.fetch_add(1, Ordering::AcqRel) + 1;
        report_open(&addresses, ip, n);
        let (open, addresses) = (open.clone(), addresses.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(120), answer(stream, ip)).await;
            let n = open.fetch_sub(1, Ordering::AcqRel) - 1;
            report_open(&addresses, ip, n);
        });
    }
}

/// Reads a request head: (method, path, content length, bytes of the body read with it).
pub async fn read_head(stream: &mut TcpStream) -> Option<(String, String, usize, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    Some((method, path, length, buf[end..].to_vec()))
}

async fn respond(stream: &mut TcpStream, status: &str, ip: Ipv4Addr, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Pod: {ip}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

async fn answer(mut stream: TcpStream, ip: Ipv4Addr) {
    let Some((method, path, length, mut read)) = read_head(&mut stream).await else {
        return;
    };
    let id = path.rsplit('/').next().unwrap_or("").to_string();
    match (method.as_str(), path.rsplit_once('/').map(|(p, _)| p)) {
        ("GET", Some("/get")) => respond(&mut stream, "200 OK", ip, &format!("get {id}")).await,
        ("POST", Some("/upload")) => {
            let n: u64 = id.parse().unwrap_or(0);
            let mut bad = None;
            let mut seen = 0usize;
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                for (i, b) in read.iter().enumerate() {
                    if bad.is_none() && *b != body_byte(n, seen + i) {
                        bad = Some(seen + i);
                    }
                }
                seen += read.len();
                if seen >= length {
                    break;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => read = chunk[..k].to_vec(),
                }
            }
            let verdict = match bad {
                None if seen == length => "ok".to_string(),
                None => format!("long@{seen}"),
                Some(at) => format!("bad@{at}"),
            };
            let body = format!("upload {id} {seen} {verdict}");
            respond(&mut stream, "200 OK", ip, &body).await;
        }
        ("POST", Some("/early")) => {
            let body = format!("too large {id}");
            respond(&mut stream, "413 Content Too Large", ip, &body).await;
            let _ = stream.shutdown().await;
            // Lingering close: drop what the caller still sends, so the answer is not lost to
            // a reset.
            let mut left = length.saturating_sub(read.len());
            let mut chunk = vec![0u8; 64 * 1024];
            while left > 0 {
                match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
                    Ok(Ok(k)) if k > 0 => left = left.saturating_sub(k),
                    _ => break,
                }
            }
        }
        _ => respond(&mut stream, "404 Not Found", ip, "no such path").await,
    }
}
