"""π_ref for the preference objective (dpo): the start model's log-prob of every response token of
every pair, computed ONCE, without gradients, before the first update (not by a frozen copy of
the model kept beside the trained one), and kept in the run folder (reference_logprobs.pt) so
that a resumed run reads the start model's values, not its checkpoint's.

Why once: DPO reads only log π_ref(y_t) of fixed responses, which never change during training.
One no-grad pass costs one forward per pair once (a frozen model would repeat it every epoch) and
keeps 4 bytes per response token, where a frozen copy holds a second model's weights for the
whole run (Qwen2.5-Math-1.5B: ~3 GB in bf16). May import: data, scoring, runfolder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from posttrain.data.preference import PreferencePair, collate_pairs
from posttrain.errors import UserError
from posttrain.scoring import score_tokens

REFERENCE_FILE = "reference_logprobs.pt"


def attach_reference_logprobs(model, pairs: list[PreferencePair], pad_id: int, runtime, micro_batch_size: int,
                              run_dir: Path, resumed: bool) -> None:
    """Set pair.reference_logprob for every pair: computed with `model` (the start model) on a
    fresh run and saved; read back from the run folder on a resumed one."""
    path = run_dir / REFERENCE_FILE
    if resumed:
        values = _load(path, pairs)
    else:
        values = reference_logprobs(model, pairs, pad_id, runtime, micro_batch_size)
        if runtime.is_main:
            _save(path, values)
    for pair, (chosen, rejected) in zip(pairs, values):
        pair.reference_logprob = (chosen, rejected)


@torch.no_grad()
def reference_logprobs(model, pairs: list[PreferencePair], pad_id: int, runtime, micro_batch_size: int) -> list:
    """[(log π_ref of the chosen response's tokens, of the rejected's)] per pair, under the
    training's autocast (so that π_θ = π_ref gives a log-ratio of 0 before the first update)."""
    was_training = model.training
    model.eval()
    values = []
    for start in range(0, len(pairs), micro_batch_size):
        batch = {k: v.to(runtime.device) for k, v in collate_pairs(pairs[start : start + micro_batch_size], pad_id).items()}
        with runtime.accelerator.autocast():
            logprob_BT = score_tokens(model, batch, matmul_dtype=runtime.matmul_dtype)["token_logprob"].float().cpu()
        mask_BT = batch["loss_mask"].cpu()
        rows = [logprob_BT[row][mask_BT[row]].tolist() for row in range(mask_BT.shape[0])]
        values += list(zip(rows[0::2], rows[1::2]))
    model.train(was_training)
    return values


def _save(path: Path, values: list) -> None:
    flat = [side for pair in values for side in pair]
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"lengths": torch.tensor([len(v) for v in flat]),
                "values": torch.tensor([x for v in flat for x in v], dtype=torch.float32)}, tmp)
    os.replace(tmp, path)


def _load(path: Path, pairs: list[PreferencePair]) -> list:
    if not path.is_file():
        raise UserError(f"{path}: missing: a resumed dpo run reads the start model's log-probs from it (its checkpoint "
                        "is not the start model); start the run again without --resume")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    lengths = saved["lengths"].tolist()
    expected = [example.loss_tokens for pair in pairs for example in (pair.chosen, pair.rejected)]
    if lengths != expected:
        raise UserError(f"{path}: holds log-probs of other responses than the data's ({len(lengths) // 2} pairs); "
                        "the data changed since the run started: start it again without --resume")
    flat = [v.tolist() for v in saved["values"].split(lengths)]
    return list(zip(flat[0::2], flat[1::2]))
