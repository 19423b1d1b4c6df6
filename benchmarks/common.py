"""Shared machinery of the end-to-end benchmarks (public interfaces only).

Servers are real SGLang servers started with :class:`sglang_tokendance.server.ServerProcess`
(the CPU defaults of the project plus ``--enable-tokendance --tokendance-mode M
--tokendance-recompute-ratio R --sleep-on-idle``); they are driven over HTTP (``/generate``,
``/flush_cache``, ``GET /tokendance/stats``) and with the trace replayer. Nothing here touches
server internals.

- :class:`ServerPool` starts servers on demand, keyed by (model, mode, ratio, extra flags), keeps
  at most ``max_alive`` of them (least recently used are stopped) and ALWAYS stops every server
  it started (context manager, also on errors and Ctrl-C). ``report.py`` shares one pool between
  benchmarks so that a server with the same flags is started once.
- ``--sleep-on-idle`` is passed to every server: without it an idle SGLang scheduler busy-polls
  (measured here: about 60-100% of one core per idle server), which would steal one of the two
  cores from the server being measured.
- Between runs on a reused server the cache is emptied with ``POST /flush_cache`` (SGLang's own
  route; it resets the TokenDance cache too), and every run uses a fresh round-id prefix: the
  server remembers a round's shared texts, and an agent's mirrors live until that agent's next
  round, so leftovers of an earlier run would otherwise count as the next run's KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import requests

logger = logging.getLogger("benchmarks")

MODES = ("tokendance", "pic", "off")
SLEEP_ON_IDLE = "--sleep-on-idle"
# Every mode of a comparison on one attention code path (the position-aware one): a benchmark
# then measures the reuse, not torch_native's kernel against TokenDance's.
UNIFORM = "--tokendance-uniform-attention"
# Flags of the tiny-model servers that storage, fidelity (and the quick prefill) share.
TINY_SERVER_ARGS = f"--max-total-tokens 262144 --max-running-requests 64 {UNIFORM}"
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


# ---- environment ----------------------------------------------------------------------------
def setup_logging(verbose: bool = False) -> None:
    """INFO logging (DEBUG with ``verbose``) for the benchmarks; quiet third-party loggers."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("urllib3", "asyncio", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cpu_cores() -> int:
    """Cores this process may run on (affinity), falling back to ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loadavg() -> float | None:
    """The 1-minute load average now (other jobs on the machine show up here)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def has_cuda() -> bool:
    """True when torch sees a CUDA device."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a dependency
        return False


def machine_name() -> str:
    """``cpu-<N>core`` (or ``<gpu>-<N>core`` with CUDA), for the results directory name."""
    cores = cpu_cores()
    if has_cuda():
        import torch

        gpu = torch.cuda.get_device_name(0).lower().replace(" ", "-")
        return f"{gpu}-{cores}core"
    return f"cpu-{cores}core"


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: cores, platform, versions, load average at the time."""
    info: dict[str, Any] = {
        "name": machine_name(),
        "cpu_cores": cpu_cores(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cuda": has_cuda(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    for mod in ("torch", "sglang"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def model_path(spec: str, arch: str = "llama") -> Path:
    """``tiny`` / ``small`` (built once by the project's builder), ``trained`` (the committed
    trained model), or a model directory."""
    if spec in ("tiny", "small"):
        from sglang_tokendance.models import build

        return Path(build(spec, arch))
    if spec == "trained":
        from sglang_tokendance.models.train_config import trained_model_dir

        try:
            return trained_model_dir()
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"error: model {spec!r} is neither tiny, small, trained nor a model directory"
        )
    return path


def default_fidelity_model() -> str:
    """``trained`` when its weights are present (they are committed), else ``tiny``."""
    from sglang_tokendance.models.train_config import trained_dir

    return "trained" if (trained_dir() / "model.safetensors").exists() else "tiny"


def model_config(path: Path) -> dict[str, Any]:
    """The model's ``config.json`` (its text config for multimodal layouts)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg.get("text_config", cfg)


def vocab_size(path: Path) -> int:
    """The model's vocabulary size (the logits' width)."""
    return int(model_config(path)["vocab_size"])


def model_label(spec: str, path: Path) -> str:
    """A short name for reports: ``tiny (llama-tiny-<hash>)`` or the directory name."""
    return f"{spec} ({path.name})" if spec in ("tiny", "small", "trained") else path.name


# ---- traces ---------------------------------------------------------------------------------
def make_trace(workload: str, agents: int, rounds: int, seed: int, **params: Any) -> Any:
    """A generated All-Gather trace (see ``python -m sglang_tokendance.trace generate``)."""
    from sglang_tokendance.trace.generators import generate

    return generate(workload, agents=agents, rounds=rounds, seed=seed, **params)


def load_trace(path: str | Path) -> Any:
    """A trace file (tokendance-trace v1)."""
    from sglang_tokendance.trace.format import read_trace

    return read_trace(path)


def run_prefix(tag: str) -> str:
    """A fresh round-id prefix (``<tag>-<6 hex>-``): round ids never repeat on a server."""
    return f"{tag}-{uuid.uuid4().hex[:6]}-"


# ---- statistics -----------------------------------------------------------------------------
def spread(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """``median, min, max, q1, q3, mean, n`` of the non-None values (all None when empty)."""
    xs = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not xs:
        return {k: None for k in ("median", "min", "max", "q1", "q3", "mean")} | {"n": 0}

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {
        "median": round(q(0.5), 6),
        "min": round(xs[0], 6),
        "max": round(xs[-1], 6),
        "q1": round(q(0.25), 6),
        "q3": round(q(0.75), 6),
        "mean": round(statistics.fmean(xs), 6),
        "n": len(xs),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den`` rounded to 4 places, None when either is missing or ``den`` is 0."""
    if num is None or den is None or den == 0:
        return None
    return round(float(num) / float(den), 4)


