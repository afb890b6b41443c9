from .synthetic import PersonMasks, SyntheticMarket, SyntheticMarketTiny, generate_synthetic_market
