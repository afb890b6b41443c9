from .synthetic import SyntheticMarket, generate_synthetic_market
