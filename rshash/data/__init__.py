"""Datasets in, splits and noise out: the input layer of rshash."""

from rshash.data.dataset import Dataset, load_dataset
from rshash.data.splits import Split, make_split

__all__ = ["Dataset", "Split", "load_dataset", "make_split"]
