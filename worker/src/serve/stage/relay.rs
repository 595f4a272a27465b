//! The stream to the next stage: micro-batches go down it, and its answers are relayed up the
//! stream they came from; when it dies, every micro-batch still awaiting an answer is answered
//! with UNAVAILABLE, and the stream is reopened for the next micro-batch.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_proto::v1::stage_client::StageClient;
use moe_proto::v1::{ForwardRequest, ForwardResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

use super::fwd_error;

/// The open stream to the next stage, and the micro-batches awaiting its answer.
pub(super) struct Downstream {
    pub(super) tx: mpsc::Sender<ForwardRequest>,
    pub(super) pending: Arc<Mutex<HashSet<u64>>>,
    pub(super) alive: Arc<AtomicBool>,
}

impl Downstream {
    pub(super) async fn open(
        name: &str,
        client: &StageClient<Channel>,
        upstream: mpsc::Sender<Result<ForwardResponse, Status>>,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
        let mut client = client.clone();
        let opened = tokio::time::timeout(
            Duration::from_secs(5),
            client.forward(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| Status::unavailable(format!("{name}: no answer when opening the stream")))?
        .map_err(|s| Status::unavailable(format!("{name}: {}", s.message())))?;
        let mut inbound = opened.into_inner();
        let pending: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (p, a, name) = (pending.clone(), alive.clone(), name.to_string());
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(resp)) => {
                        if let Ok(mut p) = p.lock() {
                            p.remove(&resp.micro_batch_id);
                        }
                        if upstream.send(Ok(resp)).await.is_err() {
                            break "upstream closed".to_string();
                        }
                    }
                    Ok(None) => break "stream ended".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            };
            a.store(false, Ordering::SeqCst);
            let lost: Vec<u64> = p
                .lock()
                .map(|mut p| p.drain().collect())
                .unwrap_or_default();
            for id in lost {
                let status = Status::unavailable(format!("{name}: {why}"));
                let _ = upstream.send(Ok(fwd_error(id, &status))).await;
            }
        });
        Ok(Self { tx, pending, alive })
    }
}
