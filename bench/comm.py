"""Bytes on the wire against quality, for every download option, on the same visits.

Runs the demo (a real coordinator and client processes over mutual TLS, SmolLM2-135M on the
Shakespeare partition by default) once per download option: lossless (byte grouping + version
deltas), then each lossy context compression. Every run has the same schedule, data, seeds and
visits, so the only difference is what the frozen blocks looked like to the clients. For each it
reports bytes per visit and per cycle against FedAvg-full on the same visits (every client
downloading and uploading the whole model), the largest visit's share of FedAvg-full's per-visit
bytes (the target: at most 1/10 for clients holding the base weights), and the held-out loss
against the lossless run's. Writes results.json, a markdown table and a PNG plot.

    .venv/bin/python bench/comm.py --out bench-out/comm            # SmolLM2, ~4-6 min per option
    .venv/bin/python bench/comm.py --model tiny --out /tmp/comm    # seconds, for a smoke test
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

#: (label, demo arguments). The first is the baseline every other row is compared with.
OPTIONS = [
    ("lossless", []),
    ("int8", ["--context-compression", "int8"]),
    ("int4", ["--context-compression", "int4"]),
    ("prune 90%", ["--context-compression", "prune", "--context-ratio", "0.9"]),
    ("drop 50%", ["--context-compression", "drop", "--context-ratio", "0.5"]),
    ("lossless, no base", ["--clients-download-base"]),
]


def run_option(label: str, extra: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out) / label.replace(" ", "_").replace(",", "").replace("%", "pct")
    summary_path = out / "summary.json"
    if not (args.reuse and summary_path.is_file()):
        cmd = [sys.executable, "-m", "fedcybgd.cli.main", "demo", "--model", args.model, "--clients", str(args.clients),
               "--cycles", str(args.cycles), "--out", str(out), *extra, *args.demo_args]
        print(f"[{label}] {' '.join(cmd[3:])}", flush=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(summary_path.read_text())


def figures(label: str, s: dict, blocks_per_cycle: int) -> dict:
    visits = s["visits"]
    per_visit_fedavg = 2 * s["model_bytes"]  # FedAvg-full: the whole model down and up
    wire = [v["bytes_down"] + v["bytes_up"] for v in visits]
    cycles = len(visits) / blocks_per_cycle
    return {
        "option": label,
        "visits": len(visits),
        "bytes_total": sum(wire),
        "bytes_down": s["total_bytes_down"],
        "bytes_up": s["total_bytes_up"],
        "bytes_per_cycle": sum(wire) / cycles,
        "bytes_per_visit_mean": sum(wire) / len(wire),
        "bytes_per_visit_max": max(wire),
        "fedavg_full_bytes_per_visit": per_visit_fedavg,
        "fedavg_full_bytes_per_cycle": per_visit_fedavg * blocks_per_cycle,
        "max_visit_share_of_fedavg": max(wire) / per_visit_fedavg,
        "share_of_fedavg": sum(wire) / (per_visit_fedavg * len(visits)),
        "eval_loss_before": s["eval_loss_before"],
        "eval_loss_after": s["eval_loss_after"],
    }


def table(rows: list[dict]) -> str:
    base = rows[0]["eval_loss_after"]
    lines = ["| download option | MB per cycle | share of FedAvg-full | mean MB per visit "
             "| largest visit / FedAvg-full visit | held-out loss after | vs lossless |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['option']} | {r['bytes_per_cycle'] / 1e6:.1f} | {r['share_of_fedavg']:.1%} | "
                     f"{r['bytes_per_visit_mean'] / 1e6:.1f} | {r['max_visit_share_of_fedavg']:.1%} | "
                     f"{r['eval_loss_after']:.4f} | {r['eval_loss_after'] - base:+.4f} |")
    r = rows[0]
    lines.append(f"| FedAvg-full (same visits) | {r['fedavg_full_bytes_per_cycle'] / 1e6:.1f} | 100% | "
                 f"{r['fedavg_full_bytes_per_visit'] / 1e6:.1f} | 100% | | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["bytes_per_cycle"] / 1e6, r["eval_loss_after"], s=40)
        ax.annotate(r["option"], (r["bytes_per_cycle"] / 1e6, r["eval_loss_after"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.axvline(rows[0]["fedavg_full_bytes_per_cycle"] / 1e6, color="grey", linestyle="--", linewidth=1)
    ax.text(rows[0]["fedavg_full_bytes_per_cycle"] / 1e6, ax.get_ylim()[1], " FedAvg-full", va="top", fontsize=8,
            color="grey")
    ax.axhline(rows[0]["eval_loss_before"], color="grey", linestyle=":", linewidth=1)
    ax.text(ax.get_xlim()[0], rows[0]["eval_loss_before"], " before training", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the wire per cycle (MB, log scale)")
    ax.set_ylabel("held-out loss after the run")
    ax.set_title("FedCyBGD download options: bytes vs quality (same visits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/comm")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="labels of the options to run (default: all)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs found under --out")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER, help="after --: more arguments for every demo run")
    args = parser.parse_args()
    args.demo_args = [a for a in args.demo_args if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, extra in OPTIONS:
        if args.only and label not in args.only:
            continue
        summary = run_option(label, extra, args)
        rows.append(figures(label, summary, summary["blocks"]))
        print(table(rows), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text(table(rows) + "\n")
    plot(rows, out / "comm.png")
    print(f"\nresults: {out / 'results.json'}, plot: {out / 'comm.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
