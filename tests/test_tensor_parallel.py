"""Tensor parallelism: two ranks started by torchrun on this machine (gloo on CPU), against the same model in one
process: logits within 1e-5, the same greedy tokens, and each rank holding about half of the split weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chatlm import AutoModelForCausalLM
from checkpoints import write_checkpoint

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from chatlm import AutoModelForCausalLM

    paths, out, dtype = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    result = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(paths[rank % len(paths)], tp_plan="auto", dtype=dtype)
        ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
        with torch.no_grad():
            result["logits"] = model(ids).logits.float().tolist()
        result["generated"] = model.generate(ids, max_new_tokens=12, eos_token_id=None).tolist()
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["kv_heads"] = model.new_cache(1, 4).keys[0].shape[1]
    except ValueError as e:
        result["error"] = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    """
)


def run_ranks(tmp_path: Path, paths: list[Path], ranks: int = 2, dtype: str = "float32") -> list[dict]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += [str(script), ",".join(str(p) for p in paths), str(out), dtype]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[:6000]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def split_parameters(model) -> int:
    """Parameters of the layers the plan splits: q, k, v, o, the MLPs' gate, up and down, the experts."""
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}
    return sum(p.numel() for n, p in model.named_parameters() if names & set(n.split(".")))


# qwen2_moe: a shared expert and a dense layer (mlp_only_layers) besides the experts; mixtral: experts only
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen2_moe", "mixtral"])
def test_two_ranks_match_one_process(tmp_path, variant):
    path = write_checkpoint(tmp_path / variant, variant)
    whole = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
    with torch.no_grad():
        logits = whole(ids).logits
    generated = whole.generate(ids, max_new_tokens=12, eos_token_id=None).tolist()
    results = run_ranks(tmp_path, [path])
    total, split = sum(p.numel() for p in whole.parameters()), split_parameters(whole)
    for rank in results:
        assert "error" not in rank, rank.get("error")
        torch.testing.assert_close(torch.tensor(rank["logits"]), logits, atol=1e-5, rtol=1e-5)
        assert rank["generated"] == generated
        assert (
            rank["parameters"] == total - split // 2
        )  # the split layers' weights are halved, the rest whole
        assert rank["kv_heads"] == whole.config.num_key_value_heads // 2  # the KV cache is split by heads


def test_refusals_name_the_problem(tmp_path):
    one_kv_head = write_checkpoint(tmp_path / "gqa1", "llama", num_key_value_heads=1)
    results = run_ranks(tmp_path, [one_kv_head])
    assert all("num_key_value_heads (1) to be a multiple of 2" in r["error"] for r in results)
    other = write_checkpoint(tmp_path / "other", "llama", seed=3, hidden_size=32)
    results = run_ranks(tmp_path, [write_checkpoint(tmp_path / "llama", "llama"), other])
    assert all("ranks disagree on the model" in r["error"] for r in results)


def test_tp_plan_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    path = write_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="torchrun"):
        AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    with pytest.raises(ValueError, match="tp_plan must be 'auto'"):
        AutoModelForCausalLM.from_pretrained(path, tp_plan="colwise")


def test_cli_under_torchrun_gives_the_single_process_replies(tmp_path):
    """`chatlm run` and `chatlm chat` on two ranks: rank 0 reads the prompt and prints, the other computes its
    share; the replies are the single process's (greedy, and sampled with a seed)."""
    path = write_checkpoint(tmp_path / "llama", "llama")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    for options in (
        ["--max-new-tokens", "10"],
        ["--max-new-tokens", "10", "--temperature", "1", "--seed", "4"],
    ):
        run = ["chatlm", "run", str(path), "hello there", *options]
        alone = subprocess.run(
            [sys.executable, "-m", *run], capture_output=True, text=True, env=env, timeout=120
        )
        split = subprocess.run([*torchrun, *run], capture_output=True, text=True, env=env, timeout=300)
        assert alone.returncode == 0 and split.returncode == 0, split.stderr[-3000:]
        assert split.stdout == alone.stdout and alone.stdout.strip()
    chat = ["chatlm", "chat", str(path), "--max-new-tokens", "6", "--temperature", "0"]
    # commands that change the chat reach every rank too
    lines = "first message\n/reset\n/system Be brief.\n/set max_tokens 4\nsecond message\n/exit\n"
    alone = subprocess.run(
        [sys.executable, "-m", *chat], input=lines, capture_output=True, text=True, env=env, timeout=120
    )
    split = subprocess.run(
        [*torchrun, *chat], input=lines, capture_output=True, text=True, env=env, timeout=300
    )
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == alone.stdout and alone.stdout.count("\n") >= 2


def test_serve_under_torchrun(tmp_path):
    """`chatlm serve` on two ranks: rank 0 serves HTTP and runs the engine, the other runs its model calls; the
    replies are the single process's; SIGTERM to torchrun shuts every rank down cleanly."""
    import signal
    import socket
    import time

    import httpx

    path = write_checkpoint(tmp_path / "llama", "llama")
    whole = AutoModelForCausalLM.from_pretrained(path)
    from chatlm import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    questions = ["hello there", "what is this", "one two three"]
    expected = []
    for q in questions:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt"
        )
        out = whole.generate(ids["input_ids"], max_new_tokens=8)[0, ids["input_ids"].shape[1] :]
        expected.append(tok.decode(out, skip_special_tokens=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    command += ["chatlm", "serve", str(path), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)

        def ask(question: str) -> str:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0}
            return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0][
                "message"
            ]["content"]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:  # together: the ranks follow a batch that rows join and leave
            assert list(pool.map(ask, questions)) == expected
        # torchrun passes SIGTERM on to every rank and then exits with status 1 whatever they do (its own
        # SignalException); the ranks must end by themselves: rank 0 after a graceful shutdown, the other when
        # rank 0 tells it to, with nobody killed.
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        err = server.stderr.read().decode()
        assert "SIGKILL" not in err and "ChildFailedError" not in err, err[-3000:]
    finally:
        if server.poll() is None:
            server.kill()


def test_two_ranks_from_gguf(tmp_path):
    """A GGUF file (Q8_0 blocks, dequantized and then sliced on each rank) split over two ranks."""
    from gguf_export import export_gguf

    checkpoint = write_checkpoint(tmp_path / "llama", "llama")
    path = export_gguf(
        checkpoint, tmp_path / "llama.gguf", "llama", tensor_type="Q8_0", tokenizer_dir=checkpoint
    )
    whole = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
    with torch.no_grad():
        logits = whole(ids).logits
    generated = whole.generate(ids, max_new_tokens=12, eos_token_id=None).tolist()
    for rank in run_ranks(tmp_path, [path]):
        assert "error" not in rank, rank.get("error")
        torch.testing.assert_close(torch.tensor(rank["logits"]), logits, atol=1e-5, rtol=1e-5)
        assert rank["generated"] == generated
