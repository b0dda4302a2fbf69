"""Layer statistics as training records (`--layer-stats N`): every N steps, one row per conv and linear
layer in RUN_DIR/layers.csv, the numbers that show whether a deep net trains (docs/depth.md).

For each layer, in the order the model registers them (its depth): the norm of the weight's gradient as
the optimizer receives it (after unscaling and clipping), the weight's norm before the step, the step's
update-to-weight ratio ||w_after - w_before|| / ||w_before||, the mean and (population) standard
deviation of the layer's output, the fraction of zeros after the ReLU that first follows the layer
(dead units; empty where none follows before the next layer), and a histogram of the output.

Nothing here runs unless the option is on: the recorder is hooks (a forward pre/post hook on the model,
a forward hook per layer, the optimizer's step pre/post hooks), installed when training starts and
removed when it ends, so `engine.train_step` is the same code with or without it. Between recording
steps each hook returns at once. On a recording step the ReLUs are seen through a TorchFunctionMode
for that one forward pass: the models call `F.relu` as often as `nn.ReLU`, and a mode sees both.

layers.csv is appended and flushed at each recording step. A resumed run first keeps the rows up to
its checkpoint's step and drops the later ones (a killed run wrote them after its last checkpoint);
training replays those steps exactly, so it writes the same rows again.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cifarlab.errors import CifarlabError
from cifarlab.rundir import LAYERS_FILE, write_text

# The histogram: HIST_BINS bins equally wide in asinh(x) over [-HIST_LIMIT, HIST_LIMIT], i.e. x from
# -201 to 201, linear near zero (asinh x ~ x for |x| < 1) and logarithmic beyond; values outside land
# in the end bins. Fixed edges, so the same bin means the same values at every step and in every layer.
HIST_BINS = 32
HIST_LIMIT = 6.0
STAT_COLUMNS = ["grad_norm", "weight_norm", "update_ratio", "act_mean", "act_std", "dead"]
COLUMNS = ["step", "depth", "layer", "kind", *STAT_COLUMNS, *(f"h{i}" for i in range(HIST_BINS))]
RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


def hist_edges() -> list[float]:
    """The histogram's bin edges in activation units (HIST_BINS + 1 of them)."""
    return [math.sinh(-HIST_LIMIT + 2 * HIST_LIMIT * i / HIST_BINS) for i in range(HIST_BINS + 1)]


def recorded_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers, in registration order (for the ResNets and the plain nets, their depth)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class _ReluWatch(TorchFunctionMode):
    """Sees every ReLU of one forward pass and hands its zero fraction to the recorder."""

    def __init__(self, recorder: "LayerStats") -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in RELUS:
            self.recorder.relu_output(result)
        return result


