//! Metrics that tell the truth: after mixed traffic (completed, streamed, abandoned, refused,
//! failed and timed-out requests) every gauge of every process returns to its idle value and
//! agrees with the state it describes, and no counter goes backwards while its process lives.

#[path = "support/deploy.rs"]
mod deploy;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deploy::Deployment;
use serde_json::{Value, json};

/// One scrape: series (name with labels) to value.
type Samples = BTreeMap<String, f64>;

/// `None` while the process is down (the launcher restarts killed ones).
async fn try_scrape(url: &str) -> Option<Samples> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("line `{l}`"));
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in `{l}`")),
            };
            (series.to_string(), v)
        })
        .collect();
    Some(samples)
}

async fn scrape(url: &str) -> Samples {
    try_scrape(url)
        .await
        .unwrap_or_else(|| panic!("{url} did not answer"))
}

/// Every process's samples, once all of them answer (within 20 s).
async fn scrape_all(d: &Deployment) -> BTreeMap<String, Samples> {
    let deadline = Instant::now() + Duration::from_secs(20);
    'again: loop {
        let mut out = BTreeMap::new();
        for (name, url) in &d.metrics {
            match try_scrape(url).await {
                Some(s) => out.insert(name.clone(), s),
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'again;
                }
                None => panic!("{name} at {url} did not answer for 20 s"),
            };
        }
        return out;
    }
}

/// Sum of the samples of metric `name` (any labels).
fn total(s: &Samples, name: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

fn is_counter(series: &str) -> bool {
    let name = series.split('{').next().unwrap_or(series);
    name.ends_with("_total") || name.ends_with("_count") || name.ends_with("_sum") || {
        name.ends_with("_bucket")
    }
}

/// Counters of `later` are at least those of `earlier`, for processes that did not restart.
fn monotonic(earlier: &BTreeMap<String, Samples>, later: &BTreeMap<String, Samples>) {
    for (proc, a) in earlier {
        let b = &later[proc];
        let start = "process_start_time_seconds";
        if a.get(start) != b.get(start) {
            continue;
        }
        for (series, &v) in a.iter().filter(|(k, _)| is_counter(k)) {
            let now = b.get(series).copied().unwrap_or(0.0);
            assert!(now >= v, "{proc}: {series} went from {v} to {now}");
        }
    }
}

async fn stream_tokens(base: String, max_tokens: u64, take: Option<usize>) -> (usize, bool) {
    use futures::StreamExt;
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": [3, 4, 5], "max_tokens": max_tokens, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .expect("http");
    if resp.status() != 200 {
        return (0, false);
    }
    let mut body = resp.bytes_stream();
    let mut events = 0;
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return (events, false);
        };
        let text = String::from_utf8_lossy(&chunk);
        if text.contains("\"error\"") {
            return (events, false);
        }
        if text.contains("[DONE]") {
            return (events, true);
        }
        events += text.matches("data: ").count();
        if take.is_some_and(|t| events >= t) {
            // Abandoned: the connection drops here.
            return (events, false);
        }
    }
    (events, false)
}

