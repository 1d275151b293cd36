//! The Redis state cache: used when configured, and the server keeps answering through an outage.

use crate::common::*;
use redis::AsyncCommands;
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
