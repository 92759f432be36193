"""What `unclip bench` and `unclip bench-anchors` share: each measurement in its own process (wall time, exit
code, peak RSS, load average after), the two sides of a ratio alternated in the same run over the repeats,
median and spread, the machine / commit / versions header, and the JSON + Markdown report files.

A measurement that is a Python function runs through ``python -m jobs.bench.worker module:function JSON``
(`probe`): a fresh interpreter, so its peak RSS and its imports are its own.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ANCHOR_SCRIPTS = ROOT / "bench" / "anchors"  # run by the anchors' own python (.venv-anchors)
PY = sys.executable
QUIET = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
ANCHOR_TIMEOUT_S = 1200.0

# ---------------------------------------------------------------- one measurement, one process


@dataclass
class Run:
    """One finished command: wall seconds, exit code, stdout, peak RSS (MB) of it and its reaped children."""

    seconds: float
    rc: int
    stdout: str
    peak_rss_mb: float
    load_avg_1m_after: float  # other work on this shared machine during the run
    log: str | None

    def result(self) -> dict:
        """The JSON object on the last such line of stdout (what `probe` and the anchor scripts print)."""
        return last_json(self.stdout)


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def _raise_on_term() -> dict | None:
    """SIGTERM and SIGHUP (a lease's or `timeout`'s end, a closed terminal) raised as SystemExit while a command
    runs, so that its process group is killed with us: by default they ended this process alone, and the
    command, in its own session, went on with no parent (an embed on the lent GPU for minutes). Main thread
    only (where signals are handled); returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    # a signal ignored (nohup, a background job) stays ignored, as `pipeline.signals.handling` leaves it
    return {
        sig: signal.signal(sig, stop)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) not in (signal.SIG_IGN, None)
    }


