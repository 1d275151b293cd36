//! Latest-state cache of every VM: Redis when configured (shared by replicas), else in process.
//!
//! The database stays authoritative. Redis is written through after each commit; when it
//! fails, reads fall back to the database, the outage is logged once, and once Redis answers
//! again it is rebuilt from the database before it is read from.

use crate::db::Db;
use crate::db::store::RevisedView;
use crate::live::{Change, LiveBus};
use deadpool_redis::redis::AsyncCommands;
use deadpool_redis::redis::Script;
use domain::VmId;
use domain::view::VmView;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

const REDIS_KEY: &str = "vmhc:vms";
/// Counts writes to `REDIS_KEY`, whichever replica makes them.
const GENERATION_KEY: &str = "vmhc:vms:generation";
/// The generation of each VM's latest write.
const WRITTEN_AT_KEY: &str = "vmhc:vms:written-at";
/// The row revision of each VM's view held.
const REVISION_KEY: &str = "vmhc:vms:revision";

/// Writes views (ARGV: id, revision, json, ...) unless a newer revision is held, and notes
/// the generation they were written at.
const PUT_SCRIPT: &str = r"
local generation = redis.call('INCR', KEYS[2])
for i = 1, #ARGV, 3 do
  local held = tonumber(redis.call('HGET', KEYS[4], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) >= held then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    redis.call('HSET', KEYS[3], ARGV[i], generation)
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  end
end
return generation
";

/// A rebuild's write (ARGV: the generation read before the database was, then id,
/// revision, json... for every VM of the database's view).
/// - A VM nobody wrote since that generation takes the view whatever revision is held:
///   the view was read after every write before it (and after a restored backup, the
///   database's revisions may be lower than those Redis holds).
/// - A VM written since keeps what was written unless the view's revision is as new:
///   that write may have committed after the view was read, or be an older one put late.
/// - A VM the view lacks is deleted unless written since. It is held as deleted when its
///   id is at most the view's highest: the database's sequence is past those ids, even
///   restored from a backup, so none is handed out again. A higher id is forgotten
///   outright: only a restored backup, its sequence wound back, lacks such a VM, and it
///   hands those ids out again to the next VMs it creates.
/// - Deletions noted before that generation are forgotten for the same ids above the view's
///   highest; below it they stay held, so a view put late never brings such a VM back.
/// - A Redis whose write count is below that generation lost writes since (a restart
///   without persistence): the script refuses, and the next rebuild takes a new ticket.
/// - What the script writes is numbered as any write is: two replicas rebuilding at once
///   (both after the same outage) treat each other's views as written since, so the one
///   that read the database first never deletes a VM the other's newer view holds.
const REBUILD_SCRIPT: &str = r"
local DELETED = '9223372036854775807'
local since = tonumber(ARGV[1])
-- Writes numbered at or below the ticket would pass for older than the read: a Redis that
-- lost its writes since (restarted without persistence, failed over) is rebuilt anew.
if tonumber(redis.call('GET', KEYS[2]) or '0') < since then
  return redis.error_reply('write numbers went back since the rebuild began')
end
-- The rebuild's own writes are numbered too: another replica's rebuild that read the
-- database earlier must not take a VM written here for one it may delete or overwrite.
local generation = redis.call('INCR', KEYS[2])
local newest = nil
local kept = {}
for i = 2, #ARGV, 3 do
  local id = tonumber(ARGV[i])
  kept[ARGV[i]] = true
  if newest == nil or id > newest then newest = id end
end
local function untouched(id)
  local at = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  return at <= since
end
local function reusable(id)
  local n = tonumber(id)
  return newest == nil or n == nil or n > newest
end
local function forget(id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[3], id)
end
local revisions = redis.call('HGETALL', KEYS[4])
for i = 1, #revisions, 2 do
  local id = revisions[i]
  if revisions[i + 1] == DELETED and untouched(id) and reusable(id) then
    forget(id)
  end
end
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not kept[id] and untouched(id) then
    redis.call('HDEL', KEYS[1], id)
    if reusable(id) then
      forget(id)
    else
      redis.call('HSET', KEYS[4], id, DELETED)
      redis.call('HSET', KEYS[3], id, generation)
    end
  end
end
for i = 2, #ARGV, 3 do
  local held = tonumber(redis.call('HGET', KEYS[4], ARGV[i]) or '-1')
  if untouched(ARGV[i]) or tonumber(ARGV[i + 1]) >= held then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    redis.call('HSET', KEYS[3], ARGV[i], generation)
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  end
end
return redis.call('HLEN', KEYS[1])
";

/// Deletes a VM's view and holds it as deleted (ARGV: id, the deleted revision), counted as
/// a write so a rebuild under way keeps the deletion.
const REMOVE_SCRIPT: &str = r"
local generation = redis.call('INCR', KEYS[2])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], generation)
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
return generation
";
/// The scripts with their digests worked out once (each call sends the digest first).
static PUT: LazyLock<Script> = LazyLock::new(|| Script::new(PUT_SCRIPT));
static REBUILD: LazyLock<Script> = LazyLock::new(|| Script::new(REBUILD_SCRIPT));
static REMOVE: LazyLock<Script> = LazyLock::new(|| Script::new(REMOVE_SCRIPT));

