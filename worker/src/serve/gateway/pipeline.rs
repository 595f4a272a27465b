//! The gateway's connection to the pipeline: one bidirectional stream to the first stage that
//! carries every lane's micro-batches, answered by id; reopened after a failure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_proto::decode_f32;
use moe_proto::v1::forward_request::Input;
use moe_proto::v1::forward_response::Result as FwdResult;
use moe_proto::v1::stage_client::StageClient;
use moe_proto::v1::{ForwardRequest, ReleaseRequest, SeqSlice, TokenIds};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::engine::Step;
use crate::error::{Error, Result};
use crate::serve::{discovery, now_unix_ms};

type Reply = oneshot::Sender<Result<Vec<f32>>>;

struct Open {
    tx: mpsc::Sender<ForwardRequest>,
    /// Set by the reader task when the stream fails.
    alive: Arc<std::sync::atomic::AtomicBool>,
}

pub struct Pipeline {
    stages: Vec<(String, discovery::Peer)>,
    max_message_bytes: usize,
    open: tokio::sync::Mutex<Option<Open>>,
    waiting: Arc<Mutex<HashMap<u64, Reply>>>,
    next_id: AtomicU64,
    hidden: usize,
    /// This gateway instance's name for the sequences it owns (see `ForwardRequest.owner`).
    owner: String,
}

