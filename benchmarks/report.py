"""Ratios and tables from benchmarks/results/serving.json (the numbers BENCHMARKS.md quotes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _at(rows: list[dict], c: int) -> dict:
    return next(r for r in rows if r["concurrency"] == c)


def summary(r: dict) -> str:
    lines = [
        f"model {r['model']}, machine {r['machine']}",
        "",
        "| runtime | " + " | ".join(f"batch {b}" for b in next(iter(r["network"].values()))) + " |",
        "|---" * (1 + len(r["network"]["onnx"])) + "|",
    ]
    for name, rates in r["network"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in rates.values()) + " |")
    lines += [
        "",
        "| endpoint | c | req/s | p50 ms | p95 ms | p99 ms | errors | vs limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in r["batching_on"].items():
        limit = r["crops_limit"] if name == "predict_faces" else r["pipeline_limit"][name.removeprefix("predict_")]
        for row in rows:
            lines.append(
                f"| {name} | {row['concurrency']} | {row['requests_per_s']:.1f} | {row['p50_ms']:.0f} | "
                f"{row['p95_ms']:.0f} | {row['p99_ms']:.0f} | {sum(row['errors'].values())} | "
                f"{row['requests_per_s'] / limit:.0%} |"
            )
    if "batching_off" in r:
        lines += [
            "",
            "| endpoint (c=16) | batching on req/s | off req/s | on / off | p99 / p50 (on) |",
            "|---|---|---|---|---|",
        ]
        for name, rows in r["batching_off"].items():
            on, off = _at(r["batching_on"][name], 16), _at(rows, 16)
            lines.append(
                f"| {name} | {on['requests_per_s']:.1f} | {off['requests_per_s']:.1f} | "
                f"{on['requests_per_s'] / off['requests_per_s']:.2f}x | {on['p99_ms'] / on['p50_ms']:.2f} |"
            )
    if "seed_one_face" in r:
        ceiling = r["ceiling_one_face"]
        service = _at(r["batching_on"]["predict_one_face"], 16)["requests_per_s"]
        seed = r["seed_one_face"]["requests_per_s"]
        lines += [
            "",
            "| /predict, one face, c=16 | photos/s | vs ceiling |",
            "|---|---|---|",
            f"| ceiling (in-process limits) | {ceiling:.1f} | 100 % |",
            f"| the service | {service:.1f} | {service / ceiling:.0%} |",
            f"| seed-style server | {seed:.1f} | {seed / ceiling:.0%} |",
            f"| service / seed | {service / seed:.2f}x | |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(
        summary(
            json.loads(
                Path(
                    sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "serving.json"
                ).read_text()
            )
        )
    )
