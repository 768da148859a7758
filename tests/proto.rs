//! The protobuf schemas minigpt is built with are the pinned wheel's: `proto/tensorflow.fds.pb`
//! is what `python_export/proto_descriptors.py` extracts from the installed TensorFlow, and the
//! generated types read what TensorFlow writes.

mod common;

use prost::Message;

#[test]
fn the_descriptor_set_is_the_wheels() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("tensorflow.fds.pb");
    let out = std::process::Command::new(common::python())
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .arg(root.join("python_export/proto_descriptors.py"))
        .arg("--out")
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let committed = std::fs::read(root.join("proto/tensorflow.fds.pb")).unwrap();
    assert!(
        std::fs::read(&fresh).unwrap() == committed,
        "proto/tensorflow.fds.pb differs from the installed wheel's descriptors: run \
         `.venv/bin/python python_export/proto_descriptors.py --out proto/tensorflow.fds.pb` and commit it"
    );
    let set = prost_types::FileDescriptorSet::decode(&committed[..]).unwrap();
    for file in [
        "tensorflow/core/protobuf/saved_model.proto",
        "tensorflow/core/protobuf/config.proto",
        "tensorflow/core/protobuf/tensorflow_server.proto",
    ] {
        assert!(set.file.iter().any(|f| f.name() == file), "{file} missing");
    }
}

#[test]
fn generated_types_read_a_savedmodel_tensorflow_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
import sys, tensorflow as tf
class M(tf.Module):
    def __init__(self):
        self.w = tf.Variable([[1.0, 2.0]], name="w")
    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    def f(self, x):
        return {"y": tf.matmul(x, self.w)}
m = M()
tf.saved_model.save(m, sys.argv[1], signatures={"serving_default": m.f})
"#;
    let dir = tmp.path().join("m");
    let out = std::process::Command::new(common::python())
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .arg("-c")
        .arg(script)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = minigpt::proto::SavedModel::decode(&std::fs::read(dir.join("saved_model.pb")).unwrap()[..]).unwrap();
    let meta = &model.meta_graphs[0];
    assert_eq!(meta.meta_info_def.as_ref().unwrap().tags, ["serve"]);
    let serving = &meta.signature_def["serving_default"];
    assert_eq!(serving.inputs["x"].dtype, minigpt::proto::DataType::DtFloat as i32);
    let objects = meta.object_graph_def.as_ref().unwrap();
    assert!(objects
        .nodes
        .iter()
        .any(|n| matches!(&n.kind, Some(minigpt::proto::saved_object::Kind::Variable(v)) if v.name == "w")));
}
