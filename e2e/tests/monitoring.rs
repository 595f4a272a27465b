//! Operating moe-serve with Prometheus: the chart's alert rules pass their promtool unit tests;
//! on a real cluster, a real Prometheus scrapes a deployment as the operator's PodMonitor says,
//! every query of the shipped Grafana dashboard answers with data, and the expert-shard-down
//! alert fires when a shard loses its last replica and resolves when it is back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{c}.monitoring.coreos.com"),
        ])?;
    }
    moe::install_operator(
        cluster,
        &ns,
        &[
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
