//! The store for several nodes: etcd, written in transactions that grow under load.
//!
//! Same contract as the embedded store ([`super::RedbStore`]): writes are applied in the order
//! they were submitted and acknowledged once etcd has committed them (on a quorum of its
//! members, etcd's own durability). One writer takes everything queued and commits it as one
//! etcd transaction (several when a batch holds more than etcd's 128 operations per
//! transaction, in order); two writes to one key in a batch become the later one, which is
//! what a reader could ever see of them anyway.
//!
//! Every etcd call has a timeout and transient failures are retried a bounded number of
//! times, so a dead or hung etcd fails a write within [`WRITE_DEADLINE`] with an error that
//! names the endpoints, never hangs it.
//!
//! **Fencing.** When servers elect a leader ([`crate::leader`]), the leader's writes carry a
//! compare on its leader key's create revision, so a server that lost its leadership (its
//! lease expired and another took the key) has every write refused by etcd itself, whatever
//! its own clock or state says. A standby's writes are refused before they leave it.
//!
//! etcd calls run on the store's own thread and single-threaded runtime: the trait's `scan` is
//! synchronous, and a blocking wait for a reply must not sit on the runtime doing the work.
//! Lease keep-alives and watches ([`super::lease`]) run there too.
//!
//! Keys: every store key lives under [`ROOT`] (`warren/sandboxes/NAME`, `warren/policies/NAME`;
//! the leader key is `warren/leader`, agents' keys `warren/nodes/NAME`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, warn};

use super::{Durable, Store, StoreError, Write};

/// Prefix of every key warren writes to etcd.
pub const ROOT: &str = "warren/";

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Bytes of keys and values in one transaction; etcd refuses requests over 1.5 MiB by default.
const MAX_TXN_BYTES: usize = 1 << 20;
/// The most writes one batch takes.
const MAX_BATCH: usize = 4096;
/// How long a batch that starts with a write-behind waits for company (as redb's).
const LINGER: Duration = Duration::from_millis(2);
/// One etcd request's timeout.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A write (all its retries) fails after this long.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(6);
/// Keys read per request by `scan` (fewer when their values are large).
const SCAN_PAGE: i64 = 500;

/// What the store's writes are guarded by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// No election: writes go through unguarded (one server, or a tool).
    Open,
    /// A standby: every write is refused; `leader` is the current leader's address, if known.
    Standby { leader: Option<String> },
    /// This server leads: writes carry `create_revision(key) == revision`.
    Held { key: String, revision: i64 },
    /// Leadership was lost: every write is refused from now on.
    Lost { reason: String },
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

struct Queued {
    write: Write,
    ack: Ack,
    behind: bool,
}

type ScanReply = std::sync::mpsc::Sender<Result<Vec<(String, Vec<u8>)>, StoreError>>;

/// The part of the store the runtime's tasks share.
pub(super) struct Shared {
    pub(super) client: Client,
    pub(super) endpoints: String,
    pub(super) fence: watch::Sender<Fence>,
    /// The last failure to reach etcd, cleared by the next success (for `/readyz`).
    pub(super) unreachable: Mutex<Option<String>>,
}

impl std::fmt::Debug for Shared {
    // etcd-client's `Client` is not `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("endpoints", &self.endpoints)
            .field("fence", &*self.fence.borrow())
            .finish()
    }
}

impl Shared {
    pub(super) fn unreachable(&self, e: &etcd_client::Error) -> StoreError {
        let message = describe(e);
        *self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
        StoreError::Unreachable {
            endpoints: self.endpoints.clone(),
            message,
        }
    }

