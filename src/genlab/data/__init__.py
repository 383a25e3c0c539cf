"""Data: sources by name, readers (IDX, image folders, CIFAR binary), transforms and the uint8 <-> [-1, 1] map.

    from genlab.data import DataConfig, load_data
    data = load_data(DataConfig(source="mnist", split="test", limit=1000))
    x = data.to_model_range()  # (N, 1, 28, 28) float32 in [-1, 1]
"""

from genlab.data.config import DataConfig, resolve_cache_dir, resolve_data_root
from genlab.data.imageset import ImageSet, from_model_range, to_model_range
from genlab.data.sources import (SOURCES, Source, get_source, is_path_source, list_sources, load_data, register_source,
                                 split_source_ref)
from genlab.data.transforms import convert_channels, fit_size

__all__ = [
    "DataConfig",
    "ImageSet",
    "SOURCES",
    "Source",
    "convert_channels",
    "fit_size",
    "from_model_range",
    "get_source",
    "list_sources",
    "load_data",
    "register_source",
    "resolve_cache_dir",
    "resolve_data_root",
    "is_path_source",
    "split_source_ref",
    "to_model_range",
]