def _restore(before: dict | None) -> None:
    for sig, handler in (before or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def measure(
    cmd: list[str],
    *,
    what: str | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> Run:
    """Run ``cmd`` to completion in its own session, stdout captured, stderr to ``log`` (or a temporary file),
    and raise RuntimeError with the tail of that if it exits non-zero. After ``timeout`` s, or if we are
    interrupted, the command and every process it started are killed (rc -9)."""
    with _stderr_file(log, cmd) as err:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        fired = threading.Event()  # set by the timer itself: timing the wait here would race it

        def on_timeout() -> None:
            fired.set()
            _kill_group(proc.pid)

        kill = threading.Timer(timeout, on_timeout) if timeout else None
        before = _raise_on_term()
        try:
            if kill:
                kill.start()
            t0 = time.perf_counter()
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
        except BaseException:
            _kill_group(proc.pid)
            raise
        finally:
            if kill:
                kill.cancel()
            _restore(before)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if fired.is_set():
            err.write(f"\n[bench] killed after {timeout:.0f} s\n")
        err.write(out)
        err.flush()
        if proc.returncode != 0:
            err.seek(0)
            tail = "\n".join(err.read().strip().splitlines()[-15:])
            where = f" (log {log})" if log else ""
            raise RuntimeError(
                f"{what or ' '.join(map(str, cmd[:6]))} exited {proc.returncode}{where}:\n{tail}"
            )
    return Run(
        seconds, proc.returncode, out, usage.ru_maxrss / 1024, round(os.getloadavg()[0], 2), log and str(log)
    )


def _stderr_file(log: Path | None, cmd: list[str]):
    if log is None:
        return tempfile.TemporaryFile("w+")
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "w+")
    f.write("$ " + " ".join(map(str, cmd)) + "\n")
    f.flush()
    return f


def _kill_group(pid: int) -> None:
    """Kill the command's process group and those of its descendants: a command that is itself a bench (the
    device check runs `unclip bench`) starts its measurements in sessions of their own, which killing the
    command's group alone would leave running (holding the GPU and the cores)."""
    groups: set[int] = set()
    try:
        import psutil  # dask[distributed] brings it

        kids = psutil.Process(pid).children(recursive=True)
    except Exception:  # gone already, or no psutil: the command's own group still goes
        kids = []
    for p in kids:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for g in [pid, *sorted(groups - {pid, os.getpgrp()})]:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def probe_cmd(fn: Callable[..., dict], **kwargs: Any) -> list[str]:
    """The command that runs ``fn(**kwargs)`` (a module-level function of `jobs.bench`) in a fresh process
    and prints its JSON result."""
    return [PY, "-m", "jobs.bench.worker", f"{fn.__module__}:{fn.__qualname__}", json.dumps(kwargs)]


def probe(fn: Callable[..., dict], **kwargs: Any) -> tuple[dict, Run]:
    """``fn(**kwargs)`` in a fresh process: its result and the run (wall time, peak RSS)."""
    run = measure(probe_cmd(fn, **kwargs), what=f"{fn.__module__}:{fn.__qualname__}")
    return run.result(), run


def anchor_env() -> dict[str, str]:
    return {
        **QUIET,
        "PYTHONUNBUFFERED": "1",
        "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "5"),
    }


def side(cmd: list[str], log: Path, what: str) -> Run:
    """One side of a `bench-anchors` comparison: run from the repository root with its log file."""
    return measure(cmd, what=what, log=log, env=anchor_env(), cwd=ROOT, timeout=ANCHOR_TIMEOUT_S)


def side_json(cmd: list[str], log: Path, what: str) -> dict:
    """The JSON a side printed, with the load average after it."""
    run = side(cmd, log, what)
    return {**run.result(), "load_avg_1m_after": run.load_avg_1m_after}


# ---------------------------------------------------------------- alternation, median and spread


def timed_train_steps(
    model, opt, loss_fn: Callable[[], Any], warmup: int, steps: int
) -> tuple[list[float], list[float]]:
    """``warmup + steps`` optimiser steps (zero grad, backward, clip the norm to 1, step) on a fixed batch:
    the seconds of each step after the warm-up, and every step's loss."""
    import torch

    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= warmup:
            times.append(dt)
    return times, losses


def alternate(
    repeats: int,
    first: Callable[[int], Any],
    second: Callable[[int], Any],
    after: Callable[[int, Any, Any], None] | None = None,
) -> tuple[list, list]:
    """``first(r)`` then ``second(r)`` for each repeat ``r``, so drifting machine load hits both sides alike;
    ``after(r, a, b)`` sees each pair (progress lines)."""
    a, b = [], []
    for r in range(repeats):
        a.append(first(r))
        b.append(second(r))
        if after:
            after(r, a[-1], b[-1])
    return a, b


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratios(ours: list[float], theirs: list[float], higher_is_better: bool = True) -> list[float]:
    """Per repeat: ours/theirs for rates, theirs/ours for costs."""
    return [(o / t if higher_is_better else t / o) for o, t in zip(ours, theirs)]


def ratio_figure(ours: list[float], theirs: list[float]) -> dict:
    """`unclip bench`'s form of a ratio: both sides' values and the ratio's median, min and max."""
    s = spread(ratios(ours, theirs))
    return {
        "ours": ours,
        "theirs": theirs,
        "ratio_median": s["median"],
        "ratio_min": s["min"],
        "ratio_max": s["max"],
        "repeats": len(s["values"]),
    }


def comparison(
    name: str,
    ours: list[float],
    theirs: list[float],
    units: str,
    target: float | None,
    higher_is_better: bool = True,
    notes: str = "",
) -> dict:
    """`unclip bench-anchors`' form: ratios per repeat, >1 always meaning ours is better."""
    r = spread(ratios(ours, theirs, higher_is_better))
    return {
        "name": name,
        "ours": spread(ours),
        "theirs": spread(theirs),
        "units": units,
        "ratio": r,
        "ratio_meaning": "ours / theirs" if higher_is_better else "theirs / ours (lower is better)",
        "repeats": len(r["values"]),
        "target": target,
        "met": None if target is None else r["median"] >= target,
        "notes": notes,
    }


# ---------------------------------------------------------------- header: machine, commit, versions


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line() -> str:
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )


def git_commit(dirty: bool = True) -> str:
    """HEAD's sha (with ``-dirty`` when tracked files differ and ``dirty``), or "unknown"."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        if sha and dirty and git("status", "--porcelain", "--untracked-files=no"):
            sha += "-dirty"
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(anchors_python: str | None) -> dict:
    """Versions of the packages measured: ours, and the anchors venv's when ``anchors_python`` exists."""
    from importlib.metadata import PackageNotFoundError, version

    def ours(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = {
        "ours": {p: ours(p) for p in ("torch", "open_clip_torch", "numpy", "embedding-reader", "img2dataset")}
    }
    if anchors_python and os.path.exists(anchors_python):
        code = (
            "import json; from importlib.metadata import version as v; "
            "print(json.dumps({p: v(p) for p in ('clip-retrieval', 'dalle2-pytorch', 'open_clip_torch', 'torch', "
            "'numpy', 'pyarrow', 'embedding-reader')}))"
        )
        r = subprocess.run([anchors_python, "-c", code], capture_output=True, text=True)
        out["anchors"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-300:]}
    return out


# ---------------------------------------------------------------- report files


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def write_report(out: Path, stem: str, report: dict, md: str, json_newline: bool = True) -> tuple[Path, Path]:
    """``out/stem.json`` (indented) and ``out/stem.md``."""
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(report, indent=2, default=str) + ("\n" if json_newline else ""))
    m.write_text(md)
    return j, m
