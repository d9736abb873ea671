#!/usr/bin/env python3
"""onnxruntime as an independent runtime for microfed's ONNX files.

Two uses:
  run    MODEL IN.f32 N H W OUT.f32 [--threads T]
         Reads a little-endian float32 [N,1,H,W] input, runs the model on the CPU, writes `logits`
         as little-endian float32 and prints its shape as JSON. Used by the agreement tests
         (tract vs onnxruntime).
  bench  MODEL N H W --threads T --runs R
         Times R runs (after 3 warm-up runs) on random input; prints JSON with the median and all times
         in ms. Used as the CPU peer in docs/benchmarks.md.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def main(argv):
    cmd = argv[1]
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 1
    if cmd == "run":
        model, inp, n, h, w, out = argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]), argv[7]
        x = np.fromfile(inp, dtype="<f4").reshape(n, 1, h, w)
        (y,) = session(model, threads).run(["logits"], {"image": x})
        y.astype("<f4").tofile(out)
        print(json.dumps({"shape": list(y.shape), "onnxruntime": ort.__version__}))
    elif cmd == "bench":
        model, n, h, w = argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 10
        s = session(model, threads)
        x = np.random.default_rng(0).standard_normal((n, 1, h, w)).astype(np.float32)
        for _ in range(3):
            s.run(["logits"], {"image": x})
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            s.run(["logits"], {"image": x})
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"median_ms": float(np.median(times)), "times_ms": times, "threads": threads,
                          "onnxruntime": ort.__version__}))
    else:
        sys.exit(f"unknown command {cmd!r}: use run or bench")


if __name__ == "__main__":
    main(sys.argv)
