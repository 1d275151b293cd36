//! Live push: which VMs changed, told to every open dashboard of every replica.
//!
//! A change this process makes is broadcast in process at once and, when Redis is configured,
//! published on a channel every replica subscribes to, so a page served by another replica
//! hears of it too. Messages name VM ids only: a page then reads the state through its usual,
//! authorised route, so nothing travels on the channel that a viewer could not already read.

use domain::VmId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

/// The Redis channel every replica publishes on and subscribes to.
pub const CHANNEL: &str = "vmhc:live";
/// Past this many ids a change is sent as "everything changed": the page reloads the fleet
/// either way, and a message stays small.
const MAX_IDS: usize = 200;
/// Changes queued for Redis before the publisher merges the rest into one "everything".
const OUTBOX: usize = 1_024;
/// Open event streams one process serves at once; more are refused (the page polls).
pub const MAX_STREAMS: usize = 1_000;

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Vms(BTreeSet<VmId>),
    All,
}

impl Change {
    /// Both changes as one.
    pub fn merge(self, other: Change) -> Change {
        match (self, other) {
            (Change::Vms(mut a), Change::Vms(b)) => {
                a.extend(b);
                if a.len() > MAX_IDS {
                    Change::All
                } else {
                    Change::Vms(a)
                }
            }
            _ => Change::All,
        }
    }

    /// The wire form shared by Redis messages and server-sent events: `*` or `1,2,3`.
    pub fn encode(&self) -> String {
        match self {
            Change::All => "*".into(),
            Change::Vms(ids) => ids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The wire form back; anything malformed or oversized reads as "everything", which
    /// only costs a reload.
    pub fn decode(text: &str) -> Change {
        // 200 ids of up to 19 digits and their commas; more is not ours.
        if text == "*" || text.len() > MAX_IDS * 20 {
            return Change::All;
        }
        let ids: Option<BTreeSet<VmId>> = text
            .split(',')
            .map(|part| part.parse::<VmId>().ok())
            .collect();
        match ids {
            Some(ids) if !ids.is_empty() && ids.len() <= MAX_IDS => Change::Vms(ids),
            _ => Change::All,
        }
    }
}

/// Whether changes from other replicas reach this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fanout {
    /// One process: every change is made here.
    InProcess,
    /// Subscribed to Redis.
    Redis,
    /// Redis is configured but the subscription is down: pages must poll.
    RedisDown,
}

/// The change bus of one process.
pub struct LiveBus {
    local: broadcast::Sender<Change>,
    outbox: Option<mpsc::Sender<Change>>,
    fanout: watch::Sender<Fanout>,
    closed: watch::Sender<bool>,
    streams: Arc<AtomicUsize>,
    /// Set when the outbox was full: the publisher then sends "everything".
    overflowed: Arc<AtomicBool>,
}

/// One open stream; counted until dropped.
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a Redis fan-out needs: the receiving end of the outbox, and who this process is.
pub struct RedisLink {
    url: String,
    outbox: mpsc::Receiver<Change>,
    overflowed: Arc<AtomicBool>,
    /// Random per process, so a replica skips its own messages (it told its pages already).
    origin: String,
}

impl LiveBus {
    /// The bus, and the Redis side to run with [`run_fanout`] when `redis_url` is set.
    pub fn new(redis_url: Option<&str>) -> (Arc<Self>, Option<RedisLink>) {
        let (local, _) = broadcast::channel(256);
        let (closed, _) = watch::channel(false);
        match redis_url {
            None => {
                let (fanout, _) = watch::channel(Fanout::InProcess);
                let bus = Self {
                    local,
                    outbox: None,
                    fanout,
                    closed,
                    streams: Arc::default(),
                    overflowed: Arc::default(),
                };
                (Arc::new(bus), None)
            }
            Some(url) => {
                let (fanout, _) = watch::channel(Fanout::RedisDown);
                let (tx, rx) = mpsc::channel(OUTBOX);
                let overflowed = Arc::new(AtomicBool::new(false));
                let bus = Self {
                    local,
                    outbox: Some(tx),
                    fanout,
                    closed,
                    streams: Arc::default(),
                    overflowed: overflowed.clone(),
                };
                let link = RedisLink {
                    url: url.to_owned(),
                    outbox: rx,
                    overflowed,
                    origin: format!("{:016x}", rand::random::<u64>()),
                };
                (Arc::new(bus), Some(link))
            }
        }
    }

    /// Tells this process's pages at once, and the other replicas' through Redis. Never waits.
    pub fn publish(&self, change: Change) {
        // No receiver is not an error: nobody has a page open.
        let _ = self.local.send(change.clone());
        if let Some(outbox) = &self.outbox
            && let Err(mpsc::error::TrySendError::Full(_)) = outbox.try_send(change)
        {
            // The publisher is behind: it sends "everything" next, so this one is not lost.
            self.overflowed.store(true, Ordering::Release);
        }
    }

    /// The given VMs changed.
    pub fn vms_changed(&self, ids: impl IntoIterator<Item = VmId>) {
        let ids: BTreeSet<VmId> = ids.into_iter().collect();
        if ids.is_empty() {
            return;
        }
        let change = if ids.len() > MAX_IDS {
            Change::All
        } else {
            Change::Vms(ids)
        };
        self.publish(change);
    }

    /// A slot for one more open stream, or `None` at [`MAX_STREAMS`].
    pub fn open_stream(&self) -> Option<StreamSlot> {
        let taken = self.streams.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot(self.streams.clone());
        (taken < MAX_STREAMS).then_some(slot)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.local.subscribe()
    }

    pub fn fanout(&self) -> watch::Receiver<Fanout> {
        self.fanout.subscribe()
    }