def fmt_spread(s: dict[str, Any], digits: int = 2, unit: str = "") -> str:
    """``median [min-max]`` for tables."""
    if not s or s.get("median") is None:
        return "n/a"
    if s.get("n", 0) <= 1:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n")


def write_outputs(
    name: str,
    result: dict[str, Any],
    out: Path,
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """``<name>.json``, ``<name>.md`` and ``<name>.png`` in ``out`` (a failed plot is logged)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result) + "\n")
    try:
        plot(result, out / f"{name}.png")
    except Exception:
        logger.exception("%s: plot failed", name)


def bench_main(mod: Any, argv: list[str] | None, pool: Any = None) -> int:
    """The ``main()`` of a server benchmark module: parse, run, write, print the summary.

    ``mod`` provides ``build_parser``, ``run(args, pool)``, ``write_outputs(result, out)``,
    ``summary_line(result)`` and ``exit_code(result)``.
    """
    args = mod.build_parser().parse_args(argv)
    setup_logging(args.verbose)
    result = mod.run(args, pool)
    mod.write_outputs(result, args.out)
    print(mod.summary_line(result))
    return int(mod.exit_code(result))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- servers --------------------------------------------------------------------------------
class ServerKey(NamedTuple):
    """What makes two servers interchangeable."""

    model: str
    mode: str
    ratio: float
    extra: tuple[str, ...]

    def label(self) -> str:
        """``mode@ratio``, with ``[selection,policy]`` when the extra flags set them."""
        if self.mode == "off":
            return self.mode
        opts = [flag_value(self.extra, f) for f in ("--tokendance-selection", POLICY_FLAG)]
        tag = ",".join(o for o in opts if o)
        mirror = flag_value(self.extra, MIRROR_FLAG)
        if mirror == "threshold":
            mirror += f" {flag_value(self.extra, MIRROR_EPS_FLAG) or 'default'}"
            if (scale := flag_value(self.extra, MIRROR_SCALE_FLAG)) not in (None, "token"):
                mirror += f" {scale}"  # token: the labels of every run before the layer scale
        suffix = f" ({mirror} mirrors)" if mirror is not None else ""  # None: the default
        return f"{self.mode}{f'[{tag}]' if tag else ''}@{self.ratio:g}{suffix}"


POLICY_FLAG = "--tokendance-master-policy"
MIRROR_FLAG = "--tokendance-mirror"
MIRROR_EPS_FLAG = "--tokendance-mirror-eps"
MIRROR_SCALE_FLAG = "--tokendance-mirror-scale"


def mirror_flags(policy: str) -> list[str]:
    """Server flags of a mirror policy spec: ``default`` (no flag: the server's default
    policy), ``keep``, ``drop`` or ``threshold[:EPS[:SCALE]]`` (``threshold`` alone: the
    server's default eps and scale; SCALE ``token`` (when an EPS is given without one: what
    ``threshold:EPS`` meant before the layer scale existed) or ``layer``, see
    ``--tokendance-mirror-scale``). Every policy but ``default`` is passed explicitly: the
    server's default is not keep."""
    name, _, rest = policy.partition(":")
    eps, _, scale = rest.partition(":")
    if (
        name not in ("default", "keep", "drop", "threshold")
        or (rest and name != "threshold")
        or scale not in ("", "token", "layer")
        or (scale and not eps)
    ):
        raise ValueError(
            "mirror policy must be default, keep, drop or threshold[:EPS[:token|layer]], "
            f"got {policy!r}"
        )
    if name == "default":
        return []
    flags = [MIRROR_FLAG, name, *([MIRROR_EPS_FLAG, str(float(eps))] if eps else [])]
    return flags + ([MIRROR_SCALE_FLAG, scale or "token"] if eps else [])


