"""Writes TensorFlow's protobuf schemas as one FileDescriptorSet, taken from the pinned wheel.

The wheel's `*_pb2` modules carry their own descriptors, so no protoc and no copied .proto files
are needed: build.rs turns this set into Rust types with prost-build, and tests/proto.rs checks
that the committed file is what this script makes from the installed TensorFlow.

    .venv/bin/python python_export/proto_descriptors.py --out proto/tensorflow.fds.pb
"""

import argparse

from google.protobuf import descriptor_pb2
from tensorflow.core.protobuf import (
    config_pb2,
    saved_model_pb2,
    saved_object_graph_pb2,
    tensorflow_server_pb2,
    trackable_object_graph_pb2,
)

ROOTS = [saved_model_pb2, config_pb2, tensorflow_server_pb2, trackable_object_graph_pb2, saved_object_graph_pb2]


def descriptor_set():
    """Every root file and its dependencies, each once, dependencies first, sorted by name."""
    seen = {}

    def visit(fd):
        if fd.name in seen:
            return
        for dep in fd.dependencies:
            visit(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        seen[fd.name] = proto

    for module in ROOTS:
        visit(module.DESCRIPTOR)
    fds = descriptor_pb2.FileDescriptorSet()
    fds.file.extend(seen.values())
    return fds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = descriptor_set().SerializeToString(deterministic=True)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"wrote {args.out}: {len(descriptor_set().file)} files, {len(data)} bytes")


if __name__ == "__main__":
    main()
