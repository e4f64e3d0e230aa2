"""Batch runs (DESIGN §8): one papermill execution per seed, each in its own process.

    run(["cifar10"], seeds=[42, 123], gpus=["0", "1"], profile="quick")

Every seed is a `Job`: a notebook, the parameters papermill injects, and the run directory
that becomes its record. `execute(job, ...)` runs one job in a child process with its own
environment (`CUDA_VISIBLE_DEVICES`, thread counts) and a wall-clock timeout, and judges it
by its record (`summary.json`), not by papermill's exit code alone. The same function runs
jobs locally (one worker per GPU slot, or CPU workers with the cores split between them)
and on SLURM through submitit. After the seeds, the analysis notebooks of `ANALYSES` run.
"""

from __future__ import annotations

import ast
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

import cbcore
from cbcore.params import (
    EXPERIMENTS,
    NOTEBOOKS,
    ParamsError,
    check_value,
    load_params,
    parse_override,
    to_dict,
)
from cbcore.records import read_summary, run_dir_for

NOTEBOOKS_DIR = Path(cbcore.__file__).resolve().parents[1] / "notebooks"
FINISHED = ("completed", "diverged")  # a run with this summary status is done: skip it
DEFAULT_TIMEOUT_S = 24 * 3600.0
HANG_GRACE_S = 120.0  # papermill may hang after the last cell; the record says it finished
POLL_S = 0.25
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CBCORE_NUM_THREADS")
RUN_PARAMETERS = ("experiment", "profile", "seed", "run_dir", "overrides")
KERNEL_NAME = "python3"


class RunnerError(RuntimeError):
    """A run cannot start (missing notebook, bad parameters cell, bad option): nothing ran."""


@dataclass(frozen=True)
class Analysis:
    """A notebook run after an experiment's seeds: once per experiment (parameters
    experiment, profile, root) or once per finished seed (parameter run_dir)."""

    notebook: str  # file name in the notebooks dir; skipped if the file is absent
    per: str  # "experiment" or "seed"
    experiments: tuple[str, ...] | None = None  # None: every experiment
    parameters: dict = field(default_factory=dict)  # extra literal parameters


ANALYSES: tuple[Analysis, ...] = (
    Analysis("summary.ipynb", per="experiment"),
    Analysis(
        "diagnostics.ipynb",
        per="seed",
        experiments=("cifar10",),
        parameters={"method": "credit_bridge"},
    ),
)


@dataclass(frozen=True)
class Job:
    """One notebook execution. Seed runs (run_dir set) are judged by run_dir/summary.json."""

    name: str  # e.g. "toy_lq/quick/seed42", "toy_lq/quick/summary"
    notebook: Path  # source notebook
    output: Path  # executed notebook; its log is beside it (.log)
    parameters: dict
    cwd: Path
    run_dir: Path | None = None


@dataclass
class Result:
    job: Job
    status: str  # completed, diverged, failed, timeout, interrupted, skipped
    elapsed: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in FINISHED or self.status == "skipped"


# ---------------------------------------------------------------- checks before any run


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False
    return True


def parameter_names(notebook: Path) -> set[str]:
    """Names assigned in the notebook's `parameters` cell, which must hold only literals."""
    if not notebook.exists():
        raise RunnerError(
            f"{notebook}: notebook not found (check --notebooks or the notebooks/ dir)"
        )
    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise RunnerError(
            f"{notebook}: no cell tagged 'parameters'; tag the cell of literals "
            "(JupyterLab: Property Inspector → Cell Tags → parameters)"
        )
    source = cells[0].source
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise RunnerError(f"{notebook}: parameters cell is not valid Python: {e}") from e
    names = set()
    for stmt in tree.body:
        target = value = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign):
            target, value = stmt.target, stmt.value
        if not isinstance(target, ast.Name) or value is None or not _is_literal(value):
            line = (ast.get_source_segment(source, stmt) or "").splitlines()[0]
            raise RunnerError(
                f"{notebook}: the parameters cell must hold only `name = literal` lines; "
                f"move `{line}` to a later cell"
            )
        names.add(target.id)
    return names