def mirror_of_label(label: str) -> str:
    """The mirror policy a server label names (``... (threshold 0.05 mirrors)`` ->
    ``threshold 0.05``, ``... (keep mirrors)`` -> ``keep``; no suffix: the server's default)."""
    head, sep, _ = label.rpartition(" mirrors)")
    return head.rsplit("(", 1)[1] if sep and "(" in head else "default"


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def server_flags(mode: str, ratio: float, extra: Sequence[str] = ()) -> list[str]:
    """The TokenDance flags of a benchmark server (``--sleep-on-idle`` always; see module doc)."""
    flags = ["--enable-tokendance", "--tokendance-mode", mode]
    flags += ["--tokendance-recompute-ratio", f"{ratio:g}"]
    if SLEEP_ON_IDLE not in extra:
        flags.append(SLEEP_ON_IDLE)
    return flags + list(extra)


@dataclass
class Server:
    """A running server of the pool: its URL, flags, log and how long it took to start."""

    key: ServerKey
    url: str
    argv: list[str]
    log_path: Path
    startup_s: float
    proc: Any = field(repr=False, default=None)

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.key.label(),
            "model": self.key.model,
            "mode": self.key.mode,
            "recompute_ratio": self.key.ratio,
            "launch_flags": self.argv[3:],
            "startup_s": round(self.startup_s, 1),
        }


class ServerPool:
    """Servers keyed by (model, mode, ratio, extra flags); every one is stopped on exit.

    Args:
        log_dir: where server logs go (``<label>-<n>.log``).
        max_alive: at most this many servers run at once (least recently used stop first).
        start_parallel: how many servers :meth:`ensure` starts at once.
    """

    def __init__(self, log_dir: Path, max_alive: int = 5, start_parallel: int = 2) -> None:
        self.log_dir = Path(log_dir)
        self.max_alive = max(1, max_alive)
        self.start_parallel = max(1, start_parallel)
        self._alive: OrderedDict[ServerKey, Server] = OrderedDict()
        self._lock = threading.Lock()
        self._count = 0
        self.started: list[dict[str, Any]] = []

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key(
        self, model: Path, mode: str, ratio: float = 0.15, extra: Sequence[str] = ()
    ) -> ServerKey:
        # the ratio is irrelevant in mode off: one off server serves every ratio
        return ServerKey(str(model), mode, 0.0 if mode == "off" else float(ratio), tuple(extra))

    def alive(self, key: ServerKey) -> bool:
        return key in self._alive

    def order(self, keys: Sequence[ServerKey]) -> list[ServerKey]:
        """``keys`` with the already running ones first (fewer starts under ``max_alive``)."""
        return [k for k in keys if k in self._alive] + [k for k in keys if k not in self._alive]

    def _start(self, key: ServerKey) -> Server:
        from sglang_tokendance.server import ServerProcess

        with self._lock:
            self._count += 1
            n = self._count
        log = self.log_dir / f"server-{n:02d}-{key.label().replace('@', '-')}.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = server_flags(key.mode, key.ratio, key.extra)
        proc = ServerProcess(key.model, argv, log_path=log, startup_timeout_s=600.0)
        t0 = time.perf_counter()
        logger.info("starting server %s (%s)", key.label(), Path(key.model).name)
        proc.start()
        srv = Server(key, proc.url, proc.argv, log, time.perf_counter() - t0, proc)
        want = flag_value(argv, "--max-total-tokens")
        got = get_stats(srv.url).get("pool_tokens")
        if want is not None and got is not None and int(got) < int(want):
            proc.stop()
            raise RuntimeError(
                f"server {key.label()} got a KV pool of {got} tokens, not the {want} asked for "
                "(SGLang profiles free memory at start): too many servers or too little memory"
            )
        logger.info("server %s up in %.1f s at %s", key.label(), srv.startup_s, srv.url)
        return srv

    def _stop(self, srv: Server) -> None:
        if srv.proc is None:  # registered from outside: its owner stops it
            return
        logger.info("stopping server %s", srv.key.label())
        srv.proc.stop()

    def register(self, key: ServerKey, url: str) -> None:
        """Use an already running server (started and stopped by the caller) for ``key``."""
        self._alive[key] = Server(key, url.rstrip("/"), ["", "", "", "(external)"], Path(), 0.0)

    def _make_room(self, needed: int, keep: Iterable[ServerKey]) -> None:
        keep = set(keep)
        victims = []
        while len(self._alive) + needed > self.max_alive:
            old = next((k for k in self._alive if k not in keep), None)
            if old is None:
                break
            victims.append(self._alive.pop(old))
        self._stop_all(victims)

    def _stop_all(self, servers: list[Server]) -> None:
        if not servers:
            return
        with ThreadPoolExecutor(len(servers)) as ex:
            list(ex.map(self._stop, servers))

    def ensure(self, keys: Sequence[ServerKey]) -> None:
        """Start the missing servers of ``keys`` (``start_parallel`` at a time)."""
        missing = list(dict.fromkeys(k for k in keys if k not in self._alive))
        if not missing:
            return
        self._make_room(len(missing), keys)
        with ThreadPoolExecutor(self.start_parallel) as ex:
            futures = [(k, ex.submit(self._start, k)) for k in missing]
            errors = []
            for k, fut in futures:
                try:
                    srv = fut.result()
                except Exception as e:  # keep the ones that started: they are stopped at close
                    errors.append(f"{k.label()}: {e}")
                    continue
                self._alive[k] = srv
                self.started.append(srv.describe())
        if errors:
            raise RuntimeError("server start failed:\n" + "\n".join(errors))

    def get(self, key: ServerKey) -> Server:
        """The running server of ``key`` (started now if needed)."""
        if key not in self._alive:
            self.ensure([key])
        self._alive.move_to_end(key)
        return self._alive[key]

    def close(self) -> None:
        """Stop every server (in parallel)."""
        servers = list(self._alive.values())
        self._alive.clear()
        self._stop_all(servers)


