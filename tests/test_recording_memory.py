"""Recording memory is O(d²) per stream: independent of the number of calibration batches."""

import subprocess
import sys

SCRIPT = """
import resource, sys, torch
from diffusers import FluxTransformer2DModel
from blockprune import plugins
from blockprune.discovery.resolve import resolve_blocks
from blockprune.brll.recording import record_block

count = int(sys.argv[1])
torch.manual_seed(0)
model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=32,
                               num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
                               axes_dims_rope=(8, 12, 12)).eval()
side, text = 32, 8
batches = [{"hidden_states": torch.randn(2, side * side, 4), "encoder_hidden_states": torch.randn(2, text, 16),
            "pooled_projections": torch.randn(2, 8), "timestep": torch.rand(2),
            "img_ids": torch.zeros(side * side, 3), "txt_ids": torch.zeros(text, 3)} for _ in range(count)]
block = resolve_blocks(model, plugins.get_adapter(model), batches[0])[1]
accumulators = record_block(model, block, batches)
assert accumulators["hidden_states"].tokens == count * 2 * side * side
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_kib(count: int) -> int:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(count)], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_four_times_more_batches_raise_peak_memory_by_less_than_ten_percent():
    # each batch's two streams are 2 MiB of float64 activations; holding 32 batches would add over 100 MiB
    few, many = _peak_kib(8), _peak_kib(32)
    assert many < 1.10 * few, (few, many)
