//! A stand-in for the agent's activity endpoint on a pod's (loopback) address, so the
//! operator's idle detection reads a real HTTP endpoint whose answers the test controls.

use crac_api::agent::{ACTIVITY_PATH, ActivityReport, DEFAULT_ACTIVITY_PORT};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Answers a control request (`POST /sleep`, `POST /wake`): given the path and the
/// `Authorization` header, the status and body (see [`ActivityServer::set_control`]).
pub type Control = Arc<dyn Fn(&str, Option<&str>) -> (u16, String) + Send + Sync>;

pub struct ActivityServer {
    report: Arc<Mutex<ActivityReport>>,
    control: Arc<Mutex<Option<Control>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ActivityServer {
    /// Serves `GET /activity` on `ip:9901` until dropped.
    pub async fn start(ip: &str, report: ActivityReport) -> Self {
        // kwok reuses the addresses of deleted pods: another test's stand-in may still hold
        // this one for a moment.
        let listener = crate::wait_for(
            &format!("{ip}:{DEFAULT_ACTIVITY_PORT} to be free"),
            std::time::Duration::from_secs(30),
            || async { TcpListener::bind((ip, DEFAULT_ACTIVITY_PORT)).await.ok() },
        )
        .await;
        let report = Arc::new(Mutex::new(report));
        let control: Arc<Mutex<Option<Control>>> = Arc::default();
        let (shared, controls) = (report.clone(), control.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (shared, controls) = (shared.clone(), controls.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let asked = String::from_utf8_lossy(&buf[..n]).to_string();
                    let line = asked.lines().next().unwrap_or("");
                    let authorization = asked
                        .lines()
                        .find_map(|l| l.strip_prefix("Authorization:"))
                        .map(str::trim);
                    let control = controls.lock().unwrap().clone();
                    let response = match (line.split(' ').nth(1), control) {
                        _ if line.starts_with(&format!("GET {ACTIVITY_PATH} ")) => {
                            let body = serde_json::to_string(&*shared.lock().unwrap()).unwrap();
                            format!(
                                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}"
                            )
                        }
                        (Some(path @ ("/sleep" | "/wake")), Some(control))
                            if line.starts_with("POST ") =>
                        {
                            let (code, body) = control(path, authorization);
                            format!(
                                "HTTP/1.0 {code} X\r\nContent-Type: application/json\r\n\r\n{body}"
                            )
                        }
                        _ => "HTTP/1.0 404 Not Found\r\n\r\n".to_string(),
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        ActivityServer {
            report,
            control,
            task,
        }
    }

    /// Serves `POST /sleep` and `POST /wake` with `control` (`None`: 404, as an agent with no
    /// control token does).
    pub fn set_control(&self, control: Option<Control>) {
        *self.control.lock().unwrap() = control;
    }

    /// The `mode` the activity report says (`sleeping` while asleep in place).
    pub fn set_mode(&self, mode: &str) {
        self.report.lock().unwrap().mode = mode.into();
    }

    pub fn set(&self, open_connections: u32, last_activity_time: Option<String>) {
        let mut r = self.report.lock().unwrap();
        r.open_connections = open_connections;
        r.last_activity_time = last_activity_time;
    }
}

impl Drop for ActivityServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A report of a restored pod with `open` connections and traffic last seen `ago_secs` ago.
pub fn report(open: u32, ago_secs: i64) -> ActivityReport {
    let seen = k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_secs(ago_secs);
    ActivityReport {
        mode: "restored".into(),
        open_connections: open,
        last_activity_time: Some(seen.to_string()),
        ..Default::default()
    }
}
