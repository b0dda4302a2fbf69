"""cifarlab: train, evaluate and inspect CNN classifiers on CIFAR-10, CIFAR-100 and image folders.

The notebook's workflow as a library::

    from cifarlab import CIFAR10CNN, fit, load_data, TensorLoader
"""
__version__ = "0.1.0"

from cifarlab.config import RECIPES, TrainConfig
from cifarlab.data import Augment, TensorLoader, channel_stats, load_data
from cifarlab.ema import WeightEMA
from cifarlab.engine import Step, evaluate, fit, test, train, train_one_epoch, train_step
from cifarlab.errors import CifarlabError
from cifarlab.models import CIFAR10CNN, create_model, model_names, register_model
from cifarlab.plots import plot_metric_curve
from cifarlab.records import History

__all__ = [
    "Augment", "CIFAR10CNN", "CifarlabError", "History", "RECIPES", "Step", "TensorLoader", "TrainConfig",
    "WeightEMA", "__version__", "channel_stats", "create_model", "evaluate", "fit", "load_data", "model_names",
    "plot_metric_curve", "register_model", "test", "train", "train_one_epoch", "train_step",
]
