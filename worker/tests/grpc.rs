//! The gRPC roles against bad input: `INVALID_ARGUMENT` (or another clean error) with a
//! message, never a crash; plus the standard health service and the control calls.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::forward_request::Input;
use moe_proto::v1::forward_response::Result as FwdResult;
use moe_proto::v1::stage_client::StageClient;
use moe_proto::v1::{
    DescribeRequest, ExpertRequest, ExpertRows, ForwardRequest, LoadStatsRequest, ReleaseRequest,
    SeqSlice, TokenIds,
};
use moe_proto::{decode_f32, encode_f32};
use moe_worker::model::{Model, MoeScratch};
use moe_worker::synthetic::{self, Synthetic};
use moe_worker::weights::ShardSpec;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_moe-worker");

/// A role process; killed when dropped (and it exits itself when its stdin closes).
struct Proc(Child, String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> Proc {
    start_on(args, "127.0.0.1:0")
}

fn start_on(args: &[&str], listen: &str) -> Proc {
    let mut child = Command::new(BIN)
        .args(["--threads", "1"])
        .args(args)
        .args(["--listen", listen, "--exit-with-stdin"])
        .args(if args.contains(&"--tls-dir") {
            &[][..]
        } else {
            &["--plaintext"][..]
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let addr = line
        .rsplit_once("listening on ")
        .expect("listening line")
        .1
        .trim()
        .to_string();
    Proc(child, format!("http://{addr}"))
}

/// A client of the stage at `url`, once it accepts connections.
async fn stage_client(url: &str) -> StageClient<tonic::transport::Channel> {
    loop {
        match StageClient::connect(url.to_string()).await {
            Ok(c) => return c,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// A stage over the whole tiny model computing its own experts, with `extra` flags.
fn tiny_stage(extra: &[&str]) -> Proc {
    let args = [
        &["stage", "--model", "synthetic:tiny", "--layers", "0..4"][..],
        extra,
    ]
    .concat();
    start(&args)
}

/// The standard `grpc.health.v1` service at `url` reports SERVING, over plaintext.
async fn assert_serving(url: &str) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    );
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

fn rows(experts: &[(u32, u32)]) -> Vec<ExpertRows> {
    experts
        .iter()
        .map(|&(expert, rows)| ExpertRows { expert, rows })
        .collect()
}

#[tokio::test]
async fn expert_shard_rejects_bad_input_and_keeps_serving() {
    let p = start(&[
        "expert",
        "--model",
        "synthetic:tiny",
        "--layers",
        "0..2",
        "--experts",
        "0,1",
        "--max-message-bytes",
        "65536",
    ]);
    let mut c = loop {
        match ExpertClient::connect(p.1.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    };
    let info = c
        .describe(DescribeRequest {})
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(
        (info.layer_start, info.layer_end, info.experts.clone()),
        (0, 2, vec![0, 1])
    );
    let h = info.hidden_size as usize;

    // A valid call equals the same experts computed in this process.
    let x: Vec<f32> = (0..3 * h)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let ok = ExpertRequest {
        layer: 1,
        experts: rows(&[(0, 2), (1, 1)]),
        input: Some(encode_f32(&x, &[3, h])),
    };
    let out = c.compute(ok.clone()).await.expect("compute").into_inner();
    let mut got = Vec::new();
    decode_f32("out", out.output.as_ref(), Some(3), h, &mut got).expect("decode");
    let cfg = synthetic::preset("tiny").expect("tiny").config;
    let src = Synthetic::new(cfg, 0);
    let local = Model::load(&src, ShardSpec::experts(0..2, [0, 1]), &mut |_| {}).expect("load");
    let mut want = Vec::new();
    local
        .expert_ffn(
            1,
            &[(0, 2), (1, 1)],
            &x,
            &mut want,
            &mut MoeScratch::default(),
        )
        .expect("local");
    assert_eq!(got, want);

    let bad = |f: &dyn Fn(&mut ExpertRequest)| {
        let mut r = ok.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(ExpertRequest, &str)> = vec![
        (bad(&|r| r.layer = 3), "layer 3"),
        (bad(&|r| r.experts = rows(&[(0, 2), (5, 1)])), "expert 5"),
        (bad(&|r| r.experts = rows(&[(1, 1), (0, 2)])), "ascending"),
        (bad(&|r| r.experts = rows(&[(0, 2), (1, 0)])), "zero rows"),
        (bad(&|r| r.experts = rows(&[(0, 1), (1, 1)])), "shape"),
        (bad(&|r| r.input.as_mut().expect("t").dtype = 9), "dtype"),
        (
            bad(&|r| r.input.as_mut().expect("t").shape = vec![3, h as u64 + 1]),
            "shape",
        ),
        (
            bad(&|r| {
                let t = r.input.as_mut().expect("t");
                t.data = t.data.slice(..10);
            }),
            "bytes",
        ),
        (bad(&|r| r.input = None), "missing"),
        (
            bad(&|r| r.experts = rows(&[(0, u32::MAX), (1, u32::MAX)])),
            "rows exceed",
        ),
    ];
    for (req, needle) in cases {
        let e = c.compute(req).await.expect_err("bad input accepted");
        assert_eq!(e.code(), Code::InvalidArgument, "{needle}: {e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    // Larger than the message limit: refused, and the shard lives on.
    let big: Vec<f32> = vec![0.5; 300 * h];
    let e = c
        .compute(ExpertRequest {
            layer: 0,
            experts: rows(&[(0, 300)]),
            input: Some(encode_f32(&big, &[300, h])),
        })
        .await
        .expect_err("oversized message accepted");
    assert_ne!(e.code(), Code::Ok);
    assert!(c.compute(ok).await.is_ok(), "the shard must keep serving");

    // The standard health service.
    assert_serving(&p.1).await;
    let stats = c
        .load_stats(LoadStatsRequest { reset: false })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.batches, 2);
}

#[tokio::test]
async fn stage_answers_bad_micro_batches_with_errors_on_the_stream() {
    // The whole tiny model as one stage computing its own experts.
    let p = tiny_stage(&[]);
    let mut c = stage_client(&p.1).await;
    let h = c
        .describe(DescribeRequest {})
        .await
        .expect("describe")
        .into_inner()
        .hidden_size as usize;
    let seq = |id, start, len| SeqSlice {
        seq_id: id,
        start,
        len,
        capacity: 16,
    };
    let tokens = |ids: Vec<u32>| Some(Input::Tokens(TokenIds { ids }));
    let reqs = vec![
        // 1: hidden states sent to the first stage.
        ForwardRequest {
            micro_batch_id: 1,
            seqs: vec![seq(7, 0, 2)],
            input: Some(Input::Hidden(encode_f32(&vec![0.0; 2 * h], &[2, h]))),
            owner: "gateway-a".into(),
            ..Default::default()
        },
        // 2: a continuation of a sequence the stage never saw.
        ForwardRequest {
            micro_batch_id: 2,
            seqs: vec![seq(8, 5, 1)],
            input: tokens(vec![3]),
            owner: "gateway-a".into(),
            ..Default::default()
        },
        // 3: token count disagrees with the slices.
        ForwardRequest {
            micro_batch_id: 3,
            seqs: vec![seq(9, 0, 3)],
            input: tokens(vec![3]),
            owner: "gateway-a".into(),
            ..Default::default()
        },
        // 4: a token outside the vocabulary.
        ForwardRequest {
            micro_batch_id: 4,
            seqs: vec![seq(10, 0, 1)],
            input: tokens(vec![u32::MAX]),
            owner: "gateway-a".into(),
            ..Default::default()
        },
        // 5: past its deadline.
        ForwardRequest {
            micro_batch_id: 5,
            seqs: vec![seq(11, 0, 1)],
            input: tokens(vec![3]),
            deadline_unix_ms: 1,
            owner: "gateway-a".into(),
            ..Default::default()
        },
        // 7: no owner.
        ForwardRequest {
            micro_batch_id: 7,
            seqs: vec![seq(13, 0, 1)],
            input: tokens(vec![3]),
            ..Default::default()
        },
        // 8: past the model's context (positions are checked before any allocation).
        ForwardRequest {
            micro_batch_id: 8,
            seqs: vec![seq(14, u32::MAX - 1, 1)],
            input: tokens(vec![3]),
            owner: "gateway-a".into(),
            ..Default::default()
        },
        // 6: fine.
        ForwardRequest {
            micro_batch_id: 6,
            seqs: vec![seq(12, 0, 2)],
            input: tokens(vec![3, 4]),
            owner: "gateway-a".into(),
            ..Default::default()
        },
    ];
    let want = [
        (1, Code::InvalidArgument, "token ids"),
        (2, Code::FailedPrecondition, "no KV cache"),
        (3, Code::InvalidArgument, "1 token ids for 3 rows"),
        (4, Code::InvalidArgument, "vocabulary"),
        (5, Code::DeadlineExceeded, "deadline"),
        (7, Code::InvalidArgument, "owner"),
        (8, Code::InvalidArgument, "context"),
    ];
    let mut stream = c
        .forward(tokio_stream::iter(reqs))
        .await
        .expect("open")
        .into_inner();
    let mut answers = std::collections::HashMap::new();
    while answers.len() < 8 {
        let r = stream.message().await.expect("stream").expect("response");
        answers.insert(r.micro_batch_id, r.result.expect("result"));
    }
    for (id, code, needle) in want {
        match &answers[&id] {
            FwdResult::Error(e) => {
                assert_eq!(e.code, code as i32, "micro-batch {id}: {}", e.message);
                assert!(
                    e.message.contains(needle),
                    "micro-batch {id}: {}",
                    e.message
                );
            }
            other => panic!("micro-batch {id} succeeded: {other:?}"),
        }
    }
    match &answers[&6] {
        FwdResult::LastHidden(t) => assert_eq!(t.shape, vec![1, h as u64]),
        other => panic!("{other:?}"),
    }
    let stats = c
        .load_stats(LoadStatsRequest { reset: false })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.active_sequences, 1);
    assert!(
        stats.experts.iter().map(|e| e.tokens).sum::<u64>() >= 2 * 4 * 2,
        "{stats:?}"
    );
    let r = c
        .release(ReleaseRequest {
            seq_ids: vec![12, 99],
            owner: "gateway-a".into(),
        })
        .await
        .expect("release")
        .into_inner();
    assert_eq!(r.released, 1);
    // The routing statistics the autoscaler reads cannot be zeroed by a peer.
    let e = c
        .load_stats(LoadStatsRequest { reset: true })
        .await
        .expect_err("reset accepted");
    assert_eq!(e.code(), Code::PermissionDenied);
}

/// One micro-batch on its own stream; the answer's result.
async fn one(
    c: &mut StageClient<tonic::transport::Channel>,
    owner: &str,
    seqs: Vec<SeqSlice>,
    ids: Vec<u32>,
) -> FwdResult {
    let req = ForwardRequest {
        micro_batch_id: 1,
        seqs,
        input: Some(Input::Tokens(TokenIds { ids })),
        owner: owner.into(),
        ..Default::default()
    };
    let mut stream = match c.forward(tokio_stream::iter(vec![req])).await {
        Ok(s) => s.into_inner(),
        // Refused when opening (a stream limit): the same error as an answer.
        Err(e) => {
            return FwdResult::Error(moe_proto::v1::ForwardError {
                code: e.code() as i32,
                message: e.message().to_string(),
            });
        }
    };
    stream
        .message()
        .await
        .expect("stream")
        .expect("answer")
        .result
        .expect("result")
}

fn code_of(r: &FwdResult) -> i32 {
    match r {
        FwdResult::Error(e) => e.code,
        FwdResult::LastHidden(_) => 0,
    }
}

#[tokio::test]
async fn gateways_sharing_a_stage_never_touch_each_others_sequences() {
    let p = tiny_stage(&["--max-sequences", "3"]);
    let mut c = stage_client(&p.1).await;
    let seq = |id, start, len| SeqSlice {
        seq_id: id,
        start,
        len,
        capacity: 8,
    };
    // Two gateways both number their first sequence 1.
    let a = one(&mut c, "gw-a/1", vec![seq(1, 0, 2)], vec![3, 4]).await;
    assert_eq!(code_of(&a), 0, "{a:?}");
    let b = one(&mut c, "gw-b/1", vec![seq(1, 0, 3)], vec![5, 6, 7]).await;
    assert_eq!(code_of(&b), 0, "{b:?}");
    // A third party cannot release either.
    let r = c
        .release(ReleaseRequest {
            seq_ids: vec![1],
            owner: "intruder".into(),
        })
        .await
        .expect("release");
    assert_eq!(r.into_inner().released, 0);
    // b's continuation at a's length is refused (b holds 3 positions); each continues its own.
    let wrong = one(&mut c, "gw-b/1", vec![seq(1, 2, 1)], vec![8]).await;
    assert_eq!(
        code_of(&wrong),
        Code::FailedPrecondition as i32,
        "{wrong:?}"
    );
    let a2 = one(&mut c, "gw-a/1", vec![seq(1, 2, 1)], vec![8]).await;
    assert_eq!(code_of(&a2), 0, "{a2:?}");
    let b2 = one(&mut c, "gw-b/1", vec![seq(1, 3, 1)], vec![8]).await;
    assert_eq!(code_of(&b2), 0, "{b2:?}");
    // a's continuation attended to a's own context: it equals [3, 4, 8] computed afresh.
    let fresh = one(&mut c, "gw-d/1", vec![seq(5, 0, 3)], vec![3, 4, 8]).await;
    let last = |r: &FwdResult| -> Vec<f32> {
        let FwdResult::LastHidden(t) = r else {
            panic!("{r:?}")
        };
        let mut v = Vec::new();
        decode_f32("last", Some(t), Some(1), t.shape[1] as usize, &mut v).expect("decode");
        v
    };
    let (x, y) = (last(&a2), last(&fresh));
    let err = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-4, "continuation differs from a fresh run by {err}");
    // Capacity is shared by every gateway: 3 held; a new one is refused, retryably.
    let full = one(&mut c, "gw-c/1", vec![seq(9, 0, 1)], vec![3]).await;
    assert_eq!(code_of(&full), Code::ResourceExhausted as i32, "{full:?}");
    let r = c
        .release(ReleaseRequest {
            seq_ids: vec![1],
            owner: "gw-a/1".into(),
        })
        .await
        .expect("release");
    assert_eq!(r.into_inner().released, 1);
    let b3 = one(&mut c, "gw-b/1", vec![seq(1, 4, 1)], vec![9]).await;
    assert_eq!(code_of(&b3), 0, "b's sequence survives a's release: {b3:?}");
    let e = c
        .release(ReleaseRequest {
            seq_ids: vec![1],
            owner: String::new(),
        })
        .await
        .expect_err("release without an owner");
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_stage_bounds_streams_and_rows_before_allocating() {
    let p = tiny_stage(&["--max-streams", "1", "--max-batch-rows", "4"]);
    let mut c = stage_client(&p.1).await;
    let seq = |id, len| SeqSlice {
        seq_id: id,
        start: 0,
        len,
        capacity: 8,
    };
    let big = one(&mut c, "gw", vec![seq(1, 5)], vec![3; 5]).await;
    match &big {
        FwdResult::Error(e) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(e.message.contains("rows"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // One stream open: a second is refused until the first closes.
    // (The previous call's stream ends on the stage a moment after its answer.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (tx, held) = loop {
        let (tx, rx) = tokio::sync::mpsc::channel::<ForwardRequest>(1);
        match c
            .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(s) => break (tx, s),
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let mut c2 = c.clone();
    let second = c2
        .forward(tokio_stream::iter(Vec::<ForwardRequest>::new()))
        .await;
    let e = second.expect_err("second stream accepted");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    drop((tx, held));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = one(&mut c, "gw", vec![seq(2, 4)], vec![3; 4]).await;
        if code_of(&r) == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn stage_frees_kv_caches_left_idle() {
    let p = tiny_stage(&["--cache-idle-timeout-s", "1"]);
    let mut c = stage_client(&p.1).await;
    let req = ForwardRequest {
        micro_batch_id: 1,
        seqs: vec![SeqSlice {
            seq_id: 5,
            start: 0,
            len: 2,
            capacity: 8,
        }],
        input: Some(Input::Tokens(TokenIds { ids: vec![3, 4] })),
        owner: "gateway-a".into(),
        ..Default::default()
    };
    let mut stream = c
        .forward(tokio_stream::iter(vec![req]))
        .await
        .expect("open")
        .into_inner();
    let r = stream.message().await.expect("stream").expect("response");
    assert!(matches!(r.result, Some(FwdResult::LastHidden(_))));
    let active = |c: &mut StageClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.load_stats(LoadStatsRequest { reset: false })
                .await
                .expect("stats")
                .into_inner()
                .active_sequences
        }
    };
    assert_eq!(active(&mut c).await, 1);
    // Nobody releases the sequence (its gateway "died"): the stage frees it by itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while active(&mut c).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle cache was never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_stage_reconnects_to_an_expert_restarted_on_its_address() {
    let expert = [
        "expert",
        "--model",
        "synthetic:tiny",
        "--layers",
        "0..4",
        "--experts",
        "0,1,2,3,4,5,6,7",
    ];
    let e = start(&expert);
    let addr = e.1.trim_start_matches("http://").to_string();
    let p = start(&[
        "stage",
        "--model",
        "synthetic:tiny",
        "--layers",
        "0..4",
        "--expert-addrs",
        &addr,
    ]);
    let mut c = stage_client(&p.1).await;
    // One stream: its micro-batches share a compute thread and that thread's connections.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = c
        .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("open")
        .into_inner();
    let mut step = async |id: u64| {
        let req = ForwardRequest {
            micro_batch_id: id,
            seqs: vec![SeqSlice {
                seq_id: id,
                start: 0,
                len: 2,
                capacity: 4,
            }],
            input: Some(Input::Tokens(TokenIds { ids: vec![3, 4] })),
            owner: "gateway-a".into(),
            ..Default::default()
        };
        tx.send(req).await.expect("send");
        answers
            .message()
            .await
            .expect("stream")
            .expect("answer")
            .result
            .expect("result")
    };
    assert!(matches!(step(1).await, FwdResult::LastHidden(_)));
    // The expert process dies and another takes its address; the stage's connection to the
    // first one is dead, but the next micro-batch must not fail for it.
    drop(e);
    let e = start_on(&expert, &addr);
    let mut probe = loop {
        match ExpertClient::connect(e.1.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    probe.describe(DescribeRequest {}).await.expect("describe");
    match step(2).await {
        FwdResult::LastHidden(_) => {}
        other => panic!("the first micro-batch after the restart failed: {other:?}"),
    }
}

/// `moe-worker certs init` into a new folder.
fn make_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .output()
        .expect("certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A channel that speaks mutual TLS with the certificates in `dir`.
fn tls_channel(url: &str, dir: &std::path::Path) -> tonic::transport::Channel {
    let tls = moe_worker::serve::tls::Tls::load(dir).expect("load certs");
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("uri")
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_with_connector_lazy(moe_worker::serve::tls::Connector::new(tls))
}

#[tokio::test]
async fn worker_ports_refuse_peers_without_the_deployments_certificate() {
    let ours = make_certs();
    let theirs = make_certs();
    let dir = ours.path().to_str().expect("utf-8").to_string();
    let expert = start(&[
        "expert",
        "--model",
        "synthetic:tiny",
        "--layers",
        "0..4",
        "--experts",
        "0,1,2,3,4,5,6,7",
        "--tls-dir",
        &dir,
    ]);
    let probe_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let health_listen = format!("127.0.0.1:{probe_port}");
    let stage = start(&[
        "stage",
        "--model",
        "synthetic:tiny",
        "--layers",
        "0..4",
        "--expert-addrs",
        expert.1.trim_start_matches("http://"),
        "--tls-dir",
        &dir,
        "--health-listen",
        &health_listen,
    ]);
    // The stage reached the expert over mutual TLS (it needs it to start serving), and a
    // client with the deployment's certificate is served.
    let mut good = StageClient::new(tls_channel(&stage.1, ours.path()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let info = loop {
        match good.describe(DescribeRequest {}).await {
            Ok(i) => break i.into_inner(),
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(info.layer_end, 4);
    let ok = one(
        &mut good,
        "gw",
        vec![SeqSlice {
            seq_id: 1,
            start: 0,
            len: 2,
            capacity: 4,
        }],
        vec![3, 4],
    )
    .await;
    assert_eq!(code_of(&ok), 0, "{ok:?}");
    let mut good_expert = ExpertClient::new(tls_channel(&expert.1, ours.path()));
    good_expert
        .describe(DescribeRequest {})
        .await
        .expect("expert over TLS");

    for url in [&stage.1, &expert.1] {
        // No TLS at all.
        let plain = tonic::transport::Endpoint::from_shared(url.clone())
            .expect("uri")
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect_lazy();
        let e = ExpertClient::new(plain)
            .describe(DescribeRequest {})
            .await
            .expect_err("plaintext client served");
        // Refused at the connection: no gRPC status ever came back from the service, the
        // error is the transport's (its code depends on what the client made of the TLS alert).
        assert!(std::error::Error::source(&e).is_some(), "{e:?}");
        // TLS with another deployment's CA: refused at the handshake.
        let e = ExpertClient::new(tls_channel(url, theirs.path()))
            .describe(DescribeRequest {})
            .await
            .expect_err("foreign certificate served");
        assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    }
    // Kubernetes' gRPC probes cannot present a certificate: health alone is served in
    // plaintext on its own port.
    assert_serving(&format!("http://{health_listen}")).await;
    // A role given neither --tls-dir nor --plaintext refuses to start, naming both.
    let out = Command::new(BIN)
        .args([
            "expert",
            "--model",
            "synthetic:tiny",
            "--layers",
            "0..4",
            "--experts",
            "0",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-dir") && err.contains("--plaintext"),
        "{err}"
    );
}