/// VMs read back from the database at a time after a change.
const REFRESH_SLICE: usize = 2_000;
/// Upper bound on any Redis round trip, so an unreachable Redis never stalls a request.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

pub struct StateCache {
    /// Shared views: a reader takes the fleet by reference counts, not copies, and lets go
    /// of the lock before doing anything with it.
    local: RwLock<Local>,
    redis: Option<RedisCache>,
    /// Told of every write, so open pages follow.
    live: Arc<LiveBus>,
}

/// This process's views, and the VMs deleted: ids are never reused while the process runs
/// (restoring a backup means a restart, which starts this map afresh), so a view of a deleted
/// VM that arrives late (its batch committed before the delete) is refused for good.
#[derive(Default)]
struct Local {
    views: HashMap<VmId, Held>,
    deleted: HashSet<VmId>,
}

/// The revision a deleted VM is held at in Redis: no view is newer (`REBUILD_SCRIPT` knows
/// it by its digits).
const DELETED: i64 = i64::MAX;

/// A view in this process's map, with its row's revision.
struct Held {
    revision: i64,
    view: Arc<VmView>,
}

impl Held {
    fn of(revised: &RevisedView) -> Self {
        Held {
            revision: revised.revision,
            view: Arc::new(revised.view.clone()),
        }
    }
}

/// The arguments of a script's views: id, revision, json for each.
fn view_args(views: &[RevisedView]) -> Vec<(String, i64, String)> {
    views
        .iter()
        .filter_map(|v| {
            let json = serde_json::to_string(&v.view).ok()?;
            Some((v.view.id.to_string(), v.revision, json))
        })
        .collect()
}

struct RedisCache {
    pool: deadpool_redis::Pool,
    link: std::sync::Mutex<Link>,
}

/// Whether Redis is used, changed together so a failure during a rebuild is never lost.
#[derive(Default)]
struct Link {
    /// Reads are served from Redis: false from start-up and after any failure until a
    /// rebuild from the database succeeds with no failure since it began.
    ready: bool,
    /// Writes go through to Redis: true from the moment a rebuild starts reading the
    /// database, so nothing written while the rebuild runs is left out of Redis.
    writing: bool,
    /// Failures so far: a rebuild that began before the latest one does not count.
    failures: u64,
}

/// Taken when a rebuild begins reading the database (`StateCache::open_writes`): the
/// failures counted so far and Redis's write generation, when both could be read.
#[derive(Clone, Copy, Debug)]
pub struct RebuildTicket(Option<(u64, i64)>);

/// What `/api/health` reports about the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheHealth {
    InProcess,
    RedisUp,
    RedisDown,
}

impl StateCache {
    pub fn new(redis_url: Option<&str>, live: Arc<LiveBus>) -> anyhow::Result<Self> {
        let redis = match redis_url {
            None => None,
            Some(url) => {
                let mut cfg = deadpool_redis::Config::from_url(url);
                cfg.pool = Some(deadpool_redis::PoolConfig {
                    max_size: 16,
                    timeouts: deadpool_redis::Timeouts {
                        wait: Some(REDIS_TIMEOUT),
                        create: Some(REDIS_TIMEOUT),
                        recycle: Some(REDIS_TIMEOUT),
                    },
                    ..Default::default()
                });
                let pool = cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
                Some(RedisCache {
                    pool,
                    link: std::sync::Mutex::new(Link::default()),
                })
            }
        };
        Ok(Self {
            local: RwLock::new(Local::default()),
            redis,
            live,
        })
    }

    pub fn live(&self) -> &Arc<LiveBus> {
        &self.live
    }

    pub fn health(&self) -> CacheHealth {
        match &self.redis {
            None => CacheHealth::InProcess,
            Some(r) if r.ready() => CacheHealth::RedisUp,
            Some(_) => CacheHealth::RedisDown,
        }
    }

