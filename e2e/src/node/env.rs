//! A container's environment as the kubelet builds it: `envFrom`, then `env` (literal values with
//! `$(VAR)` expansion, the downward API, Secret and ConfigMap keys), and `$(VAR)` expansion in
//! command and args.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod};

/// Secret or ConfigMap data by object name (Secret values decoded as UTF-8).
pub type ObjectData = BTreeMap<String, BTreeMap<String, String>>;

/// What a container's environment is computed from.
#[derive(Debug)]
pub struct EnvSources<'a> {
    pub pod: &'a Pod,
    pub pod_ip: String,
    pub host_ip: String,
    pub secrets: &'a ObjectData,
    pub config_maps: &'a ObjectData,
    /// Variables every container gets first (PATH, HOSTNAME, KUBERNETES_SERVICE_*).
    pub base: Vec<(String, String)>,
}

/// An ordered environment where a later value replaces an earlier one in place.
#[derive(Debug, Default, Clone)]
pub struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    pub fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_string(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced by its value, an undefined
/// reference is left as written, and `$$` is an escaped `$`.
pub fn expand(input: &str, env: &Env) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.as_bytes()[0] {
                b'$' => {
                    out.push('$');
                    1
                }
                b'(' => match rest.find(')') {
                    Some(close) => {
                        let name = &rest[1..close];
                        match env.get(name) {
                            Some(v) => out.push_str(v),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                _ => {
                    // `$x`: not a reference; keep the `$` and let the next character be read.
                    out.push('$');
                    0
                }
            };
            cursor += advance + 1;
            checkpoint = cursor;
        } else {
            cursor += 1;
        }
    }
    out.push_str(&input[checkpoint..]);
    out
}

/// The names of the Secrets and ConfigMaps the pod's containers (env, envFrom) and volumes use.
pub fn referenced_objects(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut secrets = BTreeSet::new();
    let mut config_maps = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return (secrets, config_maps);
    };
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        for e in c.env_from.iter().flatten() {
            if let Some(s) = &e.secret_ref {
                secrets.insert(s.name.clone());
            }
            if let Some(m) = &e.config_map_ref {
                config_maps.insert(m.name.clone());
            }
        }
        for e in c.env.iter().flatten() {
            let Some(from) = &e.value_from else { continue };
            if let Some(s) = &from.secret_key_ref {
                secrets.insert(s.name.clone());
            }
            if let Some(m) = &from.config_map_key_ref {
                config_maps.insert(m.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(s);
        }
        if let Some(m) = &v.config_map {
            config_maps.insert(m.name.clone());
        }
    }
    (secrets, config_maps)
}

/// The container's environment, or the reason it cannot be built (like the kubelet's
/// `CreateContainerConfigError`).
pub fn container_env(src: &EnvSources<'_>, c: &Container) -> Result<Env, String> {
    let mut env = Env::default();
    for (k, v) in &src.base {
        env.set(k, v.clone());
    }
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        if let Some(r) = &from.config_map_ref {
            match src.config_maps.get(&r.name) {
                Some(data) => data
                    .iter()
                    .for_each(|(k, v)| env.set(&format!("{prefix}{k}"), v.clone())),
                None if r.optional == Some(true) => {}
                None => return Err(format!("configmap {:?} not found", r.name)),
            }
        }
        if let Some(r) = &from.secret_ref {
            match src.secrets.get(&r.name) {
                Some(data) => data
                    .iter()
                    .for_each(|(k, v)| env.set(&format!("{prefix}{k}"), v.clone())),
                None if r.optional == Some(true) => {}
                None => return Err(format!("secret {:?} not found", r.name)),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = match &e.value_from {
            None => expand(e.value.as_deref().unwrap_or(""), &env),
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    field_value(src, &f.field_path)?
                } else if let Some(r) = &from.secret_key_ref {
                    match src.secrets.get(&r.name).and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if r.optional == Some(true) => continue,
                        None => return Err(format!("secret {:?} has no key {:?}", r.name, r.key)),
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    match src.config_maps.get(&r.name).and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!("configmap {:?} has no key {:?}", r.name, r.key));
                        }
                    }
                } else if let Some(r) = &from.resource_field_ref {
                    resource_value(c, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))?
                } else {
                    return Err(format!("env {:?}: unsupported valueFrom", e.name));
                }
            }
        };
        env.set(&e.name, value);
    }
    Ok(env)
}

fn field_value(src: &EnvSources<'_>, path: &str) -> Result<String, String> {
    let meta = &src.pod.metadata;
    let spec = src.pod.spec.as_ref();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels['", meta.labels.as_ref()) {
        return Ok(v);
    }
    if let Some(v) = keyed("metadata.annotations['", meta.annotations.as_ref()) {
        return Ok(v);
    }
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => src.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => src.host_ip.clone(),
        other => return Err(format!("unsupported fieldRef {other:?}")),
    })
}

