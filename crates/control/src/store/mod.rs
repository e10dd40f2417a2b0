//! The state store: where acknowledged state lives.
//!
//! The control plane writes through [`Store`] and acknowledges a change only once the store
//! says it is durable. The embedded default is [`RedbStore`] (one machine); [`EtcdStore`]
//! keeps the same state in etcd for several nodes, with leases and watches ([`lease`]) for
//! node registrations and the leader election ([`crate::leader`]). `warren server --store`
//! picks one ([`StoreUrl`]).

mod etcd;
pub mod lease;
mod redb;
pub mod testing;
mod url;

pub use self::etcd::{EtcdStore, Fence, ROOT as ETCD_ROOT, WRITE_DEADLINE};
pub use self::lease::{Lease, Watch, WatchEvent};
pub use self::redb::RedbStore;
pub use self::url::StoreUrl;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another warren server already uses {path} (the database is locked)")]
    Locked { path: String },
    #[error("cannot open the store at {path}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store {operation} failed: {message}")]
    Failed {
        operation: &'static str,
        message: String,
    },
    #[error("the store is shut down")]
    Closed,
    #[error("the etcd store at {endpoints} is unreachable: {message}")]
    Unreachable { endpoints: String, message: String },
    #[error("this warren server is a standby{}: writes go to the leader", leader.as_deref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    #[error("this warren server is no longer the leader ({reason}): write refused")]
    Fenced { reason: String },
}

impl StoreError {
    /// The same error for each of several callers (a failed commit answers every write in it).
    pub fn clone_for_ack(&self) -> StoreError {
        match self {
            StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
            StoreError::Open { .. } => StoreError::Failed {
                operation: "open",
                message: self.to_string(),
            },
            StoreError::Failed { operation, message } => StoreError::Failed {
                operation,
                message: message.clone(),
            },
            StoreError::Closed => StoreError::Closed,
            StoreError::Unreachable { endpoints, message } => StoreError::Unreachable {
                endpoints: endpoints.clone(),
                message: message.clone(),
            },
            StoreError::NotLeader { leader } => StoreError::NotLeader {
                leader: leader.clone(),
            },
            StoreError::Fenced { reason } => StoreError::Fenced {
                reason: reason.clone(),
            },
        }
    }
}

/// Moves every write queued now into `batch` (up to `max` in all); returns whether any of
/// them is waited for (`behind(w)` false). Both stores' writers gather batches this way.
fn drain<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    behind: impl Fn(&T) -> bool,
) -> bool {
    let mut waited_for = false;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(next) => {
                waited_for |= !behind(&next);
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    waited_for
}

/// Answers once a submitted write is durable (or failed).
pub type Durable = tokio::sync::oneshot::Receiver<Result<(), StoreError>>;

/// One change to persist.
#[derive(Debug, Clone)]
pub enum Write {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// A durable key-value store with prefix scans.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Queues a write and returns at once; the receiver answers once it is durable. Writes
    /// are applied in the order they were submitted, so a caller can publish a change right
    /// after submitting it and still be sure no later write to the key is overtaken.
    fn submit(&self, write: Write) -> Result<Durable, StoreError>;

    /// [`Store::submit`] for a write nobody waits for right away (written behind): the
    /// store may hold it briefly to commit it with others (fewer commits, fewer wake-ups).
    /// Order with every other write is kept.
    fn submit_behind(&self, write: Write) -> Result<Durable, StoreError> {
        self.submit(write)
    }

    /// Returns once the write is durable (on disk, or on a quorum).
    async fn write(&self, write: Write) -> Result<(), StoreError> {
        self.submit(write)?.await.map_err(|_| StoreError::Closed)?
    }

    /// Every key and value under `prefix`, in key order.
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Whether this server can write now (`/readyz`): the store answers, and (etcd) this
    /// server leads.
    fn ready(&self) -> Result<(), StoreError> {
        self.scan("\u{0}").map(|_| ())
    }

    /// A short description for `warren server` output, e.g. "redb:/var/lib/warren/state.redb".
    fn describe(&self) -> String;
}