    /// The whole fleet, or `None` when the caller must read the database instead.
    pub async fn snapshot(&self) -> Option<Vec<VmView>> {
        match &self.redis {
            None => {
                let local = self.local.read().ok()?;
                Some(
                    local
                        .views
                        .values()
                        .map(|held| VmView::clone(&held.view))
                        .collect(),
                )
            }
            Some(redis) if redis.ready() => {
                let result: Result<HashMap<String, String>, _> = redis
                    .run(|mut conn| async move { conn.hgetall(REDIS_KEY).await })
                    .await;
                match result {
                    Ok(entries) => Some(
                        entries
                            .values()
                            .filter_map(|json| serde_json::from_str(json).ok())
                            .collect(),
                    ),
                    Err(err) => {
                        redis.mark_down(&err);
                        None
                    }
                }
            }
            Some(_) => None,
        }
    }

    /// Every VM as shared views, when this process's map is what reads are served from (no
    /// Redis); `None` otherwise. The lock is held only to count references.
    pub fn local_views(&self) -> Option<Vec<Arc<VmView>>> {
        if self.redis.is_some() {
            return None;
        }
        let local = self.local.read().ok()?;
        Some(local.views.values().map(|held| held.view.clone()).collect())
    }

    /// Writes the given VMs' latest state through, except where a view of a newer revision
    /// is already held (written by another task or replica that committed later).
    pub async fn put(&self, views: &[RevisedView]) {
        if views.is_empty() {
            return;
        }
        if let Ok(mut local) = self.local.write() {
            for revised in views {
                let id = revised.view.id;
                let newer_held = local
                    .views
                    .get(&id)
                    .is_some_and(|held| held.revision > revised.revision);
                if !newer_held && !local.deleted.contains(&id) {
                    local.views.insert(id, Held::of(revised));
                }
            }
        }
        if let Some(redis) = self.redis.as_ref().filter(|r| r.writing()) {
            let items = view_args(views);
            let result: Result<i64, _> = redis
                .run(|mut conn| async move {
                    let mut script = PUT.prepare_invoke();
                    script
                        .key(REDIS_KEY)
                        .key(GENERATION_KEY)
                        .key(WRITTEN_AT_KEY)
                        .key(REVISION_KEY);
                    for (id, revision, json) in &items {
                        script.arg(id).arg(revision).arg(json);
                    }
                    script.invoke_async(&mut conn).await
                })
                .await;
            if let Err(err) = result {
                redis.mark_down(&err);
            }
        }
        // After the Redis write, so a page on another replica reads the new state.
        self.live.vms_changed(views.iter().map(|v| v.view.id));
    }

    /// Forgets a deleted VM, and refuses any view of it put later.
    pub async fn remove(&self, id: VmId) {
        if let Ok(mut local) = self.local.write() {
            local.views.remove(&id);
            local.deleted.insert(id);
        }
        self.live.vms_changed([id]);
        if let Some(redis) = &self.redis {
            let result: Result<i64, _> = redis
                .run(|mut conn| async move {
                    REMOVE
                        .key(REDIS_KEY)
                        .key(GENERATION_KEY)
                        .key(WRITTEN_AT_KEY)
                        .key(REVISION_KEY)
                        .arg(id.get())
                        .arg(DELETED)
                        .invoke_async(&mut conn)
                        .await
                })
                .await;
            if let Err(err) = result {
                redis.mark_down(&err);
            }
        }
    }

    /// Sends every write through to Redis from now on: called before the database is read
    /// for a rebuild, so what is written meanwhile is not left out. The answer is handed
    /// to `rebuild`, which serves reads from Redis only if nothing failed in between.
    pub async fn open_writes(&self) -> RebuildTicket {
        let Some(redis) = &self.redis else {
            return RebuildTicket(None);
        };
        let failures = match redis.link.lock() {
            Ok(mut link) => {
                link.writing = true;
                link.failures
            }
            Err(_poisoned) => return RebuildTicket(None),
        };
        // Read after writes are opened: every write Redis takes from here on is numbered
        // above it.
        let generation: Result<Option<i64>, _> = redis
            .run(|mut conn| async move { conn.get(GENERATION_KEY).await })
            .await;
        match generation {
            Ok(generation) => RebuildTicket(Some((failures, generation.unwrap_or(0)))),
            Err(err) => {
                redis.mark_down(&err);
                RebuildTicket(None)
            }
        }
    }

