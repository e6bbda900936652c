//! Who may put a pod to sleep in place and wake it (`POST /sleep`, `POST /wake` on the agent's
//! activity port): whoever holds the app's control token. The operator and the activator derive
//! it from one cluster key and the app's UID, so neither reads a Secret in a tenant's
//! namespace; the restore pods get it from a per-app Secret the operator writes. A tenant can
//! read its own app's token (it could exec into its pods anyway) and learns nothing about any
//! other app's: the token is an HMAC of the UID under a key only the operator's namespace holds.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The Secret, in the activator's namespace, that holds the cluster key (created by the
/// operator when it first needs it).
pub const KEY_SECRET: &str = "crac-control-key";
/// Its data field.
pub const KEY_FIELD: &str = "key";
/// Bytes of a key the operator generates.
pub const KEY_BYTES: usize = 32;
/// The shortest key either side accepts.
pub const MIN_KEY_BYTES: usize = 16;

/// The per-app Secret's data field, and where restore pods mount it.
pub const TOKEN_FIELD: &str = "token";
pub const TOKEN_DIR: &str = "/var/run/crac/control";
pub const TOKEN_FILE: &str = "/var/run/crac/control/token";

/// The per-app Secret holding the app's control token.
pub fn token_secret_name(app: &str) -> String {
    format!("{app}-crac-control")
}

/// The control token of the app with `uid`: hex HMAC-SHA256 (64 visible ASCII bytes, within
/// the agent's bounds). A CracApp deleted and created again under its name gets a new token.
pub fn app_token(key: &[u8], uid: &str) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts a key of any length");
    mac.update(b"crac.dev/control/v1/");
    mac.update(uid.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_by_key_and_uid_and_fit_the_agent() {
        let a = app_token(b"0123456789abcdef0123456789abcdef", "uid-1");
        assert_eq!(a.len(), 64);
        assert!(a.len() >= crate::agent::MIN_CONTROL_TOKEN_BYTES);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, app_token(b"0123456789abcdef0123456789abcdef", "uid-1"));
        assert_ne!(a, app_token(b"0123456789abcdef0123456789abcdef", "uid-2"));
        assert_ne!(a, app_token(b"0123456789abcdef0123456789abcdeX", "uid-1"));
        // RFC 4231 test case 2, to pin the construction.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
