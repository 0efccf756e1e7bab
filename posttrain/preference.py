"""π_ref for the preference objective (dpo): the start model's log-prob of every response token of
every pair, computed ONCE, without gradients, before the first update (not by a frozen copy of
the model kept beside the trained one), and kept in the run folder (reference_logprobs.pt) so
that a resumed run reads the start model's values, not its checkpoint's.

Why once: DPO reads only log π_ref(y_t) of fixed responses, which never change during training.
One no-grad pass costs one forward per pair once (a frozen model would repeat it every epoch) and
keeps 4 bytes per response token, where a frozen copy holds a second model's weights for the
whole run (Qwen2.5-Math-1.5B: ~3 GB in bf16). tdpo reads π_ref's whole distribution at each
response position: [tokens, V] fp32, kept in memory and in the file, refused past
VOCAB_BUDGET_BYTES (losses/tdpo.py: at a real vocabulary it needs a frozen model instead).
May import: data, losses, models, scoring.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from posttrain.data.preference import PreferencePair, collate_pairs
from posttrain.errors import UserError
from posttrain.losses.engine import head_probe
from posttrain.models import decoder_and_head
from posttrain.scoring import hidden_at_loss_positions, score_tokens

REFERENCE_FILE = "reference_logprobs.pt"
VOCAB_BUDGET_BYTES = 4 * 2**30  # tdpo: the most memory π_ref's full distributions may take


def attach_reference_logprobs(model, pairs: list[PreferencePair], pad_id: int, runtime, micro_batch_size: int,
                              run_dir: Path, resumed: bool, kind: str = "token") -> None:
    """Set pair.reference_logprob (and, kind "vocab", pair.reference_vocab_logprob) for every pair:
    computed with `model` (the start model) on a fresh run and saved; read back on a resumed one."""
    path = run_dir / REFERENCE_FILE
    if kind == "vocab":
        _check_vocab_budget(pairs, decoder_and_head(model)[1].shape[0])
    if resumed:
        values, vocab = _load(path, pairs, kind)
    else:
        values, vocab = reference_logprobs(model, pairs, pad_id, runtime, micro_batch_size, kind)
        if runtime.is_main:
            _save(path, values, vocab)
    for index, (pair, (chosen, rejected)) in enumerate(zip(pairs, values)):
        pair.reference_logprob = (chosen, rejected)
        if vocab is not None:
            pair.reference_vocab_logprob = (vocab[2 * index], vocab[2 * index + 1])


@torch.no_grad()
def reference_logprobs(model, pairs: list[PreferencePair], pad_id: int, runtime, micro_batch_size: int,
                       kind: str = "token") -> tuple[list, list | None]:
    """([(log π_ref of the chosen response's tokens, of the rejected's)] per pair, and for kind
    "vocab" the [tokens, V] log π_ref rows of every response, chosen, rejected, ...; else None),
    under the training's autocast (so that π_θ = π_ref gives a log-ratio of 0 before the first update)."""
    was_training = model.training
    model.eval()
    values, vocab = [], [] if kind == "vocab" else None
    for start in range(0, len(pairs), micro_batch_size):
        batch = {k: v.to(runtime.device) for k, v in collate_pairs(pairs[start : start + micro_batch_size], pad_id).items()}
        mask_BT = batch["loss_mask"]
        with runtime.accelerator.autocast():
            if kind == "vocab":
                hidden_NH, weight_VH = hidden_at_loss_positions(model, batch)
                rows_NV = head_probe(hidden_NH, weight_VH, _whole_rows, None, {},
                                     matmul_dtype=runtime.matmul_dtype)["logprob"].float().cpu()
                logprob_BT = torch.zeros(mask_BT.shape)
                logprob_BT[mask_BT.cpu()] = rows_NV.gather(1, batch["target_ids"][mask_BT].cpu().unsqueeze(1)).squeeze(1)
                vocab += list(rows_NV.split(mask_BT.sum(dim=1).tolist()))
            else:
                logprob_BT = score_tokens(model, batch, matmul_dtype=runtime.matmul_dtype)["token_logprob"].float().cpu()
        mask_BT = mask_BT.cpu()
        rows = [logprob_BT[row][mask_BT[row]].tolist() for row in range(mask_BT.shape[0])]
        values += list(zip(rows[0::2], rows[1::2]))
    model.train(was_training)
    return values, vocab


def _whole_rows(params, logp_CV, inputs):
    return {"logprob": logp_CV.clone()}  # the engine reuses its buffer: keep a copy


def _check_vocab_budget(pairs: list[PreferencePair], vocab: int) -> None:
    tokens = sum(pair.loss_tokens for pair in pairs)
    need = tokens * vocab * 4
    if need > VOCAB_BUDGET_BYTES:
        raise UserError(f": tdpo keeps π_ref's full distribution at every response token: {tokens:,} tokens × {vocab:,} "
                        f"ids × 4 bytes = {need / 2**30:.1f} GiB, past the {VOCAB_BUDGET_BYTES / 2**30:.0f} GiB budget; "
                        "use fewer pairs (data.max_examples), shorter responses (data.max_length) or dpo",
                        key="objective.name")


def _save(path: Path, values: list, vocab: list | None) -> None:
    flat = [side for pair in values for side in pair]
    tmp = path.with_name(path.name + ".tmp")
    state = {"lengths": torch.tensor([len(v) for v in flat]),
             "values": torch.tensor([x for v in flat for x in v], dtype=torch.float32)}
    if vocab is not None:
        state["vocab"] = torch.cat(vocab)
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: Path, pairs: list[PreferencePair], kind: str = "token") -> tuple[list, list | None]:
    if not path.is_file():
        raise UserError(f"{path}: missing: a resumed dpo run reads the start model's log-probs from it (its checkpoint "
                        "is not the start model); start the run again without --resume")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    lengths = saved["lengths"].tolist()
    expected = [example.loss_tokens for pair in pairs for example in (pair.chosen, pair.rejected)]
    if lengths != expected:
        raise UserError(f"{path}: holds log-probs of other responses than the data's ({len(lengths) // 2} pairs); "
                        "the data changed since the run started: start it again without --resume")
    if kind == "vocab" and "vocab" not in saved:
        raise UserError(f"{path}: holds no full-vocabulary log-probs (written by a dpo run?); start the tdpo run again "
                        "without --resume")
    flat = [v.tolist() for v in saved["values"].split(lengths)]
    vocab = list(saved["vocab"].split(lengths)) if kind == "vocab" else None
    return list(zip(flat[0::2], flat[1::2])), vocab
