//! Bearer-token authentication with constant-time comparison.
//!
//! Tokens are compared through their SHA-256 digests, byte by byte without early exit and
//! against every accepted token, so timing reveals neither a token's content nor its length.

use sha2::{Digest, Sha256};

/// The accepted tokens (as digests); empty means auth is off.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} accepted)", self.digests.len())
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Tokens {
    /// Accepts exactly `tokens`.
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> Self {
        Self {
            digests: tokens
                .iter()
                .map(|t| digest(t.as_ref().as_bytes()))
                .collect(),
        }
    }

    /// Whether any token is required.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether an `Authorization` header value carries an accepted bearer token.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(token) = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
        else {
            return false;
        };
        let given = digest(token);
        let mut any = 0u8;
        for d in &self.digests {
            let diff = d
                .iter()
                .zip(given.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            any |= u8::from(diff == 0);
        }
        any == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_listed_bearer_tokens() {
        let t = Tokens::new(&["alpha", "beta"]);
        assert!(t.enabled());
        assert!(t.accepts(Some(b"Bearer alpha")));
        assert!(t.accepts(Some(b"bearer beta")));
        assert!(!t.accepts(Some(b"Bearer alph")));
        assert!(!t.accepts(Some(b"Basic alpha")));
        assert!(!t.accepts(Some(b"alpha")));
        assert!(!t.accepts(None));
        assert!(!Tokens::default().enabled());
    }
}
