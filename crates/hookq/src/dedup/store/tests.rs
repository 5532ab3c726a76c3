//! The store against real SQLite files: claims, leases, pruning, upgrades.

use super::*;

const LEASE: Duration = Duration::from_secs(10);

/// A store on `path`, as one process opens it (two on one file: two processes).
fn open(path: &Path) -> Store {
    Store::open(path, LEASE, Box::new(|| {}))
}

/// Asks `done` until it says yes; fails after 5 s, saying `what`. For what
/// follows the end of another store's thread (its lease row goes with it).
async fn until<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::task::yield_now().await;
    }
}

fn claimed(attempts: u32, handbacks: u32) -> Claim {
    Claim::Claimed {
        attempts,
        handbacks,
    }
}

#[tokio::test]
async fn claim_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("d.db"));
    assert_eq!(s.claim("k", "m1").await.unwrap(), claimed(0, 0));
    // A live holder works on it: its redelivery waits, another message is a duplicate.
    assert_eq!(s.claim("k", "m1").await.unwrap(), Claim::Busy);
    assert_eq!(
        s.claim("k", "m2").await.unwrap(),
        Claim::HeldBy("m1".into())
    );
    // Parked (in a delay queue): its copy takes it back with the attempts so far.
    s.park("k", "m1", 3, true).await.unwrap();
    assert_eq!(
        s.claim("k", "m2").await.unwrap(),
        Claim::HeldBy("m1".into())
    );
    assert_eq!(s.claim("k", "m1").await.unwrap(), claimed(3, 1));
    // Dead-lettered: anyone may claim again, from scratch.
    s.release("k", "m1").await.unwrap();
    assert_eq!(s.claim("k", "m2").await.unwrap(), claimed(0, 0));
    // A stale release by the old holder changes nothing.
    s.release("k", "m1").await.unwrap();
    assert_eq!(
        s.claim("k", "m3").await.unwrap(),
        Claim::HeldBy("m2".into())
    );
    s.done_at("k", 1234).await.unwrap();
    assert_eq!(
        s.claim("k", "m2").await.unwrap(),
        Claim::Done { at_ms: 1234 }
    );
    assert_eq!(
        s.claim("k", "m4").await.unwrap(),
        Claim::Done { at_ms: 1234 }
    );
    s.probe().await.unwrap();
}

#[tokio::test]
async fn a_claim_whose_holder_stopped_renewing_is_taken_over_by_its_message_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    // A lease far longer than the test: "live" must not depend on how soon a
    // busy machine schedules the renewals; expiry is seen through the clock
    // the claims are given (`later`).
    let (a, b) = (open(&path), open(&path));
    assert_eq!(a.claim("k", "m1").await.unwrap(), claimed(0, 0));
    let now = now_ms();
    // While the holder's lease runs, the other process waits.
    assert_eq!(b.claim_at("k", "m1", now).await.unwrap(), Claim::Busy);
    // Seen from after the lease (as after a SIGKILL): the same message takes
    // it over, another message still counts as a duplicate.
    let later = now + 60_000;
    assert_eq!(
        b.claim_at("k", "m2", later).await.unwrap(),
        Claim::HeldBy("m1".into())
    );
    assert_eq!(b.claim_at("k", "m1", later).await.unwrap(), claimed(0, 0));
    // The old holder, back, cannot release or park what it lost.
    a.release("k", "m1").await.unwrap();
    a.park("k", "m1", 9, true).await.unwrap();
    assert_eq!(a.claim("k", "m1").await.unwrap(), Claim::Busy);
}

#[tokio::test]
async fn a_dropped_store_ends_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let b = open(&path);
    {
        let a = open(&path);
        assert_eq!(a.claim("k", "m1").await.unwrap(), claimed(0, 0));
        assert_eq!(b.claim("k", "m1").await.unwrap(), Claim::Busy);
    }
    // The lease row goes when the thread ends.
    until("the ended store's claim is still held", || async {
        matches!(b.claim("k", "m1").await.unwrap(), Claim::Claimed { .. })
    })
    .await;
}

#[tokio::test]
async fn concurrent_claims_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    // Two stores = two connections, as two processes would have.
    let a = open(&path);
    let b = open(&path);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.claim(&format!("k{}", i / 4), &format!("m{i}"))
                .await
                .unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Claim::Claimed { .. }) {
            won += 1;
        }
    }
    assert_eq!(won, 50);
}

#[tokio::test]
async fn prune_removes_only_old_keys_and_never_a_live_claim() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("d.db"));
    let long_ago = now_ms() - 3_600_000;
    s.done_at("old", long_ago).await.unwrap();
    s.claim_at("live", "m", long_ago).await.unwrap();
    assert_eq!(pass(&s, Duration::from_secs(60)).await, 1);
    s.done("new").await.unwrap();
    assert_eq!(pass(&s, Duration::from_secs(60)).await, 0);
    assert_eq!(s.claim("old", "m").await.unwrap(), claimed(0, 0));
    assert!(matches!(
        s.claim("new", "m").await.unwrap(),
        Claim::Done { .. }
    ));
    assert_eq!(s.claim("live", "m").await.unwrap(), Claim::Busy);
}