    /// Replaces the whole cache with the database's view, then serves reads from it. The
    /// view is written over what Redis holds rather than after deleting it, and never over
    /// a VM written since the ticket was taken (by this replica or another): that write is
    /// at least as new as the view. VMs Redis holds that the view lacks and nobody wrote
    /// since are deleted (`REBUILD_SCRIPT` says which stay held as deleted).
    pub async fn rebuild(
        &self,
        views: Vec<RevisedView>,
        ticket: RebuildTicket,
    ) -> Result<(), String> {
        if let Ok(mut local) = self.local.write() {
            let mut rebuilt: HashMap<VmId, Held> = views
                .iter()
                .filter(|v| !local.deleted.contains(&v.view.id))
                .map(|v| (v.view.id, Held::of(v)))
                .collect();
            // A view written while the database was read may be newer than the one read,
            // or of a VM created since (a higher id than any read).
            let newest_read = views.iter().map(|v| v.view.id).max();
            for (id, held) in local.views.drain() {
                let newer = match rebuilt.get(&id) {
                    Some(read) => read.revision < held.revision,
                    None => newest_read.is_none_or(|newest| id > newest),
                };
                if newer {
                    rebuilt.insert(id, held);
                }
            }
            local.views = rebuilt;
        }
        self.live.publish(Change::All);
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let Some((failures_before, since)) = ticket.0 else {
            return Err("Redis failed as the rebuild began".into());
        };
        let items = view_args(&views);
        let result: Result<i64, _> = redis
            .run(|mut conn| async move {
                let mut script = REBUILD.prepare_invoke();
                script
                    .key(REDIS_KEY)
                    .key(GENERATION_KEY)
                    .key(WRITTEN_AT_KEY)
                    .key(REVISION_KEY)
                    .arg(since);
                for (id, revision, json) in &items {
                    script.arg(id).arg(revision).arg(json);
                }
                script.invoke_async(&mut conn).await
            })
            .await;
        match result {
            Ok(_held) => {
                let mut link = redis
                    .link
                    .lock()
                    .map_err(|_poisoned| "cache state poisoned".to_owned())?;
                // A write that failed since the rebuild began is missing from Redis: the
                // next round rebuilds again.
                if failures_before != link.failures {
                    return Err("Redis failed during the rebuild".into());
                }
                if !std::mem::replace(&mut link.ready, true) {
                    tracing::info!(vms = views.len(), "Redis cache is in use");
                }
                Ok(())
            }
            Err(err) => {
                redis.mark_down(&err);
                Err(err)
            }
        }
    }

    /// True when Redis is configured but not serving, so the caller should try a rebuild.
    pub async fn needs_rebuild(&self) -> bool {
        match &self.redis {
            Some(redis) if !redis.ready() => redis.ping().await.is_ok(),
            Some(redis) => {
                // Probe a healthy Redis too, so an outage shows in /api/health without traffic.
                if let Err(err) = redis.ping().await {
                    redis.mark_down(&err);
                }
                false
            }
            None => false,
        }
    }
}

impl RedisCache {
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, String>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: std::future::Future<Output = deadpool_redis::redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.pool.get().await.map_err(|e| e.to_string())?;
            op(conn).await.map_err(|e| e.to_string())
        };
        tokio::time::timeout(REDIS_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
    }

    async fn ping(&self) -> Result<String, String> {
        self.run(|mut conn| async move {
            deadpool_redis::redis::cmd("PING")
                .query_async(&mut conn)
                .await
        })
        .await
    }

    fn ready(&self) -> bool {
        self.link.lock().is_ok_and(|l| l.ready)
    }

    fn writing(&self) -> bool {
        self.link.lock().is_ok_and(|l| l.writing)
    }

    fn mark_down(&self, err: &str) {
        let was_ready = match self.link.lock() {
            Ok(mut link) => {
                link.writing = false;
                link.failures += 1;
                std::mem::replace(&mut link.ready, false)
            }
            Err(_) => false,
        };
        if was_ready {
            tracing::warn!(error = %err, "Redis unavailable; serving from the database until it returns");
        }
    }
}

/// Re-reads the given VMs and writes them to the cache; failures only cost freshness.
pub async fn refresh(db: &Db, cache: &StateCache, ids: &[VmId]) {
    // In slices: a whole fleet turning down at once must neither hold every row in memory
    // at once nor bind more values than a statement takes (32,766 on SQLite).
    for slice in ids.chunks(REFRESH_SLICE) {
        let views = match db.conn().await {
            Ok(mut conn) => crate::db::store::vms_by_ids(&mut conn, slice).await,
            Err(err) => Err(err),
        };
        match views {
            Ok(views) => cache.put(&views).await,
            Err(err) => tracing::warn!(error = %err, "could not refresh the state cache"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DELETED, REBUILD_SCRIPT};

    #[test]
    fn the_rebuild_script_knows_the_deleted_revision() {
        assert!(REBUILD_SCRIPT.contains(&format!("local DELETED = '{DELETED}'")));
    }
}
