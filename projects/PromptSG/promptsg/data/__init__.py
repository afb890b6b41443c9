"""The embedded SyntheticMarket dataset (Market-1501 layout, generated on first use), its caption pool
and the small CLIP pretrained on that pool (``clip_pretraining``)."""
from .synthetic import PersonMasks, SyntheticMarket, SyntheticMarketTiny, generate_synthetic_market
