//! Event subscriptions: a connection that sent `subscribe` receives every committed history entry
//! and alert after its starting position, in commit order, then each new one once it is durable.
//!
//! A subscription never slows authorizations: it reads what it sends from RocksDB, a page at a
//! time on a blocking thread, and only watches the durable id, which never waits for a reader. A
//! slow subscriber's socket fills, its task waits on the write, and it falls behind; it catches up
//! from the store when its client reads again. Nothing is buffered for it but the page in hand.
//! Positions are ids of the sequence history entries and alerts share, so a client that resumes
//! from the last id it saw (after a reconnect or a giftd restart) gets no gap and no duplicate.

use super::Shared;
use crate::model::ResultCode;
use crate::store::StoredEvent;
use crate::wire::{
    encode_reply, EventView, EventsReply, FrameCodec, Opcode, Reply, Request, EVENTS_PER_FRAME_MAX, EVENT_BYTES_MAX,
    EVENT_KIND_ALERT_BIT,
};
use bytes::BytesMut;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

/// Events read from the store per page (filtered ones included): bounds a subscriber's memory and
/// the time one read holds a blocking thread.
const EVENTS_READ_MAX: usize = 1024;

/// Which events a subscription wants.
struct Filter {
    merchant: String,
    program: String,
    kinds: u64,
}

impl Filter {
    fn wants(&self, ev: &StoredEvent) -> bool {
        let kind_bit = |bit: u64| self.kinds == 0 || self.kinds & bit != 0;
        match ev {
            StoredEvent::Txn(t, card) => {
                kind_bit(1 << (t.kind as u8))
                    && (self.merchant.is_empty() || *t.merchant == *self.merchant)
                    && (self.program.is_empty() || *card.program == *self.program)
            }
            // An alert names no program: a subscription to one program does not get alerts.
            StoredEvent::Alert(a) => {
                kind_bit(EVENT_KIND_ALERT_BIT)
                    && (self.merchant.is_empty() || *a.merchant == *self.merchant)
                    && self.program.is_empty()
            }
        }
    }
}

fn view(id: u64, ev: StoredEvent) -> EventView {
    match ev {
        StoredEvent::Txn(t, card) => EventView::Txn {
            id,
            kind: t.kind,
            last4: card.last4,
            program: card.program.to_string(),
            merchant: t.merchant.into(),
            currency: card.currency,
            amount_minor: t.amount_minor,
            balance_after_minor: t.balance_after_minor,
            at_ms: t.at_ms,
            email: match t.kind {
                crate::model::TxnKind::Issue => card.email.as_deref().unwrap_or("").to_string(),
                _ => String::new(),
            },
        },
        StoredEvent::Alert(a) => EventView::Alert {
            id,
            rule: a.rule as u8,
            last4: a.last4,
            merchant: a.merchant.into(),
            client: a.client.into(),
            currency: a.currency,
            observed: a.observed,
            threshold: a.threshold,
            suspended: a.suspended,
            at_ms: a.at_ms,
        },
    }
}

/// Serves a subscription until the client closes the connection (or sends anything more: a
/// subscription connection carries nothing else) or giftd shuts down.
pub(super) async fn serve(
    mut wr: OwnedWriteHalf,
    mut frames: FramedRead<OwnedReadHalf, FrameCodec>,
    shared: Arc<Shared>,
    request_id: u64,
    req: Request,
    shutdown: CancellationToken,
) {
    let Request::Subscribe { from, merchant, program, kinds } = req else { return };
    let filter = Filter { merchant, program, kinds };
    let opcode = Opcode::Subscribe as u8;
    // Frames stay within the configured frame limit, however small, whatever the events hold.
    let per_frame = (shared.limits.frame_bytes_max.saturating_sub(64) / EVENT_BYTES_MAX).clamp(1, EVENTS_PER_FRAME_MAX);
    shared.metrics.subscriptions_open.inc();
    let mut durable = shared.store.durable_txn_id();
    let mut after = from;
    // Where this subscription is, for the lag gauge: the last id whose events (those it wants)
    // have been written to the socket.
    let position = shared.metrics.subscription_position(from);
    let mut out = BytesMut::new();
    let mut caught_up_sent = false;
    let frame = |out: &mut BytesMut, caught_up: bool, events: Vec<EventView>| {
        let reply = Reply::Events(EventsReply { result: ResultCode::Approved, caught_up, events });
        encode_reply(out, opcode, request_id, &reply);
    };
    'serve: loop {
        let upto = *durable.borrow_and_update();
        while after < upto {
            let store = shared.store.clone();
            let Ok((events, last)) =
                tokio::task::spawn_blocking(move || store.events(after, upto, EVENTS_READ_MAX)).await
            else {
                break 'serve;
            };
            after = last;
            let mut batch = Vec::new();
            let mut wanted = 0;
            for (id, ev) in events.into_iter().filter(|(_, ev)| filter.wants(ev)) {
                wanted += 1;
                batch.push(view(id, ev));
                if batch.len() == per_frame {
                    frame(&mut out, false, std::mem::take(&mut batch));
                }
            }
            if !batch.is_empty() {
                frame(&mut out, false, batch);
            }
            if !out.is_empty() {
                caught_up_sent = false;
                if !send(&mut wr, &mut out, &shutdown).await {
                    break 'serve;
                }
                shared.metrics.subscriptions_events_sent.inc_by(wanted);
            }
            position.store(after, std::sync::atomic::Ordering::Relaxed);
        }
        if !caught_up_sent {
            frame(&mut out, true, Vec::new());
            if !send(&mut wr, &mut out, &shutdown).await {
                break;
            }
            caught_up_sent = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = durable.changed() => if changed.is_err() { break },
            // The client closed, or sent something a subscription does not take.
            _ = frames.next() => break,
        }
    }
    shared.metrics.subscriptions_open.dec();
    if !shutdown.is_cancelled() {
        let _ = wr.shutdown().await;
    }
}

/// Writes `out` and empties it; false when the client is gone or giftd shuts down first. The write
/// waits as long as the client does not read (only this task waits), but not past shutdown: a
/// subscriber that does not read must not hold the drain. It resumes from the last id it saw; a
/// frame cut short by the shutdown is one it never saw.
async fn send(wr: &mut OwnedWriteHalf, out: &mut BytesMut, shutdown: &CancellationToken) -> bool {
    let sent = tokio::select! {
        r = wr.write_all(out) => r.is_ok(),
        _ = shutdown.cancelled() => false,
    };
    out.clear();
    sent
}
