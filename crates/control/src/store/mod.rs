//! The state store: where acknowledged state lives.
//!
//! The control plane writes through [`Store`] and acknowledges a change only once the store
//! says it is durable. The embedded default is [`RedbStore`]; a distributed store for several
//! nodes plugs in behind the same trait.

mod redb;

pub use self::redb::RedbStore;

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

    /// A short description for `warren server` output, e.g. "redb:/var/lib/warren/state.redb".
    fn describe(&self) -> String;
}
