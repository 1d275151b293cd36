//! The Redis state cache: used when configured, and the server keeps answering through an outage.

use crate::common::*;
use redis::AsyncCommands;
use server::db::store::RevisedView;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A private redis-server on its own port; the shared one is never touched.
pub struct PrivateRedis {
    port: u16,
    child: Child,
}

impl PrivateRedis {
    pub fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        Self { port, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn wait_ready(&self) {
        let url = self.url();
        wait_for(
            "redis-server to accept connections",
            Duration::from_secs(10),
            || {
                let url = url.clone();
                async move {
                    let client = redis::Client::open(url).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                }
            },
        )
        .await;
    }

    /// Every view the shared cache holds.
    pub(crate) async fn views(&self) -> Vec<domain::view::VmView> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let all: std::collections::HashMap<String, String> =
            conn.hgetall("vmhc:vms").await.unwrap();
        all.values()
            .map(|json| serde_json::from_str(json).unwrap())
            .collect()
    }

    /// Drops everything Redis holds, as a restart without persistence does.
    pub(crate) async fn lose_everything(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("FLUSHALL")
            .query_async::<String>(&mut conn)
            .await
            .unwrap();
    }

    pub(crate) async fn hlen(&self) -> usize {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        conn.hlen("vmhc:vms").await.unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn health_redis(srv: &TestServer) -> String {
    srv.get("/api/health").await.1["redis"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn list_hostnames(srv: &TestServer) -> Vec<String> {
    let (status, vms) = srv.get("/api/vms").await;
    assert_eq!(status, 200);
    vms.as_array()
        .unwrap()
        .iter()
        .map(|v| v["hostname"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cache_is_used_and_survives_an_outage() {
    let port = free_port();
    let redis = PrivateRedis::start(port);
    redis.wait_ready().await;
    let url = redis.url();
    let mut srv = TestServer::start(Backend::Postgres, &[("REDIS_URL", &url)]).await;
    wait_for("the cache to come up", Duration::from_secs(10), || async {
        (health_redis(&srv).await == "up").then_some(())
    })
    .await;

    assert_eq!(srv.report(&report_for("before-outage")).await.0, 200);
    assert_eq!(
        redis.hlen().await,
        1,
        "the report's state is cached in Redis"
    );
    assert_eq!(list_hostnames(&srv).await, vec!["before-outage"]);

    // Outage: reports are still stored and reads come from the database.
    drop(redis);
    for host in ["during-outage-1", "during-outage-2"] {
        let (status, body) = srv.report(&report_for(host)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        list_hostnames(&srv).await,
        vec!["before-outage", "during-outage-1", "during-outage-2"]
    );
    wait_for(
        "health to show Redis down",
        Duration::from_secs(10),
        || async { (health_redis(&srv).await == "down").then_some(()) },
    )
    .await;
    let (status, health) = srv.get("/api/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "degraded");

    // Redis returns (empty, as after a restart): the cache is rebuilt and used again.
    let redis = PrivateRedis::start(port);
    redis.wait_ready().await;
    wait_for(
        "health to show Redis up again",
        Duration::from_secs(15),
        || async { (health_redis(&srv).await == "up").then_some(()) },
    )
    .await;
    assert_eq!(redis.hlen().await, 3);
    assert_eq!(srv.report(&report_for("after-outage")).await.0, 200);
    assert_eq!(redis.hlen().await, 4);
    assert_eq!(list_hostnames(&srv).await.len(), 4);
    srv.stop().await;
}

/// One VM's view as the API serves it, renumbered, at a row revision, and marked so the
/// test can tell writes apart.
fn marked(view: &domain::view::VmView, id: i64, revision: i64, mark: &str) -> RevisedView {
    let mut view = view.clone();
    view.id = domain::VmId(id);
    view.status_reason = mark.to_owned();
    RevisedView { revision, view }
}

async fn shape_view() -> domain::view::VmView {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    assert_eq!(srv.report(&report_for("shape")).await.0, 200);
    let (_, vms) = srv.get("/api/vms").await;
    srv.stop().await;
    serde_json::from_value(vms[0].clone()).unwrap()
}

async fn marks(redis: &PrivateRedis) -> Vec<(i64, String)> {
    let mut held: Vec<(i64, String)> = redis
        .views()
        .await
        .into_iter()
        .map(|v| (v.id.get(), v.status_reason))
        .collect();
    held.sort();
    held
}

/// A private Redis, a VM's view to mark, and two replicas' caches sharing that Redis.
async fn two_replicas() -> (
    PrivateRedis,
    domain::view::VmView,
    server::cache::StateCache,
    server::cache::StateCache,
) {
    use server::cache::StateCache;
    use server::live::LiveBus;
    let redis = PrivateRedis::start(free_port());
    redis.wait_ready().await;
    let view = shape_view().await;
    let replica = || StateCache::new(Some(&redis.url()), LiveBus::new(None).0).unwrap();
    let (a, b) = (replica(), replica());
    (redis, view, a, b)
}

/// A rebuild writes the database's view read before it writes; another replica that wrote
/// a VM meanwhile wrote something at least as new, and keeps it. What nobody wrote since
/// is replaced, and a VM the view lacks is deleted unless written since; after a restored
/// backup, ids above the backup's highest are free for new VMs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_never_overwrites_a_newer_write_by_another_replica() {
    let (redis, view, replica_a, replica_b) = two_replicas().await;
    let ticket = replica_b.open_writes().await;
    let seeded = [1, 2, 3, 4].map(|id| marked(&view, id, 1, "seeded"));
    replica_b.rebuild(seeded.to_vec(), ticket).await.unwrap();

    // A begins a rebuild and reads the database: VM 1 and 3 as they were, 2 deleted.
    let ticket = replica_a.open_writes().await;
    let read_by_a = vec![marked(&view, 1, 2, "old"), marked(&view, 3, 2, "old")];
    // Meanwhile B commits newer states of VM 1 and 4 and writes them through.
    replica_b
        .put(&[marked(&view, 1, 3, "newer"), marked(&view, 4, 2, "newer")])
        .await;
    // And an older write of VM 3 (committed before A read it) reaches Redis late.
    replica_b.put(&[marked(&view, 3, 1, "late")]).await;
    replica_a.rebuild(read_by_a, ticket).await.unwrap();
    assert_eq!(
        marks(&redis).await,
        vec![(1, "newer".into()), (3, "old".into()), (4, "newer".into())],
        "B's writes stay, A's view replaces the rest, the deleted VM is gone"
    );

    // A later rebuild, with nothing written since it began, is what Redis holds.
    let ticket = replica_a.open_writes().await;
    let read_later = vec![marked(&view, 1, 4, "later"), marked(&view, 4, 3, "later")];
    replica_a.rebuild(read_later, ticket).await.unwrap();
    assert_eq!(
        marks(&redis).await,
        vec![(1, "later".into()), (4, "later".into())]
    );

    // VM 2, deleted by the first rebuild, stays deleted through the second: a view of it
    // put late does not bring it back.
    replica_b.put(&[marked(&view, 2, 9, "put late")]).await;
    assert_eq!(
        marks(&redis).await,
        vec![(1, "later".into()), (4, "later".into())]
    );

    // The database restored from a backup: its revisions are lower than those Redis holds,
    // a VM deleted since is back under its id, and a VM created after the backup (id 9,
    // above any the backup holds) is gone from it. A rebuild with nothing written since it
    // began takes the database's view.
    replica_b
        .put(&[marked(&view, 9, 7, "created after the backup")])
        .await;
    replica_b.remove(domain::VmId(4)).await;
    let ticket = replica_a.open_writes().await;
    let restored = vec![
        marked(&view, 1, 1, "restored"),
        marked(&view, 4, 1, "restored"),
    ];
    replica_a.rebuild(restored, ticket).await.unwrap();
    assert_eq!(
        marks(&redis).await,
        vec![(1, "restored".into()), (4, "restored".into())]
    );
    // The restored database hands id 9 out again: the new VM's first view is taken.
    replica_b
        .put(&[marked(&view, 9, 1, "a new VM under id 9")])
        .await;
    replica_b.put(&[marked(&view, 2, 9, "put late")]).await;
    assert_eq!(
        marks(&redis).await,
        vec![
            (1, "restored".into()),
            (4, "restored".into()),
            (9, "a new VM under id 9".into())
        ]
    );
}

/// Two writers of one VM put their views in the other order than they committed (the
/// writer that committed first was slower to reach the cache): the newer revision stays,
/// in Redis shared by replicas and in a process's own map alike. The same revision again
/// (a refresh with nothing changed) is taken; a view of a deleted VM never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_put_late_never_overwrites_a_newer_one() {
    let (redis, view, replica_a, replica_b) = two_replicas().await;
    let ticket = replica_a.open_writes().await;
    replica_a.rebuild(Vec::new(), ticket).await.unwrap();
    let ticket = replica_b.open_writes().await;
    replica_b.rebuild(Vec::new(), ticket).await.unwrap();
    replica_a.put(&[marked(&view, 7, 5, "approved")]).await;
    replica_b.put(&[marked(&view, 7, 4, "reported")]).await;
    assert_eq!(marks(&redis).await, vec![(7, "approved".into())]);
    replica_b.put(&[marked(&view, 7, 5, "refreshed")]).await;
    assert_eq!(marks(&redis).await, vec![(7, "refreshed".into())]);
    // Deleted by an operator on A; a batch that committed before the delete puts late on B.
    replica_a.remove(domain::VmId(7)).await;
    replica_b
        .put(&[marked(&view, 7, 6, "from before the delete")])
        .await;
    assert_eq!(marks(&redis).await, Vec::<(i64, String)>::new());

    let own = server::cache::StateCache::new(None, server::live::LiveBus::new(None).0).unwrap();
    let held = || async {
        let views = own.snapshot().await.unwrap();
        views
            .into_iter()
            .map(|v| v.status_reason)
            .collect::<Vec<String>>()
    };
    own.put(&[marked(&view, 7, 5, "approved")]).await;
    own.put(&[marked(&view, 7, 4, "reported")]).await;
    assert_eq!(held().await, vec!["approved".to_owned()]);
    own.remove(domain::VmId(7)).await;
    own.put(&[marked(&view, 7, 6, "from before the delete")])
        .await;
    assert_eq!(held().await, Vec::<String>::new());
}

/// Redis loses its writes while a rebuild reads the database (restarted without
/// persistence): the writes numbered after that can no longer be told from those before
/// the rebuild began, so the rebuild is refused rather than deleting a VM another replica
/// wrote meanwhile; the next one, with a new ticket, is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_refuses_a_redis_that_lost_its_writes_since_it_began() {
    let (redis, view, replica_a, replica_b) = two_replicas().await;
    let ticket = replica_a.open_writes().await;
    let seeded = [1, 2].map(|id| marked(&view, id, 1, "seeded"));
    replica_a.rebuild(seeded.to_vec(), ticket).await.unwrap();
    // B writes through (its rebuild is not needed for that); writes are numbered 1 to 3.
    replica_b.open_writes().await;
    for revision in 1..=3 {
        replica_a.put(&[marked(&view, 3, revision, "before")]).await;
    }

    let ticket = replica_a.open_writes().await;
    let read_by_a = vec![marked(&view, 1, 2, "read"), marked(&view, 2, 2, "read")];
    redis.lose_everything().await;
    // Created by B after A read the database, written to the emptied Redis.
    replica_b
        .put(&[marked(&view, 4, 1, "created meanwhile")])
        .await;
    assert!(replica_a.rebuild(read_by_a, ticket).await.is_err());
    assert_eq!(marks(&redis).await, vec![(4, "created meanwhile".into())]);

    let ticket = replica_a.open_writes().await;
    let read_again = vec![
        marked(&view, 1, 2, "read"),
        marked(&view, 2, 2, "read"),
        marked(&view, 4, 1, "read"),
    ];
    replica_a.rebuild(read_again, ticket).await.unwrap();
    assert_eq!(
        marks(&redis).await,
        vec![(1, "read".into()), (2, "read".into()), (4, "read".into())]
    );
}

/// Two replicas rebuild at once after the same outage: B read the database first, A read
/// it after a VM was created and wrote its view first. B's rebuild, finishing last, keeps
/// the VM: A's rebuild wrote it after B began, as any write would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_rebuilding_at_once_never_delete_what_the_newer_view_holds() {
    let (redis, view, replica_a, replica_b) = two_replicas().await;
    let ticket_b = replica_b.open_writes().await;
    let read_by_b = vec![marked(&view, 1, 1, "read by B")];
    let ticket_a = replica_a.open_writes().await;
    let read_by_a = vec![
        marked(&view, 1, 1, "read by A"),
        marked(&view, 2, 1, "created between the reads"),
    ];
    replica_a.rebuild(read_by_a, ticket_a).await.unwrap();
    replica_b.rebuild(read_by_b, ticket_b).await.unwrap();
    let held: Vec<i64> = marks(&redis).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(held, vec![1, 2], "{:?}", marks(&redis).await);
}