    pub(super) fn mark_unreachable(&self, message: String) {
        *self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    pub(super) fn reached(&self) {
        let mut u = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_some() {
            *u = None;
        }
    }
}

/// etcd as warren's store. Open with [`EtcdStore::open`].
#[derive(Debug)]
pub struct EtcdStore {
    pub(super) shared: Arc<Shared>,
    pub(super) runtime: tokio::runtime::Handle,
    queue: Option<mpsc::UnboundedSender<Queued>>,
    scans: Option<mpsc::UnboundedSender<(String, ScanReply)>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for EtcdStore {
    /// Closes the queue and waits for the writer to commit (or fail) what was queued.
    fn drop(&mut self) {
        self.queue.take();
        self.scans.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `host:port` endpoints as given, joined for messages: "127.0.0.1:2379,10.0.0.2:2379".
fn joined(endpoints: &[String]) -> String {
    endpoints.join(",")
}

/// An etcd error in one line: the gRPC message, or the transport's cause chain.
pub(super) fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => {
            format!("{:?}: {}", s.code(), s.message())
        }
        other => warren_runtime::error_chain(other),
    }
}

/// Worth retrying: the store may answer next time.
pub(super) fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`host:port` each) and checks that it answers.
    pub async fn open(endpoints: &[String]) -> Result<Self, StoreError> {
        let shown = joined(endpoints);
        if endpoints.is_empty() {
            return Err(StoreError::Unreachable {
                endpoints: shown,
                message: "no endpoints given".into(),
            });
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let (queue, rx) = mpsc::unbounded_channel();
        let (scans, scan_rx) = mpsc::unbounded_channel();
        let endpoints = endpoints.to_vec();
        let thread = thread::Builder::new()
            .name("warren-etcd".into())
            .spawn(move || store_thread(endpoints, ready_tx, rx, scan_rx))
            .map_err(|e| StoreError::Open {
                path: format!("etcd://{shown}"),
                source: Box::new(e),
            })?;
        match ready_rx.await {
            Ok(Ok((shared, runtime))) => Ok(EtcdStore {
                shared,
                runtime,
                queue: Some(queue),
                scans: Some(scans),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(StoreError::Closed)
            }
        }
    }

    /// `host:port,...` of the etcd endpoints.
    pub fn endpoints(&self) -> &str {
        &self.shared.endpoints
    }

    /// What the store's writes are guarded by now.
    pub fn fence(&self) -> Fence {
        self.shared.fence.borrow().clone()
    }

    /// Changes of the fence (the election's loss of leadership shows here first).
    pub fn fence_changes(&self) -> watch::Receiver<Fence> {
        self.shared.fence.subscribe()
    }

    /// Sets what writes are guarded by (see [`crate::leader`]). A lost fence stays lost.
    pub fn set_fence(&self, fence: Fence) {
        self.shared.fence.send_if_modified(|now| {
            if matches!(now, Fence::Lost { .. }) || *now == fence {
                return false;
            }
            *now = fence;
            true
        });
    }

    /// Runs `work` on the store's runtime and waits for its result from any runtime.
    pub(super) async fn on_store<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn queue(&self, write: Write, behind: bool) -> Result<Durable, StoreError> {
        if let Some(refused) = refusal(&self.shared.fence.borrow()) {
            return Err(refused);
        }
        let (ack, done) = oneshot::channel();
        self.queue
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Queued { write, ack, behind })
            .map_err(|_| StoreError::Closed)?;
        Ok(done)
    }
}

/// Why a write is refused before it is sent, if it is.
pub(super) fn refusal(fence: &Fence) -> Option<StoreError> {
    match fence {
        Fence::Open | Fence::Held { .. } => None,
        Fence::Standby { leader } => Some(StoreError::NotLeader {
            leader: leader.clone(),
        }),
        Fence::Lost { reason } => Some(StoreError::Fenced {
            reason: reason.clone(),
        }),
    }
}

type Opened = Result<(Arc<Shared>, tokio::runtime::Handle), StoreError>;

fn store_thread(
    endpoints: Vec<String>,
    ready: oneshot::Sender<Opened>,
    queue: mpsc::UnboundedReceiver<Queued>,
    scans: mpsc::UnboundedReceiver<(String, ScanReply)>,
) {
    let shown = joined(&endpoints);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(StoreError::Open {
                path: format!("etcd://{shown}"),
                source: Box::new(e),
            }));
            return;
        }
    };
    runtime.block_on(async move {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let unreachable = |e: &etcd_client::Error| StoreError::Unreachable {
            endpoints: shown.clone(),
            message: describe(e),
        };
        let mut client = match Client::connect(&endpoints, Some(options)).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(unreachable(&e)));
                return;
            }
        };
        // Connecting is lazy (a balanced channel): one read proves etcd answers. Without a
        // ready endpoint a request waits in the balancer, hence the outer timeout.
        let probe = client.get(
            format!("{ROOT}leader"),
            Some(GetOptions::new().with_count_only()),
        );
        match tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let _ = ready.send(Err(unreachable(&e)));
                return;
            }
            Err(_) => {
                let _ = ready.send(Err(StoreError::Unreachable {
                    endpoints: shown.clone(),
                    message: format!("no answer within {:?}", CONNECT_TIMEOUT + REQUEST_TIMEOUT),
                }));
                return;
            }
        }
        let (fence, _) = watch::channel(Fence::Open);
        let shared = Arc::new(Shared {
            client,
            endpoints: shown.clone(),
            fence,
            unreachable: Mutex::new(None),
        });
        if ready
            .send(Ok((shared.clone(), tokio::runtime::Handle::current())))
            .is_err()
        {
            return;
        }
        tokio::spawn(scanner(shared.clone(), scans));
        writer(&shared, queue).await;
    });
}

