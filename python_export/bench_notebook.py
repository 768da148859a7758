"""The notebook's side of `make bench`: times the notebook's own code and prints the figures as JSON.

    python python_export/bench_notebook.py --data FILE

`bench/run.py` runs it alternately with minigpt's side (`examples/bench.rs`), which measures the
same figures the same way. Times are wall-clock; `BENCH_T0` (seconds since the epoch, set by the
caller just before starting this process) anchors start-up and time to first step.
"""

import argparse
import json
import os
import resource
import sys
import time

T0 = float(os.environ.get("BENCH_T0", time.time()))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tensorflow as tf  # noqa: E402

import notebook as nb  # noqa: E402

STARTUP_S = time.time() - T0


def rate(n, seconds):
    return n / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--pipeline-batches", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    args = p.parse_args()
    figures = {"startup_s": STARTUP_S}

    # Time to first step: corpus, vocabulary, pipeline, model, first batch, first (traced) step.
    with open(args.data, encoding="utf-8") as f:
        nb.prepare(f.read())
    train_dataset = nb.make_dataset(nb.train_data)
    nb.instantiate()
    batches = iter(train_dataset)
    x, y = next(batches)
    nb.train_step(x, y).numpy()
    figures["first_step_s"] = time.time() - T0

    # 1. The input pipeline alone (after its first batch, which fills the shuffle buffer).
    pipeline = iter(nb.make_dataset(nb.train_data))
    next(pipeline)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(pipeline)
    figures["pipeline_batches_per_s"] = rate(args.pipeline_batches, time.perf_counter() - start)

    # 2. Training end to end: the notebook's loop body over its dataset, after warm-up.
    for _ in range(args.warmup):
        x, y = next(batches)
        nb.train_step(x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = next(batches)
        loss = nb.train_step(x, y)
    loss.numpy()
    figures["train_steps_per_s"] = rate(args.steps, time.perf_counter() - start)

    # 3. The train step alone on one batch already in memory.
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = nb.train_step(x, y)
    loss.numpy()
    figures["step_only_steps_per_s"] = rate(args.steps, time.perf_counter() - start)

    # 4. Generation with the notebook's generate_text (after a short warm-up call): the median
    #    of 5 calls for 200 characters, one call for 2000.
    nb.generate_text("To be, or not to be", 10)
    for n, calls in ((200, 5), (2000, 1)):
        rates = []
        for _ in range(calls):
            start = time.perf_counter()
            nb.generate_text("To be, or not to be", n)
            rates.append(rate(n, time.perf_counter() - start))
        figures[f"generate_{n}_chars_per_s"] = sorted(rates)[len(rates) // 2]

    # 5. Peak resident memory of this process (Linux reports KiB).
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump(figures, sys.stdout)
    print()


if __name__ == "__main__":
    main()
