"""Complete an `evaluate --json` file for an experiment's results folder: the run it measured, what
its model file says of it (the stage-two anomalies, the placement of the trunk's cells, the
training time), the hardware, the package version and git commit that evaluated it, and the
arguments the run's training was started with, then write it under its final name (atomically,
beside a file already there: results_file.py) and remove the temporary.

    python3 experiments/record_eval.py TMP_JSON FINAL_JSON [RUN] [-- TRAIN-ARGS...]

TRAIN-ARGS: what followed `defect-fast train` when the run was started (DATA --out RUN --seed ...
--epochs ...), recorded as "train_argv"; without them it is null.
"""
from __future__ import annotations

import json
import os
import platform

import torch

from defect_fast.detect import cpu_flags
from results_file import provenance, run_script, write_text


def main(argv: list[str]) -> None:
    import argparse

    train_argv = None
    if "--" in argv:  # everything after it is the training's arguments, options included
        i = argv.index("--")
        argv, train_argv = argv[:i], argv[i + 1:] or None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="%(prog)s TMP_JSON FINAL_JSON [RUN] [-- TRAIN-ARGS...]")
    ap.add_argument("tmp_json", help="the evaluate --json file (removed once recorded)")
    ap.add_argument("final_json", help="where the completed record goes")
    ap.add_argument("run", nargs="?", default=None, help="the run folder it measured")
    args = ap.parse_args(argv)
    src, dst, run = args.tmp_json, args.final_json, args.run
    m = json.load(open(src))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = "+".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})) or "no bf16 instructions"
    m["hardware"] = f"{cpu} ({flags}), {torch.get_num_threads()} threads, torch {torch.__version__}"
    m.update(provenance())
    m["train_argv"] = train_argv
    if run is not None:
        state = torch.load(os.path.join(run, "model.pt"), map_location="cpu", weights_only=True)
        m["run"] = run
        m["synthesis"] = (state.get("train_config") or {}).get("model_kwargs", {}).get("synthesis", "paper")
        m["placement"] = {part: state[part].get("placement", "cells") for part in ("perceptual", "context")
                          if state.get(part)}
        m["train_seconds"] = state.get("train_seconds")
    dst = write_text(dst, json.dumps(m, indent=2))
    os.remove(src)
    print(f"{dst}: pixel AUROC {m['pixel_auroc']:.4f} image AUROC {m['image_auroc']:.4f} AUPRO {m['aupro']:.4f}")


if __name__ == "__main__":
    run_script(main)
