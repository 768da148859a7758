//! The committed text GraphDefs in graphs/ are what the builders make today.

use minigpt::model::{Arch, ModelConfig};

#[test]
fn bigram_graph_is_current() {
    let model = ModelConfig::bigram(65, 128);
    let want = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/graphs/bigram.pbtxt")).unwrap();
    let got = minigpt::graph_text(&model).unwrap();
    assert!(
        got == want,
        "graphs/bigram.pbtxt differs from the graph the builder makes: if the change is meant, run \
         `minigpt graph --model bigram --out graphs/` and commit the result"
    );
    assert!(got.contains("op: \"AssignSubVariableOp\"") && got.contains("op: \"SaveV2\""));
}
