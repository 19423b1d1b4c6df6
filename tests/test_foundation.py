"""Foundation: the real SGLang server on CPU with the TokenDance plugin (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
import server_pool
import torch
from test_replay_shared import shared_process, shared_server

from sglang_tokendance.server import ServerProcess, build_command, free_port
from sglang_tokendance.server_env import server_env

PROMPTS = [
    "Isabella Rodriguez is planning a Valentine's Day party at Hobbs Cafe.",
    "Klaus Mueller is writing a research paper on the effects of gentrification",
]
MAX_NEW = 12


def _hf_greedy(model_dir: Path, prompt: str) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, ids.shape[1] :].tolist()


def _sglang_greedy(url: str, prompt: str) -> list[int]:
    r = requests.post(
        url + "/generate",
        json={
            "text": prompt,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        },
        timeout=120,
    )
    r.raise_for_status()
    return list(r.json()["output_ids"])


@pytest.fixture(scope="module")
def llama_stock(tiny_llama: Path, request, tmp_path_factory) -> ServerProcess:
    """Stock SGLang on the tiny Llama (shared with the attention-path tests)."""
    return server_pool.server(request, tmp_path_factory, server_pool.spec(tiny_llama))


def test_greedy_outputs_match_hf_llama_with_and_without_tokendance(
    tiny_llama: Path, llama_stock: ServerProcess, request, tmp_path_factory
) -> None:
    expected = [_hf_greedy(tiny_llama, p) for p in PROMPTS]
    assert all(len(e) == MAX_NEW for e in expected)
    td_url = shared_server(request, tiny_llama, tmp_path_factory)
    for url in (llama_stock.url, td_url):
        got = [_sglang_greedy(url, p) for p in PROMPTS]
        assert got == expected, f"{url}: SGLang {got} != HF {expected}"


def test_greedy_outputs_match_hf_qwen2_with_and_without_tokendance(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    flags: list[list[str]] = [[], ["--enable-tokendance"]]
    servers = [
        ServerProcess(tiny_qwen2, extra, log_path=tmp_path / f"server{i}.log")
        for i, extra in enumerate(flags)
    ]
    try:
        for srv in servers:  # both start while HF computes the expected tokens
            srv.launch()
        expected = [_hf_greedy(tiny_qwen2, p) for p in PROMPTS]
        for srv, extra in zip(servers, flags, strict=True):
            srv.wait_ready()
            got = [_sglang_greedy(srv.url, p) for p in PROMPTS]
            assert got == expected, f"flags {extra}: SGLang {got} != HF {expected}"
    finally:
        for srv in servers:
            srv.stop()


def test_tokendance_server_answers_generate_and_completions(
    tiny_llama: Path, request, tmp_path_factory
) -> None:
    srv = shared_process(request, tiny_llama, tmp_path_factory)
    r = requests.post(
        srv.url + "/generate",
        json={"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
        timeout=60,
    )
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    r = requests.post(
        srv.url + "/v1/completions",
        json={"model": "default", "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    r = requests.post(
        srv.url + "/v1/chat/completions",
        json={
            "model": "default",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "temperature": 0,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    log = srv.log()
    assert "TokenDance is on: mode=tokendance, recompute_ratio=0.15" in log
    assert "impl=TokenDanceRadixCache" in log


def test_stock_server_does_not_mention_tokendance(llama_stock: ServerProcess) -> None:
    log = llama_stock.log()
    assert "TokenDance is on" not in log
    assert "impl=TokenDanceRadixCache" not in log
    r = requests.get(llama_stock.url + "/tokendance/stats", timeout=30)
    assert r.status_code == 404


BAD_OPTIONS = [
    (["--tokendance-recompute-ratio", "1.5"], "must be in [0, 1], got 1.5"),
    (["--tokendance-mode", "dense"], "invalid choice: 'dense'"),
    (["--tokendance-round-timeout-ms", "-3"], "must be > 0 milliseconds"),
    (["--page-size", "16"], "TokenDance requires --page-size 1"),
    # refused when the attention backend is built (no CUDA here, and test servers do not
    # inherit the test process's TRITON_INTERPRET)
    (
        ["--tokendance-attention", "triton"],
        "--tokendance-attention triton needs a CUDA device or TRITON_INTERPRET=1",
    ),
]


# What ``python -m sglang.launch_server`` does before it starts anything: load the plugins, then
# parse and validate the arguments. One process runs it for every bad option (each a separate
# import of SGLang would cost ~8 CPU-seconds); the first option also gets a real launch.
_PARSE_EACH = """
import contextlib, io, json, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args
load_plugins()
for argv in json.loads(sys.argv[1]):
    err, code = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err):
            prepare_server_args(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:
        code, err = 1, io.StringIO(f"{type(e).__name__}: {e}")
    print("RESULT " + json.dumps([code, err.getvalue()]), flush=True)
"""


@pytest.fixture(scope="module")
def bad_launches(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, ...], tuple[int, str]]:
    """flags -> (exit code, output) of every bad option: the launch path's argument stage in
    one process for all of them, and a real ``launch_server`` for the first (it must exit)."""
    tmp = tmp_path_factory.mktemp("bad-options")
    argvs = []
    for flags, _ in BAD_OPTIONS:
        cmd = build_command(tiny_llama, free_port(), ["--enable-tokendance", *flags])
        argvs.append(cmd[3:])  # past "python -m sglang.launch_server"
    first = BAD_OPTIONS[0][0]
    with open(tmp / "launch.log", "w+") as out:
        real = subprocess.Popen(
            build_command(tiny_llama, free_port(), ["--enable-tokendance", *first]),
            env=server_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        each = subprocess.run(
            [sys.executable, "-c", _PARSE_EACH, json.dumps(argvs)],
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        real.wait(timeout=300)
        out.seek(0)
        launched = (real.returncode, out.read())
    lines = [ln[7:] for ln in each.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == len(BAD_OPTIONS), each.stdout + each.stderr
    results: dict[tuple[str, ...], tuple[int, str]] = {}
    for (flags, _), line in zip(BAD_OPTIONS, lines, strict=True):
        code, text = json.loads(line)
        results[tuple(flags)] = (int(code), text)
    results[("launch", *first)] = launched
    return results


def test_a_real_launch_with_a_bad_option_exits_with_its_message(bad_launches) -> None:
    flags, message = BAD_OPTIONS[0]
    returncode, output = bad_launches[("launch", *flags)]
    assert returncode != 0
    assert message in output


@pytest.mark.parametrize(("flags", "message"), BAD_OPTIONS)
def test_bad_option_stops_launch_with_clear_message(
    bad_launches: dict[tuple[str, ...], tuple[int, str]], flags: list[str], message: str
) -> None:
    returncode, output = bad_launches[tuple(flags)]
    assert returncode != 0
    assert message in output


def test_server_is_stopped_when_the_test_body_fails(tiny_llama: Path, tmp_path: Path) -> None:
    srv = ServerProcess(tiny_llama, log_path=tmp_path / "s.log")
    with pytest.raises(RuntimeError, match="boom"):
        with srv:
            pid = srv.proc.pid
            raise RuntimeError("boom")
    assert srv.proc.poll() is not None
    # No live process of the group is left (zombies reparented to a non-reaping init don't run).
    alive = [
        p.pid
        for p in psutil.process_iter(["status"])
        if _pgid(p.pid) == pid and p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert alive == []


def test_a_server_whose_chosen_port_was_taken_meanwhile_relaunches_on_another(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process binds the free port we chose before uvicorn does (servers starting side
    by side): the server logs the bind error and never answers; it is relaunched elsewhere."""
    import socket

    from sglang_tokendance import server as server_mod

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    chosen = iter([port])
    real = server_mod.free_port
    monkeypatch.setattr(server_mod, "free_port", lambda: next(chosen, 0) or real())
    try:
        with ServerProcess(tiny_llama, log_path=tmp_path / "s.log") as srv:
            assert srv.port != port and srv.url.endswith(f":{srv.port}")
            assert "address already in use" in srv.log()  # the first try's log is kept
            r = requests.post(
                srv.url + "/generate",
                json={"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 2}},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
    finally:
        taken.close()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_cpu_standin_raises_clearly_for_unimplemented_ops() -> None:
    code = (
        "from sgl_kernel import fused_experts_cpu\n"
        "try:\n    fused_experts_cpu(1)\nexcept NotImplementedError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "sgl_kernel.fused_experts_cpu is not available" in out.stdout
