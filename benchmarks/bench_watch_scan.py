"""What one round of ``defect-fast watch`` costs with many judged images left in the drop folder.

A drop folder holds ``--files`` judged images (all in the service's done table) and one new one.
"listing" is a round without file-system events (no watchdog, ``--once``, or the safety-net
listing every ``--rescan`` seconds): list and stat every file, forget what left, then check each
against the done table. "event" is a round with events: stat only the path the event named (and the files waiting
to settle). Both rounds are timed in alternation in one run; the ratio is listing / event.

    python benchmarks/bench_watch_scan.py --files 50000      # writes results/watch_scan.json

The files are empty: a round never reads them (only judging a file does).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, command_line, device_info, time_interleaved, write_results

from defect_fast import watch as w
from defect_fast.calibration import ModelInfo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 10000, 50000], help="judged images in the folder")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "watch_scan.json")
    args = ap.parse_args()
    rows = []
    for n in args.files:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "in", Path(tmp) / "out"
            src.mkdir()
            for i in range(n):
                (src / f"img_{i:06d}.png").touch()
            st = w._State(info=ModelInfo(64), threshold=0.5, in_dir=src, out=out, journal=None)
            first = w._scan(st, False, print)
            st.known, st.folder_ids = first.found, dict(first.folders)
            st.done = {k: "0" * 64 for k in st.known}  # every one judged
            st.done_sig = {k: e[1:] for k, e in st.known.items()}
            (src / "new.png").touch()
            new = {str(src / "new.png")}

            def listing():  # as the service's round: the listing, what it tells gone, the files ready
                found = w._scan(st, False, print)
                st.known = found.found
                w._after_listing(st, found, print)
                w._ready(st, st.known.keys(), 1.0)

            def event():
                keys = w._update(st, w._event_keys(st, new, False) | set(st.pending), False, print)
                w._ready(st, keys, 1.0)

            t = time_interleaved({"listing": listing, "event": event}, rounds=args.rounds)
        ratio = t["listing"]["median_ms"] / t["event"]["median_ms"]
        rows.append({"files": n, "listing_ms": t["listing"]["median_ms"], "event_ms": t["event"]["median_ms"],
                     "listing_over_event": round(ratio, 1), "timings": t})
        print(f"{n:>7} judged files: listing round {t['listing']['median_ms']:9.3f} ms | event round "
              f"{t['event']['median_ms']:7.3f} ms | x{ratio:,.0f}")
    write_results(args.out, {"info": device_info("cpu"), "command": command_line(), "rows": rows})


if __name__ == "__main__":
    main()