def check_notebook(notebook: Path, injected: Sequence[str]) -> None:
    missing = [n for n in injected if n not in parameter_names(notebook)]
    if missing:
        raise RunnerError(
            f"{notebook}: parameters cell lacks {missing}; the runner injects "
            f"{list(injected)}, add e.g. `{missing[0]} = ...` with a literal default"
        )


def parse_sets(experiment: str, sets: Sequence[str]) -> dict:
    """`--set key=value` overrides, each validated against the experiment's params."""
    out = {}
    for text in sets:
        key, value = parse_override(text)
        if key == "seed":
            raise ParamsError(f"--set {text}: give seeds with --seeds, not --set seed=")
        out[key] = check_value(EXPERIMENTS[experiment], key, value, f"--set {text}")
    return out


def plan(
    experiments: Sequence[str],
    seeds: Sequence[int],
    *,
    profile: str | None,
    sets: Sequence[str] = (),
    root: Path,
    notebooks_dir: Path,
) -> list[Job]:
    """One job per experiment × seed, with fully resolved parameters. Raises ParamsError or
    RunnerError before anything runs."""
    jobs = []
    for experiment in experiments:
        if experiment not in EXPERIMENTS:
            load_params(experiment)  # raises the did-you-mean ParamsError
        overrides = parse_sets(experiment, sets)
        notebook = notebooks_dir / NOTEBOOKS[experiment]
        check_notebook(notebook, RUN_PARAMETERS)
        for seed in dict.fromkeys(seeds):  # unique, in order
            params = to_dict(load_params(experiment, profile, {**overrides, "seed": seed}))
            run_dir = run_dir_for(root, experiment, profile, seed)
            jobs.append(
                Job(
                    name=f"{experiment}/{profile}/seed{seed}",
                    notebook=notebook,
                    output=run_dir / notebook.name,
                    cwd=Path.cwd(),
                    run_dir=run_dir,
                    parameters={
                        "experiment": experiment,
                        "profile": profile,
                        "seed": seed,
                        "run_dir": str(run_dir),
                        "overrides": params,
                    },
                )
            )
    for a in ANALYSES:
        nb = notebooks_dir / a.notebook
        if nb.exists() and any(a.experiments is None or e in a.experiments for e in experiments):
            check_notebook(
                nb,
                [
                    *(("experiment", "profile", "root") if a.per == "experiment" else ("run_dir",)),
                    *a.parameters,
                ],
            )
    return jobs


def plan_analyses(
    seed_jobs: Sequence[Job],
    ran: set[str],
    *,
    profile: str | None,
    root: Path,
    notebooks_dir: Path,
    force: bool,
) -> list[Job]:
    """Analysis jobs whose inputs changed in this invocation, or whose output is missing."""
    jobs = []
    by_experiment: dict[str, list[Job]] = {}
    for j in seed_jobs:
        by_experiment.setdefault(j.parameters["experiment"], []).append(j)
    for a in ANALYSES:
        nb = notebooks_dir / a.notebook
        if not nb.exists():
            continue
        for experiment, sj in by_experiment.items():
            if a.experiments is not None and experiment not in a.experiments:
                continue
            done = [j for j in sj if (read_summary_safe(j.run_dir) or {}).get("status") in FINISHED]
            if a.per == "experiment":
                out = root / experiment / (profile or "default") / a.notebook
                stale = force or not out.exists() or any(j.name in ran for j in sj)
                if done and stale:
                    jobs.append(
                        Job(
                            name=f"{experiment}/{profile}/{nb.stem}",
                            notebook=nb,
                            output=out,
                            cwd=Path.cwd(),
                            parameters={
                                "experiment": experiment,
                                "profile": profile,
                                "root": str(root),
                                **a.parameters,
                            },
                        )
                    )
            else:
                for j in done:
                    out = j.run_dir / a.notebook
                    if force or not out.exists() or j.name in ran:
                        jobs.append(
                            Job(
                                name=f"{j.name}/{nb.stem}",
                                notebook=nb,
                                output=out,
                                cwd=Path.cwd(),
                                parameters={"run_dir": str(j.run_dir), **a.parameters},
                            )
                        )
    return jobs


# ---------------------------------------------------------------- one run, in a child process


