//! The embedded store: redb with group commit.
//!
//! Why redb: a pure-Rust, ACID, copy-on-write B-tree with crash safety by checksummed commit
//! slots, no C toolchain and no background threads of its own, and a single-writer model that
//! fits group commit exactly. SQLite would add a C build and a SQL layer for what is a
//! key-value map; sled is unmaintained.
//!
//! Durability at thousands of creates per second needs group commit, not one fsync per
//! write: callers queue their writes to one writer thread, which takes everything queued,
//! applies it in one write transaction, commits once (one fsync) and then acknowledges every
//! caller. Under load the batches grow by themselves; alone, a write waits for one commit.
//! Writes behind ([`Store::submit_behind`]: fast creates, status changes) linger up to 2 ms
//! for company, so a short sandbox's create and end usually share one commit.

use std::path::{Path, PathBuf};
use std::thread;

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use super::{Durable, Store, StoreError, Write};

const TABLE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("warren");

/// The most writes one commit takes; bounds the latency of the first writer in a batch.
const MAX_BATCH: usize = 4096;

/// How long a batch that starts with a write-behind waits for more before it commits,
/// unless a write somebody waits for arrives. A fast create and its sandbox's end (a short
/// function: ~0.3 ms later) then usually share one commit, and the writer wakes once a
/// linger, not per write.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

type Ack = oneshot::Sender<Result<(), StoreError>>;

/// A queued write; `behind`: nobody waits for it now (see [`Store::submit_behind`]).
struct Queued {
    write: Write,
    ack: Ack,
    behind: bool,
}

#[derive(Debug)]
pub struct RedbStore {
    path: PathBuf,
    db: std::sync::Arc<Database>,
    /// `None` only while dropping.
    queue: Option<mpsc::UnboundedSender<Queued>>,
    writer: Option<thread::JoinHandle<()>>,
}

impl Drop for RedbStore {
    /// Closes the queue and waits for the writer to commit what was queued, so that when
    /// the store is gone its file is free and every accepted write is on disk.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl RedbStore {
    /// Opens (or creates) the database file and starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: shown.clone(),
            },
            other => StoreError::Open {
                path: shown.clone(),
                source: Box::new(other),
            },
        })?;
        let db = std::sync::Arc::new(db);
        let (queue, rx) = mpsc::unbounded_channel();
        let writer_db = db.clone();
        let writer = thread::Builder::new()
            .name("warren-store".into())
            .spawn(move || writer(&writer_db, rx))
            .map_err(|e| StoreError::Open {
                path: shown,
                source: Box::new(e),
            })?;
        Ok(RedbStore {
            path,
            db,
            queue: Some(queue),
            writer: Some(writer),
        })
    }
}

impl RedbStore {
    fn queue(&self, write: Write, behind: bool) -> Result<Durable, StoreError> {
        let (ack, done) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(StoreError::Closed)?;
        queue
            .send(Queued { write, ack, behind })
            .map_err(|_| StoreError::Closed)?;
        Ok(done)
    }
}

fn failed(operation: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed {
        operation,
        message: e.to_string(),
    }
}

/// The writer loop: ends when every sender is dropped.
fn writer(db: &Database, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(64);
    while let Some(first) = rx.blocking_recv() {
        let mut waited_for = !first.behind;
        batch.push(first);
        let deadline = std::time::Instant::now() + LINGER;
        loop {
            waited_for |= super::drain(&mut rx, &mut batch, MAX_BATCH, |q| q.behind);
            let now = std::time::Instant::now();
            if waited_for || batch.len() >= MAX_BATCH || now >= deadline {
                break;
            }
            // `submit` unparks this thread: a write somebody waits for ends the linger.
            thread::park_timeout(deadline - now);
        }
        let started = std::time::Instant::now();
        let result = commit(db, &batch);
        if let Err(e) = &result {
            error!(writes = batch.len(), error = %e, "store commit failed");
        } else {
            debug!(
                writes = batch.len(),
                micros = started.elapsed().as_micros() as u64,
                "store commit"
            );
        }
        for Queued { ack, .. } in batch.drain(..) {
            // A caller that went away (its request was cancelled) no longer needs the answer.
            let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| failed("commit", e)));
        }
    }
}

