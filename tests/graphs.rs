//! The committed text GraphDefs in graphs/ are what the builders make today.

mod common;

use minigpt::model::ModelConfig;

fn assert_current(model: &ModelConfig, file: &str) -> String {
    let want = std::fs::read_to_string(format!("{}/graphs/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let got = minigpt::graph::text(model).unwrap();
    assert!(
        got == want,
        "graphs/{file} differs from the graph the builder makes: if the change is meant, run \
         `minigpt graph --model {} --out graphs/` and commit the result",
        file.trim_end_matches(".pbtxt")
    );
    assert!(got.contains("op: \"AssignSubVariableOp\"") && got.contains("op: \"SaveV2\""));
    got
}

#[test]
fn bigram_graph_is_current() {
    assert_current(&ModelConfig::bigram(65, 128), "bigram.pbtxt");
}

#[test]
fn gpt_graph_is_current() {
    // `minigpt graph --model gpt`'s defaults: 4 blocks, 4 heads, width 128, 64 positions.
    let got = assert_current(&ModelConfig::gpt(65, 128, 4, 4, 64), "gpt.pbtxt");
    for part in
        ["gpt/h3/attn/qkv/kernel", "gpt/wpe/embeddings", "op: \"BatchMatMulV2\"", "op: \"Softmax\"", "op: \"Erf\""]
    {
        assert!(got.contains(part), "no {part} in graphs/gpt.pbtxt");
    }
}