/// Runs a whole prune pass; returns what it deleted.
async fn pass(s: &Store, retention: Duration) -> usize {
    let (mut after, mut deleted) = (None, 0);
    loop {
        let step = s.prune(retention, after).await.unwrap();
        deleted += step.deleted;
        match step.next {
            Some(next) => after = Some(next),
            None => return deleted,
        }
    }
}

#[tokio::test]
async fn a_prune_pass_walks_every_slice_and_keeps_what_is_young() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("d.db"));
    let long_ago = now_ms() - 3_600_000;
    let n = PRUNE_SLICE * 2 + 300;
    let old: Vec<String> = (0..n).map(|i| format!("old{i}")).collect();
    let young: Vec<String> = (0..n).map(|i| format!("young{i}")).collect();
    s.done_many(old.clone(), u64::try_from(long_ago).unwrap())
        .await
        .unwrap();
    s.done_many(young.clone(), u64::try_from(now_ms()).unwrap())
        .await
        .unwrap();
    // Each step looks at one slice: the pass takes several, and ends.
    let (mut after, mut steps, mut deleted) = (None, 0, 0);
    loop {
        let step = s.prune(Duration::from_secs(60), after).await.unwrap();
        assert!(step.deleted <= PRUNE_SLICE, "{step:?}");
        deleted += step.deleted;
        steps += 1;
        match step.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(deleted, n);
    assert_eq!(steps, (2 * n).div_ceil(PRUNE_SLICE));
    assert_eq!(s.claim("old7", "m").await.unwrap(), claimed(0, 0));
    assert!(matches!(
        s.claim("young7", "m").await.unwrap(),
        Claim::Done { .. }
    ));
}

/// The store's size target: 64 bytes a remembered key or less, on disk.
#[tokio::test]
async fn a_remembered_key_takes_under_64_bytes_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let s = open(&path);
    let n = 50_000;
    for chunk in 0..10 {
        // Keys as long as a body-hash key: "source:" and 64 hex digits.
        let keys = (0..n / 10)
            .map(|i| format!("github:{:064x}", chunk * n + i))
            .collect();
        s.done_many(keys, u64::try_from(now_ms()).unwrap())
            .await
            .unwrap();
    }
    drop(s);
    let c = Connection::open(&path).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    let per_key = bytes / n;
    assert!(per_key <= 64, "{per_key} bytes a key ({bytes} for {n})");
}

#[tokio::test]
async fn files_of_earlier_releases_are_upgraded_in_place() {
    for (schema, rows) in [
        // The first release: no holder, no counts.
        (
            "CREATE TABLE keys (key TEXT PRIMARY KEY, state INTEGER NOT NULL,
               message_id TEXT NOT NULL, updated_ms INTEGER NOT NULL) WITHOUT ROWID;",
            "INSERT INTO keys VALUES ('done', 1, '', 5), ('held', 0, 'm1', 5),
               ('gone', 2, 'm9', 5);",
        ),
        // Readable keys with holders and counts, and the index on time.
        (
            "CREATE TABLE keys (key TEXT PRIMARY KEY, state INTEGER NOT NULL,
               message_id TEXT NOT NULL, updated_ms INTEGER NOT NULL, holder TEXT,
               attempts INTEGER NOT NULL DEFAULT 0, handbacks INTEGER NOT NULL DEFAULT 0)
               WITHOUT ROWID;
             CREATE INDEX keys_updated ON keys(updated_ms);",
            "INSERT INTO keys VALUES ('done', 1, '', 5, NULL, 0, 0),
               ('held', 0, 'm1', 5, NULL, 0, 0), ('gone', 2, 'm9', 5, NULL, 0, 0),
               ('parked', 0, 'm2', 5, NULL, 3, 1);",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(&format!("{schema}{rows}"))
            .unwrap();
        let s = open(&path);
        assert_eq!(
            s.claim("done", "m").await.unwrap(),
            Claim::Done { at_ms: 5 }
        );
        assert_eq!(
            s.claim("held", "m2").await.unwrap(),
            Claim::HeldBy("m1".into())
        );
        assert_eq!(s.claim("held", "m1").await.unwrap(), claimed(0, 0));
        assert_eq!(s.claim("gone", "m3").await.unwrap(), claimed(0, 0));
        if schema.contains("attempts") {
            assert_eq!(s.claim("parked", "m2").await.unwrap(), claimed(3, 1));
        }
        drop(s);
        let tables: i64 = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('keys', 'keys_updated')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "the old table is gone");
    }
}

