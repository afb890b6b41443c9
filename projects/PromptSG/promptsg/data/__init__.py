"""The embedded SyntheticMarket dataset (Market-1501 layout, generated on first use) and its caption pool."""
from .synthetic import PersonMasks, SyntheticMarket, SyntheticMarketTiny, generate_synthetic_market
