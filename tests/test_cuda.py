"""CUDA paths: the same computations on a GPU give the CPU's results. Skipped where no CUDA device exists (the
machine this project is developed on has none); `benchmarks/gpu.py` times the same paths there."""

from __future__ import annotations

import copy

import pytest
import torch

import saelab

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available())")

ARCHITECTURES = {
    "standard": {},
    "gated": {},
    "jumprelu": {},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "matryoshka": {"k": 4, "matryoshka_widths": [16, 64]},
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_training_step_on_the_gpu_equals_the_cpu_step(architecture):
    """Outputs and every gradient of one step (sparse kernels included), in float64 so that only a wrong kernel
    and not the order of summation can tell the devices apart."""
    torch.manual_seed(0)
    cpu = saelab.create_sae(architecture, d_in=24, d_sae=64, dtype="float64", **ARCHITECTURES[architecture]).train()
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gpu = copy.deepcopy(cpu).to("cuda")
    x = torch.randn(40, 24, dtype=torch.float64)
    dead = torch.rand(64) < 0.3
    results = []
    for sae, inputs, mask in ((cpu, x, dead), (gpu, x.cuda(), dead.cuda())):
        out = sae.training_forward(inputs)
        losses = [sae.reconstruction_loss(out, inputs), sae.sparsity_loss(out), sae.auxiliary_loss(out, inputs, mask)]
        sum(loss for loss in losses if loss is not None).backward()
        results.append((out.output.detach().cpu(), [p.grad.cpu() for p in sae.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-10)
    for (name, _), a, b in zip(cpu.named_parameters(), results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-10), name


def test_autocast_training_on_the_gpu_follows_float32():
    """Under train.autocast on CUDA the step's gradients point where float32's do."""
    from saelab.training import TrainConfig, Trainer

    torch.manual_seed(0)
    sae = saelab.create_sae("topk", d_in=64, d_sae=512, k=16, device="cuda")
    x = torch.randn(256, 64, device="cuda")
    grads = []
    for autocast in (False, True):
        trainer = Trainer(copy.deepcopy(sae), TrainConfig(total_tokens=10**6, batch_size=256, autocast=autocast))
        trainer.prepared = True
        unit = trainer.units[0]
        unit.update = lambda *args, **kwargs: None  # keep the gradients, skip the optimiser step
        trainer.train_step(x)
        grads.append(torch.cat([p.grad.flatten() for p in unit.sae.parameters()]))
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_harvesting_on_the_gpu_reads_the_cpu_activations(tmp_path):
    from tiny import save_tiny_model, word_tokenizer

    from saelab.models import load_model

    folder = save_tiny_model(tmp_path / "tiny")
    tokens = torch.tensor([word_tokenizer()("the cat sat on the mat .")["input_ids"]] * 2)
    hooks = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    cpu = load_model(str(folder)).run_with_cache(tokens, hooks)
    gpu = load_model(str(folder), device="cuda").run_with_cache(tokens.cuda(), hooks)
    for name in hooks:
        assert gpu[name].device.type == "cuda"
        assert torch.allclose(cpu[name], gpu[name].cpu(), atol=1e-5), name