impl Pipeline {
    pub fn new(
        addrs: &[String],
        hidden: usize,
        max_message_bytes: usize,
        owner: String,
    ) -> Result<Self> {
        let stages = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Ok((format!("stage {i} at {a}"), discovery::Peer::new(a)?)))
            .collect::<Result<Vec<_>>>()?;
        if stages.is_empty() {
            return Err(Error::invalid(
                "stage addrs",
                "at least one stage is required",
            ));
        }
        Ok(Self {
            stages,
            max_message_bytes,
            open: tokio::sync::Mutex::new(None),
            waiting: Arc::default(),
            next_id: AtomicU64::new(1),
            hidden,
            owner,
        })
    }

    /// Each stage's name and its channel now (an error while it has no ready endpoint).
    pub fn stage_channels(&self) -> impl Iterator<Item = (&str, Result<Channel>)> {
        self.stages.iter().map(|(n, p)| (n.as_str(), p.channel()))
    }

    fn client(&self, i: usize) -> Result<StageClient<Channel>> {
        let (_, peer) = &self.stages[i];
        Ok(StageClient::new(peer.channel()?)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    async fn sender(&self) -> Result<mpsc::Sender<ForwardRequest>> {
        let mut open = self.open.lock().await;
        if let Some(o) = open.as_ref()
            && o.alive.load(Ordering::SeqCst)
        {
            return Ok(o.tx.clone());
        }
        let name = &self.stages[0].0;
        let mut client = self.client(0)?;
        let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client.forward(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| Error::peer(name.clone(), "no answer when opening the stream"))?
        .map_err(|s| Error::peer(name.clone(), s.message().to_string()))?;
        let mut inbound = resp.into_inner();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (waiting, a, name, hidden) = (
            self.waiting.clone(),
            alive.clone(),
            name.clone(),
            self.hidden,
        );
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(r)) => {
                        let reply = waiting
                            .lock()
                            .ok()
                            .and_then(|mut w| w.remove(&r.micro_batch_id));
                        let Some(reply) = reply else { continue };
                        let out = match r.result {
                            Some(FwdResult::LastHidden(t)) => {
                                let mut v = Vec::new();
                                decode_f32("last hidden", Some(&t), None, hidden, &mut v)
                                    .map(|_| v)
                                    .map_err(|e| Error::peer("last stage", e.to_string()))
                            }
                            Some(FwdResult::Error(e)) => Err(stage_error(e.code, e.message)),
                            None => Err(Error::peer("pipeline", "empty response")),
                        };
                        let _ = reply.send(out);
                    }
                    Ok(None) => break "stream ended".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            };
            a.store(false, Ordering::SeqCst);
            tracing::warn!(%why, "pipeline stream closed");
            // Whatever was in flight on this stream is lost.
            let lost: Vec<Reply> = waiting
                .lock()
                .map(|mut w| w.drain().map(|(_, r)| r).collect())
                .unwrap_or_default();
            for r in lost {
                let _ = r.send(Err(Error::peer(name.clone(), why.clone())));
            }
        });
        *open = Some(Open {
            tx: tx.clone(),
            alive,
        });
        Ok(tx)
    }

    /// Runs one step through every stage; returns the last hidden row of each sequence
    /// (`step.seqs.len() × hidden`).
    pub async fn forward(
        &self,
        step: &Step,
        timeout: Duration,
        trace_context: HashMap<String, String>,
    ) -> Result<Vec<f32>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = ForwardRequest {
            micro_batch_id: id,
            seqs: step
                .seqs
                .iter()
                .zip(&step.chunks)
                .zip(&step.capacities)
                .map(|((s, c), &cap)| SeqSlice {
                    seq_id: s.0,
                    start: c.start as u32,
                    len: c.len as u32,
                    capacity: cap as u32,
                })
                .collect(),
            input: Some(Input::Tokens(TokenIds {
                ids: step.ids.clone(),
            })),
            deadline_unix_ms: now_unix_ms() + timeout.as_millis() as u64,
            trace_context,
            owner: self.owner.clone(),
        };
        let (reply, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id, reply);
        }
        let sent = match self.sender().await {
            Ok(tx) => tx
                .send(req)
                .await
                .map_err(|_| Error::peer(self.stages[0].0.clone(), "stream closed")),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            if let Ok(mut w) = self.waiting.lock() {
                w.remove(&id);
            }
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::peer("pipeline", "stream closed")),
            Err(_) => {
                if let Ok(mut w) = self.waiting.lock() {
                    w.remove(&id);
                }
                Err(Error::Deadline(format!(
                    "the pipeline did not answer within {timeout:?}"
                )))
            }
        }
    }

    /// This gateway's owner name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Frees the sequences' KV caches on every stage (best effort: a stage that restarted
    /// holds none).
    pub async fn release(&self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let calls = self.stages.iter().enumerate().map(|(i, (name, _))| {
            let client = self.client(i);
            let mut req = Request::new(ReleaseRequest {
                seq_ids: ids.to_vec(),
                owner: self.owner.clone(),
            });
            req.set_timeout(Duration::from_secs(2));
            async move {
                let Ok(mut c) = client else {
                    tracing::debug!(%name, "release skipped: no endpoint");
                    return;
                };
                match tokio::time::timeout(Duration::from_secs(2), c.release(req)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(s)) => tracing::debug!(%name, error = %s, "release failed"),
                    Err(_) => tracing::debug!(%name, "release timed out"),
                }
            }
        });
        futures::future::join_all(calls).await;
    }
}

/// What a stage's refusal means for the request. The gateway checked the request before it
/// sent anything, so no stage error is the client's fault: capacity is retryable (503), a lost
/// KV cache (a stage restarted or evicted it) fails the request with advice to retry (503), and
/// a refusal of what this gateway sent is an internal error (500).
fn stage_error(code: i32, message: String) -> Error {
    match Code::from_i32(code) {
        Code::DeadlineExceeded => Error::Deadline(message),
        Code::ResourceExhausted => Error::Overloaded(message),
        Code::FailedPrecondition | Code::Aborted => Error::peer(
            "pipeline",
            format!("{message}; the request's state on the pipeline was lost, retry it"),
        ),
        Code::InvalidArgument | Code::Internal | Code::Unimplemented | Code::PermissionDenied => {
            Error::Internal(message)
        }
        _ => Error::peer("pipeline", message),
    }
}

/// A name for this gateway instance that no other gateway shares: its host (the pod's name
/// in Kubernetes), its process id and 64 random bits, so a restarted process on the same host
/// never inherits the old one's sequences.
pub fn instance_name() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into());
    let host: String = host.chars().take(128).collect();
    format!(
        "{host}/{}/{:016x}",
        std::process::id(),
        crate::serve::random_u64()
    )
}
