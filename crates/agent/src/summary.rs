//! The one line of JSON the operator reads back from the pod's termination message.

use std::io::Write;
use std::path::Path;

use crac_api::agent::AgentSummary;

/// Kubernetes truncates termination messages at 4096 bytes; stay well below.
const MAX_BYTES: usize = 3500;
const MAX_MESSAGE_CHARS: usize = 600;

/// Serialises `summary` as one line, shortening the message so it fits.
pub fn render(summary: &AgentSummary) -> String {
    let mut s = summary.clone();
    if let Some(m) = &s.message {
        s.message = Some(one_line(m, MAX_MESSAGE_CHARS));
    }
    let mut json = serde_json::to_string(&s).unwrap_or_else(|_| "{}".into());
    if json.len() > MAX_BYTES {
        s.message = s.message.map(|m| one_line(&m, 100));
        json = serde_json::to_string(&s).unwrap_or_else(|_| "{}".into());
    }
    json
}

fn one_line(m: &str, max_chars: usize) -> String {
    let flat: String = m.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max_chars {
        return flat;
    }
    let mut cut: String = flat.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Writes the summary (replacing what was there) and echoes it to stderr for `kubectl logs`.
pub fn write(path: &Path, summary: &AgentSummary) {
    let line = render(summary);
    eprintln!("crac-agent: summary {line}");
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = result {
        eprintln!(
            "crac-agent: cannot write summary to {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crac_api::agent::Outcome;

    #[test]
    fn long_messages_are_cut_to_one_line() {
        let s = AgentSummary {
            outcome: Some(Outcome::Failed),
            reason: Some("CriuDumpFailed".into()),
            message: Some("line one\nline two ".repeat(1000)),
            ..Default::default()
        };
        let line = render(&s);
        assert!(line.len() < 4096);
        assert!(!line.contains('\n'));
        let back: AgentSummary = serde_json::from_str(&line).unwrap();
        assert_eq!(back.reason.as_deref(), Some("CriuDumpFailed"));
        assert!(back.message.unwrap().starts_with("line one line two"));
    }
}
