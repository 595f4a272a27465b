//! Data-plane benchmarks, each against a baseline measured in the same run:
//! - `bench-transport`: activation tensors through our gRPC path (tonic + the tensor codec)
//!   vs raw TCP on loopback: throughput of large tensors, and round trip of a small batch.
//! - `bench-local`: end-to-end tokens/s of the `local` deployment vs single-process
//!   generation on the same model, at batch 1 and batch 8, with where the time goes.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moe_proto::compute::{ComputeClient, ComputeHandler, ComputeServer};
use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::expert_server::{Expert, ExpertServer};
use moe_proto::v1::{
    DescribeRequest, ExpertRequest, ExpertResponse, ExpertRows, LoadStatsRequest,
    LoadStatsResponse, ShardInfo, Tensor,
};
use moe_proto::wire::ComputeRequest;
use moe_proto::{WireDtype, decode_f32, encode, encode_bf16, encode_f32, encode_f32_owned};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::source::ModelArg;

#[derive(Debug, clap::Args)]
pub struct TransportArgs {
    /// Hidden size of the activations.
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    /// Rows of the large tensor (throughput).
    #[arg(long, default_value_t = 4096)]
    pub large_rows: usize,
    /// Rows of the small batch (round trip).
    #[arg(long, default_value_t = 8)]
    pub small_rows: usize,
    /// Round trips of the large tensor per measurement.
    #[arg(long, default_value_t = 20)]
    pub large_iters: usize,
    /// Round trips of the small batch per measurement.
    #[arg(long, default_value_t = 2000)]
    pub small_iters: usize,
    /// Interleaved repetitions of every path (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Internal: serve the echo servers (raw TCP, gRPC, tonic codec, gRPC over mutual TLS)
    /// for a parent benchmark, print `echo listening on ADDR...`, and exit when standard
    /// input closes.
    #[arg(long, hide = true)]
    pub serve_echo: bool,
    /// Internal: the certificates of the echo server's TLS path.
    #[arg(long, hide = true)]
    pub echo_tls_dir: Option<std::path::PathBuf>,
}

/// An expert service that returns its input: the real codec and gRPC path, no compute.
struct Echo;

/// The rows a request's experts claim and the columns its tensor says it has.
fn echo_shape(experts: &[ExpertRows], shape: Option<&[u64]>) -> (usize, usize) {
    let rows = experts.iter().map(|e| e.rows as usize).sum();
    let cols = shape.and_then(|s| s.get(1)).copied().unwrap_or(0) as usize;
    (rows, cols)
}

#[tonic::async_trait]
impl Expert for Echo {
    async fn compute(&self, r: Request<ExpertRequest>) -> Result<Response<ExpertResponse>, Status> {
        let req = r.into_inner();
        let (rows, cols) = echo_shape(&req.experts, req.input.as_ref().map(|t| &t.shape[..]));
        let mut x = Vec::new();
        decode_f32("input", req.input.as_ref(), Some(rows), cols, &mut x)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ExpertResponse {
            output: Some(encode_f32_owned(x, &[rows, cols])),
        }))
    }
    async fn describe(&self, _: Request<DescribeRequest>) -> Result<Response<ShardInfo>, Status> {
        Ok(Response::new(ShardInfo::default()))
    }
    async fn load_stats(
        &self,
        _: Request<LoadStatsRequest>,
    ) -> Result<Response<LoadStatsResponse>, Status> {
        Ok(Response::new(LoadStatsResponse::default()))
    }
}

/// The same echo on the path deployments use (`moe_proto::compute`).
#[tonic::async_trait]
impl ComputeHandler for Echo {
    async fn compute(&self, req: ComputeRequest, _: MetadataMap) -> Result<Tensor, Status> {
        let (rows, cols) = echo_shape(&req.experts, req.input.as_ref().map(|t| &t.shape[..]));
        // Answered in the element type it came in, as an expert shard told to send bf16 does.
        let wire = match req.input.as_ref().map(|t| t.dtype) {
            Some(d) if d == moe_proto::v1::Dtype::Bf16 as i32 => WireDtype::Bf16,
            _ => WireDtype::F32,
        };
        let x = req
            .input_f32(rows, cols)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(encode(x, &[rows, cols], wire))
    }
}

/// Raw TCP echo: 8-byte length, then the payload, sent back whole.
async fn tcp_echo_server(listener: tokio::net::TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let Ok(n) = s.read_u64_le().await else { return };
                buf.resize(n as usize, 0);
                if s.read_exact(&mut buf).await.is_err() {
                    return;
                }
                if s.write_u64_le(n).await.is_err() || s.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A 2-worker multi-threaded runtime, the layout every real role's server runs on (see
/// `cli.rs`).
fn role_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::peer("runtime", e.to_string()))
}

/// The largest message either side must accept for `args`' large tensor.
fn message_limit(args: &TransportArgs) -> usize {
    (args.large_rows * args.hidden * 4 + (1 << 20)).max(4 << 20)
}

