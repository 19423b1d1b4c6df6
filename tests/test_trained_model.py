"""The committed trained Llama: loads in HF transformers, copies from context, serves in SGLang.

No training here: these tests read the committed fp16 weights (a few seconds each, plus one
real SGLang server start).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from sglang_tokendance.models.__main__ import main as models_main
from sglang_tokendance.models.measures import induction_check
from sglang_tokendance.models.train_config import trained_model_dir
from sglang_tokendance.models.train_eval import load_model
from sglang_tokendance.server import ServerProcess

PROMPT = "Isabella Rodriguez is planning a Valentine's Day party at Hobbs Cafe."
MAX_NEW = 12


@pytest.fixture(scope="module")
def trained() -> Path:
    return trained_model_dir()


@pytest.fixture(scope="module")
def trained_url(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real SGLang server on the trained model for this module."""
    log = tmp_path_factory.mktemp("trained-server") / "server.log"
    srv = ServerProcess(trained, ["--dtype", "float32"], log_path=log)
    try:
        yield srv.start().url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def hf_model(trained: Path) -> tuple[object, object]:
    torch.set_num_threads(1)
    return load_model(trained)


def test_build_trained_prints_the_committed_directory(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert models_main(["build", "trained"]) == 0
    assert Path(capsys.readouterr().out.strip()) == trained


def test_committed_files_and_config(trained: Path) -> None:
    weights = trained / "model.safetensors"
    assert weights.stat().st_size <= 20_000_000
    config = json.loads((trained / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float16"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (4, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert config["max_position_embeddings"] == 4096
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
        assert (trained / name).exists(), name
    ev = json.loads((trained / "eval.json").read_text())
    assert ev["val_ppl"] < 0.5 * ev["unigram_ppl"]  # the card's numbers say it learned prose


def test_loads_in_transformers_and_predicts_text(hf_model: tuple[object, object]) -> None:
    model, tok = hf_model
    assert next(model.parameters()).dtype == torch.float32
    text = "The for statement in Python iterates over the items of any sequence."
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.0, f"loss {loss:.2f} on ordinary prose: the weights look untrained"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith("<|im_start|>user\nhi<|im_end|>")


def test_second_copy_of_a_repeated_random_sequence_costs_under_half_the_first(
    hf_model: tuple[object, object],
) -> None:
    """The induction check of issue 8: random ids repeated twice; copying from context makes
    the second copy far cheaper than the first (which no model can predict)."""
    model, _ = hf_model
    res = induction_check(model, length=64, trials=16, seed=0)
    assert res["ratio"] < 0.5, res


def test_sglang_server_answers_generate_like_hf(
    trained_url: str, hf_model: tuple[object, object]
) -> None:
    model, tok = hf_model
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = out[0, ids.shape[1] :].tolist()
    r = requests.post(
        trained_url + "/generate",
        json={
            "text": PROMPT,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        },
        timeout=120,
    )
    r.raise_for_status()
    body = r.json()
    assert isinstance(body["text"], str) and body["text"]
    assert list(body["output_ids"]) == expected, (body["output_ids"], expected)


def test_sglang_server_continues_a_repeated_random_sequence_from_context(
    trained_url: str,
) -> None:
    """The copying circuit survives SGLang's own forward: given random ids and the start of
    their repeat, the server's greedy tokens continue the repeat."""
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(256, 1024, (48,), generator=g).tolist()
    r = requests.post(
        trained_url + "/generate",
        json={
            "input_ids": seq + seq[:16],
            "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
        },
        timeout=120,
    )
    r.raise_for_status()
    got = r.json()["output_ids"]
    hits = sum(a == b for a, b in zip(got, seq[16:32], strict=True))
    assert hits >= 12, (got, seq[16:32])
