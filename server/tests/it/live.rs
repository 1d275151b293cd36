//! Live push (`/api/live`): a change reaches pages on every replica through Redis, the
//! stream says when it falls back to polling, and it is closed to anonymous callers.

use crate::common::*;
use crate::redis_cache::PrivateRedis;
use std::time::Duration;

/// One server-sent event stream, read event by event.
pub(crate) struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    pub(crate) async fn open(srv: &TestServer) -> Self {
        let response = srv
            .http
            .get(srv.url("/api/live"))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "an event stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event as (name, data); keep-alive comments are skipped.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = v.trim().to_owned();
                    }
                }
                if !name.is_empty() {
                    return Some((name, data));
                }
                continue;
            }
            let chunk = self.response.chunk().await.ok()??;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads events until `wanted` accepts one; panics at the deadline.
    pub(crate) async fn until(
        &mut self,
        what: &str,
        deadline: Duration,
        wanted: impl Fn(&str, &str) -> bool,
    ) {
        let seen = tokio::time::timeout(deadline, async {
            let mut seen = Vec::new();
            while let Some((name, data)) = self.next().await {
                if wanted(&name, &data) {
                    return Ok(());
                }
                seen.push(format!("{name}={data}"));
            }
            Err(seen)
        })
        .await;
        match seen {
            Ok(Ok(())) => {}
            Ok(Err(seen)) => panic!("the stream ended before {what}; saw {seen:?}"),
            Err(_) => panic!("no {what} within {deadline:?}"),
        }
    }
}

fn names(data: &str, id: i64) -> bool {
    data == "*" || data.split(',').any(|part| part == id.to_string())
}

/// Two replicas on one database and one Redis: a VM reporting to A is announced on a stream
/// served by B. When Redis goes away B's stream says "poll"; when it returns, "push" again,
/// and changes flow across once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_reaches_a_page_on_another_replica_through_redis() {
    let port = free_port();
    let redis = PrivateRedis::start(port);
    redis.wait_ready().await;
    let url = redis.url();
    let db = fresh_db(Backend::Postgres).await;
    let second_db = TestDb {
        url: db.url.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let mut a = TestServer::start_on(db, &[("REDIS_URL", &url)]).await;
    let mut b = TestServer::start_on(second_db, &[("REDIS_URL", &url)]).await;

    let mut events = Events::open(&b).await;
    events
        .until(
            "B subscribed to Redis",
            Duration::from_secs(15),
            |name, data| name == "mode" && data == "push",
        )
        .await;
    let (status, body) = a.report(&report_for("on-replica-a")).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    events
        .until(
            "A's new VM announced on B",
            Duration::from_secs(10),
            |name, data| name == "change" && names(data, id),
        )
        .await;

    // Redis goes away: B cannot hear A any more, and says so.
    drop(redis);
    events
        .until(
            "B's stream to fall back to polling",
            Duration::from_secs(15),
            |name, data| name == "mode" && data == "poll",
        )
        .await;
    // It comes back: push again, and A's changes reach B again.
    let redis = PrivateRedis::start(port);
    redis.wait_ready().await;
    events
        .until("B back on push", Duration::from_secs(20), |name, data| {
            name == "mode" && data == "push"
        })
        .await;
    let (status, body) = a.report(&report_for("after-redis-returned")).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    events
        .until(
            "a change after the outage",
            Duration::from_secs(15),
            |name, data| name == "change" && names(data, id),
        )
        .await;

    // An open stream does not hold a shutdown open.
    tokio::time::timeout(Duration::from_secs(15), b.stop())
        .await
        .expect("the server stops with a live stream open");
    a.stop().await;
}

/// Without Redis the one process tells its own pages; nobody reads the stream anonymously.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_needs_a_credential_and_tells_of_each_report() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    for token in [None, Some("not-a-token"), Some(AGENT_TOKEN)] {
        let mut req = srv.http.get(srv.url("/api/live"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let status = req.send().await.unwrap().status().as_u16();
        assert_eq!(status, 401, "{token:?} must not read the stream");
    }
    let mut events = Events::open(&srv).await;
    events
        .until("the greeting", Duration::from_secs(5), |name, data| {
            name == "mode" && data == "push"
        })
        .await;
    let (status, body) = srv.report(&report_for("told-at-once")).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    events
        .until(
            "the report's change",
            Duration::from_secs(5),
            |name, data| name == "change" && names(data, id),
        )
        .await;
    srv.stop().await;
}