/// A lease for batches run without a store thread.
fn lease() -> Lease {
    Lease {
        holder: "this-process".into(),
        duration: LEASE,
        valid_until: AtomicU64::new(0),
    }
}

fn request(op: Op) -> Request {
    Request {
        op,
        now_ms: now_ms(),
    }
}

#[test]
fn answers_are_sent_only_once_their_batch_has_committed() {
    let dir = tempfile::tempdir().unwrap();
    let c = sql::open(&dir.path().join("d.db")).unwrap();
    let (claim, mut claim_answer) = oneshot::channel();
    let (prune, mut prune_answer) = oneshot::channel();
    let batch = vec![
        request(Op::Claim {
            key: key_hash("k"),
            message_id: "m1".into(),
            reply: claim,
        }),
        request(Op::Prune {
            older_than_ms: 0,
            after: None,
            reply: prune,
        }),
    ];
    let answers =
        sql::run_batch(&c, &lease(), batch, None).unwrap_or_else(|f| panic!("{}", f.error));
    assert!(
        claim_answer.try_recv().is_err(),
        "an answer before the commit"
    );
    for answer in answers {
        answer.send();
    }
    assert_eq!(claim_answer.try_recv().unwrap().unwrap(), claimed(0, 0));
    assert_eq!(
        prune_answer.try_recv().unwrap().unwrap(),
        Pruned {
            deleted: 0,
            next: None
        }
    );
}

#[test]
fn a_failed_batch_gives_every_waiter_its_error_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = sql::open(&dir.path().join("d.db")).unwrap();
    // A claim consults the leases: without their table, it fails mid-batch.
    c.execute_batch("DROP TABLE holders").unwrap();
    let (done, mut ran_before) = oneshot::channel();
    let (claim, mut failing) = oneshot::channel();
    let (probe, mut never_ran) = oneshot::channel();
    let batch = vec![
        request(Op::Done {
            key: key_hash("a"),
            reply: done,
        }),
        request(Op::Claim {
            key: key_hash("k"),
            message_id: "m1".into(),
            reply: claim,
        }),
        request(Op::Probe { reply: probe }),
    ];
    let Err(failed) = sql::run_batch(&c, &lease(), batch, None) else {
        panic!("the batch committed");
    };
    assert_eq!(failed.waiting.len(), 3);
    let err = Error {
        path: "d.db".into(),
        message: failed.error.to_string(),
    };
    for request in failed.waiting {
        request.fail(&err);
    }
    assert_eq!(
        ran_before.try_recv().unwrap().unwrap_err().message,
        err.message
    );
    assert_eq!(
        failing.try_recv().unwrap().unwrap_err().message,
        err.message
    );
    assert_eq!(
        never_ran.try_recv().unwrap().unwrap_err().message,
        err.message
    );
    // The done that ran before the failure was rolled back.
    let keys: i64 = c
        .query_row("SELECT count(*) FROM done", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys, 0);
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_fails_each_request_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    // A directory where the file should be: SQLite cannot open it.
    std::fs::create_dir(&path).unwrap();
    let s = open(&path);
    let err = s.claim("k", "m1").await.unwrap_err();
    assert_eq!(err.path, path.display().to_string());
    assert!(s.prune(Duration::from_secs(60), None).await.is_err());
    assert!(!s.is_healthy());
    // Fixed: the next request opens the file.
    std::fs::remove_dir(&path).unwrap();
    assert_eq!(s.claim("k", "m1").await.unwrap(), claimed(0, 0));
    assert!(s.is_healthy());
}

#[tokio::test]
async fn a_partition_is_taken_by_one_live_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let b = open(&path);
    {
        let a = open(&path);
        assert!(a.take_partition("p.done.0").await.unwrap());
        assert!(a.take_partition("p.done.0").await.unwrap(), "its own again");
        assert!(!b.take_partition("p.done.0").await.unwrap());
        assert!(b.take_partition("p.done.1").await.unwrap(), "another one");
        a.leave_partition("p.done.0").await.unwrap();
        assert!(b.take_partition("p.done.0").await.unwrap());
        assert!(!a.take_partition("p.done.0").await.unwrap());
        // A leave by a process that does not hold it changes nothing.
        a.leave_partition("p.done.0").await.unwrap();
        assert!(!a.take_partition("p.done.0").await.unwrap());
        b.leave_partition("p.done.0").await.unwrap();
        assert!(a.take_partition("p.done.0").await.unwrap());
    }
    // The holder's process ended (its lease row goes with its store): free.
    until("still held by a process that ended", || async {
        b.take_partition("p.done.0").await.unwrap()
    })
    .await;
}

#[tokio::test]
async fn done_at_ms_reads_what_done_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("d.db"));
    assert_eq!(s.done_at_ms("k").await.unwrap(), None);
    s.done_at("k", 77).await.unwrap();
    assert_eq!(s.done_at_ms("k").await.unwrap(), Some(77));
}