def read_summary_safe(run_dir: Path | None) -> dict | None:
    if run_dir is None:
        return None
    try:
        return read_summary(run_dir)
    except (OSError, json.JSONDecodeError):
        return None  # half-written by a killed run


def child_env(cuda_visible: str | None, threads: int | None, jupyter_path: str) -> dict:
    """The child's environment: its GPU (None: inherit, e.g. SLURM's), thread counts, and a
    kernelspec dir first on JUPYTER_PATH so `python3` means this interpreter."""
    env = dict(os.environ)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    if threads:
        env.update({k: str(threads) for k in THREAD_VARS})
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [jupyter_path, env.get("JUPYTER_PATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_kernelspec(folder: str) -> None:
    """A `python3` kernelspec pointing at sys.executable (a registered one may point at
    another interpreter, or at whatever `python` is first on PATH)."""
    kdir = Path(folder, "kernels", KERNEL_NAME)
    kdir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (cbcore)",
        "language": "python",
    }
    (kdir / "kernel.json").write_text(json.dumps(spec))


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (the kernel runs in its own session)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop papermill and its kernel (which also exits when its parent goes away)."""
    pids = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [proc.pid, *pids]:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=5)
            if all(not Path(f"/proc/{p}").exists() for p in pids):
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)


def _wait(proc: subprocess.Popen, job: Job, deadline: float, stop: threading.Event | None) -> str:
    """exited, timeout, hung (record finished, process didn't), or interrupted."""
    finished_at = None
    while True:
        try:
            proc.wait(timeout=POLL_S)
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        outcome = None
        if stop is not None and stop.is_set():
            outcome = "interrupted"
        elif now > deadline:
            outcome = "timeout"
        elif (read_summary_safe(job.run_dir) or {}).get("status") in FINISHED:
            finished_at = finished_at or now
            if now - finished_at > HANG_GRACE_S:
                outcome = "hung"
        if outcome:
            _kill_tree(proc)
            return outcome


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def notebook_error(path: Path) -> tuple[str, str] | None:
    """(`Name: message`, traceback text) of the first error output of an executed notebook."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:
        return None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = ANSI.sub("", "\n".join(out.get("traceback", [])))
                return f"{out.get('ename')}: {out.get('evalue')}", tb
    return None


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _write_summary(job: Job, status: str, error: str, detail: dict, elapsed: float) -> None:
    """Record a run that did not record its own end (failed, timed out, interrupted);
    detail: {"traceback": ...} from the notebook, or {"log_tail": ...} from papermill's log."""
    p = job.parameters
    body = {
        "experiment": p["experiment"],
        "profile": p["profile"],
        "seed": p["seed"],
        "status": status,
        "wall_s": elapsed,
        "error": error,
        **{k: tail(v) for k, v in detail.items()},
        "log": job.output.with_suffix(".log").name,
        "methods": {},
    }
    tmp = job.run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(job.run_dir / "summary.json")


def execute(
    job: Job,
    cuda_visible: str | None,
    threads: int | None,
    timeout: float,
    stop: threading.Event | None = None,
) -> Result:
    """Run one job with papermill in a child process; judge it by its record."""
    t0 = time.time()
    job.output.parent.mkdir(parents=True, exist_ok=True)
    old = read_summary_safe(job.run_dir)
    if old is not None and old.get("status") not in FINISHED:
        (job.run_dir / "summary.json").unlink()  # a stale failure; checkpoints stay, to resume
    log_path = job.output.with_suffix(".log")
    papermill = [sys.executable, "-m", "papermill", "-k", KERNEL_NAME, "--no-progress-bar"]
    cmd = [*papermill, "--log-output", str(job.notebook), str(job.output)]
    cmd += ["-y", json.dumps(job.parameters)]
    with tempfile.TemporaryDirectory(prefix="cbcore-kernel-") as kdir, log_path.open("w") as log:
        write_kernelspec(kdir)
        env = child_env(cuda_visible, threads, kdir)
        # its own session: a Ctrl-C reaches it through us (we kill it), not directly
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=job.cwd, env=env, start_new_session=True
        )
        outcome = _wait(proc, job, t0 + timeout, stop)
    elapsed = time.time() - t0
    log_text = log_path.read_text(errors="replace")
    err = notebook_error(job.output) if job.output.exists() else None

    if job.run_dir is None:  # analysis notebook: judged by exit code and error outputs
        if outcome == "exited" and proc.returncode == 0 and err is None:
            return Result(job, "completed", elapsed)
        status, error = _failure(outcome, proc.returncode, err, timeout, log_text)
        return Result(job, status, elapsed, error)

    summary = read_summary_safe(job.run_dir) or {}
    if summary.get("status") in FINISHED:  # the record says done, whatever papermill's exit
        return Result(job, summary["status"], elapsed)
    if summary.get("status") == "failed":  # the notebook recorded its own failure
        return Result(job, "failed", elapsed, summary.get("error") or "failed (see summary.json)")
    status, error = _failure(outcome, proc.returncode, err, timeout, log_text)
    detail = {"traceback": err[1]} if err else {"log_tail": log_text}
    _write_summary(job, status, error, detail, elapsed)
    return Result(job, status, elapsed, error)


def _failure(
    outcome: str, returncode: int | None, err: tuple[str, str] | None, timeout: float, log_text: str
) -> tuple[str, str]:
    """(status, error) of a run that did not finish."""
    if outcome == "timeout":
        return "timeout", f"exceeded the wall-clock timeout of {timeout:g} s (--timeout)"
    if outcome == "interrupted":
        return "interrupted", "stopped by the user; re-run the same command to resume"
    if err is not None:
        return "failed", err[0]
    if returncode:
        return "failed", f"papermill exited with code {returncode}: {tail(log_text, 1)}"
    return "failed", "the notebook ended without writing summary.json (record.write_summary)"


# ---------------------------------------------------------------- many runs


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Progress:
    """One line per job start and finish, with elapsed time (thread-safe)."""

    def __init__(self, total: int, say: Callable[[str], None]) -> None:
        self.total, self.say, self.n, self.lock = total, say, 0, threading.Lock()

    def start(self, job: Job, where: str, verb: str = "start") -> None:
        with self.lock:
            self.say(f"{verb:<6} {job.name}  on {where}")

    def finish(self, r: Result) -> None:
        with self.lock:
            self.n += 1
            why = f": {r.error}" if r.error else ""
            self.say(
                f"[{self.n}/{self.total}] {r.status:<9} {r.job.name}  in {r.elapsed:.1f} s{why}"
            )


def run_local(
    jobs: Sequence[Job],
    slots: Sequence[str],
    workers: int,
    threads: int,
    timeout: float,
    progress: Progress,
) -> list[Result]:
    """`workers` jobs at a time, at most one per slot; a slot is a GPU id ("" = CPU)."""
    free: queue.Queue[str] = queue.Queue()
    for s in slots:
        free.put(s)
    stop = threading.Event()

    def work(job: Job) -> Result:
        slot = free.get()
        try:
            if stop.is_set():
                return Result(job, "interrupted", 0.0, "not started")
            progress.start(
                job, f"gpu {slot}" if slot else f"cpu, {threads} thread{'s' * (threads > 1)}"
            )
            r = execute(job, slot, threads, timeout, stop)
            progress.finish(r)
            return r
        finally:
            free.put(slot)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(work, j) for j in jobs]
        return [f.result() for f in futures]
    except BaseException:
        stop.set()  # running children are killed by their workers
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def make_submitit_executor(
    root: Path, timeout: float, cluster: str | None, slurm: dict
) -> tuple[Any, dict]:
    """submitit.AutoExecutor: SLURM where sbatch exists, else local processes."""
    import submitit

    ex = submitit.AutoExecutor(folder=root / ".submitit", cluster=cluster)
    params = {
        "name": "cbcore",
        "timeout_min": math.ceil(timeout / 60) + 5,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        **slurm,
    }
    try:
        ex.update_parameters(**params)
    except (NameError, ValueError, TypeError) as e:
        raise RunnerError(f"--slurm: {e}") from e
    return ex, params


