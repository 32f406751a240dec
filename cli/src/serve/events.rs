//! Server-sent events: state changes under the state root (whoever made them: the API, a
//! terminal, a TTL expiry) and the progress of the API's long operations.
//!
//! One watcher task per server looks at the state root (every [`TICK`], or at once when the
//! API finished an operation) and publishes what changed; every `/api/events` client gets the
//! same stream. Pages never poll.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, Notify};

use super::Shared;
use crate::workspace::Workspace;

/// How often the watcher looks at the state root when nothing nudges it.
const TICK: Duration = Duration::from_millis(500);
/// Events a slow client may fall behind by before it is told to resync.
const BACKLOG: usize = 1024;

/// One published event: its SSE name and JSON data.
#[derive(Clone, Debug)]
pub struct Published {
    pub name: &'static str,
    pub data: Arc<String>,
}

#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Published>,
    ops: Arc<AtomicU64>,
    nudge: Arc<Notify>,
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        Self {
            tx,
            ops: Arc::new(AtomicU64::new(1)),
            nudge: Arc::new(Notify::new()),
        }
    }

    pub fn publish(&self, name: &'static str, data: Value) {
        // No subscriber is not an error: nobody is watching.
        let _ = self.tx.send(Published {
            name,
            data: Arc::new(data.to_string()),
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.tx.subscribe()
    }

    pub fn next_op_id(&self) -> u64 {
        self.ops.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the watcher to look now.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }
}

/// What the watcher compares between looks: per workspace, its state and its snapshots.
#[derive(Clone, PartialEq, Debug)]
struct WsView {
    state: &'static str,
    /// (tag, note, kind, parent) in creation order: a rename or note edit changes it too.
    snapshots: Vec<(String, Option<String>, String, Option<String>)>,
}

fn look(root: &std::path::Path) -> BTreeMap<String, WsView> {
    Workspace::all(root)
        .into_iter()
        .map(|ws| {
            let snapshots = snapshot::list(&ws.snapshots_dir())
                .into_iter()
                .map(|s| {
                    let m = s.manifest;
                    (
                        m.tag,
                        m.note,
                        format!("{:?}", m.kind).to_lowercase(),
                        m.parent,
                    )
                })
                .collect();
            let view = WsView {
                state: ws.state().as_str(),
                snapshots,
            };
            (ws.config.name, view)
        })
        .collect()
}

/// Publishes one event per change between two looks.
fn diff(hub: &Hub, before: &BTreeMap<String, WsView>, after: &BTreeMap<String, WsView>) {
    for (name, v) in after {
        let old = before.get(name);
        if old.map(|o| o.state) != Some(v.state) {
            hub.publish(
                "workspace",
                json!({"name": name, "state": v.state, "previous": old.map(|o| o.state)}),
            );
        }
        if old.map(|o| &o.snapshots) != Some(&v.snapshots) {
            hub.publish(
                "snapshots",
                json!({"workspace": name, "count": v.snapshots.len()}),
            );
        }
    }
    for (name, old) in before {
        if !after.contains_key(name) {
            hub.publish(
                "workspace",
                json!({"name": name, "state": null, "previous": old.state, "removed": true}),
            );
        }
    }
}

pub fn spawn_watcher(state: Shared) {
    tokio::spawn(async move {
        let root = state.root.clone();
        let mut seen = {
            let r = root.clone();
            tokio::task::spawn_blocking(move || look(&r))
                .await
                .unwrap_or_default()
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = state.hub.nudge.notified() => {}
            }
            let r = root.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || look(&r)).await else {
                continue;
            };
            diff(&state.hub, &seen, &now);
            seen = now;
        }
    });
}

/// An SSE response fed by a channel: the producer task stops when the client goes away (its
/// sends fail).
pub fn sse_from(rx: mpsc::Receiver<Event>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The `/api/events` stream for one client: a `hello`, then every published event.
pub fn client_stream(state: &Shared) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(64);
    let mut sub = state.hub.subscribe();
    tokio::spawn(async move {
        if tx
            .send(Event::default().event("hello").data("{}"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let ev = match sub.recv().await {
                Ok(p) => Event::default().event(p.name).data(p.data.as_str()),
                // Fell behind: the client reloads what it shows instead of missing changes.
                Err(broadcast::error::RecvError::Lagged(n)) => Event::default()
                    .event("resync")
                    .data(json!({"missed": n}).to_string()),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    sse_from(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(state: &'static str, tags: &[&str]) -> WsView {
        WsView {
            state,
            snapshots: tags
                .iter()
                .map(|t| (t.to_string(), None, "full".into(), None))
                .collect(),
        }
    }

    #[test]
    fn changes_become_events() {
        let hub = Hub::new();
        let mut rx = hub.subscribe();
        let a = BTreeMap::from([("w".to_string(), view("stopped", &[]))]);
        let b = BTreeMap::from([
            ("w".to_string(), view("running", &["s"])),
            ("x".to_string(), view("stopped", &[])),
        ]);
        diff(&hub, &a, &b);
        diff(&hub, &b, &BTreeMap::new());
        let names: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| (p.name, p.data.to_string()))
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(names[0].1.contains(r#""state":"running""#), "{names:?}");
        assert_eq!(names[1].0, "snapshots");
        assert!(names.iter().any(|(_, d)| d.contains(r#""removed":true"#)));
    }
}
