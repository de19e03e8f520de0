"""Shared by the benchmark scripts: run the driver under DeepSpeed's launcher and write results files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def run_configs(configs: list[dict], ranks: int = 2, port: int = 29650) -> dict:
    """Run ``configs`` in order in one job of ``ranks`` CPU ranks; the driver's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        config_path, out = Path(tmp) / "configs.json", Path(tmp) / "out.json"
        config_path.write_text(json.dumps(configs))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [
            str(DEEPSPEED),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(port),
            str(ROOT / "bench" / "pipeline_bench.py"),
            "--configs",
            str(config_path),
            "--out",
            str(out),
        ]
        try:
            result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        finally:  # DeepSpeed 0.19.8's CPU backend never unlinks its shared-memory all-reduce buffers
            for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                path.unlink(missing_ok=True)
        progress = [line for line in result.stdout.splitlines() if line.startswith("[")]
        print("\n".join(progress[-len(configs) :]), flush=True)
        if result.returncode != 0:
            raise SystemExit(f"benchmark job failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
        return json.loads(out.read_text())


def machine() -> str:
    import platform

    import deepspeed
    import torch

    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"deepspeed {deepspeed.__version__}, 1 thread per rank"
    )


def write_results(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
