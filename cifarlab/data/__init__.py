"""Data: sources -> cached tensors -> splits -> the device-resident loader."""
from cifarlab.data.loader import Augment, TensorLoader, channel_stats
from cifarlab.data.sources import ImageSet, Splits, read_source
from cifarlab.data.splits import DataBundle, load_data

__all__ = ["Augment", "DataBundle", "ImageSet", "Splits", "TensorLoader", "channel_stats", "load_data", "read_source"]
