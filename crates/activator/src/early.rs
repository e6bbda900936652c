//! Forwarding as soon as a woken app answers. While requests are held, the activator probes the
//! app's pods that run but are not Ready yet, itself: the app's readiness path when its probe is
//! an HTTP GET, else a TCP connect to its port. A pod that answers takes the held requests at
//! once, instead of after the kubelet's next probe (whose period is at least a second), its
//! report to the API server and the watch that brings it here. The kubelet's probe keeps its
//! role for everything else: steady-state traffic goes where the Service's endpoints say.
//!
//! The probe is the app author's (hostile, possibly): its path is checked before it is used,
//! it only ever goes to the app's own pods, one connection at a time per pod, with a short
//! deadline and a bounded read, and only while requests are held.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crac_api::CracApp;
use crac_api::agent::{
    ACTIVITY_PATH, ActivityReport, ControlAnswer, DEFAULT_ACTIVITY_PORT, WAKE_PATH, mode,
};
use crac_api::cracapp::APP_CONTAINER;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How the activator asks a starting pod whether its app answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppProbe {
    /// A connection to the port is accepted.
    Tcp { port: u16 },
    /// `GET path` on the port answers 2xx or 3xx (as the kubelet counts an HTTP probe).
    Http { port: u16, path: String },
}

/// Longest readiness path the activator sends.
const MAX_PATH: usize = 512;
/// Bytes of an answer read to find its status line.
const MAX_ANSWER: u64 = 1024;

/// The probe for `app`: its app container's readiness probe when that is an HTTP GET (plain
/// HTTP) or a TCP check the activator can repeat, else a TCP connect to `fallback_port` (the
/// app's first port). `None` when there is nothing to probe.
pub fn app_probe(app: &CracApp, fallback_port: Option<u16>) -> Option<AppProbe> {
    let container = app
        .spec
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == APP_CONTAINER);
    let from_readiness = container.and_then(|c| probe_of(c, c.readiness_probe.as_ref()?));
    from_readiness.or_else(|| fallback_port.map(|port| AppProbe::Tcp { port }))
}

fn probe_of(container: &Container, probe: &Probe) -> Option<AppProbe> {
    if let Some(http) = &probe.http_get {
        let port = resolve_port(container, &http.port)?;
        let https = http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let path = http.path.as_deref().unwrap_or("/");
        return Some(match (https, safe_path(path)) {
            // Not spoken here, or not safe to send: whether the port accepts is still news.
            (true, _) | (_, false) => AppProbe::Tcp { port },
            (false, true) => AppProbe::Http {
                port,
                path: path.to_string(),
            },
        });
    }
    let tcp = probe.tcp_socket.as_ref()?;
    Some(AppProbe::Tcp {
        port: resolve_port(container, &tcp.port)?,
    })
}

/// A port number, or the name of one of the container's ports.
fn resolve_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p != 0),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p != 0),
    }
}

