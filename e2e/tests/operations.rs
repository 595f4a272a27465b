//! Operating moe-serve: the chart's alert rules pass their promtool unit tests; on a real
//! cluster, a real Prometheus scrapes a deployment as the operator's PodMonitor says, every
//! query of the shipped Grafana dashboard answers with data, and the expert-shard-down alert
//! fires when a shard loses its last replica and resolves when it is back; and updating one
//! expert shard rolls only its replicas, one at a time, while requests keep succeeding.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::moe::{self, chart_dir};
use e2e::wait::until;
use serde_json::{Value, json};

fn prometheus_dir() -> Result<PathBuf> {
    e2e::prometheus_bin_dir()
}

/// The chart's PrometheusRule rendered with extra helm arguments, as a Prometheus rule file
/// (its `spec`).
fn rendered_rules(extra: &[&str]) -> Result<Value> {
    let helm = e2e::k8s_bin_dir()?.join("helm");
    let mut cmd = Command::new(helm);
    cmd.args(["template", "moe"])
        .arg(chart_dir())
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .args([
            "--set",
            "prometheusRule.enabled=true,prometheusRule.force=true",
        ]);
    cmd.args(extra);
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule: Value = serde_yaml::from_slice(&out.stdout)?;
    Ok(rule["spec"].clone())
}

fn promtool(args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new(prometheus_dir()?.join("promtool"))
        .args(args)
        .current_dir(dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?}:\n{text}");
    Ok(text)
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() -> Result<()> {
    let dir = tempfile_dir("rules")?;
    std::fs::write(
        dir.join("rules.yaml"),
        serde_json::to_string_pretty(&rendered_rules(&[])?)?,
    )?;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring/alerts_test.yaml"),
        dir.join("alerts_test.yaml"),
    )?;
    // Every alert links to its section of the operations guide.
    let guide = std::fs::read_to_string(moe::repo_root().join("docs/operations.md"))?;
    let rules = rendered_rules(&[])?;
    for r in rules["groups"][0]["rules"].as_array().context("rules")? {
        let runbook = r["annotations"]["runbook"].as_str().context("runbook")?;
        let anchor = runbook
            .strip_prefix("docs/operations.md#")
            .context("runbook link")?;
        assert!(
            guide.contains(&format!("<a id=\"{anchor}\"></a>")),
            "{}: docs/operations.md has no section {anchor}",
            r["alert"]
        );
    }
    let checked = promtool(&["check", "rules", "rules.yaml"], &dir)?;
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yaml"], &dir)?;
    assert!(tested.contains("SUCCESS"), "{tested}");
    // A threshold is a value: raising the error ratio above what the test's traffic fails
    // silences that alert, and the unit tests notice.
    std::fs::write(
        dir.join("rules.yaml"),
        serde_json::to_string_pretty(&rendered_rules(&[
            "--set-json",
            "prometheusRule.thresholds.errorRatio=0.6",
        ])?)?,
    )?;
    let err = promtool(&["test", "rules", "alerts_test.yaml"], &dir)
        .expect_err("the unit tests depend on the threshold");
    assert!(err.to_string().contains("MoEGatewayErrors"), "{err}");
    Ok(())
}

#[test]
fn the_dashboard_is_grafana_json_whose_queries_use_only_its_variables() -> Result<()> {
    let text = std::fs::read_to_string(chart_dir().join("dashboards/moe-serve.json"))?;
    let d: Value = serde_json::from_str(&text)?;
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .context("templating")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "namespace", "deployment"]);
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 15, "{queries:?}");
    for (title, expr) in &queries {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find('$') {
            rest = &rest[at + 1..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                vars.contains(&name.as_str()) || name == "__rate_interval",
                "{title}: unknown variable ${name} in {expr}"
            );
        }
        assert!(
            expr.contains("namespace=\"$namespace\"")
                && expr.contains("moe_deployment=\"$deployment\""),
            "{title}: every query selects the deployment: {expr}"
        );
    }
    Ok(())
}

/// (panel title, query) of every target.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_string(), e.to_string()));
            }
        }
    }
    out
}

fn tempfile_dir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "moe-e2e-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A Prometheus label name as the Kubernetes discovery writes pod labels.
fn meta_label(label: &str) -> String {
    moe_operator::resources::sanitize(label)
}

