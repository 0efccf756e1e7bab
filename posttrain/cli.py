"""The `posttrain` command: a thin Typer layer that parses, loads and calls. No logic here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from posttrain.errors import UserError, in_recipe

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Token-level post-training experiments: train (SFT/DFT/OTR/DPO/...), rl (OPD/LSM/GRPO/PPO/...; alias distill), eval, report.",
)

RECIPE = typer.Option(..., "--recipe", "-r", help="YAML recipe (see `posttrain recipes`).")
OVERRIDES = typer.Argument(None, help="Recipe overrides as dotted key=value pairs, typed by the schema, "
                                      "e.g. optim.lr=1e-4 objective.k=128 name=my-run.", show_default=False)
RESUME = typer.Option(False, "--resume", help="Continue the run folder from its newest intact checkpoint.")
CHECK = typer.Option(False, "--check", help="Only the pre-flight checks (teacher/student vocabulary, EOS and end of "
                     "turn, chat templates, samples, scoring determinism), in seconds; writes nothing.")
ALLOW_CHANGED = typer.Option(False, "--allow-changed-recipe", help="With --resume: continue although the recipe differs "
                             "from the run's config.yaml (the change is recorded in config_changes.jsonl).")


@app.command()
def train(recipe: Path = RECIPE, overrides: list[str] = OVERRIDES, resume: bool = RESUME,
          allow_changed_recipe: bool = ALLOW_CHANGED) -> None:
    """Train with an offline objective on demonstrations (sft, dft, otr; kd_topk from a teacher cache) or on
    preference pairs (dpo, tdpo); writes runs/<name>/."""
    from posttrain.config import TrainRecipe, load_recipe
    from posttrain.train import train as run

    with in_recipe(recipe):
        run(load_recipe(recipe, TrainRecipe, overrides), resume=resume, allow_changed_recipe=allow_changed_recipe,
            command=_command("train", recipe, overrides, resume, allow_changed_recipe))


@app.command()
def rl(recipe: Path = RECIPE, overrides: list[str] = OVERRIDES, resume: bool = RESUME,
       allow_changed_recipe: bool = ALLOW_CHANGED, check: bool = CHECK) -> None:
    """On-policy training (opd, lsm, forward_kl, jsd; grpo, gspo, cispo, sapo, dcpo, ppo): the student
    samples; a teacher, a reference policy, a critic or a grader scores what the objective declares;
    writes runs/<name>/."""
    from posttrain.config import RLRecipe, load_recipe
    from posttrain.rl import check as check_recipe
    from posttrain.rl import rl as run

    with in_recipe(recipe):
        loaded = load_recipe(recipe, RLRecipe, overrides)
        if check:
            check_recipe(loaded)
        else:
            run(loaded, resume=resume, allow_changed_recipe=allow_changed_recipe,
                command=_command("rl", recipe, overrides, resume, allow_changed_recipe))


def _command(name: str, recipe: Path, overrides: list[str] | None, resume: bool, allow_changed: bool) -> list[str]:
    """The command as the run folder records it (config.yaml `command:`): its name, then its arguments."""
    flags = ["--resume"] * resume + ["--allow-changed-recipe"] * allow_changed
    return [name, "--recipe", str(recipe), *(overrides or []), *flags]


@app.command()
def distill(recipe: Path = RECIPE, overrides: list[str] = OVERRIDES, resume: bool = RESUME,
            allow_changed_recipe: bool = ALLOW_CHANGED, check: bool = CHECK) -> None:
    """The same as `posttrain rl` (its older name, kept for distillation recipes: opd, lsm)."""
    rl(recipe, overrides, resume, allow_changed_recipe, check)


@app.command("rft-data")
def rft_data(
    eval_dir: Path = typer.Argument(..., help="An eval folder (posttrain eval --out) of k samples per training problem."),
    out: Path = typer.Option(..., "--out", help="The JSONL to write: the correct samples, for `posttrain train`."),
    max_per_problem: int = typer.Option(None, "--max-per-problem", min=1, help="Keep at most this many per problem."),
    given_completions: bool = typer.Option(False, "--given-completions", help="The eval graded --completions: use "
                                           "them as the base model's own samples under the chat prompt."),
) -> None:
    """Rejection-sampling fine-tuning data: the correct, model-ended, distinct samples of an eval."""
    from posttrain.rft import rft_data as run

    run(eval_dir, out, max_per_problem, given_completions)


@app.command("pref-data")
def pref_data(
    eval_dir: Path = typer.Argument(..., help="An eval folder (posttrain eval --out) of k samples per training problem."),
    out: Path = typer.Option(..., "--out", help="The JSONL to write: (chosen, rejected) pairs, for `posttrain train` (dpo)."),
    max_pairs_per_problem: int = typer.Option(None, "--max-pairs-per-problem", min=1, help="At most this many pairs per "
                                              "problem (default: min(#correct, #incorrect); each response in one pair)."),
    seed: int = typer.Option(0, "--seed", help="Seeds each problem's shuffle of its correct and incorrect samples."),
    given_completions: bool = typer.Option(False, "--given-completions", help="The eval graded --completions: use "
                                           "them as the base model's own samples under the chat prompt."),
) -> None:
    """Preference pairs (DPO data): a correct (chosen) and an incorrect (rejected) model-ended sample of one problem."""
    from posttrain.pref_data import pref_data as run

    run(eval_dir, out, max_pairs_per_problem, seed, given_completions)


@app.command("teacher-cache")
def teacher_cache(
    teacher: str = typer.Option(..., "--teacher", help="The teacher checkpoint folder (or Hub id)."),
    data: Path = typer.Option(..., "--data", help="The prompt/response file (.jsonl, .json or .parquet) to score."),
    k: int = typer.Option(32, "--k", min=1, help="Top-K ids and log-probs kept per response token."),
    out: Path = typer.Option(..., "--out", help="The cache folder (a partial one of the same inputs is resumed)."),
    prompt_field: str = typer.Option("problem", "--prompt-field", help="As the train recipe's data.prompt_field."),
    response_field: str = typer.Option("solution", "--response-field", help="As data.response_field."),
    max_length: int = typer.Option(1024, "--max-length", min=1, help="As data.max_length."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per teacher forward pass."),
    shard_tokens: int = typer.Option(1 << 18, "--shard-tokens", min=1, help="Response tokens per shard file."),
) -> None:
    """Score a prompt/response set once with a teacher; its top-K per response token, for `train` with kd_topk."""
    from posttrain.config import DataConfig
    from posttrain.teacher_cache import write_teacher_cache

    cfg = DataConfig(prompt_field=prompt_field, response_field=response_field, max_length=max_length)
    write_teacher_cache(teacher, data, k, out, data_cfg=cfg, batch_size=batch_size, shard_tokens=shard_tokens)


@app.command(name="eval")
def evaluate(
    model: str = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub id to evaluate."),
    benchmark: str = typer.Option(None, "--benchmark", "-b", help="Comma-separated: math500, aime24, aime25, amc23, "
                                  "minerva_math, olympiadbench, gsm8k, humaneval, synthetic, synthetic_ood."),
    data_dir: str = typer.Option(None, "--data-dir", help="Directory with the benchmark files (e.g. ../shared/benchmarks)."),
    samples: int = typer.Option(None, "--samples", "-k", help="Samples per problem, k of avg@k / pass@k (default 1)."),
    limit: int = typer.Option(None, "--limit", help="Only the first N problems of each benchmark (default: all)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory for samples.jsonl, results.json and "
                            "eval_config.json (default: <run>/eval for a run's checkpoint, else <model>/eval)."),
    prompt: str = typer.Option(None, "--prompt", help="chat (the tokenizer's template; default), qwen-boxed (the DFT paper's exact prompt), "
                        "lsm-think (the LSM authors' math template, through the chat template) or raw."),
    backend: str = typer.Option(None, "--backend", help="hf (transformers, CPU or GPU; default) or vllm (GPU)."),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature; 0 is greedy (default 1.0)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 1.0: off)."),
    top_k: int = typer.Option(None, "--top-k", help="Keep the k most likely tokens; 0 is off (default)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Longest completion; longer ones count as "
                                       "truncated (default 1024)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed; each group of problems derives its own (default 0)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Prompts per generation call (default 32)."),
    workers: int = typer.Option(None, "--workers", help="Grading processes (default 2)."),
    completions: Path = typer.Option(None, "--completions", help="Grade this JSONL of {index, completion} instead of "
                                     "generating (no model needed)."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Eval recipe YAML; flags given here override it."),
    extract: str = typer.Option(None, "--extract", help="Math answer and grader: boxed (last \\boxed{} after "
                                "<think>…</think>, math-verify; default), after-think (the LSM authors' eval: after the "
                                "first </think>) or harness (the Qwen2.5-Math harness of the DFT paper: last boxed, else "
                                "the last number, its own equivalence rules)."),
    cross_check: bool = typer.Option(False, "--cross-check", help="Also grade the samples with both math-verify and "
                                     "harness-style rules; counts in results.json, disagreements in cross_check.jsonl."),
    report_to: str = typer.Option(None, "--report-to", help="Also send the metrics to these experiment trackers: "
                                  "tensorboard, wandb, trackio (comma-separated; default none)."),
    allow_weak_sandbox: bool = typer.Option(False, "--allow-weak-sandbox", help="Grade code without bubblewrap, in "
                                            "a weak sandbox: its scores are marked forgeable (results.json: sandbox weak)."),
) -> None:
    """Evaluate a checkpoint (or grade given completions) on math and code benchmarks."""
    from posttrain.eval.runner import eval_from_cli

    flags = {"model": model, "benchmarks": benchmark, "data_dir": data_dir, "samples": samples, "limit": limit,
             "out": out, "prompt": prompt, "backend": backend, "temperature": temperature, "top_p": top_p,
             "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size,
             "workers": workers, "extract": extract, "report_to": report_to}
    eval_from_cli(recipe, {k: v for k, v in flags.items() if v is not None}, completions, cross_check, allow_weak_sandbox)


@app.command()
def recipes(directory: Path = typer.Argument(None, help="Recipe directory (default: ./recipes or the checkout's).")) -> None:
    """List the recipes with the one-line description from each file's first comment."""
    from posttrain.recipes import list_recipes

    list_recipes(directory)


@app.command()
def objectives() -> None:
    """List the registered objectives, their parameters and what they need."""
    from posttrain.recipes import list_objectives

    list_objectives()


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (or directories holding them)."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Where the tables and plots go."),
    papers: bool = typer.Option(True, help="Put the papers' numbers beside ours, in labelled columns."),
    split_protocols: bool = typer.Option(False, "--split-protocols", help="Runs evaluated under different protocols "
                                         "get rows of their own (labelled) instead of a refusal."),
) -> None:
    """Rebuild the comparison tables, the claims table and plots from run folders (nothing typed in by hand)."""
    from posttrain.report import report as run

    run(runs, out, with_papers=papers, split_protocols=split_protocols)


def main() -> None:
    try:
        app()
    except UserError as err:
        from rich.markup import escape

        from posttrain.progress import console

        # escaped: a message may hold brackets (a list, an extra's name) that are not markup
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; a run continues from its newest checkpoint with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
