//! The etcd store against a real etcd (started per test on free loopback ports).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::store::lease::{self, Lease, WatchEvent};
use crate::store::testing::EtcdServer;

fn put(key: &str, v: &[u8]) -> Write {
    Write::Put {
        key: key.into(),
        value: v.to_vec(),
    }
}

async fn open(etcd: &EtcdServer) -> EtcdStore {
    EtcdStore::open(&[etcd.endpoint()]).await.expect("open")
}

#[test]
fn batches_split_at_etcds_limits_and_keep_one_write_per_key() {
    let mut batch = Vec::new();
    let mut acks = Vec::new();
    for i in 0..300 {
        let (ack, rx) = oneshot::channel();
        acks.push(rx);
        batch.push(Queued {
            write: put(&format!("k{}", i % 200), &[1]),
            ack,
            behind: false,
        });
    }
    let (chunks, carried_by) = chunks(&batch);
    // 128 distinct keys, then 72 more, and the repeats of k0..k99 land where their key
    // already is, or in the chunk open then.
    assert!(chunks.iter().all(|c| c.ops.len() <= MAX_TXN_OPS));
    assert_eq!(chunks[0].ops.len(), MAX_TXN_OPS);
    let total: usize = chunks.iter().map(|c| c.ops.len()).sum();
    assert!((200..=300).contains(&total), "{total}");
    assert_eq!(carried_by.len(), 300);
    assert!(carried_by.windows(2).all(|w| w[0] <= w[1]), "in order");
    for c in &chunks {
        let mut keys: Vec<_> = c.ops.iter().map(key_of).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), c.ops.len(), "a key twice in one transaction");
    }
}

#[test]
fn prefix_ends() {
    assert_eq!(prefix_end(b"warren/a"), b"warren/b");
    assert_eq!(prefix_end(b"a\xff"), b"b");
    assert_eq!(prefix_end(b"\xff"), [0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_durable_in_order_and_scannable() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    {
        let store = Arc::new(open(&etcd).await);
        assert_eq!(store.describe(), format!("etcd://{}", etcd.endpoint()));
        let mut tasks = Vec::new();
        for i in 0..300 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("s/{i:03}");
                if i % 2 == 0 {
                    store.write(put(&key, &[i as u8])).await
                } else {
                    store
                        .submit_behind(put(&key, &[i as u8]))?
                        .await
                        .map_err(|_| StoreError::Closed)?
                }
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("write");
        }
        // Order holds for one key across both kinds of write, in one batch.
        let a = store.submit_behind(put("k", b"1")).expect("queue");
        let b = store
            .submit_behind(Write::Delete { key: "k".into() })
            .expect("queue");
        store.write(put("k", b"3")).await.expect("write");
        assert!(matches!(a.await, Ok(Ok(()))) && matches!(b.await, Ok(Ok(()))));
        store
            .write(Write::Delete {
                key: "s/007".into(),
            })
            .await
            .expect("delete");
        // Queued at drop: committed before the store is gone.
        drop(store.submit_behind(put("t/last", b"x")).expect("queue"));
    }
    let store = open(&etcd).await;
    let all = store.scan("s/").expect("scan");
    assert_eq!(all.len(), 299);
    assert_eq!(all[0], ("s/000".to_string(), vec![0]));
    assert!(all.iter().all(|(k, _)| k != "s/007"));
    assert_eq!(
        store.scan("k").expect("scan"),
        [("k".to_string(), b"3".to_vec())]
    );
    assert_eq!(store.scan("t/").expect("scan").len(), 1);
    assert!(store.scan("u/").expect("scan").is_empty());
    store.ready().expect("ready");
}

/// More keys than one scan page, and values past the per-transaction byte limit in one batch.
#[tokio::test]
async fn large_batches_and_scans_page() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let store = open(&etcd).await;
    let value = vec![7u8; 8 << 10];
    let acks: Vec<_> = (0..1500)
        .map(|i| {
            store
                .submit_behind(put(&format!("p/{i:05}"), &value))
                .expect("queue")
        })
        .collect();
    for ack in acks {
        ack.await.expect("answer").expect("durable");
    }
    let all = store.scan("p/").expect("scan");
    assert_eq!(all.len(), 1500);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
}

#[tokio::test]
async fn an_unreachable_store_fails_writes_in_bounded_time_naming_the_endpoints() {
    let Some(mut etcd) = EtcdServer::start() else {
        return;
    };
    let store = open(&etcd).await;
    store.write(put("a", b"1")).await.expect("write");
    etcd.pause();
    let started = Instant::now();
    let e = store
        .write(put("a", b"2"))
        .await
        .expect_err("etcd is stopped");
    let took = started.elapsed();
    assert!(took < WRITE_DEADLINE + Duration::from_secs(3), "{took:?}");
    assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&etcd.endpoint()), "{e}");
    assert!(store.ready().is_err());
    etcd.resume();
    // The same store works again once etcd answers.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.write(put("a", b"3")).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
            }
            Err(e) => panic!("etcd came back but writes fail: {e}"),
        }
    }
    store.ready().expect("ready again");
    etcd.kill();
    let e = store.write(put("a", b"4")).await.expect_err("etcd is gone");
    assert!(e.to_string().contains(&etcd.endpoint()), "{e}");
    // Opening against a dead etcd fails fast with the endpoint named.
    let started = Instant::now();
    let e = EtcdStore::open(&[etcd.endpoint()]).await.expect_err("dead");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(e.to_string().contains(&etcd.endpoint()), "{e}");
}

