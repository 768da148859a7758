"""Where minigpt's train step spends its time, per op, from TensorFlow's own step stats.

    python bench/profile.py --data FILE [-- extra flags for the example, e.g. --xla]

Runs `examples/profile_step.rs` (release build) and prints, over 20 traced steps, the mean wall
time of a step, the sum of the ops' times (above the wall time when ops overlap) and the ops
that take the most.
"""

import argparse
import collections
import os
import struct
import subprocess
import sys
import tempfile

from tensorflow.core.protobuf import config_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--grep", help="list only the ops whose name contains this")
    p.add_argument("extra", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "metadata.bin")
        run = subprocess.run(["cargo", "run", "--quiet", "--release", "--example", "profile_step", "--",
                        "--data", args.data, "--out", out, *args.extra], cwd=ROOT, check=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stderr=subprocess.PIPE, text=True)
        data = open(out, "rb").read()
    print("".join(line for line in run.stderr.splitlines(True) if line.startswith("untraced")), end="")
    per_op, per_type, per_scope, walls, i = collections.Counter(), collections.Counter(), collections.Counter(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        meta = config_pb2.RunMetadata.FromString(data[i + 8:i + 8 + n])
        i += 8 + n
        starts, ends = [], []
        for dev in meta.step_stats.dev_stats:
            for node in dev.node_stats:
                per_op[node.node_name] += node.all_end_rel_micros
                # timeline_label: "name = OpType(inputs)"
                kind = node.timeline_label.partition(" = ")[2].partition("(")[0] or node.node_name
                per_type[kind] += node.all_end_rel_micros
                per_scope[node.node_name.partition("/")[0]] += node.all_end_rel_micros
                starts.append(node.all_start_micros)
                ends.append(node.all_start_micros + node.all_end_rel_micros)
        walls.append(max(ends) - min(starts))
    steps = len(walls)
    wall, busy = sum(walls) / steps, sum(per_op.values()) / steps
    print(f"{steps} steps: wall {wall:.0f} µs per step, ops {busy:.0f} µs ({len(per_op)} ops; "
          f"{busy / wall:.2f} ops running on average)")
    print("by scope:")
    for scope, micros in per_scope.most_common(args.top):
        print(f"{micros / steps:8.0f} µs  {scope}")
    print("by op type:")
    for kind, micros in per_type.most_common(args.top):
        print(f"{micros / steps:8.0f} µs  {kind}")
    print("by op:")
    for name, micros in per_op.most_common(args.top if not args.grep else None):
        if args.grep and args.grep not in name:
            continue
        print(f"{micros / steps:8.0f} µs  {name}")


if __name__ == "__main__":
    sys.exit(main())