/// The scrape configs the Prometheus Operator generates for a PodMonitor (one per endpoint:
/// keep the selected, running pods' containers on the endpoint's port; set namespace,
/// container, pod, job and endpoint; then the PodMonitor's own relabelings), with pods found
/// through this cluster's API server.
fn scrape_configs(pm: &Value, kubeconfig: &Path, interval: &str) -> Result<Vec<Value>> {
    let ns = pm["metadata"]["namespace"].as_str().context("namespace")?;
    let name = pm["metadata"]["name"].as_str().context("name")?;
    let selector = pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("selector")?;
    let mut out = Vec::new();
    for (i, e) in pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .enumerate()
    {
        let port = e["port"].as_str().context("port")?;
        let mut relabel = Vec::new();
        for (k, v) in selector {
            relabel.push(json!({
                "action": "keep",
                "source_labels": [
                    format!("__meta_kubernetes_pod_label_{}", meta_label(k)),
                    format!("__meta_kubernetes_pod_labelpresent_{}", meta_label(k)),
                ],
                "regex": format!("({});true", v.as_str().context("label value")?),
            }));
        }
        relabel.push(json!({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"}));
        relabel.push(json!({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port}));
        for (from, to) in [
            ("__meta_kubernetes_namespace", "namespace"),
            ("__meta_kubernetes_pod_container_name", "container"),
            ("__meta_kubernetes_pod_name", "pod"),
        ] {
            relabel.push(json!({"source_labels": [from], "target_label": to}));
        }
        relabel.push(json!({"target_label": "job", "replacement": format!("{ns}/{name}")}));
        relabel.push(json!({"target_label": "endpoint", "replacement": port}));
        for r in e["relabelings"].as_array().into_iter().flatten() {
            relabel.push(json!({
                "action": r["action"].as_str().unwrap_or("replace").to_lowercase(),
                "source_labels": r["sourceLabels"],
                "target_label": r["targetLabel"],
            }));
        }
        out.push(json!({
            "job_name": format!("podMonitor/{ns}/{name}/{i}"),
            "scrape_interval": interval,
            "scrape_timeout": "1s",
            "metrics_path": e["path"].as_str().unwrap_or("/metrics"),
            "scheme": e["scheme"].as_str().unwrap_or("http"),
            "kubernetes_sd_configs": [{
                "role": "pod",
                "kubeconfig_file": kubeconfig,
                "namespaces": {"names": [ns]},
            }],
            "relabel_configs": relabel,
        }));
    }
    Ok(out)
}

/// A Prometheus process, stopped on drop.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(config: &Value, rules: &Value, dir: &Path) -> Result<Self> {
        std::fs::write(dir.join("rules.yaml"), serde_json::to_string_pretty(rules)?)?;
        std::fs::write(
            dir.join("prometheus.yaml"),
            serde_json::to_string_pretty(config)?,
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(prometheus_dir()?.join("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yaml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let p = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        until(
            "Prometheus to be ready",
            Duration::from_secs(60),
            || async {
                let r = p.http.get(format!("{}/-/ready", p.url)).send().await;
                Ok(r.ok().filter(|r| r.status().is_success()).map(|_| ()))
            },
        )
        .await?;
        Ok(p)
    }

    /// The result vector of an instant query; an error for a query Prometheus refuses.
    async fn query(&self, q: &str) -> Result<Vec<Value>> {
        let v: Value = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await?
            .json()
            .await?;
        if v["status"] != "success" {
            bail!("{q}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    async fn firing(&self, alert: &str, shard: &str) -> Result<bool> {
        let q = format!(
            "ALERTS{{alertname=\"{alert}\", alertstate=\"firing\", moe_expert_shard=\"{shard}\"}}"
        );
        Ok(!self.query(&q).await?.is_empty())
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_deployment_the_dashboard_answers_and_a_lost_expert_shard_alerts()
-> Result<()> {
    let cluster = moe::cluster().await;
    let client = cluster.client().await?;
    let ns = cluster.namespace("monitoring").await?;

    // The Prometheus Operator's CRDs, so the operator creates PodMonitors and the chart its
    // ServiceMonitor and PrometheusRule.
    let crds = prometheus_dir()?.join("../crds");
    cluster.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=e2e",
        "-f",
        &crds.to_string_lossy(),
    ])?;
    for c in ["podmonitors", "servicemonitors", "prometheusrules"] {
        moe::established(cluster, &format!("{c}.monitoring.coreos.com")).await?;
    }
    moe::install_operator(
        cluster,
        &ns,
        &[
            "--set",
            "rbac.aggregateToDefaultRoles=false",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.thresholds.shardDownFor=10s",
            "--set",
            "workerMonitoring.interval=2s",
        ],
    )
    .await?;
    moe::apply_example(
        cluster,
        &client,
        &ns,
        "tiny.yaml",
        "tiny",
        Duration::from_secs(240),
    )
    .await?;

    // What the operator and the chart created.
    let pm: Value = until(
        "the operator to create the PodMonitor",
        Duration::from_secs(60),
        || async {
            Ok(cluster
                .kubectl(&["-n", &ns, "get", "podmonitor", "tiny-workers", "-o", "json"])
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok()))
        },
    )
    .await?;
    assert_eq!(
        pm["metadata"]["ownerReferences"][0]["kind"],
        "MoEDeployment"
    );
    let rule: Value = serde_json::from_str(&cluster.kubectl(&[
        "-n",
        &ns,
        "get",
        "prometheusrule",
        "moe-operator",
        "-o",
        "json",
    ])?)?;
    cluster.kubectl(&["-n", &ns, "get", "servicemonitor", "moe-operator"])?;

    // A Prometheus scraping the workers as the PodMonitor says, and the operator pod as its
    // ServiceMonitor does (labels honoured), evaluating the installed rules.
    let dir = tempfile_dir("prometheus")?;
    let mut jobs = scrape_configs(&pm, cluster.kubeconfig(), "2s")?;
    jobs.push(json!({
        "job_name": "moe-operator",
        "honor_labels": true,
        "scrape_interval": "2s",
        "scrape_timeout": "1s",
        "kubernetes_sd_configs": [{
            "role": "pod",
            "kubeconfig_file": cluster.kubeconfig(),
            "namespaces": {"names": [&ns]},
        }],
        "relabel_configs": [
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], "regex": "moe-operator"},
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http-metrics"},
        ],
    }));
    let config = json!({
        "global": {"scrape_interval": "2s", "evaluation_interval": "1s"},
        "rule_files": [dir.join("rules.yaml")],
        "scrape_configs": jobs,
    });
    let prom = Prometheus::start(&config, &rule["spec"], &dir).await?;

    // Traffic: completions, and bad requests (400).
    let base = moe::gateway_url(&client, &ns, "tiny").await?;
    let http = reqwest::Client::new();
    for i in 0..12u32 {
        let r = http
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": [1 + i, 2, 3], "max_tokens": 6, "ignore_eos": true}))
            .send()
            .await?;
        assert_eq!(r.status(), 200, "{}", r.text().await?);
    }
    let r = http
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": [1, 2], "max_tokens": 0}))
        .send()
        .await?;
    assert_eq!(r.status(), 400);

    // Every worker pod is a live target with its deployment's labels, and the operator too.
    let workers = moe::pods(&client, &ns, "serving.moe.dev/deployment=tiny").await?;
    until(
        "Prometheus to scrape every worker and the operator",
        Duration::from_secs(90),
        || async {
            let up = prom
                .query("up{moe_deployment=\"tiny\", namespace=~\".+\"} == 1")
                .await?;
            let op = prom.query("moe_operator_expert_shard_replicas").await?;
            Ok((up.len() == workers.len() && !op.is_empty()).then_some(()))
        },
    )
    .await
    .with_context(|| format!("{} worker pods; logs in {}", workers.len(), dir.display()))?;

    // Every query of the dashboard, with the variables a user picks, answers with data.
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        chart_dir().join("dashboards/moe-serve.json"),
    )?)?;
    let queries = dashboard_queries(&dashboard);
    until(
        "every dashboard query to return data",
        Duration::from_secs(90),
        || async {
            let mut empty = Vec::new();
            for (title, expr) in &queries {
                let q = expr
                    .replace("$namespace", &ns)
                    .replace("$deployment", "tiny")
                    .replace("$__rate_interval", "1m");
                // A query Prometheus refuses fails the test at once.
                if prom.query(&q).await?.is_empty() {
                    empty.push(format!("{title}: {q}"));
                }
            }
            if empty.is_empty() {
                Ok(Some(()))
            } else {
                bail!("no data yet:\n{}", empty.join("\n"))
            }
        },
    )
    .await?;
    // The variables' own queries list this deployment.
    let deployments = prom
        .query(&format!(
            "count by (moe_deployment) (moe_gateway_ready{{namespace=\"{ns}\"}})"
        ))
        .await?;
    assert_eq!(deployments.len(), 1);
    assert_eq!(deployments[0]["metric"]["moe_deployment"], "tiny");

    // Expert shard 1 loses its only replica (its process frozen: nothing answers), the alert
    // fires after its 10 s; once the process runs again it resolves.
    assert!(!prom.firing("MoEExpertShardDown", "1").await?);
    let shard = moe::pods(
        &client,
        &ns,
        "serving.moe.dev/deployment=tiny,serving.moe.dev/expert-shard=1",
    )
    .await?;
    assert_eq!(shard.len(), 1, "shard 1 runs one replica");
    let pid = moe::pid(&shard[0]).context("expert pid")?;
    signal(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let fired = until(
        "MoEExpertShardDown to fire for shard 1",
        Duration::from_secs(60),
        || async { Ok(prom.firing("MoEExpertShardDown", "1").await?.then_some(())) },
    )
    .await;
    signal(pid, nix::sys::signal::Signal::SIGCONT)?;
    fired?;
    assert!(
        !prom.firing("MoEExpertShardDown", "0").await?,
        "only the lost shard alerts"
    );
    until(
        "MoEExpertShardDown to resolve",
        Duration::from_secs(90),
        || async { Ok((!prom.firing("MoEExpertShardDown", "1").await?).then_some(())) },
    )
    .await?;
    drop(prom);
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

/// Requests sent in a loop until `stop`: (succeeded, failures with their answers).
async fn steady_traffic(base: String, stop: Arc<AtomicBool>, seed: u32) -> (u32, Vec<String>) {
    let http = reqwest::Client::new();
    let (mut ok, mut failed) = (0, Vec::new());
    let mut i = 0u32;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let r = http
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": [1 + (seed + i) % 50, 2, 3], "max_tokens": 8, "ignore_eos": true}))
            .timeout(Duration::from_secs(60))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => ok += 1,
            Ok(r) => failed.push(format!(
                "{}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (ok, failed)
}

fn memory_limit(p: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    let c = p.spec.as_ref()?.containers.first()?;
    Some(
        c.resources
            .as_ref()?
            .limits
            .as_ref()?
            .get("memory")?
            .0
            .clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_one_expert_shard_rolls_only_its_replicas_one_at_a_time_while_requests_succeed()
-> Result<()> {
    let cluster = moe::cluster().await;
    let client = cluster.client().await?;
    let ns = cluster.namespace("rollout").await?;
    // Tests of this binary share the cluster: only one release may own the aggregated roles.
    moe::install_operator(
        cluster,
        &ns,
        &["--set", "rbac.aggregateToDefaultRoles=false"],
    )
    .await?;
    // tiny with two replicas per expert shard and no autoscaler moving them.
    let text = std::fs::read_to_string(moe::example("tiny.yaml"))?;
    let mut md: Value = serde_yaml::from_str(&text)?;
    md["spec"]["experts"] = json!({"minReplicas": 2, "maxReplicas": 2});
    let file = tempfile_dir("rollout")?.join("tiny.yaml");
    std::fs::write(&file, serde_json::to_string(&md)?)?;
    cluster.kubectl(&["-n", &ns, "apply", "-f", &file.to_string_lossy()])?;
    moe::wait_ready(&client, &ns, "tiny", Duration::from_secs(240))
        .await
        .map_err(|e| e.context(moe::diagnostics(cluster, &ns)))?;

    let all = "serving.moe.dev/deployment=tiny";
    let shard1 = "serving.moe.dev/deployment=tiny,serving.moe.dev/expert-shard=1";
    let uids = |pods: &[k8s_openapi::api::core::v1::Pod]| -> BTreeMap<String, String> {
        pods.iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.metadata.uid.clone().unwrap_or_default(),
                )
            })
            .collect()
    };
    let before = moe::pods(&client, &ns, all).await?;
    let old_shard1 = uids(&moe::pods(&client, &ns, shard1).await?);
    assert_eq!(old_shard1.len(), 2);
    let others: BTreeMap<String, String> = uids(&before)
        .into_iter()
        .filter(|(n, _)| !old_shard1.contains_key(n))
        .collect();
    let generations = |c: &str| -> Result<String> {
        cluster
            .kubectl(&[
                "-n",
                &ns,
                "get",
                "deployments,statefulsets",
                "-l",
                all,
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.metadata.generation} {end}",
            ])
            .map(|s| s.trim().to_string())
            .with_context(|| c.to_string())
    };
    let gens_before = generations("before")?;

    let base = moe::gateway_url(&client, &ns, "tiny").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..2)
        .map(|k| tokio::spawn(steady_traffic(base.clone(), stop.clone(), k * 17)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Shard 1 gets its own resources.
    cluster.kubectl(&[
        "-n", &ns, "patch", "moedeployment", "tiny", "--type", "merge", "-p",
        r#"{"spec":{"experts":{"shards":[{"shard":1,"resources":{"requests":{"cpu":"250m","memory":"256Mi"},"limits":{"memory":"1100Mi"}}}]}}}"#,
    ])?;
    // Until the rollout is over: never fewer than two ready replicas serving, never more than
    // three live pods (one surge) nor more than one starting, and each old replica drains
    // before it stops.
    let violations = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let rolled = until(
        "shard 1 to roll to its new resources",
        Duration::from_secs(240),
        || {
            let (client, ns, violations) = (client.clone(), ns.clone(), violations.clone());
            async move {
                let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
                    kube::Api::namespaced(client.clone(), &ns);
                let pods = api
                    .list(&kube::api::ListParams::default().labels(shard1))
                    .await?
                    .items;
                // Draining (terminating) replicas do not count: they take no new work.
                let live: Vec<_> = pods
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let ready = live.iter().filter(|p| moe::is_ready(p)).count();
                let starting = live.len() - ready;
                if ready < 2 || starting > 1 || live.len() > 3 {
                    let state: Vec<String> = pods
                        .iter()
                        .map(|p| {
                            format!(
                                "{} ready={} terminating={} memory={:?}",
                                p.metadata.name.clone().unwrap_or_default(),
                                moe::is_ready(p),
                                p.metadata.deletion_timestamp.is_some(),
                                memory_limit(p)
                            )
                        })
                        .collect();
                    if let Ok(mut v) = violations.lock() {
                        v.push(state.join("; "));
                    }
                }
                let new = live
                    .iter()
                    .filter(|p| memory_limit(p).as_deref() == Some("1100Mi"))
                    .count();
                Ok((pods.len() == 2 && new == 2 && ready == 2).then_some(()))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let mut ok = 0;
    let mut failed = Vec::new();
    for t in traffic {
        let (o, f) = t.await?;
        ok += o;
        failed.extend(f);
    }
    rolled.map_err(|e| e.context(moe::diagnostics(cluster, &ns)))?;
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rollout: {failed:#?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 10, "only {ok} requests ran during the rollout");
    let violations = violations.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(
        violations.is_empty(),
        "mid-rollout, shard 1 had fewer than 2 ready replicas, more than one starting or more \
         than one surge replica:\n{}",
        violations.join("\n")
    );

    // Shard 1's replicas are new; every other pod and workload is the one from before.
    let after = moe::pods(&client, &ns, all).await?;
    let new_shard1 = uids(&moe::pods(&client, &ns, shard1).await?);
    assert!(
        new_shard1.keys().all(|n| !old_shard1.contains_key(n)),
        "{new_shard1:?}"
    );
    let others_after: BTreeMap<String, String> = uids(&after)
        .into_iter()
        .filter(|(n, _)| !new_shard1.contains_key(n))
        .collect();
    assert_eq!(others_after, others, "only shard 1's pods were replaced");
    let gens_after = generations("after")?;
    let changed: Vec<(&str, &str)> = gens_before
        .split(' ')
        .zip(gens_after.split(' '))
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 1, "{gens_before} -> {gens_after}");
    assert!(changed[0].0.starts_with("tiny-expert-1="), "{changed:?}");
    // Each old replica drained: it said so, then stopped.
    for old in old_shard1.keys() {
        let log = std::fs::read_to_string(cluster.pod_log(&ns, old, "expert")).unwrap_or_default();
        assert!(log.contains("draining"), "{old} did not drain:\n{log}");
    }
    cluster.delete_namespace(&ns).await?;
    Ok(())
}
