"""benchmarks/heal_states_probe.py: the batches it trains on, and its end-to-end image loss."""

import copy

import torch
from conftest import benchmark_script
from test_toy_pipeline import tiny_toy_pipeline


def test_batches_split_into_rows_and_stack_back():
    probe = benchmark_script("heal_states_probe")
    batch = {"hidden_states": torch.arange(6.0).reshape(3, 2), "timestep": torch.tensor([0.1, 0.5, 0.9]),
             "shared": torch.ones(4, 4), "flag": True}
    rows = probe.rows([batch])
    assert len(rows) == 3 and torch.equal(rows[1]["hidden_states"], torch.tensor([[2.0, 3.0]]))
    assert rows[2]["shared"] is batch["shared"] and rows[0]["flag"] is True  # not a per-row tensor: shared
    again = probe.stack(rows)
    assert torch.equal(again["hidden_states"], batch["hidden_states"]) and torch.equal(again["timestep"],
                                                                                         batch["timestep"])


def test_the_image_loss_is_zero_against_itself_and_trains_the_student_only():
    probe = benchmark_script("heal_states_probe")
    teacher = tiny_toy_pipeline("sd3")
    student = copy.deepcopy(teacher)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    same = probe.image_loss(teacher, student, prompts, 2, 3, torch.Generator().manual_seed(0))
    assert float(same) < 1e-10  # the same images, up to rounding
    with torch.no_grad():
        for parameter in student.transformer.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    loss = probe.image_loss(teacher, student, prompts, 2, 3, torch.Generator().manual_seed(0))
    assert float(loss) > 1e-6
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.transformer.parameters())
    assert all(p.grad is None for p in teacher.transformer.parameters())
