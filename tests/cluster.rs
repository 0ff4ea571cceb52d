//! Two guards, one truth (issue 14): the shared store against a real `redis-server`. Two
//! `Store`s named as two guards stand for the pair; what one records the other must count,
//! whatever order and concurrency the calls come in, and a store that dies must answer
//! within the deadline with an error, never hang a request.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::Redis;
use qsguard::cluster::store::{NewSession, Store, Touch};
use qsguard::config::ClusterConfig;

const MINUTE: Duration = Duration::from_secs(60);

fn store(redis: &Redis, name: &str) -> Store {
    Store::new(&ClusterConfig {
        redis_url: redis.url(),
        name: Some(name.into()),
        key_prefix: "qsguard:test:".into(),
        store_timeout: Duration::from_millis(100),
        ca_file: None,
        secret_file: None,
    })
    .expect("store client")
}

/// A session of `owner` on `node` as a guard commits it (no virtual proxy prefix, no device).
fn rec<'a>(owner: &'a str, session: &'a str, node: &'a str, lives: Duration) -> NewSession<'a> {
    NewSession {
        owner,
        session,
        node,
        vp: "",
        lives,
        devices: &[],
        sealed: "",
        attributes: "",
    }
}

/// Commits `n` sessions of `user` through `s`, each under a reservation as a login makes it.
async fn logins(s: &Store, user: &str, tag: &str, n: usize) {
    for i in 0..n {
        let r = s
            .reserve(user, 5, MINUTE)
            .await
            .unwrap()
            .expect("under the limit");
        s.commit(Some(&r), &rec(user, &format!("{tag}{i}"), "node-1", MINUTE))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_limit_holds_across_the_pair() {
    let redis = Redis::start().await;
    let (a, b) = (store(&redis, "guard-a"), store(&redis, "guard-b"));
    logins(&a, "DIR\\ann", "a", 3).await;
    logins(&b, "dir\\ANN", "b", 2).await;
    assert_eq!(
        a.count("dir\\ann").await.unwrap(),
        5,
        "users compared without case"
    );
    assert!(a.reserve("DIR\\ann", 5, MINUTE).await.unwrap().is_none());
    assert!(b.reserve("DIR\\ann", 5, MINUTE).await.unwrap().is_none());
    // Another user is not touched by ann's count.
    assert!(b.reserve("DIR\\bob", 5, MINUTE).await.unwrap().is_some());
    // One ended through B frees a slot that A can take.
    b.end("DIR\\ann", "a0").await.unwrap();
    assert!(a.reserve("DIR\\ann", 5, MINUTE).await.unwrap().is_some());
    assert!(b.reserve("DIR\\ann", 5, MINUTE).await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_logins_through_both_guards_never_pass_the_limit() {
    let redis = Redis::start().await;
    let stores = [
        Arc::new(store(&redis, "guard-a")),
        Arc::new(store(&redis, "guard-b")),
    ];
    // Two sessions exist already; 40 logins race for the 3 slots left.
    logins(&stores[0], "DIR\\ann", "old", 2).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            s.reserve("DIR\\ann", 5, MINUTE).await.unwrap().is_some()
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += usize::from(t.await.unwrap());
    }
    assert_eq!(granted, 3);
    assert_eq!(stores[1].count("DIR\\ann").await.unwrap(), 5);
}

#[tokio::test]
async fn a_dead_guards_reservation_expires() {
    let redis = Redis::start().await;
    let (a, b) = (store(&redis, "guard-a"), store(&redis, "guard-b"));
    logins(&a, "DIR\\ann", "s", 4).await;
    // A reserves the last slot and dies before Qlik answers.
    assert!(a
        .reserve("DIR\\ann", 5, Duration::from_millis(300))
        .await
        .unwrap()
        .is_some());
    assert!(b.reserve("DIR\\ann", 5, MINUTE).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.count("DIR\\ann").await.unwrap(), 4);
    let r = b.reserve("DIR\\ann", 5, MINUTE).await.unwrap();
    assert!(r.is_some(), "the slot is free again");
    // A released reservation frees its slot at once.
    b.release(&r.unwrap()).await.unwrap();
    assert_eq!(b.count("DIR\\ann").await.unwrap(), 4);
}

#[tokio::test]
async fn the_other_guard_learns_owner_and_node_of_a_session() {
    let redis = Redis::start().await;
    let (a, b) = (store(&redis, "guard-a"), store(&redis, "guard-b"));
    assert_eq!(b.lookup("k1").await.unwrap(), None);
    a.commit(None, &rec("DIR\\ann", "k1", "node-2", MINUTE))
        .await
        .unwrap();
    let r = b.lookup("k1").await.unwrap().expect("recorded by A");
    assert_eq!(
        (r.owner.as_str(), r.node.as_str(), r.guard.as_str()),
        ("DIR\\ann", "node-2", "guard-a")
    );
    b.end("DIR\\ann", "k1").await.unwrap();
    assert_eq!(a.lookup("k1").await.unwrap(), None);
    assert_eq!(a.count("DIR\\ann").await.unwrap(), 0);
}

#[tokio::test]
async fn activity_written_back_keeps_a_session_counted() {
    let redis = Redis::start().await;
    let a = store(&redis, "guard-a");
    let short = Duration::from_millis(400);
    a.commit(None, &rec("DIR\\ann", "busy", "n", short))
        .await
        .unwrap();
    a.commit(None, &rec("DIR\\ann", "idle", "n", short))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let batch = [
        Touch {
            user: "DIR\\ann",
            session: "busy",
            lives: MINUTE,
        },
        Touch {
            user: "DIR\\ann",
            session: "gone",
            lives: MINUTE,
        },
    ];
    assert_eq!(
        a.touch(&batch).await.unwrap(),
        1,
        "only sessions it still has"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(a.count("DIR\\ann").await.unwrap(), 1);
    assert!(a.lookup("busy").await.unwrap().is_some());
    assert_eq!(a.lookup("idle").await.unwrap(), None);
    assert_eq!(a.lookup("gone").await.unwrap(), None, "touch made nothing");
}

#[tokio::test]
async fn a_dead_store_answers_within_the_deadline_and_is_used_again_when_back() {
    let mut redis = Redis::start().await;
    let a = store(&redis, "guard-a");
    logins(&a, "DIR\\ann", "s", 1).await;
    redis.stop();
    for _ in 0..3 {
        let t = Instant::now();
        let e = a.reserve("DIR\\ann", 5, MINUTE).await;
        assert!(e.is_err(), "{e:?}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a dead store held a call {:?}",
            t.elapsed()
        );
    }
    redis.resume().await;
    let mut back = false;
    for _ in 0..50 {
        if let Ok(Some(_)) = a.reserve("DIR\\ann", 5, MINUTE).await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the store is used again once it is back");
}

#[tokio::test]
async fn the_store_over_tls_is_reached_with_its_ca_and_refused_without_it() {
    let cert = common::tls::TestCert::new();
    let redis = Redis::start_tls(&cert.cert_file(), &cert.key_file()).await;
    let config = |ca_file| ClusterConfig {
        redis_url: format!("rediss://localhost:{}/0", redis.port),
        name: Some("guard-a".into()),
        key_prefix: "qsguard:test:".into(),
        store_timeout: Duration::from_millis(500),
        ca_file,
        secret_file: None,
    };
    let trusted = Store::new(&config(Some(cert.cert_file()))).unwrap();
    let r = trusted
        .reserve("DIR\\ann", 5, MINUTE)
        .await
        .expect("TLS with the store's CA");
    assert!(r.is_some());
    assert_eq!(trusted.count("DIR\\ann").await.unwrap(), 1);
    // The system's roots do not know a self-signed certificate: no answer, and soon.
    let untrusted = Store::new(&config(None)).unwrap();
    let started = Instant::now();
    let e = untrusted.count("DIR\\ann").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{e}");
}
