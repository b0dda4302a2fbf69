"""The report's section "What the network sees": the first layer's filters, the validation patches that
excite deeper channels, the feature maps of a right and a wrong validation image from the most confused
pair of classes, and Grad-CAM on the most confident mistakes. Without captum the maps give way to a note."""
from __future__ import annotations

import html
from typing import Callable

import numpy as np
import torch

from cifarlab.errors import CifarlabError
from cifarlab.evaluation import run_split
from cifarlab.explain import INSTALL_HINT, explain_tensor, kernel_arrays, open_explainer
from cifarlab.explain_draw import (draw_attributions, draw_feature_maps, draw_kernels, draw_mistake_maps,
                                   draw_top_patches)
from cifarlab.kernels import top_patches
from cifarlab.rundir import MODEL_FILE

PATCH_IMAGES = 500  # validation images searched for the top patches (more costs seconds, shows the same)
MISTAKES = 8
TITLE = "<h2>What the network sees</h2>"


def _has_captum() -> bool:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def most_confused(matrix: list[list[int]]) -> tuple[int, int]:
    """(true, predicted) of the largest off-diagonal count of a confusion matrix."""
    counts = np.asarray(matrix)
    np.fill_diagonal(counts, -1)
    true, predicted = np.unravel_index(int(counts.argmax()), counts.shape)
    return int(true), int(predicted)


def right_and_wrong(explainer, images: torch.Tensor, labels: torch.Tensor,
                    pair: tuple[int, int]) -> list[tuple[str, int]]:
    """("right", index) of the most confident right answer for the pair's true class and ("wrong", index)
    of its most confident confusion with the other class (either may be missing)."""
    true, predicted = pair
    index = torch.nonzero(labels == true).flatten()
    with torch.no_grad():
        probabilities = explainer.model(explainer.normalise(images[index])).float().softmax(dim=1)
    chosen = []
    for which, cls in (("right", true), ("wrong", predicted)):
        hits = torch.nonzero(probabilities.argmax(dim=1) == cls).flatten()
        if len(hits):
            chosen.append((which, int(index[hits[probabilities[hits, cls].argmax()]])))
    return chosen


def explain_section(run: dict, embed: Callable[[object, str], str]) -> str:
    """The section's HTML for a run (the dict report.load_run reads), a note where a part cannot be drawn.
    `embed(figure, alt)` is the report's own <img> tag for a figure."""
    ev = run["eval"]
    if not (run["dir"] / MODEL_FILE).exists() or not ev:
        return f"{TITLE}<p class=muted>needs the run's {MODEL_FILE} and its evaluation (the run has not finished)</p>"
    explainer = open_explainer(run["dir"])
    kernels = kernel_arrays(explainer)
    parts = [f"<h3>First-layer filters</h3>{embed(draw_kernels(kernels), 'first-layer filters')}"]
    try:
        split = run_split(run["config"], ev["split"])
    except CifarlabError as error:
        return f"{TITLE}{''.join(parts)}<p class=muted>the rest not drawn: {html.escape(str(error))}</p>"
    patches = top_patches(explainer, split.images[:PATCH_IMAGES])
    parts.append(f"<h3>What deeper channels respond to</h3>{embed(draw_top_patches(patches), 'top patches')}")
    captum = _has_captum()
    methods = ("gradcam",) if captum else ()
    pair = most_confused(ev["confusion_matrix"])
    names = explainer.info.classes
    parts.append(f"<h3>Feature maps: {html.escape(names[pair[0]])} taken for {html.escape(names[pair[1]])}, "
                 "the most frequent confusion</h3><p>The most confident right answer for the true class, then "
                 "the most confident mistake of the pair.</p>")
    for which, index in right_and_wrong(explainer, split.images, split.labels, pair):
        arrays = explain_tensor(explainer, split.images[index], methods)
        pictures = [(draw_feature_maps(arrays), f"feature maps, {which}")]
        pictures += [(draw_attributions(arrays), f"Grad-CAM, {which}")] if captum else []
        parts.append("<div class=row>" + "".join(embed(p, alt) for p, alt in pictures) + "</div>")
    if not captum:
        parts.append(f"<p class=muted>Grad-CAM maps not drawn: they need the captum package ({INSTALL_HINT})</p>")
    else:
        parts.append(_mistakes(explainer, split.images, ev["worst_mistakes"][:MISTAKES], embed))
    return TITLE + "".join(parts)


def _mistakes(explainer, images: torch.Tensor, mistakes: list[dict], embed: Callable[[object, str], str]) -> str:
    if not mistakes:
        return "<p class=muted>no mistakes to show</p>"
    maps = [explain_tensor(explainer, images[m["index"]], ("gradcam",), channels=1) for m in mistakes]
    titles = [f"{m['true']}->{explainer.info.classes[int(a['target'])]}" for m, a in zip(mistakes, maps)]
    figure = draw_mistake_maps(np.stack([a["image"] for a in maps]), np.stack([a["attr:gradcam"] for a in maps]),
                               titles)
    return f"<h3>Grad-CAM on the most confident mistakes</h3>{embed(figure, 'mistakes')}"