/// Answers `scan` calls (which block their caller's thread on a std channel).
async fn scanner(shared: Arc<Shared>, mut scans: mpsc::UnboundedReceiver<(String, ScanReply)>) {
    while let Some((prefix, reply)) = scans.recv().await {
        let _ = reply.send(scan(&shared, &prefix).await);
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the key space.
    vec![0]
}

async fn scan(shared: &Shared, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let full = format!("{ROOT}{prefix}");
    let end = prefix_end(full.as_bytes());
    let mut kv = shared.client.kv_client();
    let mut from = full.clone().into_bytes();
    let mut out = Vec::new();
    let mut page = SCAN_PAGE;
    loop {
        let options = GetOptions::new().with_range(end.clone()).with_limit(page);
        let answer = retry(shared, "scan", || {
            let mut kv = kv.clone();
            let from = from.clone();
            let options = options.clone();
            async move { kv.get(from, Some(options)).await }
        })
        .await;
        let resp = match answer {
            Ok(resp) => resp,
            // A page of large values exceeds the client's 4 MiB message limit: smaller pages.
            Err(StoreError::Failed { message, .. })
                if message.contains("message length too large") && page > 1 =>
            {
                page = (page / 4).max(1);
                continue;
            }
            Err(e) => return Err(e),
        };
        let kvs = resp.kvs();
        for item in kvs {
            let key = String::from_utf8_lossy(item.key());
            let key = key.strip_prefix(ROOT).unwrap_or(&key).to_string();
            out.push((key, item.value().to_vec()));
        }
        match kvs.last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
        kv = shared.client.kv_client();
    }
    Ok(out)
}

/// Runs an etcd call until it succeeds, fails for good, or [`WRITE_DEADLINE`] passes.
pub(super) async fn retry<T, F, Fut>(
    shared: &Shared,
    operation: &'static str,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + WRITE_DEADLINE;
    let mut pause = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(left.min(REQUEST_TIMEOUT), call()).await;
        match attempt {
            Ok(Ok(v)) => {
                shared.reached();
                return Ok(v);
            }
            Ok(Err(e)) if !transient(&e) => {
                return Err(StoreError::Failed {
                    operation,
                    message: format!("etcd at {}: {}", shared.endpoints, describe(&e)),
                });
            }
            Ok(Err(e)) => {
                let err = shared.unreachable(&e);
                if Instant::now() + pause >= deadline {
                    return Err(err);
                }
                debug!(operation, error = %err, "etcd call failed; retrying");
            }
            Err(_) => {
                let message = format!("no answer within {REQUEST_TIMEOUT:?}");
                shared.mark_unreachable(message.clone());
                if Instant::now() + pause >= deadline {
                    return Err(StoreError::Unreachable {
                        endpoints: shared.endpoints.clone(),
                        message,
                    });
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(800));
    }
}

/// One etcd transaction's worth of a batch: each key once (its latest write).
#[derive(Default)]
struct Chunk {
    ops: Vec<Write>,
    /// Key -> index in `ops`.
    index: std::collections::HashMap<String, usize>,
    bytes: usize,
}

fn key_of(w: &Write) -> &str {
    match w {
        Write::Put { key, .. } | Write::Delete { key } => key,
    }
}

fn size_of(w: &Write) -> usize {
    match w {
        Write::Put { key, value } => key.len() + value.len(),
        Write::Delete { key } => key.len(),
    }
}

/// Splits a batch into transactions in order; returns them and, per queued write, the
/// index of the transaction that carries it.
fn chunks(batch: &[Queued]) -> (Vec<Chunk>, Vec<usize>) {
    let mut out: Vec<Chunk> = vec![Chunk::default()];
    let mut carried_by = Vec::with_capacity(batch.len());
    for q in batch {
        let key = key_of(&q.write);
        let size = size_of(&q.write) + ROOT.len();
        let last = out.len() - 1;
        let chunk = &mut out[last];
        if let Some(&i) = chunk.index.get(key) {
            // The later write to a key in one transaction is all anyone could ever read.
            chunk.bytes = chunk.bytes + size - size_of(&chunk.ops[i]) - ROOT.len();
            chunk.ops[i] = q.write.clone();
        } else {
            let full = chunk.ops.len() >= MAX_TXN_OPS || chunk.bytes + size > MAX_TXN_BYTES;
            if full && !chunk.ops.is_empty() {
                out.push(Chunk::default());
            }
            let last = out.len() - 1;
            let chunk = &mut out[last];
            chunk.index.insert(key.to_string(), chunk.ops.len());
            chunk.ops.push(q.write.clone());
            chunk.bytes += size;
        }
        carried_by.push(out.len() - 1);
    }
    (out, carried_by)
}

async fn commit_chunk(shared: &Shared, chunk: &Chunk) -> Result<(), StoreError> {
    let fence = shared.fence.borrow().clone();
    if let Some(refused) = refusal(&fence) {
        return Err(refused);
    }
    let ops: Vec<TxnOp> = chunk
        .ops
        .iter()
        .map(|w| match w {
            Write::Put { key, value } => TxnOp::put(format!("{ROOT}{key}"), value.clone(), None),
            Write::Delete { key } => TxnOp::delete(format!("{ROOT}{key}"), None),
        })
        .collect();
    let txn = fenced_txn(&fence, ops);
    let kv = shared.client.kv_client();
    let resp = retry(shared, "commit", || {
        let mut kv = kv.clone();
        let txn = txn.clone();
        async move { kv.txn(txn).await }
    })
    .await?;
    if !resp.succeeded() {
        return Err(leadership_lost(shared));
    }
    Ok(())
}

/// A transaction of `ops` that etcd carries out only while `fence` holds (the leader key
/// still has the revision this server created it with).
pub(super) fn fenced_txn(fence: &Fence, ops: Vec<TxnOp>) -> Txn {
    match fence {
        Fence::Held { key, revision } => Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                *revision,
            )])
            .and_then(ops),
        _ => Txn::new().and_then(ops),
    }
}