@contextlib.contextmanager
def pool_or_new(pool: ServerPool | None, log_dir: Path, **kw: Any) -> Iterator[ServerPool]:
    """``pool`` as is (its owner stops it), or a new pool stopped when the block ends."""
    if pool is not None:
        yield pool
        return
    with ServerPool(log_dir, **kw) as own:
        yield own


# ---- HTTP -----------------------------------------------------------------------------------
def flush_cache(url: str, timeout_s: float = 60.0) -> None:
    """``POST /flush_cache`` until SGLang accepts it (it refuses while requests are running)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = requests.post(url + "/flush_cache", timeout=30)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"{url}/flush_cache did not succeed in {timeout_s}s: {last}")


def get_stats(url: str) -> dict[str, Any]:
    """``GET /tokendance/stats`` ({} when the route is missing)."""
    r = requests.get(url + "/tokendance/stats", timeout=60)
    return r.json() if r.status_code == 200 else {}


def round_stats(stats: dict[str, Any], round_id: str) -> dict[str, Any] | None:
    """The server's per-round entry of ``round_id`` (None if it has none)."""
    return next((r for r in stats.get("per_round") or [] if r.get("round") == round_id), None)


@dataclass
class Reply:
    """One /generate answer as the benchmarks need it (times from ``time.perf_counter``)."""

    round: int
    agent: str
    ok: bool = False
    error: str | None = None
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    num_retractions: int = 0
    t_start: float = 0.0
    t_first: float | None = None
    t_done: float = 0.0
    first_top_logprobs: list[list[Any]] | None = None
    step_top_logprobs: list[list[list[Any]]] | None = None  # every output token's top-K

    @property
    def ttft_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_start) * 1000.0

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_start) * 1000.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("first_top_logprobs")
        d.pop("step_top_logprobs")
        return d


def _fill(rep: Reply, obj: dict[str, Any]) -> None:
    meta = obj.get("meta_info") or {}
    rep.text = obj.get("text", rep.text)
    ids = obj.get("output_ids")
    if ids is None and meta.get("output_token_logprobs"):
        ids = [int(t[1]) for t in meta["output_token_logprobs"]]
    if ids is not None:
        rep.output_ids = [int(i) for i in ids]
    rep.prompt_tokens = int(meta.get("prompt_tokens") or 0)
    rep.cached_tokens = int(meta.get("cached_tokens") or 0)
    rep.completion_tokens = int(meta.get("completion_tokens") or 0)
    rep.num_retractions = int(meta.get("num_retractions") or 0)
    top = meta.get("output_top_logprobs")
    if top:
        rep.first_top_logprobs = top[0]
        rep.step_top_logprobs = top


