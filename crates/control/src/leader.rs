//! Leader election between `warren server` replicas on one etcd.
//!
//! Only the leader serves: the others are standbys that answer every call with UNAVAILABLE
//! naming the leader (`warren-leader` metadata, followed by the client, [`crate::client`]).
//!
//! How: a lease-guarded key. Each candidate grants a lease of `ttl` and creates
//! `warren/leader` = its address under that lease, if the key is absent, in one etcd
//! transaction. The one whose create succeeds leads; its key's create revision becomes the
//! store's fence ([`Fence::Held`]): every write it makes carries
//! `create_revision(warren/leader) == revision`, so once its lease has expired and another
//! server has created the key, etcd refuses its writes even if it has not noticed yet.
//! Standbys watch the key and try again when it goes (deleted, or its lease expired: a
//! leader killed with -9 is replaced within about one TTL).
//!
//! A leader that loses its lease (no keep-alive answered for a TTL, or etcd says it expired)
//! or sees its key change stops writing at once (the fence is set to [`Fence::Lost`]) and
//! the server exits: its in-memory state may be stale, and a supervisor restarting it makes
//! it a standby that recovers from etcd when it next wins.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::lease::Created;
use crate::store::{EtcdStore, Fence, Lease, StoreError, WatchEvent};

/// The leader key, under the store's root (`warren/leader`).
pub const LEADER_KEY: &str = "leader";

/// Default lease TTL of the leader key: a dead leader is replaced about this long after it
/// died.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

/// Where this server stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not decided yet (before the first campaign answers).
    Candidate,
    /// Another server leads, at this address.
    Standby { leader: String },
    /// This server won and is loading every record before it serves.
    Recovering,
    /// This server leads and serves.
    Leader,
    /// This server led and lost it; it serves nothing more.
    Deposed { reason: String },
}

/// One server's part in the election.
#[derive(Debug)]
pub struct Election {
    store: Arc<EtcdStore>,
    advertise: String,
    ttl: Duration,
    role: watch::Sender<Role>,
}

/// Leadership won: holds the lease that keeps it.
#[derive(Debug)]
pub struct Leadership {
    lease: Lease,
    revision: i64,
    watch: crate::store::Watch,
}

impl Election {
    /// A candidate advertising `advertise` (where clients reach this server). Until it wins,
    /// the store refuses this server's writes.
    pub fn new(store: Arc<EtcdStore>, advertise: String, ttl: Duration) -> Self {
        store.set_fence(Fence::Standby { leader: None });
        let (role, _) = watch::channel(Role::Candidate);
        Election {
            store,
            advertise,
            ttl,
            role,
        }
    }

    pub fn roles(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// Marks the end of recovery: the server serves from now on.
    pub fn serving(&self) {
        self.role.send_if_modified(|r| {
            if *r == Role::Recovering {
                *r = Role::Leader;
                true
            } else {
                false
            }
        });
    }

    fn standby(&self, leader: String) {
        self.store.set_fence(Fence::Standby {
            leader: Some(leader.clone()),
        });
        self.role.send_replace(Role::Standby { leader });
    }

    /// Campaigns until this server leads. While etcd is unreachable it keeps trying (a
    /// standby stays a standby); it returns only once leadership is won.
    pub async fn campaign(&self) -> Leadership {
        let mut pause = Duration::from_millis(200);
        loop {
            match self.try_once().await {
                Ok(Some(won)) => return won,
                Ok(None) => pause = Duration::from_millis(200),
                Err(e) => {
                    warn!(error = %e, "leader election: etcd call failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One round: win, or wait as a standby until the leader key goes (`Ok(None)`).
    async fn try_once(&self) -> Result<Option<Leadership>, StoreError> {
        // Watch first, so a key deleted right after the create attempt is not missed.
        let mut watch = self.store.watch_prefix(LEADER_KEY).await?;
        let lease = self.store.grant_lease(self.ttl).await?;
        let created = self
            .store
            .create_if_absent(LEADER_KEY, self.advertise.as_bytes().to_vec(), &lease)
            .await?;
        match created {
            Created::Created { revision } => {
                self.store.set_fence(Fence::Held {
                    key: format!("{}{LEADER_KEY}", crate::store::ETCD_ROOT),
                    revision,
                });
                self.role.send_replace(Role::Recovering);
                info!(address = %self.advertise, revision, "elected leader");
                Ok(Some(Leadership {
                    lease,
                    revision,
                    watch,
                }))
            }
            Created::Exists { value, .. } => {
                // Not ours: give the lease back rather than let it linger for a TTL.
                if let Err(e) = lease.revoke().await {
                    warn!(error = %e, "could not revoke an unused lease");
                }
                if value.is_empty() {
                    return Ok(None);
                }
                let leader = String::from_utf8_lossy(&value).into_owned();
                if self.role()
                    != (Role::Standby {
                        leader: leader.clone(),
                    })
                {
                    info!(leader = %leader, "standby: another server leads");
                }
                self.standby(leader);
                // Wait for the key to go (its leader's lease expired, or it resigned).
                loop {
                    match watch.next().await? {
                        WatchEvent::Delete { key } if key == LEADER_KEY => return Ok(None),
                        WatchEvent::Put { key, value, .. } if key == LEADER_KEY => {
                            self.standby(String::from_utf8_lossy(&value).into_owned());
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Resolves when leadership is lost, with the reason; the fence is already lost then.
    /// Cancel-safe: a shutdown can drop it and [`Election::resign`].
    pub async fn hold(&self, leadership: &mut Leadership) -> String {
        let Leadership {
            lease,
            revision,
            watch,
        } = leadership;
        let revision = *revision;
        let mut lost = lease.lost();
        let mut fence = self.store.fence_changes();
        let mut watching = true;
        let reason = loop {
            tokio::select! {
                changed = lost.changed() => {
                    let why = lost.borrow().clone();
                    match (changed, why) {
                        (_, Some(why)) => break why,
                        (Err(_), None) => break "the lease keeper stopped".to_string(),
                        (Ok(()), None) => {}
                    }
                }
                event = watch.next(), if watching => match event {
                    Ok(WatchEvent::Delete { key }) if key == LEADER_KEY => {
                        break "the leader key was deleted".to_string();
                    }
                    Ok(WatchEvent::Put { key, create_revision, .. })
                        if key == LEADER_KEY && create_revision != revision =>
                    {
                        break "another server created the leader key".to_string();
                    }
                    Ok(_) => {}
                    // The watch broke (etcd unreachable): the lease keeper decides.
                    Err(e) => {
                        warn!(error = %e, "leader key watch broke; relying on the lease");
                        watching = false;
                    }
                },
                _ = fence.changed() => {
                    if let Fence::Lost { reason } = &*fence.borrow() {
                        break reason.clone();
                    }
                }
            }
        };
        self.store.set_fence(Fence::Lost {
            reason: reason.clone(),
        });
        self.role.send_replace(Role::Deposed {
            reason: reason.clone(),
        });
        warn!(reason = %reason, "lost leadership");
        reason
    }

    /// Gives leadership up at a clean shutdown: the lease is revoked, so a standby takes
    /// over at once instead of one TTL later.
    pub async fn resign(&self, leadership: Leadership) {
        self.store.set_fence(Fence::Lost {
            reason: "this server shut down".into(),
        });
        if let Err(e) = leadership.lease.revoke().await {
            warn!(error = %e, "could not revoke the leader lease; a standby takes over after its TTL");
        }
    }
}
