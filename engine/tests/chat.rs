//! Chat templates against transformers: for every golden checkpoint with a template, the
//! rendered text and token ids of each conversation in its `chat.json` (made by
//! `scripts/golden/make_chat.py` with `apply_chat_template`) are equal, and a conversation
//! the template refuses is refused with the template's message.

use std::path::Path;

use moe_engine::chat::{ChatTemplate, OrderedJson};
use moe_engine::tokenizer::Tokenizer;
use serde_json::Value;

#[test]
fn chat_templates_render_what_transformers_renders() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut checked = 0;
    for dir in std::fs::read_dir(&root).expect("golden folder").flatten() {
        let dir = dir.path();
        let Ok(text) = std::fs::read_to_string(dir.join("chat.json")) else {
            continue;
        };
        let fixture: Value = serde_json::from_str(&text).expect("chat.json");
        // The tools again, keys in the file's order (serde_json's maps sort them).
        let ordered: OrderedJson = serde_json::from_str(&text).expect("chat.json");
        let template = ChatTemplate::for_checkpoint(&dir)
            .expect("template loads")
            .expect("the checkpoint has a template");
        let tok = Tokenizer::for_checkpoint(&dir).expect("tokenizer");
        for (i, case) in fixture["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .enumerate()
        {
            let name = format!("{}: {}", dir.display(), case["name"]);
            let tools = ordered
                .get_attr("cases")
                .and_then(|c| c.get_item(&OrderedJson::from(i)))
                .and_then(|c| c.get_attr("tools"))
                .expect("case");
            let got = template.render(
                &case["messages"],
                (!tools.is_undefined()).then_some(&tools),
                case["add_generation_prompt"].as_bool().expect("flag"),
            );
            match (case.get("text"), got) {
                (Some(want), Ok(got)) => {
                    assert_eq!(got, want.as_str().expect("text"), "{name}");
                    let ids: Vec<u32> = case["ids"]
                        .as_array()
                        .expect("ids")
                        .iter()
                        .map(|i| i.as_u64().expect("id") as u32)
                        .collect();
                    assert_eq!(tok.encode(&got, None).expect("encode"), ids, "{name}");
                }
                (None, Err(e)) => {
                    let want = case["error"].as_str().expect("error");
                    assert_eq!(e.to_string(), format!("invalid messages: {want}"), "{name}");
                }
                (want, got) => panic!("{name}: transformers {want:?}, here {got:?}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked} cases");
}

#[test]
fn a_checkpoint_without_a_template_has_none_and_a_broken_one_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        "{\"bos_token\": \"<s>\"}",
    )
    .expect("write");
    assert!(
        ChatTemplate::for_checkpoint(tmp.path())
            .expect("ok")
            .is_none()
    );
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#,
    )
    .expect("write");
    let e = ChatTemplate::for_checkpoint(tmp.path()).expect_err("no default");
    assert!(e.to_string().contains("default"), "{e}");
    std::fs::write(tmp.path().join("chat_template.jinja"), "{% for %}").expect("write");
    let e = ChatTemplate::for_checkpoint(tmp.path()).expect_err("syntax");
    assert!(e.to_string().contains("chat_template.jinja"), "{e}");
}

#[test]
fn named_templates_use_tool_use_when_tools_are_given() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "</s>"}, "chat_template": [
            {"name": "default", "template": "plain{{ eos_token }}"},
            {"name": "tool_use", "template": "{{ tools | length }} tools{{ eos_token }}"}]}"#,
    )
    .expect("write");
    let t = ChatTemplate::for_checkpoint(tmp.path())
        .expect("ok")
        .expect("some");
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    assert_eq!(
        t.render(&msgs, None::<&Value>, true).expect("plain"),
        "plain</s>"
    );
    let tools = serde_json::json!([{"type": "function"}]);
    assert_eq!(
        t.render(&msgs, Some(&tools), true).expect("tools"),
        "1 tools</s>"
    );
}