async def post_generate(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], rep: Reply
) -> Reply:
    """Send one /generate (streamed when ``body["stream"]``) and fill ``rep``; never raises."""
    rep.t_start = time.perf_counter()
    try:
        async with session.post(url + "/generate", json=body) as resp:
            if resp.status != 200:
                rep.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return rep
            if not body.get("stream"):
                obj = orjson.loads(await resp.read())
                rep.t_first = None
                _fill(rep, obj)
            else:
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    obj = orjson.loads(data)
                    if "error" in obj:
                        rep.error = str(obj["error"])[:500]
                        return rep
                    if rep.t_first is None and obj.get("output_ids"):
                        rep.t_first = time.perf_counter()
                    _fill(rep, obj)
            rep.ok = rep.error is None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        rep.error = f"{type(e).__name__}: {e}"
    finally:
        rep.t_done = time.perf_counter()
    return rep


def round_bodies(
    trace: Any,
    rnd: int,
    prefix: str,
    *,
    hints: bool = True,
    max_new_tokens: int | None = None,
    extra: dict[str, Any] | None = None,
    stream: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """``(agent, /generate body)`` of every request of round ``rnd`` (greedy).

    ``hints`` adds the TokenDance hint (round id ``<prefix>r<rnd>``); a server in mode off
    ignores it except for its per-round accounting (same text, same tokens, same outputs).
    """
    from sglang_tokendance.replay.runner import build_sent

    reqs = trace.rounds()[rnd]
    out = []
    for req in reqs:
        sent = build_sent(req, req.segments, "tokendance" if hints else "off", len(reqs), prefix)
        body: dict[str, Any] = {
            "text": sent.text,
            "sampling_params": {
                "temperature": 0.0,
                "max_new_tokens": int(max_new_tokens or sent.max_tokens),
            },
            "stream": stream,
        }
        if sent.kv_hints is not None:
            body["kv_hints"] = sent.kv_hints
        body.update(extra or {})
        out.append((req.agent, body))
    return out


async def _run_rounds(
    url: str,
    trace: Any,
    prefix: str,
    rounds: Sequence[int],
    timeout_s: float,
    **kw: Any,
) -> list[tuple[float, list[Reply]]]:
    out = []
    widest = max(len(trace.rounds()[r]) for r in rounds)
    from sglang_tokendance.replay.client import make_session

    async with make_session(timeout_s, widest) as session:
        for rnd in rounds:
            bodies = round_bodies(trace, rnd, prefix, **kw)
            t0 = time.perf_counter()
            reps = await asyncio.gather(
                *(post_generate(session, url, b, Reply(rnd, a)) for a, b in bodies)
            )
            out.append(((time.perf_counter() - t0) * 1000.0, list(reps)))
    return out


def run_rounds(
    url: str,
    trace: Any,
    prefix: str,
    rounds: Sequence[int] | None = None,
    timeout_s: float = 1800.0,
    **kw: Any,
) -> list[tuple[float, list[Reply]]]:
    """Send the trace's rounds one after the other, each round's requests at once.

    Returns ``(round latency ms, replies in trace order)`` per round. Keyword arguments go to
    :func:`round_bodies` (``hints``, ``max_new_tokens``, ``extra``, ``stream``).
    """
    rounds = list(rounds if rounds is not None else trace.rounds().keys())
    return asyncio.run(_run_rounds(url, trace, prefix, rounds, timeout_s, **kw))


def warm_up(url: str, tag: str = "warm", flush: bool = True) -> None:
    """One small hinted round (2 agents, 1 round, 2 output tokens), then flush the cache."""
    trace = make_trace(
        "generative_agents",
        agents=2,
        rounds=1,
        seed=12345,
        private_words=60,
        shared_words=20,
        max_tokens=2,
    )
    res = run_rounds(url, trace, run_prefix(tag), max_new_tokens=2)
    bad = [r.error for _, reps in res for r in reps if not r.ok]
    if bad:
        raise RuntimeError(f"warm-up failed on {url}: {bad[0]}")
    if flush:
        flush_cache(url)


def replay_trace(url: str, trace: Any, prefix: str, hints: bool = True) -> dict[str, Any]:
    """Replay ``trace`` with the project's replayer and return its report (the public path).

    ``hints`` sends TokenDance hints (the replayer's mode ``tokendance``); to a mode-off server
    they only label requests with their round for the server's per-round accounting.
    """
    from sglang_tokendance.replay import ReplayOptions, build_report, replay

    opts = ReplayOptions(
        mode="tokendance" if hints else "off",
        progress=False,
        round_prefix=prefix,
        honor_arrival=False,
    )
    result = replay(trace, url, opts)
    return build_report(
        result, opts, "<generated>", trace.header.workload, len(trace.header.agents)
    )
