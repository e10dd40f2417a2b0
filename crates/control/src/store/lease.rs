//! Leases and watches on the etcd store, for what lives only while its owner does: node
//! registrations (an agent's key under its lease; agent lost = lease expired) and the leader
//! key of [`crate::leader`].
//!
//! - [`EtcdStore::grant_lease`] grants a lease with a TTL and keeps it alive (a keep-alive
//!   every third of the TTL) until [`Lease::revoke`] or drop; [`Lease::lost`] says when etcd
//!   no longer holds it, or when no keep-alive got through for a whole TTL (so the lease may
//!   have expired: its owner must assume it has).
//! - [`EtcdStore::watch_prefix`] reads every key under a prefix and then streams each later
//!   change ([`WatchEvent`]), with no gap between the two.
//!
//! Keys here are store keys, under the same root as the store's records
//! ([`super::ETCD_ROOT`]). Everything runs on the store's runtime, so callers on any runtime
//! (or a test's current-thread one) can use them.

use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, PutOptions, TxnOp, WatchOptions};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::StoreError;
use super::etcd::{EtcdStore, ROOT, describe, retry};

/// A granted lease, kept alive in the background until revoked or dropped.
#[derive(Debug)]
pub struct Lease {
    id: i64,
    ttl: Duration,
    store: std::sync::Arc<super::etcd::Shared>,
    runtime: tokio::runtime::Handle,
    lost: watch::Receiver<Option<String>>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    /// Stops the keep-alives: etcd drops the lease (and its keys) one TTL later.
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed; `create_revision` tells a re-created key apart.
    Put {
        key: String,
        value: Vec<u8>,
        create_revision: i64,
    },
    /// The key was deleted, or its lease expired.
    Delete { key: String },
}

/// A watch: what was there when it started, and every change after.
#[derive(Debug)]
pub struct Watch {
    /// Every key under the prefix when the watch started, in key order.
    pub initial: Vec<(String, Vec<u8>)>,
    /// The store revision of `initial`; events are from after it.
    pub revision: i64,
    events: mpsc::UnboundedReceiver<Result<WatchEvent, StoreError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// The next change; `Err` once the watch broke (etcd unreachable, compacted): start a
    /// new one, which reads the current state again.
    pub async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        match self.events.recv().await {
            Some(event) => event,
            None => Err(StoreError::Closed),
        }
    }
}

/// What [`EtcdStore::create_if_absent`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The key is ours, created at this revision.
    Created { revision: i64 },
    /// Someone else's key: its value, its create revision and the store's revision then.
    Exists {
        value: Vec<u8>,
        create_revision: i64,
        revision: i64,
    },
}

fn full(key: &str) -> String {
    format!("{ROOT}{key}")
}

fn strip(key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    key.strip_prefix(ROOT).unwrap_or(&key).to_string()
}