    /// Ends every open stream, so a graceful shutdown does not wait for pages to close.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }
}

/// Publishes this process's changes to Redis and passes other replicas' on to local pages;
/// reconnects after any failure, and marks the fan-out down meanwhile.
pub async fn run_fanout(bus: Arc<LiveBus>, link: RedisLink) {
    let RedisLink {
        url,
        mut outbox,
        overflowed,
        origin,
    } = link;
    let publisher = {
        let url = url.clone();
        let origin = origin.clone();
        tokio::spawn(async move { publish_loop(&url, &origin, &mut outbox, &overflowed).await })
    };
    let _stop_publisher = AbortOnDrop(publisher);
    let mut pause = Duration::from_millis(250);
    let mut ever_up = false;
    loop {
        match subscribe_loop(&bus, &url, &origin).await {
            Ok(()) => pause = Duration::from_millis(250),
            Err(err) => {
                let was_up = bus.fanout.send_replace(Fanout::RedisDown) == Fanout::Redis;
                ever_up |= was_up;
                // Said once when it goes down, and once at start when it never came up (a
                // wrong REDIS_URL, or no SUBSCRIBE permission).
                if was_up || (!ever_up && pause == Duration::from_millis(250)) {
                    tracing::warn!(error = %err, "live push from other replicas is down; pages fall back to polling");
                }
            }
        }
        bus.fanout.send_replace(Fanout::RedisDown);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// One subscription, until it fails.
async fn subscribe_loop(bus: &LiveBus, url: &str, origin: &str) -> Result<(), String> {
    use futures_util::StreamExt;
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|elapsed| format!("connecting: {elapsed}"))?
        .map_err(|e| e.to_string())?;
    pubsub.subscribe(CHANNEL).await.map_err(|e| e.to_string())?;
    if bus.fanout.send_replace(Fanout::Redis) != Fanout::Redis {
        tracing::info!("live push is shared with other replicas through Redis");
    }
    // Whatever other replicas changed while we were not listening.
    let _ = bus.local.send(Change::All);
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let Ok(payload) = message.get_payload::<String>() else {
            continue;
        };
        let Some((from, change)) = payload.split_once('|') else {
            continue;
        };
        if from != origin {
            let _ = bus.local.send(Change::decode(change));
        }
    }
    Err("the subscription ended".into())
}

/// Sends queued changes, merged, one PUBLISH at a time; a failed one is retried once the
/// connection is back (as "everything", which is what a replica assumes after a gap anyway).
async fn publish_loop(
    url: &str,
    origin: &str,
    outbox: &mut mpsc::Receiver<Change>,
    overflowed: &AtomicBool,
) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut pending: Option<Change> = None;
    loop {
        if pending.is_none() {
            match outbox.recv().await {
                Some(change) => pending = Some(change),
                None => return,
            }
        }
        while let Ok(more) = outbox.try_recv() {
            pending = pending.map(|p| p.merge(more));
        }
        if overflowed.swap(false, Ordering::AcqRel) {
            pending = Some(Change::All);
        }
        let Some(change) = pending.clone() else {
            continue;
        };
        if conn.is_none() {
            conn = connect(url).await;
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            pending = Some(Change::All);
            continue;
        };
        let message = format!("{origin}|{}", change.encode());
        let sent: Result<Result<i64, _>, _> = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(message)
                .query_async(c),
        )
        .await;
        match sent {
            Ok(Ok(_)) => pending = None,
            _ => {
                conn = None;
                pending = Some(Change::All);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn connect(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).ok()?;
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn ids(list: &[i64]) -> Change {
        Change::Vms(list.iter().copied().map(VmId).collect())
    }

    #[test]
    fn changes_travel_as_text_and_back() {
        assert_eq!(ids(&[3, 1, 2]).encode(), "1,2,3");
        assert_eq!(Change::decode("1,2,3"), ids(&[1, 2, 3]));
        assert_eq!(Change::decode("*"), Change::All);
        // Malformed or empty messages cost a reload, never a missed change.
        assert_eq!(
            Change::decode(&"12345,".repeat(1_000)),
            Change::All,
            "oversized"
        );
        for bad in ["", "1,,2", "x", "1;2", "1,2,", "0", "-4"] {
            assert_eq!(Change::decode(bad), Change::All, "{bad:?}");
        }
    }

    #[test]
    fn merging_past_the_limit_becomes_everything() {
        assert_eq!(ids(&[1]).merge(ids(&[2])), ids(&[1, 2]));
        assert_eq!(ids(&[1]).merge(Change::All), Change::All);
        let many: Vec<i64> = (1..=i64::try_from(MAX_IDS).unwrap() + 1).collect();
        assert_eq!(ids(&many[..1]).merge(ids(&many[1..])), Change::All);
    }

    #[test]
    fn open_streams_are_capped_and_released() {
        let (bus, _) = LiveBus::new(None);
        let slots: Vec<StreamSlot> = (0..MAX_STREAMS)
            .map(|_| bus.open_stream().unwrap())
            .collect();
        assert!(bus.open_stream().is_none(), "one over the cap is refused");
        drop(slots);
        assert!(
            bus.open_stream().is_some(),
            "closed streams give their slots back"
        );
    }

    #[tokio::test]
    async fn a_change_reaches_local_subscribers_without_redis() {
        let (bus, link) = LiveBus::new(None);
        assert!(link.is_none());
        assert_eq!(*bus.fanout().borrow(), Fanout::InProcess);
        let mut rx = bus.subscribe();
        bus.vms_changed([VmId(7)]);
        assert_eq!(rx.recv().await.unwrap(), ids(&[7]));
        bus.vms_changed([]);
        assert!(rx.try_recv().is_err(), "an empty change is not sent");
    }
}