/// A path that fits in a request line as it is: starts with `/`, bounded, visible ASCII only
/// (no space, no CR or LF that would end the line and start a header of the author's).
fn safe_path(path: &str) -> bool {
    path.starts_with('/') && path.len() <= MAX_PATH && path.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether the app on `ip` answers `probe` within `limit`.
pub async fn answers(ip: IpAddr, probe: &AppProbe, limit: Duration) -> bool {
    tokio::time::timeout(limit, ask(ip, probe))
        .await
        .unwrap_or(false)
}

async fn ask(ip: IpAddr, probe: &AppProbe) -> bool {
    let port = match probe {
        AppProbe::Tcp { port } | AppProbe::Http { port, .. } => *port,
    };
    let Ok(mut stream) = TcpStream::connect(SocketAddr::new(ip, port)).await else {
        return false;
    };
    let AppProbe::Http { path, .. } = probe else {
        return true;
    };
    let host = SocketAddr::new(ip, port);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: crac-activator\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let mut limited = (&mut stream).take(MAX_ANSWER);
    // The status line is all that matters; stop reading once it is in.
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') {
        match limited.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    status_ok(&answer)
}

/// What the agent of the pod on `ip` says about how its app started (`GET /activity` on the
/// agent's port): one bounded exchange (64 KiB, `limit`). `None` when it does not answer so.
pub async fn agent_report(ip: IpAddr, limit: Duration) -> Option<ActivityReport> {
    agent_exchange(ip, &format!("GET {ACTIVITY_PATH}"), None, limit).await
}

/// Wakes a pod that sleeps in place (`POST /wake` with the app's control token), waiting at
/// most `limit` for its agent to restore the JVM and see it ready. `None` when the wake did not
/// happen (no answer, or an error: the operator falls back for that pod).
pub async fn wake_in_place(ip: IpAddr, token: &str, limit: Duration) -> Option<ControlAnswer> {
    let answer: ControlAnswer =
        agent_exchange(ip, &format!("POST {WAKE_PATH}"), Some(token), limit).await?;
    [mode::RESTORED, mode::COLD_STARTED]
        .contains(&answer.mode.as_str())
        .then_some(answer)
}

/// One bounded HTTP/1.0 exchange with a pod's agent (64 KiB, `limit`): the JSON body of a 2xx.
async fn agent_exchange<T: serde::de::DeserializeOwned>(
    ip: IpAddr,
    request_line: &str,
    token: Option<&str>,
    limit: Duration,
) -> Option<T> {
    let exchange = async {
        let addr = SocketAddr::new(ip, DEFAULT_ACTIVITY_PORT);
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let authorization = token
            .map(|t| format!("Authorization: Bearer {t}\r\nContent-Length: 0\r\n"))
            .unwrap_or_default();
        let request = format!("{request_line} HTTP/1.0\r\nHost: {addr}\r\n{authorization}\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut answer).await.ok()?;
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
        status_ok(&answer[..split]).then_some(())?;
        serde_json::from_slice(&answer[split + 4..]).ok()
    };
    tokio::time::timeout(limit, exchange).await.ok().flatten()
}

/// Whether an HTTP answer's status line says 2xx or 3xx.
fn status_ok(answer: &[u8]) -> bool {
    let line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    version.starts_with(b"HTTP/1.")
        && code.len() == 3
        && matches!(code.first(), Some(b'2' | b'3'))
        && code.iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(container: serde_json::Value) -> CracApp {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "crac.dev/v1alpha1", "kind": "CracApp",
            "metadata": { "name": "a", "namespace": "n" },
            "spec": { "template": { "spec": { "containers": [container] } } }
        }))
        .unwrap()
    }

    #[test]
    fn the_readiness_probe_is_followed_when_it_can_be_repeated_safely() {
        let http = app(serde_json::json!({
            "name": "app", "ports": [{ "name": "web", "containerPort": 8080 }],
            "readinessProbe": { "httpGet": { "path": "/ready", "port": "web" } }
        }));
        assert_eq!(
            app_probe(&http, Some(9000)),
            Some(AppProbe::Http {
                port: 8080,
                path: "/ready".into()
            })
        );
        let tcp = app(serde_json::json!({
            "name": "app", "readinessProbe": { "tcpSocket": { "port": 7000 } }
        }));
        assert_eq!(
            app_probe(&tcp, Some(9000)),
            Some(AppProbe::Tcp { port: 7000 })
        );
        // An exec probe cannot be repeated from here: the app's port is.
        let exec = app(serde_json::json!({
            "name": "app", "readinessProbe": { "exec": { "command": ["true"] } }
        }));
        assert_eq!(
            app_probe(&exec, Some(9000)),
            Some(AppProbe::Tcp { port: 9000 })
        );
        assert_eq!(app_probe(&exec, None), None);
    }

    #[test]
    fn an_unsafe_path_or_https_probes_the_port_only() {
        for (path, scheme) in [
            ("/ready\r\nX-Evil: 1", "HTTP"),
            ("/a b", "HTTP"),
            ("ready", "HTTP"),
            ("/ready", "HTTPS"),
        ] {
            let a = app(serde_json::json!({
                "name": "app",
                "readinessProbe": { "httpGet": { "path": path, "port": 8080, "scheme": scheme } }
            }));
            assert_eq!(
                app_probe(&a, None),
                Some(AppProbe::Tcp { port: 8080 }),
                "{path:?}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert!(!safe_path(&long));
        // A named port the container does not have: nothing from the probe.
        let unnamed = app(serde_json::json!({
            "name": "app", "readinessProbe": { "httpGet": { "path": "/", "port": "nope" } }
        }));
        assert_eq!(
            app_probe(&unnamed, Some(1)),
            Some(AppProbe::Tcp { port: 1 })
        );
    }

    #[test]
    fn only_2xx_and_3xx_answers_count() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!status_ok(b"HTTP/1.1 2000 OK\r\n"));
        assert!(!status_ok(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!status_ok(b""));
    }

    #[tokio::test]
    async fn a_real_server_is_asked_its_readiness_path() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut asked = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer: &[u8] = if head.starts_with("GET /ready ") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n"
                };
                s.write_all(answer).await.unwrap();
                asked.push(head.lines().next().unwrap_or_default().to_string());
            }
            asked
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let limit = Duration::from_secs(2);
        let ready = AppProbe::Http {
            port,
            path: "/ready".into(),
        };
        let other = AppProbe::Http {
            port,
            path: "/other".into(),
        };
        assert!(answers(ip, &ready, limit).await);
        assert!(!answers(ip, &other, limit).await);
        assert_eq!(
            server.await.unwrap(),
            ["GET /ready HTTP/1.1", "GET /other HTTP/1.1"]
        );
        // Nobody listening: no.
        drop(ready);
        assert!(!answers(ip, &AppProbe::Tcp { port }, limit).await);
    }
}
