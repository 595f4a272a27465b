//! A checkpoint's own chat template, rendered as transformers' `apply_chat_template` renders
//! it: Jinja (MiniJinja here) with `trim_blocks` and `lstrip_blocks`, loop controls, Python's
//! string and dict methods, `raise_exception`, `strftime_now`, and a `tojson` that writes what
//! Python's `json.dumps` writes. The variables are transformers': `messages`, `tools`,
//! `add_generation_prompt`, `bos_token`, `eos_token`.

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// Work one render may do (MiniJinja fuel): far above any real template on any real
/// conversation, so that a template looping on user input cannot hang the gateway.
const FUEL: u64 = 5_000_000;

/// A JSON value that keeps the key order of the text it was read from (MiniJinja's value,
/// whose maps keep insertion order): what a request's tools are read into, so that `tojson`
/// writes their keys in the order the client sent them, as transformers would.
pub type OrderedJson = Value;

/// A compiled chat template and the special tokens it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// A second template to use when the request has tools (`tool_use` in a named set).
    has_tool_template: bool,
    bos_token: String,
    eos_token: String,
    /// Where it came from, for errors.
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A special token in `tokenizer_config.json`: a string, or an added-token object.
fn token_text(v: Option<&Json>) -> String {
    match v {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of a checkpoint folder: `chat_template.jinja`, else `chat_template` in
    /// `tokenizer_config.json` (one template, or a list of named ones: `default`, and
    /// `tool_use` for requests with tools). `None` when it has neither.
    pub fn for_checkpoint(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&config_path, format!("invalid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json::Null,
            Err(e) => return Err(Error::io(&config_path, e)),
        };
        let bos = token_text(config.get("bos_token"));
        let eos = token_text(config.get("eos_token"));
        let file = dir.join("chat_template.jinja");
        if file.exists() {
            let source = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
            return Self::new(&source, None, &bos, &eos, &file.display().to_string()).map(Some);
        }
        let origin = format!("{}: chat_template", config_path.display());
        match config.get("chat_template") {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Self::new(s, None, &bos, &eos, &origin).map(Some),
            Some(Json::Array(named)) => {
                let find = |name: &str| {
                    named.iter().find_map(|t| {
                        (t.get("name").and_then(|n| n.as_str()) == Some(name))
                            .then(|| t.get("template").and_then(|s| s.as_str()))
                            .flatten()
                    })
                };
                let default = find("default").ok_or_else(|| {
                    Error::checkpoint(&config_path, "chat_template: no template named `default`")
                })?;
                Self::new(default, find("tool_use"), &bos, &eos, &origin).map(Some)
            }
            Some(other) => Err(Error::checkpoint(
                &config_path,
                format!("chat_template: expected a string or a list, got {other}"),
            )),
        }
    }

    /// Compiles `source` (and `tool_use`, used when a request has tools).
    pub fn new(
        source: &str,
        tool_use: Option<&str>,
        bos_token: &str,
        eos_token: &str,
        origin: &str,
    ) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Tokenizer(format!("{origin}: {e}")))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let compile = |env: &mut Environment<'static>, name: &'static str, src: &str| {
            env.add_template_owned(name, src.to_string())
                .map_err(|e| Error::Tokenizer(format!("{origin}: {e:#}")))
        };
        compile(&mut env, "default", source)?;
        if let Some(t) = tool_use {
            compile(&mut env, "tool_use", t)?;
        }
        Ok(Self {
            env,
            has_tool_template: tool_use.is_some(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            origin: origin.to_string(),
        })
    }

    /// The prompt text for `messages` (a list of `{role, content, ...}`), with `tools` when
    /// given (maps keep their order: read them into [`OrderedJson`]). A refusal of the template
    /// (`raise_exception`) or a render error is an invalid `messages` error carrying the
    /// template's message.
    pub fn render<M: Serialize + ?Sized, T: Serialize + ?Sized>(
        &self,
        messages: &M,
        tools: Option<&T>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let name = if tools.is_some() && self.has_tool_template {
            "tool_use"
        } else {
            "default"
        };
        let template = self
            .env
            .get_template(name)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.origin)))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        template.render(ctx).map_err(|e| {
            let message = match e.kind() {
                // The template's own words, as transformers reports them.
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => format!("the chat template ({}) failed: {e:#}", self.origin),
            };
            Error::invalid("messages", message)
        })
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time (UTC, as in a container) in Python's `strftime`
/// format.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    strftime(&format, jiff::Timestamp::now())
}

fn strftime(format: &str, t: jiff::Timestamp) -> std::result::Result<String, minijinja::Error> {
    jiff::fmt::strtime::format(format, t).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now({format:?}): {e}"),
        )
    })
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`
/// (separators `, ` and `: `; with an indent, `,` and `: ` and one item per line).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn py_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let s = v.to_string();
            // Python writes inf/nan as Infinity/NaN; JSON has neither, nor do requests.
            out.push_str(&s);
        }
        ValueKind::String => out.push_str(
            &serde_json::to_string(v.as_str().unwrap_or_default())
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                py_json(item, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                let key = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&key).unwrap_or_default());
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&v.to_string()).unwrap_or_default()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: impl Serialize) -> Result<String> {
        ChatTemplate::new(src, None, "<s>", "</s>", "test")?.render(&messages, None::<&Json>, true)
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let out = render(
            "{{ messages[0] | tojson }}|{{ [] | tojson }}|{{ {'a': [1, 2.5, none, true]} | tojson(indent=2) }}",
            // Read from text, keys keep its order.
            serde_json::from_str::<OrderedJson>(
                r#"[{"role": "user", "content": "caf\u00e9 \"q\" <b>"}]"#,
            )
            .expect("json"),
        )
        .expect("render");
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"caf\u{e9} \\\"q\\\" <b>\"}|[]|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}"
        );
    }

    #[test]
    fn a_template_refusal_is_an_invalid_messages_error_with_its_words() {
        let e = render(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Only user first!') }}{% endif %}",
            serde_json::json!([{"role": "assistant", "content": "x"}]),
        )
        .expect_err("refused");
        assert_eq!(e.to_string(), "invalid messages: Only user first!");
        // A template that never ends runs out of fuel instead of hanging.
        let e = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            serde_json::json!([]),
        )
        .expect_err("fuel");
        assert!(e.to_string().contains("chat template"), "{e}");
        let e = ChatTemplate::new("{% if %}", None, "", "", "broken.jinja").expect_err("syntax");
        assert!(e.to_string().contains("broken.jinja"), "{e}");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-02-29 13:05:09 UTC, a leap day.
        let t = jiff::Timestamp::from_second(1_709_211_909).expect("time");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %B %b %-d %j %%", t).expect("format"),
            "2024-02-29 13:05:09 February Feb 29 060 %"
        );
        assert_eq!(
            strftime("%d %B %Y", jiff::Timestamp::UNIX_EPOCH).expect("format"),
            "01 January 1970"
        );
        let today = render("{{ strftime_now('%Y') }}", serde_json::json!([])).expect("now");
        assert!(today.parse::<i32>().is_ok_and(|y| y >= 2026), "{today}");
    }
}
