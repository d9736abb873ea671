#!/usr/bin/env python3
"""onnxruntime as an independent runtime for microfed's ONNX files.

Two uses:
  run    MODEL IN.f32 N H W OUT.f32 [--threads T]
         Reads a little-endian float32 [N,1,H,W] input, runs the model on the CPU, writes `logits`
         as little-endian float32 and prints its shape as JSON. Used by the agreement tests
         (tract vs onnxruntime).
  bench  MODEL N H W --threads T --runs R [--tile PX --overlap PX --tile-batch B]
         Times R runs (after 3 warm-up runs) on random input; prints JSON with the median and all times
         in ms. Used as the CPU peer in docs/benchmarks.md. With --tile, each of the N H×W images is
         segmented as microfed's agent does (pipeline/tiling.rs: reflect-padded tiles of PX on a
         16-aligned grid overlapping by at least --overlap, B tiles per run, each output pixel taken
         from the tile that owns it), and the time is the whole images'.
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


def axis_tiles(length, tile, overlap):
    """Tile starts and owned ranges along one axis, as AxisTiles::new in pipeline/tiling.rs."""
    padded = -(-max(length, 1) // 16) * 16
    if padded <= tile:
        return padded, [0], [(0, padded)]
    stride = max((max(tile - overlap, 0) // 16) * 16, 16)
    starts = []
    s = 0
    while s + tile < padded:
        starts.append(s)
        s += stride
    if not starts or starts[-1] != padded - tile:
        starts.append(padded - tile)
    owned, lo = [], 0
    for i, st in enumerate(starts):
        hi = (starts[i + 1] + st + tile) // 2 if i + 1 < len(starts) else padded
        owned.append((lo, hi))
        lo = hi
    return tile, starts, owned


def reflect(i, n):
    """Mirror index i into 0..n without repeating the edge (pipeline/tiling.rs's reflect)."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    m = i % period
    return np.where(m < n, m, period - m)


def segment_tiled(s, image, tile, overlap, batch):
    """Logits [K, H, W] of one H×W image through the tile grid."""
    h, w = image.shape
    th, ys, yo = axis_tiles(h, tile, overlap)
    tw, xs, xo = axis_tiles(w, tile, overlap)
    cells = [(r, c) for r in range(len(ys)) for c in range(len(xs))]
    out = None
    for k in range(0, len(cells), batch):
        chunk = cells[k:k + batch]
        x = np.stack([image[np.ix_(reflect(np.arange(ys[r], ys[r] + th), h),
                                   reflect(np.arange(xs[c], xs[c] + tw), w))] for r, c in chunk])
        (y,) = s.run(["logits"], {"image": x[:, None].astype(np.float32)})
        if out is None:
            out = np.empty((y.shape[1], h, w), np.float32)
        for j, (r, c) in enumerate(chunk):
            (ylo, yhi), (xlo, xhi) = yo[r], xo[c]
            yhi, xhi = min(yhi, h), min(xhi, w)
            out[:, ylo:yhi, xlo:xhi] = y[j, :, ylo - ys[r]:yhi - ys[r], xlo - xs[c]:xhi - xs[c]]
    return out


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
        opt = lambda name, default: int(argv[argv.index(name) + 1]) if name in argv else default
        tile, overlap, batch = opt("--tile", 0), opt("--overlap", 32), opt("--tile-batch", 1)
        s = session(model, threads)
        x = np.random.default_rng(0).standard_normal((n, 1, h, w)).astype(np.float32)
        if tile:
            one = lambda: [segment_tiled(s, img[0], tile, overlap, batch) for img in x]
        else:
            one = lambda: s.run(["logits"], {"image": x})
        for _ in range(3):
            one()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            one()
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"median_ms": float(np.median(times)), "times_ms": times, "threads": threads,
                          "tile": tile or None, "overlap": overlap if tile else None,
                          "tile_batch": batch if tile else None, "onnxruntime": ort.__version__}))
    else:
        sys.exit(f"unknown command {cmd!r}: use run or bench")


if __name__ == "__main__":
    main(sys.argv)