fn commit(db: &Database, batch: &[Queued]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(|e| failed("begin", e))?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| failed("open table", e))?;
        for Queued { write, .. } in batch {
            match write {
                Write::Put { key, value } => {
                    table
                        .insert(key.as_str(), value.as_slice())
                        .map_err(|e| failed("insert", e))?;
                }
                Write::Delete { key } => {
                    table
                        .remove(key.as_str())
                        .map_err(|e| failed("remove", e))?;
                }
            }
        }
    }
    txn.commit().map_err(|e| failed("commit", e))
}

#[async_trait::async_trait]
impl Store for RedbStore {
    fn submit(&self, write: Write) -> Result<Durable, StoreError> {
        let done = self.queue(write, false)?;
        // Ends a linger on a write-behind batch (a stray unpark just makes one extra check).
        if let Some(writer) = &self.writer {
            writer.thread().unpark();
        }
        Ok(done)
    }

    fn submit_behind(&self, write: Write) -> Result<Durable, StoreError> {
        self.queue(write, true)
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| failed("begin read", e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(failed("open table", e)),
        };
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(|e| failed("scan", e))? {
            let (k, v) = item.map_err(|e| failed("scan", e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_durable_and_scannable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("state.redb");
        {
            let store = std::sync::Arc::new(RedbStore::open(&path).expect("open"));
            let mut tasks = Vec::new();
            for i in 0..200 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let key = format!("s/{i:03}");
                    store
                        .write(Write::Put {
                            key,
                            value: vec![i as u8],
                        })
                        .await
                }));
            }
            for t in tasks {
                t.await.expect("join").expect("write");
            }
            store
                .write(Write::Delete {
                    key: "s/007".into(),
                })
                .await
                .expect("delete");
            store
                .write(Write::Put {
                    key: "t/x".into(),
                    value: b"other".to_vec(),
                })
                .await
                .expect("put");
        }
        // Dropping the store joined its writer, so the file is free at once.
        let store = RedbStore::open(&path).expect("reopen");
        let all = store.scan("s/").expect("scan");
        assert_eq!(all.len(), 199);
        assert_eq!(all[0], ("s/000".to_string(), vec![0]));
        assert!(all.iter().all(|(k, _)| k != "s/007"));
        assert_eq!(store.scan("t/").expect("scan").len(), 1);
        assert!(store.scan("u/").expect("scan").is_empty());
    }

    /// Writes behind share a commit with what follows them; a write somebody waits for ends
    /// the linger at once, and order holds across both kinds.
    #[tokio::test]
    async fn writes_behind_are_batched_in_order_and_never_lost() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("state.redb");
        {
            let store = RedbStore::open(&path).expect("open");
            let put = |v: u8| Write::Put {
                key: "k".into(),
                value: vec![v],
            };
            let first = store.submit_behind(put(1)).expect("queue");
            let second = store.submit_behind(put(2)).expect("queue");
            // Waited for: committed with the two before it, after them.
            store.write(put(3)).await.expect("write");
            assert!(matches!(first.await, Ok(Ok(()))));
            assert!(matches!(second.await, Ok(Ok(()))));
            assert_eq!(store.scan("k").expect("scan"), [("k".to_string(), vec![3])]);
            // A write behind, alone, is committed after the linger.
            let alone = store.submit_behind(put(4)).expect("queue");
            assert!(matches!(alone.await, Ok(Ok(()))));
            // And one still queued when the store closes is committed before it is gone.
            drop(store.submit_behind(put(5)).expect("queue"));
        }
        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.scan("k").expect("scan"), [("k".to_string(), vec![5])]);
    }

    #[test]
    fn a_second_open_is_refused_as_locked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("state.redb");
        let _first = RedbStore::open(&path).expect("open");
        match RedbStore::open(&path) {
            Err(e @ StoreError::Locked { .. }) => assert!(e.to_string().contains("state.redb")),
            other => panic!("expected Locked, got {other:?}"),
        }
    }
}
