"""Tables that are evidence: one protocol per table, seeds = evaluated runs, intervals that cover
seeds and problems, claims judged by a test fixed in advance, forgeable code scores kept out, and
version differences said. Run folders are written by hand here (samples.jsonl included), so every
expected number is known exactly."""

import json

import numpy as np
import pytest
import yaml

from posttrain import claims, stats
from posttrain.errors import UserError
from posttrain.report import report
from tests.helpers import run_cli

PROBLEMS = 40


def _run(root, name, command="train", **config):
    folder = root / name
    (folder / "final").mkdir(parents=True)
    config = {"name": name, "objective": {"name": "sft"}, "train": {}, **config}
    (folder / "config.yaml").write_text(f"# posttrain {command} --recipe x.yaml\n" + yaml.safe_dump(config))
    return folder


def _eval(folder, correct_by_bench, samples=4, limit_of=500, versions=None, **config):
    """eval/results.json + samples.jsonl; correct_by_bench: benchmark -> [problems] correct counts (of `samples`)."""
    (folder / "eval").mkdir()
    records, benches = [], {}
    for bench, counts in correct_by_bench.items():
        for index, count in enumerate(counts):
            records += [{"benchmark": bench, "index": index, "sample": j, "correct": j < count} for j in range(samples)]
        benches[bench] = {"sha256": "ab" * 32, "metrics": {f"avg@{samples}": 100 * sum(counts) / (samples * len(counts))},
                          "coverage": {"complete": True, "problems_asked": len(counts), "problems_graded": len(counts),
                                       "problems_in_benchmark": limit_of}}
    cfg = {"samples": samples, "temperature": 1.0, "top_p": 1.0, "top_k": None, "max_new_tokens": 96, "prompt": "chat",
           "extract": "boxed", "backend": "hf", "completions": None, **config}
    results = {"config": cfg, "versions": versions or {"math-verify": "0.9.0", "transformers": "5.25.0"}, "benchmarks": benches}
    (folder / "eval" / "results.json").write_text(json.dumps(results))
    (folder / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _counts(rate, seed):
    rng = np.random.default_rng(seed)
    return [int(c) for c in rng.binomial(4, rate, size=PROBLEMS)]


def _family(root, rates, seeds=3):
    base = _run(root, "base", model={"tiny": {}})
    _eval(base, {"synthetic": _counts(rates["base"], 99)})
    for variant, rate in rates.items():
        if variant == "base":
            continue
        for seed in range(seeds):
            run = _run(root, f"{variant}-seed{seed}", model={"path": str(base / "final")}, seed=seed,
                       objective={"name": variant if variant in ("sft", "dft") else "sft"})
            _eval(run, {"synthetic": _counts(rate, 10 * seed + len(variant))})
    return base


def test_mixed_protocols_are_refused_in_one_line_and_split_with_the_flag(tmp_path):
    runs = tmp_path / "runs"
    _family(runs, {"base": 0.2, "sft": 0.3, "dft": 0.5})
    # one seed of dft re-evaluated on 20 problems with k = 1: the row would average two protocols
    seed2 = runs / "dft-seed2"
    import shutil

    shutil.rmtree(seed2 / "eval")
    _eval(seed2, {"synthetic": [1] * 20}, samples=1)
    with pytest.raises(UserError) as refused:
        report([runs], tmp_path / "out")
    message = str(refused.value)
    assert "different protocols" in message and "samples 4 vs 1" in message and "synthetic.problems 40 of 500 vs 20 of 500" in message
    assert "\n" not in message and not (tmp_path / "out").exists()  # nothing written
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "cli-out"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and len(proc.stderr.strip().splitlines()) == 1
    summary = report([runs], tmp_path / "split", split_protocols=True)
    methods = [row["method"] for row in summary["tables"]["offline"]]
    assert "dft [protocol 1]" in methods and "dft [protocol 2]" in methods
    text = (tmp_path / "split" / "tables.md").read_text()
    assert "Protocol 2: " in text and "samples 1" in text


def test_seeds_count_evaluated_runs_and_the_unevaluated_are_listed(tmp_path):
    runs = tmp_path / "runs"
    base = _family(runs, {"base": 0.2, "sft": 0.3})
    _run(runs, "sft-seed3", model={"path": str(base / "final")}, seed=3)  # trained, never evaluated
    summary = report([runs], tmp_path / "out")
    sft = next(row for row in summary["tables"]["offline"] if row["method"] == "sft")
    assert sft["runs"] == ["sft-seed0", "sft-seed1", "sft-seed2"] and sft["unevaluated"] == ["sft-seed3"]
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "| sft | 3 |" in text and "Not evaluated on every benchmark of this table (not counted): sft-seed3" in text
    assert "first 40 of 500 problems" in text  # a --limit eval says it is a subset


def test_the_interval_covers_the_seed_spread_and_the_problem_noise(tmp_path):
    """Known answer: one problem solved, the others not, in every seed (no seed spread): the interval is
    the problem bootstrap's; seeds far apart on identical problems widen it."""
    one = np.zeros((3, 40))
    one[:, 0] = 1.0
    draws = stats.bootstrap({"a": [one]})["a"]
    assert stats.point([one]) == pytest.approx(2.5)
    # share of resamples holding problem 0 j times is Binomial(40, 1/40): the sd of the mean is 100·sqrt(40·(1/40)(39/40))/40
    assert draws.std() == pytest.approx(100 * np.sqrt(39 / 40) / 40, rel=0.08)
    spread = np.stack([np.full(40, 0.1), np.full(40, 0.3), np.full(40, 0.5)])
    wide = stats.interval(stats.point([spread]), stats.bootstrap({"b": [spread]})["b"])
    assert wide.mean == pytest.approx(30.0) and wide.low < 20 and wide.high > 40  # the seeds alone move it


def test_claims_are_judged_by_their_fixed_test(tmp_path):
    runs = tmp_path / "runs"
    _family(runs, {"base": 0.1, "sft": 0.3, "dft": 0.7})
    summary = report([runs], tmp_path / "out")
    verdicts = {c["claim"]: c for c in summary["claims"]}
    assert verdicts["dft>sft"]["verdict"] == claims.REPRODUCED and verdicts["dft>sft"]["ci95"][0] > 0
    assert verdicts["sft>base"]["verdict"] == claims.REPRODUCED
    assert verdicts["lsm>opd"]["verdict"] == claims.NOT_RUN
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "Claims of the papers, tested on these runs" in text and "**reproduced**" in text


def test_a_claim_the_runs_contradict_and_one_they_cannot_decide():
    rng = np.random.default_rng(0)
    low = (rng.random((3, 200)) < 0.2).astype(float)
    high = (rng.random((3, 200)) < 0.6).astype(float)
    same = (rng.random((3, 200)) < 0.2).astype(float)
    table = {"sft": [high], "dft": [low], "otr": [same]}
    draws = stats.bootstrap(table)
    points = {k: stats.point(v) for k, v in table.items()}
    verdicts = {v.claim.key: v for v in claims.judge(claims.CLAIMS, points, draws, {k: 3 for k in table})}
    assert verdicts["dft>sft"].verdict == claims.CONTRADICTED
    assert verdicts["otr>sft"].verdict == claims.CONTRADICTED
    # dft and otr are both 20%: "otr > otr-beta0" is not run; a tie is inconclusive
    tie = claims.judge([claims.Claim("x", "x", "x", "dft", "otr")], points, draws, {k: 3 for k in table})[0]
    assert tie.verdict == claims.INCONCLUSIVE and tie.detectable > abs(tie.difference)


def test_a_claim_on_scores_that_never_vary_is_inconclusive():
    """Both variants at 0% on every problem: the bootstrap difference is exactly 0 with no spread. A
    non-inferiority claim would read as proven (p = 0 of falling below −margin) and "A > B" as a tie;
    neither test has a noise estimate, so both are inconclusive (32 samples at 0% still allow ~9 points)."""
    floor = np.zeros((1, 16))
    table = {"lsm-student-topk": [floor], "lsm": [floor], "dft": [floor], "sft": [floor]}
    draws = stats.bootstrap(table)
    points = {k: stats.point(v) for k, v in table.items()}
    chosen = [c for c in claims.CLAIMS if c.key in ("lsm-student-topk≈lsm", "dft>sft")]
    verdicts = claims.judge(chosen, points, draws, {k: 1 for k in table})
    assert [v.verdict for v in verdicts] == [claims.INCONCLUSIVE, claims.INCONCLUSIVE]
    assert all(v.detectable == 0 for v in verdicts)


def test_distillation_claims_are_untestable_when_the_teacher_is_not_better():
    """A teacher 35 points below its student made "distillation improves the student" read as
    contradicted: a verdict on the paper's claim drawn from a broken testbed."""
    rng = np.random.default_rng(1)
    draw = lambda rate: (rng.random((1, 300)) < rate).astype(float)  # noqa: E731
    table = {"base": [draw(0.4)], "teacher": [draw(0.06)], "opd": [draw(0.25)], "sft": [draw(0.7)]}
    draws = stats.bootstrap(table)
    points = {k: stats.point(v) for k, v in table.items()}
    seeds = {k: 1 for k in table}
    chosen = [c for c in claims.CLAIMS if c.key in ("opd>student", "sft>base")]
    verdicts = claims.judge(chosen, points, draws, seeds)
    checks = claims.judge(claims.TESTBED_CHECKS, points, draws, seeds)
    assert checks[0].verdict == claims.CONTRADICTED
    claims.apply_preconditions(verdicts, checks)
    by_key = {v.claim.key: v for v in verdicts}
    assert by_key["opd>student"].verdict == claims.UNTESTABLE and by_key["opd>student"].difference < 0
    assert by_key["sft>base"].verdict == claims.REPRODUCED  # needs no teacher


def test_holm_adjusts_in_order():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_forgeable_code_scores_are_kept_out_and_versions_are_said(tmp_path):
    runs = tmp_path / "runs"
    base = _run(runs, "base", model={"tiny": {}})
    _eval(base, {"synthetic": _counts(0.2, 1)})
    sft = _run(runs, "sft-seed0", model={"path": str(base / "final")})
    _eval(sft, {"synthetic": _counts(0.4, 2), "humaneval": _counts(0.9, 3)},
          versions={"math-verify": "0.9.0", "transformers": "5.19.0"})
    results = json.loads((sft / "eval" / "results.json").read_text())
    results["benchmarks"]["humaneval"]["sandbox"] = "weak"
    (sft / "eval" / "results.json").write_text(json.dumps(results))
    summary = report([runs], tmp_path / "out")
    assert summary["benchmarks"] == ["synthetic"]  # the weak-sandbox humaneval number is no benchmark score
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "Made under different versions: eval transformers: 5.25.0 (base); 5.19.0 (sft-seed0)" in text


def test_seeds_of_one_row_must_share_their_recipe(tmp_path):
    runs = tmp_path / "runs"
    base = _family(runs, {"base": 0.2, "sft": 0.3})
    config = yaml.safe_load((runs / "sft-seed1" / "config.yaml").read_text())
    config["optim"] = {"lr": 1.0}
    (runs / "sft-seed1" / "config.yaml").write_text("# posttrain train\n" + yaml.safe_dump(config))
    with pytest.raises(UserError, match="seeds of one row \\(sft\\) but their recipes differ in optim"):
        report([runs], tmp_path / "out")
    assert base.exists()
    # the command line each run records differs between seeds by construction (name=…-seedN seed=N):
    # provenance, not the recipe (the whole mini reproduction was refused on it)
    for seed in (0, 1):
        path = runs / f"sft-seed{seed}" / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config.pop("optim", None)
        config["command"] = ["train", "--recipe", "recipes/mini/sft.yaml", f"name=sft-seed{seed}", f"seed={seed}"]
        path.write_text("# posttrain train\n" + yaml.safe_dump(config))
    report([runs], tmp_path / "out")