impl EtcdStore {
    /// Grants a lease of `ttl` (whole seconds, at least 1 s... etcd rounds up to its own
    /// minimum) and keeps it alive until the [`Lease`] is revoked or dropped.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let shared = self.shared.clone();
        let id = self
            .on_store(async move {
                let lease = shared.client.lease_client();
                let granted = retry(&shared, "grant a lease", || {
                    let mut lease = lease.clone();
                    async move { lease.grant(seconds, None).await }
                })
                .await?;
                Ok(granted.id())
            })
            .await?;
        let ttl = Duration::from_secs(seconds.unsigned_abs());
        let (lost_tx, lost) = watch::channel(None);
        let keeper = self
            .runtime
            .spawn(keep_alive(self.shared.clone(), id, ttl, lost_tx));
        Ok(Lease {
            id,
            ttl,
            store: self.shared.clone(),
            runtime: self.runtime.clone(),
            lost,
            keeper,
        })
    }

    /// Creates `key` = `value` under `lease` unless the key exists (one transaction).
    pub async fn create_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: &Lease,
    ) -> Result<Created, StoreError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
        let shared = self.shared.clone();
        let key = full(key);
        let lease = lease.id;
        self.on_store(async move {
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let kv = shared.client.kv_client();
            let resp = retry(&shared, "create a key", || {
                let mut kv = kv.clone();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            if resp.succeeded() {
                return Ok(Created::Created { revision });
            }
            for op in resp.op_responses() {
                if let TxnOpResponse::Get(get) = op
                    && let Some(kv) = get.kvs().first()
                {
                    return Ok(Created::Exists {
                        value: kv.value().to_vec(),
                        create_revision: kv.create_revision(),
                        revision,
                    });
                }
            }
            // Deleted between the compare and the get (its lease just expired): absent now.
            Ok(Created::Exists {
                value: Vec::new(),
                create_revision: 0,
                revision,
            })
        })
        .await
    }

    /// Reads every key under `prefix`, then streams every later change under it.
    pub async fn watch_prefix(&self, prefix: &str) -> Result<Watch, StoreError> {
        let shared = self.shared.clone();
        let prefix = full(prefix);
        let (tx, events) = mpsc::unbounded_channel();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let task = self.runtime.spawn(async move {
            let kv = shared.client.kv_client();
            let options = GetOptions::new().with_prefix();
            let read = retry(&shared, "read a watched prefix", || {
                let mut kv = kv.clone();
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { kv.get(prefix, Some(options)).await }
            })
            .await;
            let resp = match read {
                Ok(resp) => resp,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            let initial = resp
                .kvs()
                .iter()
                .map(|kv| (strip(kv.key()), kv.value().to_vec()))
                .collect();
            let mut watcher = shared.client.watch_client();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut stream = match watcher.watch(prefix.as_str(), Some(options)).await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = started_tx.send(Err(shared.unreachable(&e)));
                    return;
                }
            };
            if started_tx.send(Ok((initial, revision))).is_err() {
                return;
            }
            loop {
                let message = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        let _ = tx.send(Err(StoreError::Unreachable {
                            endpoints: shared.endpoints.clone(),
                            message: "the watch stream ended".into(),
                        }));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(shared.unreachable(&e)));
                        return;
                    }
                };
                if message.canceled() {
                    let _ = tx.send(Err(StoreError::Failed {
                        operation: "watch",
                        message: format!("etcd cancelled the watch: {}", message.cancel_reason()),
                    }));
                    return;
                }
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    let change = match event.event_type() {
                        EventType::Put => WatchEvent::Put {
                            key: strip(kv.key()),
                            value: kv.value().to_vec(),
                            create_revision: kv.create_revision(),
                        },
                        EventType::Delete => WatchEvent::Delete {
                            key: strip(kv.key()),
                        },
                    };
                    if tx.send(Ok(change)).is_err() {
                        return;
                    }
                }
            }
        });
        match started.await {
            Ok(Ok((initial, revision))) => Ok(Watch {
                initial,
                revision,
                events,
                task,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Closed),
        }
    }
}