/// The echo servers' process (`bench-transport --serve-echo`): the baselines' servers on
/// their own runtime, as a real expert shard serves from its own process.
fn serve_echo(args: &TransportArgs) -> Result<()> {
    let rt = role_runtime()?;
    let limit = message_limit(args);
    rt.block_on(async {
        let err = |e: std::io::Error| Error::peer("bench", e.to_string());
        let listen = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (tcp, grpc, tonic, tls) = (
            listen().await.map_err(err)?,
            listen().await.map_err(err)?,
            listen().await.map_err(err)?,
            listen().await.map_err(err)?,
        );
        println!(
            "echo listening on {} {} {} {}",
            tcp.local_addr().map_err(err)?,
            grpc.local_addr().map_err(err)?,
            tonic.local_addr().map_err(err)?,
            tls.local_addr().map_err(err)?,
        );
        let certs = args
            .echo_tls_dir
            .as_deref()
            .ok_or_else(|| Error::invalid("echo-tls-dir", "required with --serve-echo"))?;
        let certs = super::tls::Tls::load(certs)?;
        std::io::stdout().flush().map_err(err)?;
        tokio::spawn(tcp_echo_server(tcp));
        let generated = || {
            ExpertServer::new(Echo)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit)
        };
        let direct = || ComputeServer::new(std::sync::Arc::new(Echo), generated(), limit);
        let secure = super::server()
            .add_service(direct())
            .serve_with_incoming_shutdown(
                super::tls::accept(tls, Some(certs)),
                super::shutdown_signal(true),
            );
        let direct = super::server()
            .add_service(direct())
            .serve_with_incoming_shutdown(super::incoming(grpc), super::shutdown_signal(true));
        let codec = super::server()
            .add_service(generated())
            .serve_with_incoming_shutdown(super::incoming(tonic), super::shutdown_signal(true));
        let (a, b, c) = tokio::join!(direct, codec, secure);
        a.and(b)
            .and(c)
            .map_err(|e| Error::peer("bench", e.to_string()))
    })
}