/// Etcd refused a fenced transaction: another server leads. The fence is lost for good.
pub(super) fn leadership_lost(shared: &Shared) -> StoreError {
    let reason = "the leader key is no longer this server's (another server leads)".to_string();
    error!(reason, "etcd refused a fenced write: leadership lost");
    shared.fence.send_replace(Fence::Lost {
        reason: reason.clone(),
    });
    StoreError::Fenced { reason }
}

/// The writer loop: ends when the queue closes (the store is dropped), after committing
/// everything queued.
async fn writer(shared: &Shared, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        let mut waited_for = !first.behind;
        batch.push(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        loop {
            waited_for |= super::drain(&mut rx, &mut batch, MAX_BATCH, |q| q.behind);
            if waited_for || batch.len() >= MAX_BATCH {
                break;
            }
            tokio::select! {
                next = rx.recv() => match next {
                    Some(next) => {
                        waited_for |= !next.behind;
                        batch.push(next);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let started = Instant::now();
        let (chunks, carried_by) = chunks(&batch);
        let mut results: Vec<Result<(), String>> = Vec::with_capacity(chunks.len());
        let mut first_error: Option<StoreError> = None;
        for chunk in &chunks {
            // After a failed transaction later ones are not tried: order is kept.
            if first_error.is_some() {
                results.push(Err("an earlier write of the batch failed".into()));
                continue;
            }
            match commit_chunk(shared, chunk).await {
                Ok(()) => results.push(Ok(())),
                Err(e) => {
                    results.push(Err(e.to_string()));
                    first_error = Some(e);
                }
            }
        }
        match &first_error {
            Some(e) => warn!(writes = batch.len(), error = %e, "etcd commit failed"),
            None => debug!(
                writes = batch.len(),
                transactions = chunks.len(),
                micros = started.elapsed().as_micros() as u64,
                "etcd commit"
            ),
        }
        for (q, chunk) in batch.drain(..).zip(carried_by) {
            let result = match (&results[chunk], &first_error) {
                (Ok(()), _) => Ok(()),
                (Err(_), Some(e)) => Err(e.clone_for_ack()),
                (Err(m), None) => Err(StoreError::Failed {
                    operation: "commit",
                    message: m.clone(),
                }),
            };
            let _ = q.ack.send(result);
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn submit(&self, write: Write) -> Result<Durable, StoreError> {
        self.queue(write, false)
    }

    fn submit_behind(&self, write: Write) -> Result<Durable, StoreError> {
        self.queue(write, true)
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.scans
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send((prefix.to_string(), tx))
            .map_err(|_| StoreError::Closed)?;
        rx.recv_timeout(WRITE_DEADLINE + REQUEST_TIMEOUT)
            .map_err(|_| StoreError::Unreachable {
                endpoints: self.shared.endpoints.clone(),
                message: "no answer to a scan".into(),
            })?
    }

    fn ready(&self) -> Result<(), StoreError> {
        if let Some(refused) = refusal(&self.shared.fence.borrow()) {
            return Err(refused);
        }
        let last = self
            .shared
            .unreachable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match last {
            Some(message) => Err(StoreError::Unreachable {
                endpoints: self.shared.endpoints.clone(),
                message,
            }),
            None => Ok(()),
        }
    }

    fn describe(&self) -> String {
        format!("etcd://{}", self.shared.endpoints)
    }
}

#[cfg(test)]
#[path = "etcd_tests.rs"]
mod tests;