def run_submitit(
    jobs: Sequence[Job], executor: Any, threads: int, timeout: float, progress: Progress
) -> list[Result]:
    """Submit each job as its own task; the task runs `execute` (GPU from the scheduler)."""
    submitted = []
    for job in jobs:
        sj = executor.submit(execute, job, None, threads, timeout)
        progress.start(job, f"{executor.cluster} job {sj.job_id}", verb="submit")
        submitted.append((job, sj))
    results: dict[int, Result] = {}
    while len(results) < len(submitted):
        for i, (job, sj) in enumerate(submitted):
            if i in results or not sj.done():
                continue
            try:
                r = sj.result()
            except Exception as e:  # the task died outside execute (killed, preempted, ...)
                r = Result(job, "failed", 0.0, f"submitit job {sj.job_id}: {e}".strip())
                if (
                    job.run_dir is not None
                    and (read_summary_safe(job.run_dir) or {}).get("status") not in FINISHED
                ):
                    _write_summary(job, "failed", r.error, {"traceback": str(e)}, 0.0)
            results[i] = r
            progress.finish(r)
        time.sleep(POLL_S)
    return [results[i] for i in range(len(submitted))]


def run(
    experiments: Sequence[str],
    seeds: Sequence[int],
    *,
    profile: str | None = "paper",
    sets: Sequence[str] = (),
    gpus: Sequence[str] | None = None,
    jobs: int | None = None,
    force: bool = False,
    executor: str = "local",
    timeout: float = DEFAULT_TIMEOUT_S,
    root: str | Path = "executed",
    notebooks_dir: str | Path | None = None,
    cluster: str | None = None,
    slurm: dict | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Run every experiment × seed, then the analysis notebooks. Returns the exit code:
    0 all finished, 1 some run failed. ParamsError/RunnerError: nothing ran."""
    root = Path(root).resolve()
    notebooks_dir = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    if timeout <= 0:
        raise RunnerError(f"--timeout {timeout:g}: must be > 0 seconds")
    if jobs is not None and jobs < 1:
        raise RunnerError(f"--jobs {jobs}: must be >= 1")
    if executor not in ("local", "slurm"):
        raise RunnerError(f"--executor {executor!r}: choose local or slurm")
    seed_jobs = plan(
        experiments, seeds, profile=profile, sets=sets, root=root, notebooks_dir=notebooks_dir
    )

    if executor == "slurm":
        if gpus:
            say(
                "note: --gpus is for local runs; each submitit task gets its GPU from the "
                "scheduler (--slurm gpus_per_node=N)"
            )
        ex, sparams = make_submitit_executor(root, timeout, cluster, slurm or {})
        threads = int(sparams["cpus_per_task"])

        def dispatch(js: Sequence[Job], progress: Progress) -> list[Result]:
            return run_submitit(js, ex, threads, timeout, progress)
    else:
        if gpus:
            workers = min(jobs or len(gpus), len(gpus))
            slots = list(gpus)
        else:
            workers = jobs or 1
            slots = [""] * workers
        threads = max(1, cpu_count() // workers)

        def dispatch(js: Sequence[Job], progress: Progress) -> list[Result]:
            return run_local(js, slots, workers, threads, timeout, progress)

    todo, results = [], []
    for job in seed_jobs:
        done = (read_summary_safe(job.run_dir) or {}).get("status")
        if done in FINISHED and not force:
            say(f"skip   {job.name}  ({done}; --force re-runs it)")
            results.append(Result(job, "skipped"))
            continue
        if force and job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        todo.append(job)
    t0 = time.time()
    results += dispatch(todo, Progress(len(todo), say))
    ran = {r.job.name for r in results if r.status != "skipped"}
    analyses = plan_analyses(
        seed_jobs, ran, profile=profile, root=root, notebooks_dir=notebooks_dir, force=force
    )
    ana = dispatch(analyses, Progress(len(analyses), say)) if analyses else []

    bad = [r for r in [*results, *ana] if not r.ok]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    say(
        f"{len(results)} run{'s' * (len(results) != 1)} in {time.time() - t0:.1f} s: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + (f"; {len(ana)} analysis notebooks" if ana else "")
        + (f"; {len(bad)} not finished: " + ", ".join(r.job.name for r in bad) if bad else "")
    )
    say(f"report: cbcore report --root {root}")
    return 1 if bad else 0
