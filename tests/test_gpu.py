"""On a GPU: an epoch of the speed recipes' step never makes the host wait (the loader draws its shuffles,
shifts, flips and cutout boxes on the device), with SGD or Muon, with or without lookahead, and steps
replayed from CUDA graphs train as eager ones. Skipped without CUDA; `benchmarks/gpu.sh sync` runs it."""
import copy

import pytest
import torch

from cifarlab.build import Runtime, graphed
from cifarlab.config import TrainConfig
from cifarlab.data import Augment, ImageSet, TensorLoader
from cifarlab.ema import Lookahead
from cifarlab.engine import Step, train_step
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer, build_scheduler, param_groups
from cifarlab.records import EpochSums

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("optimizer, lookahead", [("sgd", False), ("sgd", True), ("muon", False)])
def test_an_epoch_of_training_steps_never_synchronises_with_the_host(optimizer: str, lookahead: bool) -> None:
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 10, (2048,), generator=generator), [str(k) for k in range(10)])
    loader = TensorLoader(data, 256, device, ([0.5] * 3, [0.25] * 3), shuffle=True,
                          augment=Augment(translate=2, flip=True, cutout=8), seed=0)
    model = create_model("fast_net", widths=[16, 32, 32]).to(device, memory_format=torch.channels_last)
    filter_lr = 0.24 if optimizer == "muon" else None
    built = build_optimizer(optimizer, param_groups(model, 0.1, 5e-4, 64, filter_lr=filter_lr), 0.85)
    step = Step(model, built, device, scheduler=build_scheduler(built, "onecycle", 2 * len(loader), 2),
                lookahead=Lookahead(model, 2 * len(loader)) if lookahead else None,
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


def test_cuda_graph_steps_train_as_eager_steps_do() -> None:
    """--cuda-graph replays a recorded forward and backward: after a few steps the weights are those of
    eager steps (the same kernels; cuDNN may time its way to other algorithms, hence the tolerance), the
    BatchNorm statistics the model was built with survive the recording, eval mode runs eagerly, and the
    replayed steps never make the host wait."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    eager = create_model("fast_net", widths=[16, 32, 32]).to(device, memory_format=torch.channels_last)
    replayed = copy.deepcopy(eager)
    built = [b.clone() for b in replayed.buffers()]
    replayed = graphed(replayed, TrainConfig(cuda_graph=True), Runtime(device, torch.bfloat16), 256)
    assert all(torch.equal(a, b) for a, b in zip(built, replayed.buffers()))
    batches = [(torch.randn(256, 3, 32, 32, device=device), torch.randint(0, 10, (256,), device=device))
               for _ in range(4)]
    for model, strict in ((eager, False), (replayed, True)):
        optimizer = build_optimizer("sgd", param_groups(model, 0.1, 5e-4, 64), 0.85)
        step = Step(model, optimizer, device, amp_dtype=torch.bfloat16, label_smoothing=0.2)
        train_step(step, batches[0])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if strict else 0)
        try:
            for batch in batches[1:]:
                train_step(step, batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(eager.state_dict().values(), replayed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    eager.eval(), replayed.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(eager(batches[0][0]).float(), replayed(batches[0][0]).float(), rtol=5e-2, atol=5e-2)
