"""What trained models do and cost: where the prompt looks (attention maps), searching with words,
probes of the test prompt, the ablation tables, figures of a ranking, FLOPs, speed and memory."""
