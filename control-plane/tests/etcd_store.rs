//! The etcd store against a real etcd, through our own generated v3 client: guarded commits
//! (a stale version conflicts and writes nothing), deletes, reloading what another writer
//! stored, and the watch that tells a replica someone else committed.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Etcd;
use remora_control_plane::resource::Kind;
use remora_control_plane::store::etcd_store::EtcdStore;
use remora_control_plane::store::{Change, CommitOutcome, ConfigStore, ResourceKey};
use remora_tests::wait_for_async;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_guarded_by_the_version_and_other_writers_are_seen() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let endpoints = [etcd.endpoint.clone()];
    let writer = EtcdStore::connect(&endpoints).await.expect("connect");
    let reader = EtcdStore::connect(&endpoints).await.expect("connect");
    let mut changes = reader
        .external_changes()
        .expect("etcd reports external changes");

    let route = ResourceKey::new(Kind::Route, "", "a/b");
    let cluster = ResourceKey::new(Kind::Cluster, "team-a", "c");
    let first = vec![
        Change::Put(route.clone(), Bytes::from_static(b"route-1")),
        Change::Put(cluster.clone(), Bytes::from_static(b"cluster-1")),
    ];
    assert_eq!(
        writer.commit(0, first.clone()).await.unwrap(),
        CommitOutcome::Committed(1)
    );
    // Committing on top of version 0 again is stale now, and must change nothing.
    let stale = vec![Change::Put(route.clone(), Bytes::from_static(b"lost"))];
    assert_eq!(
        reader.commit(0, stale).await.unwrap(),
        CommitOutcome::Conflict
    );

    let state = reader.load().await.unwrap();
    assert_eq!(state.version, 1);
    assert_eq!(state.resources.get(&route).unwrap().as_ref(), b"route-1");
    assert_eq!(
        state.resources.get(&cluster).unwrap().as_ref(),
        b"cluster-1"
    );

    let seen = *changes.borrow_and_update();
    assert_eq!(
        writer
            .commit(1, vec![Change::Delete(cluster.clone())])
            .await
            .unwrap(),
        CommitOutcome::Committed(2)
    );
    wait_for_async(
        "the reader's watch to see the other writer's commit",
        Duration::from_secs(10),
        || {
            let ticked = *changes.borrow_and_update() != seen;
            async move { ticked.then_some(()) }
        },
    )
    .await;
    let state = reader.load().await.unwrap();
    assert_eq!(state.version, 2);
    assert!(!state.resources.contains_key(&cluster));
    assert!(state.resources.contains_key(&route));
    drop(etcd);
}

#[tokio::test]
async fn an_unreachable_etcd_is_an_error_naming_the_call() {
    // A loopback port nobody listens on.
    let port = remora_tests::free_port();
    let store = EtcdStore::connect(&[format!("127.0.0.1:{port}")])
        .await
        .expect("connecting is lazy");
    let error = format!("{:#}", store.load().await.unwrap_err());
    assert!(error.contains("reading /remora/ from etcd"), "{error}");
}
