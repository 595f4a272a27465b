//! `moe_proto::compute` over real HTTP/2 on loopback, against tonic's generated client and
//! server for the same RPC: the two must be interchangeable on the wire, in both directions,
//! for tensors of one frame and of many, for errors, limits and deadlines.

use std::sync::Arc;
use std::time::Duration;

use moe_proto::compute::{ComputeClient, ComputeHandler, ComputeServer};
use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::expert_server::{Expert, ExpertServer};
use moe_proto::v1::{
    DescribeRequest, ExpertRequest, ExpertResponse, ExpertRows, LoadStatsRequest,
    LoadStatsResponse, ShardInfo, Tensor,
};
use moe_proto::wire::ComputeRequest;
use moe_proto::{decode_f32, encode_f32};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

const LIMIT: usize = 8 << 20;

/// Doubles its input; layer 99 is refused, layer 98 takes 2 s, and the metadata key
/// `x-echo` comes back as the output's first element.
struct Doubler;

fn doubled(layer: u32, x: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor, Status> {
    if layer == 99 {
        return Err(Status::invalid_argument("layer 99 is not owned here"));
    }
    let y: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    Ok(encode_f32(&y, &[rows, cols]))
}

fn shape(experts: &[ExpertRows], t: Option<&Tensor>) -> (usize, usize) {
    let rows = experts.iter().map(|e| e.rows as usize).sum();
    let cols = t.and_then(|t| t.shape.get(1)).copied().unwrap_or(0) as usize;
    (rows, cols)
}

#[tonic::async_trait]
impl Expert for Doubler {
    async fn compute(&self, r: Request<ExpertRequest>) -> Result<Response<ExpertResponse>, Status> {
        let req = r.into_inner();
        if req.layer == 98 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let (rows, cols) = shape(&req.experts, req.input.as_ref());
        let mut x = Vec::new();
        decode_f32("input", req.input.as_ref(), Some(rows), cols, &mut x)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let output = doubled(req.layer, x, rows, cols)?;
        Ok(Response::new(ExpertResponse {
            output: Some(output),
        }))
    }
    async fn describe(&self, _: Request<DescribeRequest>) -> Result<Response<ShardInfo>, Status> {
        Ok(Response::new(ShardInfo {
            index: 7,
            ..Default::default()
        }))
    }
    async fn load_stats(
        &self,
        _: Request<LoadStatsRequest>,
    ) -> Result<Response<LoadStatsResponse>, Status> {
        Ok(Response::new(LoadStatsResponse::default()))
    }
}

#[tonic::async_trait]
impl ComputeHandler for Doubler {
    async fn compute(&self, req: ComputeRequest, md: MetadataMap) -> Result<Tensor, Status> {
        if req.layer == 98 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let cols = req.input.as_ref().and_then(|t| t.shape.get(1)).copied();
        let rows = req.experts.iter().map(|e| e.rows as usize).sum();
        let cols = cols.unwrap_or(0) as usize;
        let mut x = req
            .input_f32(rows, cols)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(v) = md.get("x-echo").and_then(|v| v.to_str().ok())
            && let (Ok(v), Some(first)) = (v.parse::<f32>(), x.first_mut())
        {
            *first = v / 2.0;
        }
        doubled(req.layer, x, rows, cols)
    }
}

/// Serves `svc` on a loopback port; returns a channel to it.
async fn serve<S>(svc: S) -> Channel
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn generated() -> ExpertServer<Doubler> {
    ExpertServer::new(Doubler)
        .max_decoding_message_size(LIMIT)
        .max_encoding_message_size(LIMIT)
}

async fn ours() -> Channel {
    serve(ComputeServer::new(Arc::new(Doubler), generated(), LIMIT)).await
}

fn input(rows: usize, cols: usize) -> (Vec<f32>, Tensor) {
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| (i % 1013) as f32 - 500.0)
        .collect();
    let t = encode_f32(&x, &[rows, cols]);
    (x, t)
}

fn rows(n: u32) -> Vec<ExpertRows> {
    vec![
        ExpertRows {
            expert: 0,
            rows: n / 2,
        },
        ExpertRows {
            expert: 3,
            rows: n - n / 2,
        },
    ]
}

