"""`posttrain pref-data`: preference pairs (DPO's data) from the base model's graded samples of
training problems, the offline-RL baseline of the DFT paper's Table 2 (DPO 23.20 on
Qwen2.5-Math-1.5B), built like `posttrain rft-data` builds RFT data:

  1. `posttrain eval --model BASE --benchmark synthetic_train --samples k --out D`   (as for RFT)
  2. `posttrain pref-data D --out pairs.jsonl`                                     (this module)
  3. `posttrain train --recipe recipes/mini/dpo.yaml data.source=pairs.jsonl`

A pair is one correct response (chosen) and one incorrect response (rejected) to the same
problem. Both sides are samples the model ended itself (a completion cut at max_new_tokens is on
neither side: its EOS would be trained on as if the model had stopped there), distinct within
their side. Pairing policy: per problem, the correct and the incorrect samples are each shuffled
by a generator seeded from (--seed, benchmark, index) and zipped, so each response is in at most
one pair, a problem gives min(#correct, #incorrect, --max-pairs-per-problem) pairs, and the same
samples and seed always give the same pairs. A problem with only one side gives none: it is
skipped and counted. The same guards as rft-data hold (rft.py): the eval sampled training
problems under the chat prompt, and no problem is a test problem by content.

Each line: {"prompt", "chosen", "rejected", "answer", "problem", "index", "chosen_sample",
"rejected_sample", "pref_source": the eval folder}; the counts and the policy go to
<out>.provenance.json beside it.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from posttrain.errors import UserError
from posttrain.eval.prompts import BOXED_INSTRUCTION
from posttrain.progress import console
from posttrain.rft import _benchmark_rows, _check_out, _eval_config, _refuse_test_problem, _samples
from posttrain.runfolder import write_text_atomic


def pref_data(eval_dir: Path, out: Path, max_pairs_per_problem: int | None = None, seed: int = 0,
              given_completions: bool = False) -> dict:
    """Write the preference pairs of `eval_dir` to `out` (JSONL); returns the counts."""
    config = _eval_config(eval_dir, given_completions)
    _check_out(out, eval_dir)
    sides, counts = _sides(eval_dir, _samples(eval_dir / "samples.jsonl"), config)
    rows, rows_of = [], {}
    for (benchmark, index), (correct, incorrect) in sorted(sides.items()):
        if not correct or not incorrect:
            counts["one_sided_problems"] += 1
            continue
        counts["two_sided_problems"] += 1
        if benchmark not in rows_of:
            rows_of[benchmark] = _benchmark_rows(benchmark, config, eval_dir)
        spec, problems, source = rows_of[benchmark]
        if index >= len(problems):
            raise UserError(f"{eval_dir / 'samples.jsonl'}: {benchmark} index {index} is past the benchmark's "
                            f"{len(problems)} problems; the samples do not belong to these problems")
        question = spec.question(problems[index]).strip()
        _refuse_test_problem(question, {"index": index, "benchmark": benchmark}, source, config, eval_dir)
        rng = random.Random(_problem_seed(seed, benchmark, index))
        rng.shuffle(correct)
        rng.shuffle(incorrect)
        for chosen, rejected in list(zip(correct, incorrect))[:max_pairs_per_problem]:
            rows.append({"prompt": f"{question}\n{BOXED_INSTRUCTION}", "chosen": chosen["completion"],
                         "rejected": rejected["completion"], "answer": chosen.get("gold"), "problem": question,
                         "index": index, "chosen_sample": chosen["sample"], "rejected_sample": rejected["sample"],
                         "pref_source": str(eval_dir)})
    if not rows:
        raise UserError(f"{eval_dir / 'samples.jsonl'}: no problem has both a correct and an incorrect sample that the "
                        f"model ended itself ({counts['one_sided_problems']} problems have one side only); nothing to pair")
    counts["pairs"] = len(rows)
    policy = (f"per problem: correct and incorrect samples shuffled by seed {seed} and zipped, each response in at most "
              f"one pair, at most {max_pairs_per_problem or 'min(#correct, #incorrect)'} pairs")
    write_text_atomic(out, "".join(json.dumps(row) + "\n" for row in rows))
    write_text_atomic(out.with_name(out.name + ".provenance.json"), json.dumps(
        {"pref_source": str(eval_dir), "policy": policy, "seed": seed, "max_pairs_per_problem": max_pairs_per_problem,
         **counts}, indent=1))
    console.print(f"pref-data: {len(rows)} pairs from {counts['two_sided_problems']} problems with both a correct and an "
                  f"incorrect sample ({counts['one_sided_problems']} one-sided problems skipped; {counts['samples']} samples, "
                  f"dropped {counts['cut_off']} cut off, {counts['duplicate']} duplicates; {policy}) → {out}", highlight=False)
    return counts


def _sides(eval_dir: Path, records: list[dict], config: dict) -> tuple[dict, dict]:
    """{(benchmark, index): ([correct records], [incorrect records])} of the model-ended, distinct
    samples, in sample order, and the counts of what was dropped."""
    sides: dict[tuple[str, int], tuple[list, list]] = {}
    seen, counts = set(), {"samples": len(records), "cut_off": 0, "duplicate": 0, "one_sided_problems": 0,
                           "two_sided_problems": 0}
    for record in sorted(records, key=lambda r: (r["benchmark"], r["index"], r["sample"])):
        key = (record["benchmark"], record["index"])
        correct, incorrect = sides.setdefault(key, ([], []))
        if record.get("finish_reason") not in ("stop", "length"):
            source = f"the completions file {config['completions']}" if config.get("completions") else "samples.jsonl"
            raise UserError(f"{eval_dir / 'samples.jsonl'}: {record['benchmark']} index {record['index']} sample "
                            f"{record['sample']} has finish_reason {record.get('finish_reason')!r}; preference pairs keep "
                            f"only samples the model ended itself, so each needs 'stop' or 'length' (give it per line of {source})")
        if record["finish_reason"] != "stop":
            counts["cut_off"] += 1
            continue
        if (key, record["completion"]) in seen:
            counts["duplicate"] += 1
            continue
        seen.add((key, record["completion"]))
        (correct if record["correct"] else incorrect).append(record)
    return sides, counts


def _problem_seed(seed: int, benchmark: str, index: int) -> int:
    """A problem's own shuffle seed: independent of which other problems were sampled."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{benchmark}:{index}".encode()).digest()[:8], "big")
