"""The embedded SyntheticMarket dataset (Market-1501 layout, generated on first use), its caption pool
and the small CLIP pretrained on that pool (``clip_pretraining``); the real datasets' start-up checks
and variants (``real_datasets``, which registers CUHK03Detected)."""
from .real_datasets import CUHK03Detected, check_real_dataset, describe_dataset
from .synthetic import PersonMasks, SyntheticMarket, SyntheticMarketTiny, generate_synthetic_market