/// Starts the echo servers in a child process and returns it with their addresses. The
/// child exits when its standard input (held by the returned `Child`) closes.
fn spawn_echo(
    args: &TransportArgs,
    certs: &std::path::Path,
) -> Result<(std::process::Child, Vec<String>)> {
    let err = |e: std::io::Error| Error::peer("bench", e.to_string());
    let exe = std::env::current_exe().map_err(err)?;
    let mut child = Command::new(exe)
        .args(["bench-transport", "--serve-echo", "--echo-tls-dir"])
        .arg(certs)
        .args(["--hidden", &args.hidden.to_string()])
        .args(["--large-rows", &args.large_rows.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(err)?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::peer("bench", "echo stdout"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map_err(err)?;
    let addrs: Vec<String> = line
        .trim()
        .strip_prefix("echo listening on ")
        .unwrap_or("")
        .split(' ')
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if addrs.len() == 4 {
        return Ok((child, addrs));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(Error::peer(
        "bench",
        format!("echo server did not start: `{}`", line.trim()),
    ))
}

pub fn transport(args: TransportArgs) -> Result<()> {
    if args.serve_echo {
        return serve_echo(&args);
    }
    // The servers run in their own process: sharing the client's runtime (as this benchmark
    // once did) makes client and server tasks compete for the same two workers, which no
    // deployment does, and it flatters or penalises the two baselines unevenly.
    let certs = super::tls::TempCerts::new()?;
    let (mut child, addrs) = spawn_echo(&args, &certs.dir)?;
    let tls = super::tls::Tls::load(&certs.dir)?;
    let result = measure_transport(&args, &addrs, tls);
    // Closing its standard input stops the child; wait so it never outlives us.
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

/// The client side: like a pipeline stage's compute thread, it drives its calls on a
/// current-thread runtime of its own (`stage::Caller`). Three ways to move the same tensor there and back: our
/// path (`moe_proto::compute` on both ends, as stages and expert shards talk), the same RPC
/// through tonic's generated client and server, and raw TCP.
fn measure_transport(
    args: &TransportArgs,
    addrs: &[String],
    certs: std::sync::Arc<super::tls::Tls>,
) -> Result<()> {
    let [tcp, grpc, tonic, tls] = [0, 1, 2, 3].map(|i| addrs[i].as_str());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::peer("runtime", e.to_string()))?;
    let limit = message_limit(args);
    let (mut direct, mut generated, mut secure) = rt.block_on(async {
        let direct = ComputeClient::new(super::channel(grpc)?, limit);
        let generated = ExpertClient::new(super::channel(tonic)?)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let secure = ComputeClient::new(
            super::endpoint(tls)?.connect_with_connector_lazy(super::tls::Connector::new(certs)),
            limit,
        );
        Ok::<_, Error>((direct, generated, secure))
    })?;
    let mut tcp = rt
        .block_on(tokio::net::TcpStream::connect(tcp))
        .map_err(|e| Error::peer("bench", e.to_string()))?;
    tcp.set_nodelay(true)
        .map_err(|e| Error::peer("bench", e.to_string()))?;

    let h = args.hidden;
    let grpc_err = |s: Status| Error::peer("grpc", s.message().to_string());
    // Best-of-repeats time of each path for `iters` round trips of a [rows, h] tensor.
    let mut measure = |rows: usize, iters: usize| -> Result<Vec<[Duration; 5]>> {
        let x: Vec<f32> = (0..rows * h).map(|i| (i % 977) as f32 * 0.001).collect();
        let x_bf16: Vec<f32> = x.iter().map(|&v| WireDtype::Bf16.round(v)).collect();
        // The tensor to send exists already, as a stage's gathered rows do.
        let input = encode_f32(&x, &[rows, h]);
        let input_bf16 = encode_bf16(&x, &[rows, h]);
        let experts = [ExpertRows {
            expert: 0,
            rows: rows as u32,
        }];
        let check = |out: &[f32], want: &[f32]| {
            if out == want {
                Ok(())
            } else {
                Err(Error::peer("bench", "the echo differs from what was sent"))
            }
        };
        let ours = |client: &mut ComputeClient<tonic::transport::Channel>, bf16: bool| {
            let (input, want) = if bf16 {
                (&input_bf16, &x_bf16)
            } else {
                (&input, &x)
            };
            rt.block_on(async {
                let (t, mut out) = (Instant::now(), Vec::new());
                for _ in 0..iters {
                    out = client
                        .compute(MetadataMap::new(), None, 0, &experts, input.clone())
                        .await
                        .map_err(grpc_err)?
                        .to_f32("out", Some(rows), h)
                        .map_err(|e| Error::peer("grpc", e.to_string()))?;
                }
                let took = t.elapsed();
                check(&out, want).map(|()| took)
            })
        };
        let mut codec = || {
            rt.block_on(async {
                let (t, mut out) = (Instant::now(), Vec::new());
                for _ in 0..iters {
                    let req = ExpertRequest {
                        layer: 0,
                        experts: experts.to_vec(),
                        input: Some(input.clone()),
                    };
                    let r = generated.compute(req).await.map_err(grpc_err)?;
                    // A fresh buffer per answer, as the stage takes each one.
                    out = Vec::new();
                    decode_f32("out", r.get_ref().output.as_ref(), Some(rows), h, &mut out)
                        .map_err(|e| Error::peer("grpc", e.to_string()))?;
                }
                let took = t.elapsed();
                check(&out, &x).map(|()| took)
            })
        };
        let bytes = &input.data;
        let mut back = vec![0u8; bytes.len()];
        let mut raw = || {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    tcp.write_u64_le(bytes.len() as u64).await?;
                    tcp.write_all(bytes).await?;
                    let n = tcp.read_u64_le().await? as usize;
                    back.resize(n, 0);
                    tcp.read_exact(&mut back).await?;
                }
                Ok::<_, std::io::Error>(t.elapsed())
            })
            .map_err(|e| Error::peer("raw tcp", e.to_string()))
        };
        // Interleaved, so a noisy moment hits one repetition of every path alike.
        let mut times = Vec::new();
        for _ in 0..args.repeats.max(1) {
            times.push([
                ours(&mut direct, false)?,
                codec()?,
                raw()?,
                ours(&mut secure, false)?,
                ours(&mut secure, true)?,
            ]);
        }
        if back[..] != bytes[..] {
            return Err(Error::peer("bench", "the raw TCP echo differs"));
        }
        Ok(times)
    };
    let large_bytes = (args.large_rows * h * 4) as f64;
    let large = measure(args.large_rows, args.large_iters)?;
    let small = measure(args.small_rows, args.small_iters)?;
    let gbps = |d: Duration| 2.0 * large_bytes * args.large_iters as f64 / d.as_secs_f64() / 1e9;
    let us = |d: Duration| d.as_secs_f64() * 1e6 / args.small_iters as f64;
    println!(
        "activation transport on loopback, median of {} interleaved repetitions (echo: each tensor goes there and back)",
        args.repeats.max(1)
    );
    println!(
        "| measure | moe.v1 gRPC, mutual TLS (deployed) | moe.v1 gRPC, plaintext | same RPC via tonic codec | raw TCP | TLS vs raw TCP | plaintext vs raw TCP | target |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let [o, c, r, t] = [0, 1, 2, 3].map(|i| gbps(median(large.iter().map(|x| x[i]))));
    let raw_gbps = r;
    let vs_raw = |rows: &[[Duration; 5]], i: usize, small: bool| {
        median_f64(rows.iter().map(|x| {
            let (ours, raw) = (x[i].as_secs_f64(), x[2].as_secs_f64());
            if small { ours / raw } else { raw / ours }
        }))
    };
    println!(
        "| throughput, [{}x{h}] f32 ({:.1} MiB) | {t:.2} GB/s | {o:.2} GB/s | {c:.2} GB/s | {r:.2} GB/s | {:.2}x | {:.2}x | >= 0.7x |",
        args.large_rows,
        large_bytes / (1 << 20) as f64,
        vs_raw(&large, 3, false),
        vs_raw(&large, 0, false),
    );
    let [o, c, r, t] = [0, 1, 2, 3].map(|i| us(median(small.iter().map(|x| x[i]))));
    println!(
        "| round trip, [{}x{h}] f32 | {t:.1} us | {o:.1} us | {c:.1} us | {r:.1} us | {:.2}x | {:.2}x | <= 2x |",
        args.small_rows,
        vs_raw(&small, 3, true),
        vs_raw(&small, 0, true),
    );
    // The same activations as bf16 on the deployed path: half the bytes per hop.
    let saving = |rows: &[[Duration; 5]]| {
        median_f64(rows.iter().map(|x| x[3].as_secs_f64() / x[4].as_secs_f64()))
    };
    let tb = gbps(median(large.iter().map(|x| x[4])));
    println!(
        "bf16 on the wire (--wire-dtype bf16, mutual TLS): the [{}x{h}] tensor's round trip \
         {:.2}x faster than f32 ({:.2} GB/s of f32-equivalent activations, {:.1} MiB per \
         direction instead of {:.1}); the [{}x{h}] batch's round trip {:.2}x faster ({:.1} us)",
        args.large_rows,
        saving(&large),
        tb,
        large_bytes / 2.0 / (1 << 20) as f64,
        large_bytes / (1 << 20) as f64,
        args.small_rows,
        saving(&small),
        us(median(small.iter().map(|x| x[4]))),
    );
    // What encryption alone costs here: every byte of the echo is sealed once and opened once
    // in each direction (four AEAD passes), on the cores client and server share.
    let aead = aead_rate(large_bytes as usize)?;
    let raw_s = 2.0 * large_bytes / (raw_gbps * 1e9);
    let crypto_s = 4.0 * large_bytes / (aead * 1e9) / cores() as f64;
    println!(
        "AES-128-GCM (ring, 16 KiB records) on one core: {aead:.2} GB/s; {} cores shared by both ends: \
         the TLS echo cannot beat {:.2}x raw TCP even with free copies and perfect overlap \
         (raw {:.1} ms + crypto {:.1} ms per round trip of the large tensor)",
        cores(),
        raw_s / (raw_s + crypto_s),
        raw_s * 1e3,
        crypto_s * 1e3,
    );
    Ok(())
}

/// This machine's cores.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Bytes per second one core seals with AES-128-GCM in TLS-sized records (best of 3).
fn aead_rate(bytes: usize) -> Result<f64> {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = UnboundKey::new(&AES_128_GCM, &[7u8; 16])
        .map(LessSafeKey::new)
        .map_err(|_| Error::peer("bench", "AES key"))?;
    let mut buf = vec![0x5au8; 16 * 1024];
    let records = bytes.div_ceil(buf.len()).max(1);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for i in 0..records {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let _tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buf)
                .map_err(|_| Error::peer("bench", "seal"))?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((records * buf.len()) as f64 / best / 1e9)
}

fn median(xs: impl Iterator<Item = Duration>) -> Duration {
    Duration::from_secs_f64(median_f64(xs.map(|d| d.as_secs_f64())))
}

fn median_f64(xs: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = xs.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, clap::Args)]
pub struct LocalBenchArgs {
    #[arg(long, default_value = "synthetic:gpt4-mini")]
    pub model: ModelArg,
    #[arg(long, default_value_t = 4)]
    pub stages: usize,
    #[arg(long, default_value_t = 4)]
    pub expert_shards: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Concurrent requests of the batched measurement.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

/// A deterministic prompt of `n` token ids below `vocab`.
pub fn prompt(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = crate::synthetic::splitmix64(x);
            (3 + x % (vocab as u64 - 3)) as u32
        })
        .collect()
}

