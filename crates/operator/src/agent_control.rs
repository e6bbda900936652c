//! The operator's calls to a restore pod's agent to sleep and wake it in place (`POST /sleep`,
//! `POST /wake` on the activity port, with the app's control token): bounded HTTP/1.0
//! exchanges, as the activity reads are.

use crac_api::agent::{ControlAnswer, DEFAULT_ACTIVITY_PORT};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a call did not succeed.
#[derive(Clone, Debug, PartialEq)]
pub enum CallFailure {
    /// No answer: the pod is gone, its node unreachable, or its agent not listening yet.
    Unreachable(String),
    /// Connected, but no answer within the limit (a restore slower than that).
    TimedOut(Duration),
    /// The agent does not take control calls from us: 404 (no token configured: a pod from
    /// before the app slept in place) or 401 (another token).
    NotControllable(u16),
    /// The agent answered with an error (503: the wake failed and the agent is ending).
    Failed(u16, String),
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallFailure::Unreachable(why) => write!(f, "its agent did not answer ({why})"),
            CallFailure::TimedOut(limit) => write!(f, "its agent did not answer within {limit:?}"),
            CallFailure::NotControllable(404) => {
                f.write_str("its agent has no control token (a pod from an earlier template)")
            }
            CallFailure::NotControllable(code) => write!(f, "its agent refused our token ({code})"),
            CallFailure::Failed(code, body) => write!(f, "its agent answered {code}: {body}"),
        }
    }
}

/// How long connecting to an agent may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(3);

/// `POST <path>` to the agent at `ip`, waiting at most `limit` (a wake restores before it
/// answers). The answer is read up to 64 KiB.
pub async fn call(
    ip: &str,
    path: &str,
    token: &str,
    limit: Duration,
) -> Result<ControlAnswer, CallFailure> {
    let exchange = async {
        // A node that went away drops the SYN: that is no slow restore.
        let connect = tokio::net::TcpStream::connect((ip, DEFAULT_ACTIVITY_PORT));
        let mut stream = tokio::time::timeout(CONNECT_LIMIT, connect)
            .await
            .map_err(|_| CallFailure::Unreachable(format!("no connection in {CONNECT_LIMIT:?}")))?
            .map_err(|e| CallFailure::Unreachable(e.to_string()))?;
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: {ip}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| CallFailure::Unreachable(e.to_string()))?;
        let mut response = Vec::new();
        stream
            .take(64 * 1024)
            .read_to_end(&mut response)
            .await
            .map_err(|e| CallFailure::Unreachable(e.to_string()))?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| CallFailure::Unreachable("no HTTP answer".into()))?;
        let code: u16 = head
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| CallFailure::Unreachable("no HTTP answer".into()))?;
        match code {
            200 => serde_json::from_str(body)
                .map_err(|e| CallFailure::Failed(code, format!("unreadable answer: {e}"))),
            401 | 404 => Err(CallFailure::NotControllable(code)),
            _ => Err(CallFailure::Failed(
                code,
                body.chars().take(300).collect::<String>(),
            )),
        }
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or(Err(CallFailure::TimedOut(limit)))
}
