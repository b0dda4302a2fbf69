"""On a GPU: an epoch of the speed recipes' step never makes the host wait (the loader draws its shuffles,
shifts, flips and cutout boxes on the device). Skipped without CUDA; benchmarks/gpu_check.sh runs it."""
import pytest
import torch

from cifarlab.data import Augment, ImageSet, TensorLoader
from cifarlab.engine import Step, train_step
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer, build_scheduler, param_groups
from cifarlab.records import EpochSums

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_an_epoch_of_training_steps_never_synchronises_with_the_host() -> None:
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 10, (2048,), generator=generator), [str(k) for k in range(10)])
    loader = TensorLoader(data, 256, device, ([0.5] * 3, [0.25] * 3), shuffle=True,
                          augment=Augment(translate=2, flip=True, cutout=8), seed=0)
    model = create_model("fast_net", widths=[16, 32, 32]).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer("sgd", param_groups(model, 0.1, 5e-4, 64), 0.85)
    step = Step(model, optimizer, device, scheduler=build_scheduler(optimizer, "onecycle", 2 * len(loader), 2),
                amp_dtype=torch.bfloat16, label_smoothing=0.2)
    sums = EpochSums.zeros(device, 0.1)
    train_step(step, next(iter(loader)), sums)  # the first step may set things up (cuDNN, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in loader:
            train_step(step, batch, sums)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sums.batches == len(loader) + 1