impl Lease {
    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// `Some(reason)` once the lease is gone or must be assumed gone; watch it to step down.
    pub fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.clone()
    }

    /// Puts `key` = `value` under this lease: the key goes when the lease does.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let shared = self.store.clone();
        let (key, id) = (full(key), self.id);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let kv = shared.client.kv_client();
            let result = retry(&shared, "put under a lease", || {
                let mut kv = kv.clone();
                let (key, value) = (key.clone(), value.clone());
                async move {
                    kv.put(key, value, Some(PutOptions::new().with_lease(id)))
                        .await
                }
            })
            .await
            .map(|_| ());
            let _ = tx.send(result);
        });
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Revokes the lease now: its keys are deleted at once.
    pub async fn revoke(self) -> Result<(), StoreError> {
        self.keeper.abort();
        let shared = self.store.clone();
        let id = self.id;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let lease = shared.client.lease_client();
            let result = retry(&shared, "revoke a lease", || {
                let mut lease = lease.clone();
                async move { lease.revoke(id).await }
            })
            .await
            .map(|_| ());
            let _ = tx.send(result);
        });
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Sends a keep-alive every third of the TTL. The lease counts as lost when etcd says it is
/// gone (TTL 0) or when no keep-alive was answered for a whole TTL since the last one sent
/// that was: etcd's expiry is at least that late, so stepping down then is never too late.
async fn keep_alive(
    shared: std::sync::Arc<super::etcd::Shared>,
    id: i64,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    loop {
        let sent = Instant::now();
        let answer = async {
            if stream.is_none() {
                let mut client = shared.client.lease_client();
                stream = Some(client.keep_alive(id).await?);
            }
            let Some((keeper, replies)) = stream.as_mut() else {
                unreachable!("set above");
            };
            keeper.keep_alive().await?;
            replies.message().await
        };
        let outcome = tokio::time::timeout(every.max(Duration::from_millis(200)), answer).await;
        match outcome {
            Ok(Ok(Some(reply))) if reply.ttl() > 0 => {
                last_ok = sent;
                shared.reached();
            }
            Ok(Ok(Some(_))) => {
                let _ = lost.send(Some(format!("etcd expired lease {id:x}")));
                return;
            }
            Ok(Ok(None)) => {
                debug!(lease = id, "keep-alive stream ended; reopening");
                stream = None;
            }
            Ok(Err(e)) => {
                warn!(lease = id, error = %describe(&e), "lease keep-alive failed");
                let _ = shared.unreachable(&e);
                stream = None;
            }
            Err(_) => {
                debug!(lease = id, "lease keep-alive unanswered");
                shared
                    .mark_unreachable(format!("a lease keep-alive got no answer within {every:?}"));
                stream = None;
            }
        }
        if last_ok.elapsed() >= ttl {
            let _ = lost.send(Some(format!(
                "no keep-alive of lease {id:x} answered for {ttl:?}: etcd at {} unreachable",
                shared.endpoints
            )));
            return;
        }
        let next = sent + every;
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Leases renewed by someone else's activity rather than kept alive in the background: an
/// agent's registration lives while its heartbeats keep coming ([`crate::registrations`]).
/// Each call is one etcd request with a timeout, no retries: the next heartbeat retries.
impl EtcdStore {
    /// Grants a lease of `ttl` (whole seconds, at least 1) that nothing keeps alive: it
    /// expires unless [`EtcdStore::renew_lease`] is called within every TTL.
    pub async fn grant_bare_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let shared = self.shared.clone();
        self.on_store(async move {
            let mut lease = shared.client.lease_client();
            let granted = once(&shared, lease.grant(seconds, None)).await?;
            Ok(granted.id())
        })
        .await
    }

    /// Renews lease `id` once; `Ok(false)` when etcd no longer has it (it expired).
    pub async fn renew_lease(&self, id: i64) -> Result<bool, StoreError> {
        let shared = self.shared.clone();
        self.on_store(async move {
            let mut client = shared.client.lease_client();
            // Opening the stream sends one keep-alive and reads its answer: that is the
            // renewal. etcd-client turns etcd's TTL-0 answer (expired) into this error.
            once(&shared, async {
                match client.keep_alive(id).await {
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
        })
        .await
    }

    /// Puts `key` = `value` under lease `id` (granted by [`EtcdStore::grant_bare_lease`],
    /// possibly by another server). Fenced like every other write: a standby's or a deposed
    /// leader's put is refused.
    pub async fn put_leased(&self, key: &str, value: Vec<u8>, id: i64) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let key = full(key);
        self.on_store(async move {
            let fence = shared.fence.borrow().clone();
            if let Some(refused) = super::etcd::refusal(&fence) {
                return Err(refused);
            }
            let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(id)));
            let txn = super::etcd::fenced_txn(&fence, vec![put]);
            let mut kv = shared.client.kv_client();
            if !once(&shared, kv.txn(txn)).await?.succeeded() {
                return Err(super::etcd::leadership_lost(&shared));
            }
            Ok(())
        })
        .await
    }

    /// The value of `key` and the lease it is under (0: none), if it exists.
    pub async fn get_leased(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let shared = self.shared.clone();
        let key = full(key);
        self.on_store(async move {
            let mut kv = shared.client.kv_client();
            let resp = once(&shared, kv.get(key, None)).await?;
            Ok(resp
                .kvs()
                .first()
                .map(|kv| (kv.value().to_vec(), kv.lease())))
        })
        .await
    }
}

/// One etcd call under the request timeout; failures are recorded for `/readyz`.
async fn once<T>(
    shared: &super::etcd::Shared,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(super::etcd::REQUEST_TIMEOUT, call).await {
        Ok(Ok(v)) => {
            shared.reached();
            Ok(v)
        }
        Ok(Err(e)) => Err(shared.unreachable(&e)),
        Err(_) => {
            let message = format!("no answer within {:?}", super::etcd::REQUEST_TIMEOUT);
            shared.mark_unreachable(message.clone());
            Err(StoreError::Unreachable {
                endpoints: shared.endpoints.clone(),
                message,
            })
        }
    }
}
