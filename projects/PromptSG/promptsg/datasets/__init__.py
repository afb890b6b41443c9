from .synthetic import SyntheticMarket, SyntheticMarketTiny, generate_synthetic_market
