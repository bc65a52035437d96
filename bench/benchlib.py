"""What the benchmark scripts share: the environment a figure was measured in, CUDA-synchronised
timing (median of windows), the pipeline's training step, FLOPs of a training step, and the
JSON + markdown outputs (reports/benchmarks/<name>.json and .md by default)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "reports" / "benchmarks"


def readme_commands() -> tuple[str, str]:
    """The README's two commands (1: set up and run the pipeline, 2: set up and run the tests):
    the two command lines of its "Two commands" block, as a new user copies them."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 2:
        raise ValueError(f"README.md: expected two commands under 'Two commands', found {lines}")
    return lines[0], lines[1]


README_RUN = " && uv run dvc repro"  # what command 1 runs once it has set up


def readme_setup() -> str:
    """Command 1's set-up part (bash): uv found or bootstrapped into .uv/, then `uv sync`."""
    one, _ = readme_commands()
    if not one.endswith(README_RUN):
        raise ValueError(f"README.md: command 1 no longer ends with {README_RUN!r}: {one}")
    return one.removesuffix(README_RUN)


def uv_for(clone: Path) -> str:
    """The uv the README's set-up left for `clone`: the one it bootstrapped, else PATH's."""
    import shutil

    bootstrapped = clone / ".uv" / "bin" / "uv"
    return str(bootstrapped) if bootstrapped.exists() else shutil.which("uv") or "uv"


def pick_device(choice: str) -> torch.device:
    """The pipeline's device rule (pipeline.engine.distributed.pick_device) for a --device flag."""
    from pipeline.core.common import PipelineError
    from pipeline.engine import distributed

    try:
        return distributed.pick_device(choice, name="--device")
    except PipelineError as exc:
        sys.exit(str(exc))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    sha = out.stdout.strip() or "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{sha}+dirty" if dirty else sha


def environment(devices: Sequence[torch.device], argv: Sequence[str] | None = None) -> dict:
    """Where and when a figure was measured, and the command that measured it."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    if script.is_absolute() and script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return {
        "devices": [device_name(d) for d in devices],
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "commit": commit(),
        "command": shlex.join(["python", str(script), *argv[1:]]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(
    step: Callable[[], Any], device: torch.device, steps: int, windows: int, warmup: int
) -> dict[str, float]:
    """Seconds per step: median (and min/max) over `windows` windows of `steps` steps each,
    after `warmup` untimed steps; CUDA is synchronised at every window's ends only, so the
    GPU's queue is not drained between steps (as in training)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    per_step = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        per_step.append((time.perf_counter() - t0) / steps)
    return {
        "step_s": statistics.median(per_step),
        "step_s_min": min(per_step),
        "step_s_max": max(per_step),
        "warmup_s": warmup_s,
    }


def train_step_flops(model: nn.Module, shape: Sequence[int]) -> int:
    """FLOPs of one training step (forward + backward) on a batch of `shape` (B, C, H, W),
    counted by torch's FlopCounterMode on the meta device (shapes only, nothing computed).
    Convolutions and matmuls count 2 FLOPs per multiply-add; normalisation, activations, the
    loss and the optimizer are not counted (they are a few % and memory-bound)."""
    import copy

    meta = copy.deepcopy(model).to("meta").train()
    x = torch.empty(*shape, device="meta")
    y = torch.empty(shape[0], *shape[2:], dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = meta(x)
        outs = out if isinstance(out, list) else [out]
        loss = sum(nn.functional.cross_entropy(o, y) for o in outs)
        loss.backward()
    return counter.get_total_flops()


def pipeline_engine(
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    compile_model: bool,
    loss_fn: nn.Module | None = None,
    lr: float = 1e-3,
    fused: bool = False,
):
    """The pipeline's training step (pipeline.engine.loop.Engine) as pipeline.stages.train
    builds it: autocast to `amp_dtype`, channels_last and torch.compile (each switchable), the
    pipeline's loss (default CE + soft Dice), Adam (`fused`: its one-kernel form, what the
    pipeline runs with bf16 on a CPU)."""
    from pipeline.engine.loop import Engine
    from pipeline.engine.losses import SegmentationLoss

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    return Engine(
        model=forward,
        loss_fn=(loss_fn or SegmentationLoss()).to(device),
        optimizer=torch.optim.Adam(model.parameters(), lr=lr, **({"fused": True} if fused else {})),
        amp_dtype=amp_dtype,
        device=device,
        channels_last=channels_last,
    )


def pipeline_step(engine, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One step as pipeline.engine.loop.train_epoch runs it: to the device (memory format), forward
    and backward, the loss and gradient norm read back to the host (the finiteness check: one
    sync per step), optimizer step."""
    from pipeline.engine import distributed

    images, labels = engine.to_device([images, labels])
    out = engine.step(images, labels)
    distributed.mean_values(out, engine.ctx)
    engine.apply()


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """rows -> a markdown table of `columns` (key -> header); floats get 3 significant
    decimals at most."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    lines = [
        "| " + " | ".join(columns.values()) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def parse_sets(items: Sequence[str]) -> dict:
    """`key.sub=value` strings (as `dvc exp run -S` takes them) -> a nested overlay dict, each
    value read as YAML (`0.01` a float, `null` None); pipeline.preset.merge / apply take it."""
    import yaml

    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out


def out_stem(out: str | None, name: str) -> Path:
    """--out: a path stem (a .json or .md suffix is dropped); default reports/benchmarks/NAME."""
    path = Path(out) if out else OUT_DIR / name
    return path.with_suffix("") if path.suffix in {".json", ".md"} else path


def write_outputs(
    stem: Path, title: str, env: dict, rows: list[dict], columns: dict[str, str], notes: str = ""
) -> str:
    """<stem>.json (environment + rows) and <stem>.md (a header naming the device, date,
    commit and command, then the table); returns the markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"benchmark": title, **env, "rows": rows}, indent=2) + "\n"
    )
    header = [
        f"### {title}",
        "",
        f"- device: {'; '.join(env['devices'])}",
        f"- date: {env['date']}, commit `{env['commit']}`, torch {env['torch']}",
        f"- command: `{env['command']}`",
        "",
    ]
    md = "\n".join(header) + "\n" + markdown_table(rows, columns) + "\n"
    if notes:
        md += "\n" + notes.strip() + "\n"
    stem.with_suffix(".md").write_text(md)
    return md