/// `resourceFieldRef`: the container's limit (or request) in units of the divisor, rounded up
/// like the kubelet does. Without a limit, the node's allocatable (a fixed large value here).
fn resource_value(c: &Container, resource: &str, divisor: Option<&str>) -> Result<String, String> {
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resourceFieldRef {resource:?}"))?;
    let res = c.resources.as_ref();
    let map = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("unsupported resourceFieldRef {resource:?}")),
    };
    let value = match map.and_then(|m| m.get(name)) {
        Some(q) => parse_quantity(&q.0)?,
        None if name == "cpu" => 64.0,
        None if name == "memory" => 512.0 * 1024f64.powi(3),
        None => return Err(format!("unsupported resourceFieldRef {resource:?}")),
    };
    let divisor = match divisor {
        Some(d) => parse_quantity(d)?,
        None => 1.0,
    };
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// A Kubernetes quantity (`500m`, `2`, `16Gi`, `1e3`) as a number.
pub fn parse_quantity(q: &str) -> Result<f64, String> {
    let q = q.trim();
    let split = q
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.' || ch == '-' || ch == '+'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad quantity {q:?}"))?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        s if s.starts_with(['e', 'E']) => {
            10f64.powi(s[1..].parse().map_err(|_| format!("bad quantity {q:?}"))?)
        }
        _ => return Err(format!("bad quantity {q:?}")),
    };
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource,
        ObjectFieldSelector, PodSpec, SecretKeySelector,
    };

    fn env_of(pairs: &[(&str, &str)]) -> Env {
        let mut e = Env::default();
        for (k, v) in pairs {
            e.set(k, v.to_string());
        }
        e
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let env = env_of(&[("A", "x"), ("B", "y y")]);
        assert_eq!(expand("$(A)", &env), "x");
        assert_eq!(expand("--a=$(A) --b=$(B)", &env), "--a=x --b=y y");
        assert_eq!(expand("$(MISSING)", &env), "$(MISSING)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$$$(A)", &env), "$x");
        assert_eq!(expand("cost $5", &env), "cost $5");
        assert_eq!(expand("$(A", &env), "$(A");
        assert_eq!(expand("end$", &env), "end$");
        assert_eq!(expand("", &env), "");
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn env_resolves_downward_api_secrets_and_config_maps() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.namespace = Some("ns".into());
        pod.metadata.labels = Some([("app".to_string(), "gw".to_string())].into());
        pod.spec = Some(PodSpec {
            node_name: Some("gpu-node-1".into()),
            ..Default::default()
        });
        let secrets: ObjectData = [(
            "s".to_string(),
            [("k".to_string(), "secret".to_string())].into(),
        )]
        .into();
        let cms: ObjectData = [(
            "cm".to_string(),
            [
                ("X".to_string(), "1".to_string()),
                ("Y".to_string(), "2".to_string()),
            ]
            .into(),
        )]
        .into();
        let src = EnvSources {
            pod: &pod,
            pod_ip: "10.77.0.5".into(),
            host_ip: "10.77.0.1".into(),
            secrets: &secrets,
            config_maps: &cms,
            base: vec![("PATH".into(), "/bin".into())],
        };
        let c = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    ..Default::default()
                }),
                prefix: Some("CM_".into()),
                ..Default::default()
            }]),
            env: Some(vec![
                field("POD", "metadata.name"),
                field("NS", "metadata.namespace"),
                field("IP", "status.podIP"),
                field("NODE", "spec.nodeName"),
                field("APP", "metadata.labels['app']"),
                var("ADDR", "$(IP):8000"),
                var("CM_X", "override"),
                EnvVar {
                    name: "S".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "s".into(),
                            key: "k".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "OPT".into(),
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "nope".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let env = container_env(&src, &c).unwrap_or_default();
        let got: Vec<(&str, &str)> = env
            .vars()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("PATH", "/bin"),
                ("CM_X", "override"),
                ("CM_Y", "2"),
                ("POD", "p"),
                ("NS", "ns"),
                ("IP", "10.77.0.5"),
                ("NODE", "gpu-node-1"),
                ("APP", "gw"),
                ("ADDR", "10.77.0.5:8000"),
                ("S", "secret"),
            ]
        );

        let missing = Container {
            name: "c".into(),
            env: Some(vec![EnvVar {
                name: "S".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "s".into(),
                        key: "absent".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(container_env(&src, &missing).is_err());
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_quantity("500m"), Ok(0.5));
        assert_eq!(parse_quantity("2"), Ok(2.0));
        assert_eq!(parse_quantity("1Gi"), Ok(1073741824.0));
        assert_eq!(parse_quantity("1e3"), Ok(1000.0));
        assert!(parse_quantity("x").is_err());
    }
}