#[tokio::test]
async fn fenced_writes_fail_once_the_leader_key_changes() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let a = open(&etcd).await;
    let b = open(&etcd).await;
    let lease_a = a.grant_lease(Duration::from_secs(5)).await.expect("lease");
    let created = a
        .create_if_absent("leader", b"a".to_vec(), &lease_a)
        .await
        .expect("create");
    let lease::Created::Created { revision } = created else {
        panic!("first create: {created:?}");
    };
    let key = format!("{ROOT}leader");
    a.set_fence(Fence::Held {
        key: key.clone(),
        revision,
    });
    a.write(put("x", b"from a")).await.expect("leader writes");
    // A standby is refused before anything is sent.
    b.set_fence(Fence::Standby {
        leader: Some("tcp://a".into()),
    });
    let e = b.write(put("x", b"from b")).await.expect_err("standby");
    assert!(e.to_string().contains("tcp://a"), "{e}");
    // a's lease goes; b takes the key; a's next write is refused by etcd itself.
    lease_a.revoke().await.expect("revoke");
    let lease_b = b.grant_lease(Duration::from_secs(5)).await.expect("lease");
    let lease::Created::Created { revision: rb } = b
        .create_if_absent("leader", b"b".to_vec(), &lease_b)
        .await
        .expect("create")
    else {
        panic!("b should win once a's lease is revoked");
    };
    b.set_fence(Fence::Held { key, revision: rb });
    // A registration's put is fenced too: a deposed leader's is refused by etcd.
    let bare = a
        .grant_bare_lease(Duration::from_secs(5))
        .await
        .expect("bare lease");
    let e = a
        .put_leased("nodes/n1", b"stale".to_vec(), bare)
        .await
        .expect_err("fenced put_leased");
    assert!(matches!(e, StoreError::Fenced { .. }), "{e:?}");
    assert_eq!(b.get_leased("nodes/n1").await.expect("get"), None);
    b.put_leased("nodes/n1", b"fresh".to_vec(), bare)
        .await
        .expect("the leader's put_leased");
    let e = a.write(put("x", b"stale")).await.expect_err("fenced");
    assert!(matches!(e, StoreError::Fenced { .. }), "{e:?}");
    assert!(matches!(a.fence(), Fence::Lost { .. }));
    // And stays refused without asking etcd again.
    assert!(a.submit(put("x", b"again")).is_err());
    b.write(put("x", b"from b"))
        .await
        .expect("new leader writes");
    assert_eq!(
        b.scan("x").expect("scan"),
        [("x".to_string(), b"from b".to_vec())]
    );
}

#[tokio::test]
async fn leases_keep_keys_alive_and_watches_see_them_come_and_go() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let store = open(&etcd).await;
    let lease: Lease = store
        .grant_lease(Duration::from_secs(2))
        .await
        .expect("lease");
    lease
        .put("nodes/a", b"10.0.0.1".to_vec())
        .await
        .expect("put");
    let mut watch = store.watch_prefix("nodes/").await.expect("watch");
    assert_eq!(
        watch.initial,
        [("nodes/a".to_string(), b"10.0.0.1".to_vec())]
    );
    // Kept alive well past its TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(store.scan("nodes/").expect("scan").len(), 1);
    assert!(lease.lost().borrow().is_none());

    let other = store
        .grant_lease(Duration::from_secs(2))
        .await
        .expect("lease");
    other
        .put("nodes/b", b"10.0.0.2".to_vec())
        .await
        .expect("put");
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an event")
        .expect("put event");
    assert!(
        matches!(&event, WatchEvent::Put { key, value, .. } if key == "nodes/b" && value == b"10.0.0.2"),
        "{event:?}"
    );
    // Revoked: the key goes at once.
    other.revoke().await.expect("revoke");
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an event")
        .expect("delete event");
    assert_eq!(
        event,
        WatchEvent::Delete {
            key: "nodes/b".into()
        }
    );
    // Dropped (its owner died): the key goes one TTL later.
    let dropped_at = Instant::now();
    drop(lease);
    let event = tokio::time::timeout(Duration::from_secs(8), watch.next())
        .await
        .expect("the lease expires")
        .expect("delete event");
    assert_eq!(
        event,
        WatchEvent::Delete {
            key: "nodes/a".into()
        }
    );
    assert!(
        dropped_at.elapsed() >= Duration::from_secs(1),
        "expired too soon"
    );
    assert!(store.scan("nodes/").expect("scan").is_empty());
}

#[tokio::test]
async fn a_lease_whose_store_is_gone_is_reported_lost_within_its_ttl() {
    let Some(mut etcd) = EtcdServer::start() else {
        return;
    };
    let store = open(&etcd).await;
    let lease = store
        .grant_lease(Duration::from_secs(2))
        .await
        .expect("lease");
    let mut lost = lease.lost();
    etcd.pause();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(6), lost.wait_for(|l| l.is_some()))
        .await
        .expect("lost within the TTL and a keep-alive period")
        .expect("keeper alive");
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let why = lost.borrow().clone().unwrap_or_default();
    assert!(why.contains(&etcd.endpoint()), "{why}");
}
