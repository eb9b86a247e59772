//! A small blocking connection pool: at most `size` connections, a bounded wait for a free
//! one, broken connections dropped, and transactions left open by a snapshot rolled back before
//! the connection is handed out again.
//!
//! Our own rather than r2d2: it is a page of code, and it lets a connection given back from
//! an async context (a snapshot dropped by a server handler) be returned without running any
//! I/O there (the `postgres` client blocks on its own runtime, which an async worker may not).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::is_connection_error;
use crate::error::{IndexError, Result};

pub(crate) struct Pool {
    config: postgres::Config,
    /// `SET search_path ...` and the like, run on every new connection.
    setup: String,
    describe: String,
    size: usize,
    acquire_timeout: Duration,
    /// How long a connection attempt keeps retrying while the server is unreachable
    /// (restarting, failing over).
    reconnect_for: Duration,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// Retrying only makes sense for a server that was there: a wrong address or a database
    /// that is down when zrag starts is reported at once.
    ever_connected: AtomicBool,
}

struct PoolState {
    idle: Vec<Idle>,
    /// Connections handed out plus idle ones.
    open: usize,
}

struct Idle {
    client: Client,
    /// A snapshot's transaction is still open on it.
    in_transaction: bool,
}

impl Pool {
    pub(crate) fn new(
        config: postgres::Config,
        setup: String,
        describe: String,
        size: usize,
        acquire_timeout: Duration,
        reconnect_for: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            config,
            setup,
            describe,
            size: size.max(1),
            acquire_timeout,
            reconnect_for,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            ever_connected: AtomicBool::new(false),
        })
    }

    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    /// A connection, waiting up to the acquire timeout for one to be free.
    pub(crate) fn get(self: &Arc<Self>) -> Result<PooledClient> {
        let deadline = Instant::now() + self.acquire_timeout;
        loop {
            let reuse = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(idle) = state.idle.pop() {
                        break Some(idle);
                    }
                    if state.open < self.size {
                        state.open += 1;
                        break None;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(IndexError::PoolExhausted {
                            database: self.describe.clone(),
                            size: self.size,
                            waited: self.acquire_timeout,
                        });
                    }
                    state = self
                        .freed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            match reuse {
                Some(mut idle) => {
                    if idle.client.is_closed()
                        || (idle.in_transaction && idle.client.batch_execute("ROLLBACK").is_err())
                    {
                        discard(idle.client);
                        self.forget();
                        continue;
                    }
                    return Ok(PooledClient {
                        client: Some(idle.client),
                        pool: self.clone(),
                        in_transaction: false,
                    });
                }
                None => match self.connect() {
                    Ok(client) => {
                        return Ok(PooledClient {
                            client: Some(client),
                            pool: self.clone(),
                            in_transaction: false,
                        })
                    }
                    Err(e) => {
                        self.forget();
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Opens a connection, retrying while a server this pool has reached before is restarting
    /// or unreachable.
    fn connect(&self) -> Result<Client> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            let attempt = self.config.connect(NoTls).and_then(|mut client| {
                client.batch_execute(&self.setup)?;
                Ok(client)
            });
            match attempt {
                Ok(client) => {
                    self.ever_connected.store(true, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e)
                    if is_connection_error(&e)
                        && self.ever_connected.load(Ordering::Relaxed)
                        && started.elapsed() < self.reconnect_for =>
                {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(IndexError::Postgres {
                        database: self.describe.clone(),
                        context: "connecting".into(),
                        source: e,
                    })
                }
            }
        }
    }

    /// A connection that will not come back (broken, or its open failed).
    fn forget(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open = state.open.saturating_sub(1);
        self.freed.notify_one();
    }

    fn give_back(&self, client: Client, in_transaction: bool) {
        if client.is_closed() {
            discard(client);
            self.forget();
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.idle.push(Idle {
            client,
            in_transaction,
        });
        self.freed.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for idle in state.idle.drain(..) {
            discard(idle.client);
        }
    }
}

/// Drops a client on a thread of its own: closing runs the client's own runtime, which must
/// not happen on an async worker (a server drops its pools there when it shuts down).
fn discard(client: Client) {
    let _ = std::thread::Builder::new()
        .name("zrag-pg-close".into())
        .spawn(move || drop(client));
}

/// A connection on loan from a [`Pool`]; goes back on drop.
pub(crate) struct PooledClient {
    client: Option<Client>,
    pool: Arc<Pool>,
    /// Set by a snapshot: the connection carries an open read transaction.
    pub(crate) in_transaction: bool,
}

impl PooledClient {
    pub(crate) fn describe(&self) -> &str {
        self.pool.describe()
    }
}

impl Deref for PooledClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("client present until drop")
    }
}

impl DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("client present until drop")
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.pool.give_back(client, self.in_transaction);
        }
    }
}