fn twice(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v * 2.0).collect()
}

#[tokio::test]
async fn our_client_and_server_interoperate_with_generated_code() {
    let (ours_ch, generated_ch) = (ours().await, serve(generated()).await);
    // One frame, and many (HTTP/2 frames are at most 16 KiB by default: 5 MiB is hundreds).
    for (n, cols) in [(3usize, 4usize), (1280, 1024)] {
        let (x, t) = input(n, cols);
        for ch in [&ours_ch, &generated_ch] {
            let mut c = ComputeClient::new(ch.clone(), LIMIT);
            let out = c
                .compute(MetadataMap::new(), None, 1, &rows(n as u32), t.clone())
                .await
                .expect("compute");
            assert_eq!(out.to_f32("out", Some(n), cols).expect("f32"), twice(&x));
        }
        let mut g = ExpertClient::new(ours_ch.clone())
            .max_decoding_message_size(LIMIT)
            .max_encoding_message_size(LIMIT);
        let r = g
            .compute(ExpertRequest {
                layer: 1,
                experts: rows(n as u32),
                input: Some(t),
            })
            .await
            .expect("generated client");
        let mut got = Vec::new();
        decode_f32("out", r.get_ref().output.as_ref(), Some(n), cols, &mut got).expect("decode");
        assert_eq!(got, twice(&x));
    }
    // The other methods still reach the generated server behind ours.
    let info = ExpertClient::new(ours_ch.clone())
        .describe(DescribeRequest {})
        .await
        .expect("describe");
    assert_eq!(info.get_ref().index, 7);
    // Metadata reaches the handler.
    let mut md = MetadataMap::new();
    md.insert("x-echo", "42".parse().expect("value"));
    let (_, t) = input(2, 4);
    let out = ComputeClient::new(ours_ch, LIMIT)
        .compute(md, None, 1, &rows(2), t)
        .await
        .expect("compute");
    assert_eq!(out.to_f32("out", None, 4).expect("f32")[0], 42.0);
}

#[tokio::test]
async fn errors_limits_and_deadlines_come_back_as_statuses() {
    let (ours_ch, generated_ch) = (ours().await, serve(generated()).await);
    for ch in [&ours_ch, &generated_ch] {
        let mut c = ComputeClient::new(ch.clone(), LIMIT);
        // The handler's error, with its code and message.
        let (_, t) = input(4, 4);
        let e = c
            .compute(MetadataMap::new(), None, 99, &rows(4), t.clone())
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("layer 99"), "{}", e.message());
        // A tensor that does not match its rows.
        let e = c
            .compute(MetadataMap::new(), None, 1, &rows(5), t.clone())
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("shape"), "{}", e.message());
        // The deadline travels: the server gives up, and says so.
        let e = c
            .compute(
                MetadataMap::new(),
                Some(Duration::from_millis(100)),
                98,
                &rows(4),
                t.clone(),
            )
            .await
            .expect_err("deadline");
        assert_eq!(e.code(), Code::Cancelled, "{e:?}");
        // A response larger than this client accepts.
        let mut small = ComputeClient::new(ch.clone(), 32);
        let e = small
            .compute(MetadataMap::new(), None, 1, &rows(4), t)
            .await
            .expect_err("too large");
        assert!(e.message().contains("limit"), "{e:?}");
    }
    // A request larger than our server accepts: refused, and it keeps serving.
    let (_, big) = input(LIMIT / 4096 + 1, 1024);
    let mut c = ComputeClient::new(ours_ch, 2 * LIMIT);
    let e = c
        .compute(
            MetadataMap::new(),
            None,
            1,
            &rows((LIMIT / 4096 + 1) as u32),
            big,
        )
        .await
        .expect_err("too large");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("exceeds the limit"), "{e:?}");
    let (x, t) = input(4, 4);
    let out = c
        .compute(MetadataMap::new(), None, 1, &rows(4), t)
        .await
        .expect("still serving");
    assert_eq!(out.to_f32("out", None, 4).expect("f32"), twice(&x));
}
