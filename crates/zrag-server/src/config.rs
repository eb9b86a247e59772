//! What a server may accept: limits, and who may call it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::ServerError;

/// Bounds on what one request may cost. Every bound answers with a clear error, never a
/// silent cut.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body (413 above it).
    pub max_body_bytes: usize,
    /// Wall time for one non-streaming request (504 after it); a stream stops after it.
    pub request_timeout: Duration,
    /// Largest k for search and ask.
    pub max_k: usize,
    /// Largest max_tokens for ask and chat completions.
    pub max_tokens: usize,
    /// Inputs in one embeddings request, documents in one upsert.
    pub max_batch: usize,
    /// Searches and embedding requests running at once (503 beyond).
    pub max_concurrent_searches: usize,
    /// Generations running at once (503 beyond). Each uses every core, so 1 on a laptop.
    pub max_concurrent_generations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 8 << 20,
            request_timeout: Duration::from_secs(120),
            max_k: 50,
            max_tokens: 512,
            max_batch: 256,
            max_concurrent_searches: 16,
            max_concurrent_generations: 1,
        }
    }
}

/// Refuses to expose a server beyond this machine without an API key: anyone who can reach
/// the port could otherwise rewrite the collection.
pub fn check_access(addr: SocketAddr, api_key: Option<&str>) -> Result<(), ServerError> {
    match api_key {
        Some("") => Err(ServerError::Config("the API key must not be empty".into())),
        None if !addr.ip().is_loopback() => Err(ServerError::Config(format!(
            "refusing to listen on {addr} without an API key: pass --api-key (or set \
             ZRAG_API_KEY) to serve beyond loopback, or bind 127.0.0.1"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_required_off_loopback() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let lan: SocketAddr = "192.168.1.5:8080".parse().unwrap();
        let v6_any: SocketAddr = "[::]:8080".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6_loopback: SocketAddr = "[::1]:8080".parse().unwrap();
        for addr in [public, lan, v6_any] {
            let err = check_access(addr, None).unwrap_err().to_string();
            assert!(err.contains("--api-key"), "{err}");
            assert!(check_access(addr, Some("k")).is_ok());
        }
        for addr in [loopback, v6_loopback] {
            assert!(check_access(addr, None).is_ok());
        }
        assert!(check_access(loopback, Some("")).is_err());
    }
}