pub fn local(args: LocalBenchArgs) -> Result<()> {
    let src = args.model.open()?;
    let vocab = src.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..args.batch.max(1))
        .map(|i| prompt(args.prompt_tokens, i as u64 + 7, vocab))
        .collect();
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(args.tokens)
    };

    // Single process.
    let model = crate::load::load_full(src.as_ref(), Default::default())?;
    let mut engine = Engine::new(model, EngineOptions::default())?;
    engine.generate(prompts[0].clone(), params.clone())?;
    let t = Instant::now();
    let single_ids = engine.generate(prompts[0].clone(), params.clone())?.0;
    let single_b1 = args.tokens as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in &prompts {
        engine.add(p.clone(), params.clone())?;
    }
    let mut produced = 0;
    while engine.has_work() {
        produced += engine.step()?.len();
    }
    let single_b8 = produced as f64 / t.elapsed().as_secs_f64();
    drop(engine);

    // The deployment.
    let deployment = LocalDeployment::start(&args.model, args.stages, args.expert_shards, None)?;
    let addr = deployment.addr.clone();
    let result = (|| -> Result<()> {
        let request = |p: &Vec<u32>| json!({"prompt": p, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": true});
        super::http_json(
            &addr,
            "POST",
            "/v1/completions",
            Some(&request(&prompts[0])),
        )?;
        let gw_b1 = super::http_json(&addr, "GET", "/v1/stats", None)?;
        let t = Instant::now();
        let v = super::http_json(
            &addr,
            "POST",
            "/v1/completions",
            Some(&request(&prompts[0])),
        )?;
        let wall_b1 = t.elapsed().as_secs_f64();
        let stats_b1 = super::http_json(&addr, "GET", "/v1/stats", None)?;
        let ids: Vec<u32> = v["choices"][0]["token_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default();
        if ids != single_ids {
            return Err(Error::peer(
                "bench",
                "the deployment's tokens differ from single-process generation",
            ));
        }
        let before_b8: Value = super::http_json(&addr, "GET", "/v1/stats", None)?;
        let t = Instant::now();
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (addr, body) = (addr.clone(), request(p));
                std::thread::spawn(move || {
                    super::http_json(&addr, "POST", "/v1/completions", Some(&body))
                })
            })
            .collect();
        let mut produced = 0;
        for h in handles {
            let v = h
                .join()
                .map_err(|_| Error::peer("bench", "request thread"))??;
            produced += v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let wall_b8 = t.elapsed().as_secs_f64();
        let stats_b8 = super::http_json(&addr, "GET", "/v1/stats", None)?;
        let local_b1 = args.tokens as f64 / wall_b1;
        let local_b8 = produced as f64 / wall_b8;
        println!(
            "{} over {} stages and {} expert shards; {} prompt tokens, {} generated per request",
            args.model, args.stages, args.expert_shards, args.prompt_tokens, args.tokens
        );
        println!("| batch | local tok/s | single-process tok/s | ratio |");
        println!("|---|---|---|---|");
        println!(
            "| 1 | {local_b1:.1} | {single_b1:.1} | {:.2}x |",
            local_b1 / single_b1
        );
        println!(
            "| {} | {local_b8:.1} | {single_b8:.1} | {:.2}x |",
            prompts.len(),
            local_b8 / single_b8
        );
        breakdown("batch 1", &stats_b1, Some(&gw_b1), wall_b1, args.tokens);
        breakdown(
            &format!("batch {}", prompts.len()),
            &stats_b8,
            Some(&before_b8),
            wall_b8,
            produced,
        );
        Ok(())
    })();
    drop(deployment);
    result
}

/// A `moe-worker local` deployment started for a benchmark; stopped (SIGTERM, waited for)
/// when dropped, so no process outlives the benchmark.
pub struct LocalDeployment {
    child: std::process::Child,
    /// host:port of its OpenAI endpoint.
    pub addr: String,
}

impl LocalDeployment {
    pub fn start(
        model: &ModelArg,
        stages: usize,
        expert_shards: usize,
        micro_batches: Option<usize>,
    ) -> Result<Self> {
        let exe = std::env::current_exe().map_err(|e| Error::peer("bench", e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.args(["local", "--model", &model.to_string(), "--http-port", "0"])
            .args(["--stages", &stages.to_string()])
            .args(["--expert-shards", &expert_shards.to_string()]);
        if let Some(m) = micro_batches {
            cmd.args(["--micro-batches", &m.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::peer("bench", e.to_string()))?;
        let mut d = Self {
            child,
            addr: String::new(),
        };
        let mut out = std::io::BufReader::new(
            d.child
                .stdout
                .take()
                .ok_or_else(|| Error::peer("bench", "stdout"))?,
        );
        d.addr = loop {
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut out, &mut line)
                .map_err(|e| Error::peer("bench", e.to_string()))?
                == 0
            {
                return Err(Error::peer("bench", "local exited before it was ready"));
            }
            if let Some(ep) = line.trim().strip_prefix("OpenAI endpoint: http://") {
                break ep.trim_end_matches("/v1").to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Ok(d)
    }
}

impl Drop for LocalDeployment {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Where a measurement's time went, per generated token (the counters only grow: each figure
/// is the difference from `before`).
fn breakdown(label: &str, s: &Value, before: Option<&Value>, wall: f64, tokens: usize) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let gw = |k: &str| f(&s["gateway"][k]) - before.map_or(0.0, |b| f(&b["gateway"][k]));
    let summed = |v: &Value, k: &str| -> f64 {
        v["stages"]
            .as_array()
            .map(|a| a.iter().map(|x| f(&x[k])).sum())
            .unwrap_or(0.0)
    };
    let stage = |k: &str| summed(s, k) - before.map_or(0.0, |b| summed(b, k));
    let busy = stage("busySeconds");
    let wait = stage("expertWaitSeconds");
    let per = |x: f64| x * 1e3 / tokens.max(1) as f64;
    println!(
        "{label}: {:.2} ms/token wall; summed over the pipeline per token: stage compute {:.2} ms, expert calls (compute + transport) {:.2} ms; gateway: waiting on the pipeline {:.2} ms (of which not in any stage {:.2} ms), LM head + sampling {:.2} ms",
        per(wall),
        per(busy - wait),
        per(wait),
        per(gw("pipelineSeconds")),
        per((gw("pipelineSeconds") - busy).max(0.0)),
        per(gw("headSeconds")),
    );
}

/// A client of the moe.v1 compute service at `addr` over mutual TLS (the certificates in
/// `certs`), driven by a current-thread runtime of its own as a stage's caller is.
fn tls_client(
    certs: &std::path::Path,
    addr: &str,
    limit: usize,
) -> Result<(
    tokio::runtime::Runtime,
    ComputeClient<tonic::transport::Channel>,
)> {
    let (rt, channel) = tls_channel(certs, addr)?;
    Ok((rt, ComputeClient::new(channel, limit)))
}

/// A current-thread runtime (as a stage's compute thread drives its calls) and a mutual-TLS
/// channel to `addr` made on it.
fn tls_channel(
    certs: &std::path::Path,
    addr: &str,
) -> Result<(tokio::runtime::Runtime, tonic::transport::Channel)> {
    let tls = super::tls::Tls::load(certs)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::peer("runtime", e.to_string()))?;
    let channel = rt.block_on(async {
        Ok::<_, Error>(
            super::endpoint(addr)?.connect_with_connector_lazy(super::tls::Connector::new(tls)),
        )
    })?;
    Ok((rt, channel))
}

/// One hop between two processes, as the performance model describes it.
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    /// One way, seconds: half the median round trip of a one-row tensor, each call after both
    /// ends slept (as in a pipeline, where a peer waits while others compute).
    pub latency: f64,
    /// CPU seconds one hop costs both processes together (encoding, TLS, system calls,
    /// wake-ups), over the same calls.
    pub cpu: f64,
    /// One way, bytes/s (a large tensor's round trip moves its bytes twice).
    pub bandwidth: f64,
}

/// CPU seconds process `pid` has used (`/proc` counts in USER_HZ, 100 on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

/// What decode steps' expert calls cost a real expert shard process here.
#[derive(Debug, Clone, Copy)]
pub struct ExpertCalls {
    /// Wall seconds per call, as the caller waits for it.
    pub wall: f64,
    /// CPU seconds per call of both processes (the caller's cache polluting excluded).
    pub cpu: f64,
    /// Seconds per call the shard spent computing its experts (its own busy counter).
    pub compute: f64,
    /// Experts per call, and bytes of one expert's weights as the shard holds them.
    pub experts_per_call: usize,
    pub expert_bytes: f64,
}

/// A real expert shard process here (`moe-worker expert` serving every layer and expert of a
/// synthetic preset, over mutual TLS, one thread as `local` runs it); stops when dropped.
struct ShardProcess {
    child: std::process::Child,
    addr: String,
    /// The preset's hidden size, layers and experts per layer.
    hidden: usize,
    layers: usize,
    experts: usize,
    /// Bytes of one expert's weights (gate, up, down) as the shard holds them.
    expert_bytes: f64,
}

impl ShardProcess {
    fn start(preset: &str, certs: &std::path::Path) -> Result<Self> {
        let err = |e: std::io::Error| Error::peer("bench", e.to_string());
        let model = format!("synthetic:{preset}");
        let cfg = model.parse::<ModelArg>()?.open()?.config().clone();
        let (layers, experts) = (cfg.num_hidden_layers.max(1), cfg.num_local_experts.max(1));
        let exe = std::env::current_exe().map_err(err)?;
        let all_experts = (0..experts)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut child = Command::new(exe)
            .args([
                "--threads",
                "1",
                "expert",
                "--model",
                &model,
                "--layers",
                &format!("0..{layers}"),
            ])
            .args(["--experts", &all_experts, "--listen", "127.0.0.1:0"])
            .arg("--tls-dir")
            .arg(certs)
            .arg("--exit-with-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err)?;
        let addr = (|| {
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| Error::peer("bench", "expert stdout"))?;
            let mut out = std::io::BufReader::new(stdout);
            let addr = loop {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut out, &mut line).map_err(err)? == 0 {
                    return Err(Error::peer("bench", "the expert exited before it listened"));
                }
                if let Some((_, a)) = line.trim().rsplit_once("listening on ") {
                    break a.to_string();
                }
            };
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            Ok(addr)
        })();
        let mut shard = Self {
            child,
            addr: String::new(),
            hidden: cfg.hidden_size,
            layers,
            experts,
            expert_bytes: (3 * cfg.hidden_size * cfg.intermediate_size * cfg.dtype.size()) as f64,
        };
        // On failure the shard is dropped here: its input closes and it exits.
        shard.addr = addr?;
        Ok(shard)
    }
}

impl Drop for ShardProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A caller of one [`ShardProcess`] as a stage's compute thread calls it: its own
/// current-thread runtime, one call per layer in turn, `per_call` different experts with one
/// row each, and a stage's worth of its own memory traffic before each call.
struct ShardCaller {
    rt: tokio::runtime::Runtime,
    client: ComputeClient<tonic::transport::Channel>,
    stats: ExpertClient<tonic::transport::Channel>,
    x: Vec<f32>,
    hidden: usize,
    layers: usize,
    experts: usize,
    per_call: usize,
    scratch: Vec<f32>,
    /// Calls made; the next call's layer and experts follow from it.
    made: usize,
}

impl ShardCaller {
    fn new(certs: &std::path::Path, shard: &ShardProcess, per_call: usize) -> Result<Self> {
        let (hidden, layers, experts) = (shard.hidden, shard.layers, shard.experts);
        let (rt, channel) = tls_channel(certs, &shard.addr)?;
        let per_call = per_call.clamp(1, experts.max(1));
        let mut caller = Self {
            rt,
            client: ComputeClient::new(channel.clone(), 64 << 20),
            stats: ExpertClient::new(channel),
            x: (0..per_call * hidden)
                .map(|i| (i % 17) as f32 * 0.01)
                .collect(),
            hidden,
            layers,
            experts,
            per_call,
            scratch: vec![1f32; 4 << 20],
            made: 0,
        };
        // It listens before its weights are loaded: ready once a call succeeds.
        let ready_by = Instant::now() + Duration::from_secs(60);
        while let Err(e) = caller.call() {
            if Instant::now() > ready_by {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for _ in 0..2 * caller.layers {
            caller.call()?;
        }
        Ok(caller)
    }

    /// Dirties the caches as a stage's own compute does between calls: seconds it took.
    fn pollute(&mut self) -> f64 {
        let t = Instant::now();
        let bump = self.made as f32;
        self.scratch.iter_mut().for_each(|v| *v += bump);
        std::hint::black_box(&self.scratch);
        t.elapsed().as_secs_f64()
    }

    /// The next call: layer `made mod layers`, experts from a stride that visits every pair.
    fn call(&mut self) -> Result<()> {
        let i = self.made;
        let first = (i * 5 + i / self.layers) % self.experts;
        let mut chosen: Vec<u32> = (0..self.per_call)
            .map(|j| ((first + j) % self.experts) as u32)
            .collect();
        chosen.sort_unstable();
        let experts: Vec<ExpertRows> = chosen
            .into_iter()
            .map(|expert| ExpertRows { expert, rows: 1 })
            .collect();
        let limit = Duration::from_secs(10);
        let input = encode_f32(&self.x, &[self.per_call, self.hidden]);
        let layer = (i % self.layers) as u32;
        let client = &mut self.client;
        self.rt
            .block_on(async {
                tokio::time::timeout(
                    limit,
                    client.compute(MetadataMap::new(), Some(limit), layer, &experts, input),
                )
                .await
            })
            .map_err(|_| Error::peer("expert", "no answer within 10 s"))?
            .map_err(|s| Error::peer("expert", s.message().to_string()))?;
        self.made += 1;
        Ok(())
    }

    /// The shard's busy seconds so far.
    fn busy(&mut self) -> Result<f64> {
        let stats = &mut self.stats;
        self.rt
            .block_on(stats.load_stats(LoadStatsRequest { reset: false }))
            .map(|r| r.into_inner().busy_seconds)
            .map_err(|s| Error::peer("expert", s.message().to_string()))
    }
}

/// Calls a real expert shard process here (see [`ShardProcess`], [`ShardCaller`]) as decode
/// steps do, every call after the caller slept 1 ms and dirtied its caches (both ends idle,
/// caches cold, weights streamed from memory as a deployment streams them). The shard's busy
/// counter separates the experts' compute from what the call costs around it: both ends'
/// gRPC and TLS, and every thread that wakes for it.
pub fn expert_call(preset: &str, experts_per_call: usize) -> Result<ExpertCalls> {
    let certs = super::tls::TempCerts::new()?;
    let shard = ShardProcess::start(preset, &certs.dir)?;
    let mut caller = ShardCaller::new(&certs.dir, &shard, experts_per_call)?;
    let calls = 40 * shard.layers;
    let cpu = || cpu_seconds(std::process::id()) + cpu_seconds(shard.child.id());
    let (cpu_before, busy_before) = (cpu(), caller.busy()?);
    let (mut wall, mut polluting) = (0.0, 0.0);
    for _ in 0..calls {
        std::thread::sleep(Duration::from_millis(1));
        polluting += caller.pollute();
        let t = Instant::now();
        caller.call()?;
        wall += t.elapsed().as_secs_f64();
    }
    let n = calls as f64;
    Ok(ExpertCalls {
        wall: wall / n,
        cpu: ((cpu() - cpu_before - polluting) / n).max(0.0),
        compute: (caller.busy()? - busy_before) / n,
        experts_per_call: caller.per_call,
        expert_bytes: shard.expert_bytes,
    })
}

/// How many chains of calls this host runs at once: `chains` callers, each with its own
/// expert shard process, calling back to back (each chain keeps about one core busy), over
/// one such chain alone: `chains` when nothing is lost to sharing the host, less for what
/// the machine loses when processes hand work to each other on every core (wake-ups of idle
/// cores, scheduling, contended memory).
pub fn call_chains(preset: &str, chains: usize) -> Result<f64> {
    let certs = super::tls::TempCerts::new()?;
    let chains = chains.max(1);
    let shards = (0..chains)
        .map(|_| ShardProcess::start(preset, &certs.dir))
        .collect::<Result<Vec<_>>>()?;
    let mut callers = shards
        .iter()
        .map(|s| ShardCaller::new(&certs.dir, s, 2))
        .collect::<Result<Vec<_>>>()?;
    let calls = 20 * shards[0].layers;
    // Calls per second of `n` chains at once.
    let mut rate = |n: usize| -> Result<f64> {
        let barrier = std::sync::Barrier::new(n);
        let t = Instant::now();
        let done: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = callers
                .iter_mut()
                .take(n)
                .map(|c| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        for _ in 0..calls {
                            c.pollute();
                            c.call()?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::peer("bench", "caller thread")))
                })
                .collect()
        });
        done.into_iter().collect::<Result<()>>()?;
        Ok((n * calls) as f64 / t.elapsed().as_secs_f64())
    };
    // Rounds of one chain and of all, interleaved so drifts of the machine hit both alike;
    // the median ratio.
    let mut ratios = Vec::new();
    for _ in 0..5 {
        let one = rate(1)?;
        let all = rate(chains)?;
        ratios.push(all / one.max(1e-9));
    }
    let ratio = median_f64(ratios.into_iter());
    Ok(ratio.clamp(1.0, chains as f64))
}

/// The deployed hop between two processes here (moe.v1 gRPC over mutual TLS on loopback, f32
/// activations of width `hidden`). The echo server is its own process, as a peer is.
pub fn grpc_hop(hidden: usize) -> Result<Hop> {
    let args = TransportArgs {
        hidden,
        large_rows: (16 << 20) / (hidden.max(1) * 4),
        small_rows: 1,
        large_iters: 8,
        small_iters: 400,
        repeats: 5,
        serve_echo: false,
        echo_tls_dir: None,
    };
    let certs = super::tls::TempCerts::new()?;
    let (mut child, addrs) = spawn_echo(&args, &certs.dir)?;
    let result = (|| {
        let (rt, mut client) = tls_client(&certs.dir, &addrs[3], message_limit(&args))?;
        let mut round_trip = |rows: usize, iters: usize, idle: bool| -> Result<f64> {
            let x: Vec<f32> = (0..rows * hidden).map(|i| (i % 977) as f32).collect();
            let input = encode_f32(&x, &[rows, hidden]);
            let experts = [ExpertRows {
                expert: 0,
                rows: rows as u32,
            }];
            let mut times = Vec::new();
            for _ in 0..args.repeats {
                let t = rt.block_on(async {
                    let mut took = 0.0;
                    for _ in 0..iters {
                        if idle {
                            // As in a pipeline: both ends slept while others computed.
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        let t = Instant::now();
                        client
                            .compute(MetadataMap::new(), None, 0, &experts, input.clone())
                            .await
                            .map_err(|s| Error::peer("grpc", s.message().to_string()))?;
                        took += t.elapsed().as_secs_f64();
                    }
                    Ok::<_, Error>(took / iters as f64)
                })?;
                times.push(t);
            }
            Ok(median_f64(times.into_iter()))
        };
        // Warm the connection (handshake, buffers) before timing.
        round_trip(1, 50, false)?;
        let hot = round_trip(1, args.small_iters, false)? / 2.0;
        let idle_calls = args.small_iters / 4;
        let cpu = || cpu_seconds(std::process::id()) + cpu_seconds(child.id());
        let before = cpu();
        let latency = round_trip(1, idle_calls, true)? / 2.0;
        let hop_cpu = (cpu() - before) / (2 * idle_calls * args.repeats) as f64;
        eprintln!(
            "gRPC hop: {:.0} us back to back, {:.0} us after 1 ms idle, {:.0} us of CPU",
            hot * 1e6,
            latency * 1e6,
            hop_cpu * 1e6
        );
        let large = round_trip(args.large_rows, args.large_iters, false)?;
        let bytes = (args.large_rows * hidden * 4) as f64;
        Ok(Hop {
            latency,
            cpu: hop_cpu,
            bandwidth: bytes / (large / 2.0 - hot).max(1e-9),
        })
    })();
    drop(child.stdin.take());
    let _ = child.wait();
    result
}