fn signal(pid: i32, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_return_to_idle_and_counters_only_grow_after_mixed_abandoned_and_failing_traffic() {
    let d = Deployment::start(
        "synthetic:tiny",
        2,
        2,
        &["--step-timeout-ms", "1500", "--max-sequences", "4"],
    );
    assert_eq!(d.metrics.len(), 5, "{:?}", d.metrics);
    let mut scrapes = vec![scrape_all(&d).await];
    let base = d.base.clone();
    let client = reqwest::Client::new();

    // Completed, streamed to the end, abandoned streams, abandoned plain requests (the client
    // times out), and refused ones (400): more than the 4 sequences run at once, so some queue.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6u64 {
        let base = base.clone();
        tasks.spawn(async move {
            let (events, done) = stream_tokens(base.clone(), 8 + i, None).await;
            assert!(done && events > 0, "complete stream {i}");
        });
    }
    for i in 0..4 {
        let base = base.clone();
        tasks.spawn(async move {
            let (events, done) = stream_tokens(base.clone(), 400, Some(2 + i)).await;
            assert!(!done && events >= 2, "abandoned stream {i}");
        });
    }
    for _ in 0..3 {
        let (base, client) = (base.clone(), client.clone());
        tasks.spawn(async move {
            let r = client
                .post(format!("{base}/v1/completions"))
                .json(&json!({"prompt": [7, 8], "max_tokens": 300, "ignore_eos": true}))
                .timeout(Duration::from_millis(150))
                .send()
                .await;
            assert!(r.is_err(), "the client gave up first");
        });
    }
    for _ in 0..2 {
        let (base, client) = (base.clone(), client.clone());
        tasks.spawn(async move {
            let r = client
                .post(format!("{base}/v1/completions"))
                .json(&json!({"prompt": [7, 8], "max_tokens": 0}))
                .send()
                .await
                .expect("http");
            assert_eq!(r.status(), 400);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("traffic task");
    }
    scrapes.push(scrape_all(&d).await);

    // Timed out: expert shard 1 frozen past the step deadline while a stream runs.
    let frozen = d.pid_of("expert", 1);
    let long = tokio::spawn(stream_tokens(base.clone(), 400, None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(frozen, "-STOP");
    let (_, done) = tokio::time::timeout(Duration::from_secs(20), long)
        .await
        .expect("the frozen step must time out")
        .expect("task");
    signal(frozen, "-CONT");
    assert!(!done, "the stream failed when its step timed out");
    scrapes.push(scrape_all(&d).await);

    // Failed: expert shard 0 killed mid-stream (the launcher restarts it).
    let long = tokio::spawn(stream_tokens(base.clone(), 400, None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(d.pid_of("expert", 0), "-KILL");
    let (_, done) = tokio::time::timeout(Duration::from_secs(20), long)
        .await
        .expect("the failed request must end")
        .expect("task");
    assert!(!done, "the stream failed with its expert shard");

    // Idle: every gauge at rest, within a few seconds (no idle-cache eviction involved: the
    // stages' timeout is minutes).
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = loop {
        let now = scrape_all(&d).await;
        let g = &now["local-gateway"];
        let running = total(g, "moe_gateway_lane_sequences");
        let queued = total(g, "moe_gateway_queue_depth");
        let admitted = total(g, "moe_gateway_sequences_admitted_total");
        let finished = total(g, "moe_gateway_sequences_finished_total");
        let kv: f64 = (0..2)
            .map(|s| total(&now[&format!("local-stage-{s}")], "moe_stage_kv_sequences"))
            .sum();
        let calls: f64 = (0..2)
            .map(|e| {
                let x = &now[&format!("local-expert-{e}")];
                total(x, "moe_expert_shard_running_calls")
                    + total(x, "moe_expert_shard_waiting_calls")
            })
            .sum();
        if running == 0.0 && queued == 0.0 && kv == 0.0 && calls == 0.0 && admitted == finished {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "not idle 20 s after the traffic: {running} running, {queued} queued, {kv} KV \
             caches, {calls} expert calls, {admitted} admitted vs {finished} finished\n{now:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    scrapes.push(last);
    for w in scrapes.windows(2) {
        monotonic(&w[0], &w[1]);
    }

    let g = &scrapes.last().expect("scrape")["local-gateway"];
    let reason = |r: &str| {
        g.get(&format!(
            "moe_gateway_sequences_finished_total{{reason=\"{r}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert!(reason("length") >= 6.0, "{g:#?}");
    assert!(reason("cancelled") >= 7.0, "abandoned: {g:#?}");
    assert!(reason("error") >= 2.0, "timed out and failed: {g:#?}");
    assert!(
        g.get("moe_gateway_requests_total{endpoint=\"completions\",status=\"400\"}")
            .is_some_and(|&n| n >= 2.0),
        "{g:#?}"
    );
    // The stages saw failed micro-batches; the restarted expert shard's counters began again.
    let failures: f64 = (0..2)
        .map(|s| {
            total(
                &scrapes.last().expect("scrape")[&format!("local-stage-{s}")],
                "moe_stage_failures_total",
            )
        })
        .sum();
    assert!(failures >= 1.0, "{:#?}", scrapes.last());
    assert_ne!(
        scrapes[0]["local-expert-0"].get("process_start_time_seconds"),
        scrapes.last().expect("scrape")["local-expert-0"].get("process_start_time_seconds"),
        "expert shard 0 was restarted"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_its_metrics_while_loading_and_after() {
    let d = Deployment::start("synthetic:tiny", 2, 2, &["--expert-replicas", "2"]);
    // 2 stages, 2 shards x 2 replicas, 1 gateway.
    assert_eq!(d.metrics.len(), 7, "{:?}", d.metrics);
    let (status, v): (u16, Value) = {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/completions", d.base))
            .json(&json!({"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": true}))
            .send()
            .await
            .expect("http");
        (r.status().as_u16(), r.json().await.expect("json"))
    };
    assert_eq!(status, 200, "{v}");
    for (name, url) in &d.metrics {
        let s = scrape(url).await;
        if name.contains("gateway") {
            assert_eq!(
                total(&s, "moe_gateway_generated_tokens_total"),
                4.0,
                "{s:#?}"
            );
            continue;
        }
        let role = if name.contains("stage") {
            "stage"
        } else {
            "expert"
        };
        assert!(
            s.keys()
                .any(|k| k.starts_with("moe_worker_info{")
                    && k.contains(&format!("role=\"{role}\""))),
            "{name}: {s:#?}"
        );
        assert_eq!(s.get("moe_worker_loaded"), Some(&1.0), "{name}");
        let rows = if role == "stage" {
            total(&s, "moe_stage_rows_total")
        } else {
            total(&s, "moe_expert_shard_rows_total")
        };
        if role == "stage" {
            // Three prompt rows and three decode steps pass every stage.
            assert_eq!(rows, 6.0, "{name}: {s:#?}");
            assert!(total(&s, "moe_stage_expert_tokens_total") > 0.0, "{name}");
        }
    }
    // Every routed token was computed by one replica of one shard: the shards' sum equals the
    // stages' sum.
    let mut staged = 0.0;
    let mut computed = 0.0;
    for (name, url) in &d.metrics {
        let s = scrape(url).await;
        staged += total(&s, "moe_stage_expert_tokens_total");
        computed += total(&s, "moe_expert_shard_expert_tokens_total");
        let _ = name;
    }
    assert!(staged > 0.0);
    assert_eq!(staged, computed);
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_spread_over_the_lanes() {
    // Two stages: two lanes. Eight requests at once used to land 7 + 1 (the first lane to step
    // took everything queued); each lane now takes at most its share of what runs and waits,
    // so the micro-batches are even and pipeline through the stages.
    let d = Deployment::start("synthetic:tiny", 2, 2, &["--max-sequences", "16"]);
    let gateway = d
        .metrics
        .iter()
        .find(|(name, _)| name.contains("gateway"))
        .map(|(_, url)| url.clone())
        .expect("gateway metrics");
    let streams: Vec<_> = (0..8)
        .map(|_| tokio::spawn(stream_tokens(d.base.clone(), 400, Some(300))))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let lanes = loop {
        let s = scrape(&gateway).await;
        if total(&s, "moe_gateway_sequences_admitted_total") >= 8.0 {
            break s
                .iter()
                .filter(|(k, _)| k.starts_with("moe_gateway_lane_sequences{"))
                .map(|(_, v)| *v)
                .collect::<Vec<f64>>();
        }
        assert!(Instant::now() < deadline, "8 requests not admitted in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lanes.len(), 2, "{lanes:?}");
    assert_eq!(lanes.iter().sum::<f64>(), 8.0, "{lanes:?}");
    assert!(
        lanes.iter().all(|&n| (3.0..=5.0).contains(&n)),
        "the lanes run {lanes:?} of 8 sequences"
    );
    for s in streams {
        s.await.expect("stream");
    }
}
