"""The chunked head engine and a training step on a CUDA device. Skipped without one: `make
gpu-check` (bench/gpu_check.py) runs this file on a lent GPU; the CPU suite checks the same
engine against the same references in tests/test_losses.py."""

import pytest
import torch

from posttrain.losses import OBJECTIVES, head_loss
from tests import reference
from tests.test_losses import CASE_IDS, CASES, inputs_for, make_problem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")

# OTR draws its tokens with a generator on the tensors' device, so CUDA draws differ from the
# CPU reference's; its draws are tested on the CPU.
GPU_CASES = [(case, case_id) for case, case_id in zip(CASES, CASE_IDS) if case[0] != "otr"]


def _on(device, tensors: dict) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


def _engine(name, params, hidden, weight, inputs, chunk, matmul_dtype=None):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = head_loss(h, w, OBJECTIVES[name], params, inputs, chunk_tokens=chunk, matmul_dtype=matmul_dtype)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _reference(name, params, hidden, weight, inputs):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = reference.REFERENCES[name](h, w, inputs, params)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("name,params", [c for c, _ in GPU_CASES], ids=[i for _, i in GPU_CASES])
@pytest.mark.parametrize("chunk", [7, None])
def test_engine_on_cuda_equals_the_plain_reference(name, params, chunk):
    hidden, weight, batch, _ = make_problem()
    inputs = inputs_for(name, params, batch)
    want = _reference(name, params, hidden.double(), weight.double(),
                      {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    got = _engine(name, params, hidden.cuda(), weight.cuda(), _on("cuda", inputs), chunk)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-4)


def test_bf16_matmuls_on_cuda_stay_close_to_float64():
    hidden, weight, batch, _ = make_problem(n=512, h=64, v=4096)
    params = OBJECTIVES["sft"].Params()
    loss, grad_h, grad_w = _engine("sft", params, hidden.cuda(), weight.cuda(), _on("cuda", batch), 128,
                                   matmul_dtype=torch.bfloat16)
    ref_loss, ref_h, ref_w = _reference("sft", params, hidden.double(), weight.double(), batch)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    assert (grad_h.cpu().double() - ref_h).norm() / ref_h.norm() < 3e-2
    assert (grad_w.cpu().double() - ref_w).norm() / ref_w.norm() < 3e-2


def test_a_model_step_on_cuda_with_bf16_autocast_matches_the_cpu():
    """A tiny Qwen2's SFT gradient through decoder + chunked head: CUDA with bf16 autocast (what
    `posttrain train` does on a GPU) against the CPU in fp32."""
    from posttrain.config import TinyModelConfig
    from posttrain.models import build_tiny_model, decoder_and_head

    torch.manual_seed(0)
    ids = torch.randint(3, 320, (4, 33))
    grads = {}
    for device, autocast in (("cpu", False), ("cuda", True)):
        model = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=2), 320, seed=0).to(device)
        decoder, head = decoder_and_head(model)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            hidden = decoder(input_ids=ids[:, :-1].to(device)).last_hidden_state
        loss = head_loss(hidden.reshape(-1, hidden.shape[-1]).float(), head, OBJECTIVES["sft"], None,
                         {"target_ids": ids[:, 1:].reshape(-1).to(device)},
                         matmul_dtype=torch.bfloat16 if autocast else None)
        loss.backward()
        grads[device] = torch.cat([p.grad.flatten().cpu().float() for p in model.parameters()])
    assert (grads["cuda"] - grads["cpu"]).norm() / grads["cpu"].norm() < 5e-2