class LayerStats:
    """Records every `every`-th training step of `model` stepped by `optimizer` into the csv at `path`
    (created at the first recording: a run shorter than `every` steps has none). `step`: the steps
    already taken (a resumed run's). Use as a context manager: the hooks are removed on exit."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, path: Path,
                 step: int = 0) -> None:
        self.layers = recorded_layers(model)
        self.every, self.step, self.path = every, step, path
        self.file = None
        self.recording = False
        self.watch: _ReluWatch | None = None
        self.last: int | None = None  # the layer whose following ReLU is still to come
        n = len(self.layers)
        self.acts = [torch.full((3 + HIST_BINS,), math.nan) for _ in range(n)]  # mean, std, dead, histogram
        self.before: list[torch.Tensor] = []
        self.grads = self.norms = torch.empty(0)
        self.handles = [model.register_forward_pre_hook(self._forward_starts),
                        model.register_forward_hook(self._forward_ends),
                        optimizer.register_step_pre_hook(self._before_update),
                        optimizer.register_step_post_hook(self._after_update)]
        self.handles += [m.register_forward_hook(self._layer_output(i)) for i, (_, m) in enumerate(self.layers)]

    def __enter__(self) -> "LayerStats":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self._end_watch()
        if self.file is not None:
            self.file.close()

    # --- the forward pass ---
    def _forward_starts(self, module: nn.Module, args) -> None:
        if not module.training:  # an evaluation: not a step
            return
        self.step += 1
        self.recording = self.step % self.every == 0
        if self.recording:
            self.last = None
            for acts in self.acts:
                acts.fill_(math.nan)
            self.watch = _ReluWatch(self)
            self.watch.__enter__()

    def _forward_ends(self, module: nn.Module, args, output) -> None:
        self._end_watch()

    def _end_watch(self) -> None:
        if self.watch is not None:
            self.watch.__exit__(None, None, None)
            self.watch = None

    def _layer_output(self, index: int):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if self.watch is None:
                return
            out = output.detach().float()
            std, mean = torch.std_mean(out, correction=0)
            hist = torch.histc(torch.asinh(out).clamp_(-HIST_LIMIT, HIST_LIMIT), HIST_BINS, -HIST_LIMIT, HIST_LIMIT)
            # dead (NaN until the following ReLU is seen) between the moments and the histogram
            self.acts[index] = torch.cat([torch.stack([mean, std]).cpu(), torch.tensor([math.nan]), hist.cpu()])
            self.last = index
        return hook

    def relu_output(self, output: torch.Tensor) -> None:
        if self.last is not None:
            self.acts[self.last][2] = (output == 0).float().mean().item()
            self.last = None

    # --- the optimizer's step ---
    def _weights(self) -> list[torch.Tensor]:
        return [m.weight for _, m in self.layers]

    def _before_update(self, optimizer, args, kwargs) -> None:
        if not self.recording:
            return
        weights = self._weights()
        nan = torch.tensor(math.nan, device=weights[0].device)
        self.grads = torch.stack([w.grad.detach().float().norm() if w.grad is not None else nan for w in weights])
        self.norms = torch.stack([w.detach().float().norm() for w in weights])
        self.before = [w.detach().clone() for w in weights]

    def _after_update(self, optimizer, args, kwargs) -> None:
        if not self.recording:
            return
        self.recording = False
        moved = torch.stack([(w.detach().float() - b.float()).norm() for w, b in zip(self._weights(), self.before)])
        self.before = []
        values = torch.stack([self.grads, self.norms, moved / self.norms], dim=1).cpu()
        if self.file is None:
            new = not self.path.exists()
            self.file = open(self.path, "a", newline="")
            self.writer = csv.writer(self.file)
            if new:
                self.writer.writerow(COLUMNS)
        for depth, ((name, module), stats, acts) in enumerate(zip(self.layers, values.tolist(), self.acts), 1):
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            mean, std, dead, *hist = acts.tolist()
            self.writer.writerow([self.step, depth, name, kind, *map(_cell, [*stats, mean, std, dead]),
                                  *(int(h) for h in hist)])
        self.file.flush()


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.7g}"


def open_layer_stats(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, every: int,
                     step: int = 0) -> LayerStats:
    """The recorder of a run starting after `step` steps: layers.csv keeps its rows up to that step
    (a fresh run: none) and is appended to from there."""
    path = run_dir / LAYERS_FILE
    kept = [row for row in _complete_rows(path) if int(row[0]) <= step] if step else []
    if kept:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([COLUMNS, *kept])
        write_text(path, buffer.getvalue())
    else:
        path.unlink(missing_ok=True)
    return LayerStats(model, optimizer, every, path, step)


def _complete_rows(path: Path) -> list[list[str]]:
    """The rows after the header, up to the last newline (a killed run may have left half a line)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return list(csv.reader(io.StringIO(text[: text.rfind("\n") + 1])))[1:]


def read_layer_stats(path: Path) -> list[dict]:
    """layers.csv's complete rows as dicts: numbers parsed (None where empty), `hist` the counts."""
    rows = []
    for line, raw in enumerate(_complete_rows(path), 2):
        row = dict(zip(COLUMNS, raw))
        try:
            parsed = {"step": int(row["step"]), "depth": int(row["depth"]), "layer": row["layer"], "kind": row["kind"]}
            parsed.update({c: float(row[c]) if row[c] != "" else None for c in STAT_COLUMNS})
            parsed["hist"] = [int(row[f"h{i}"]) for i in range(HIST_BINS)]
        except (KeyError, ValueError) as error:
            raise CifarlabError(f"{path}: corrupt CSV (line {line}: {error})") from None
        rows.append(parsed)
    return rows
