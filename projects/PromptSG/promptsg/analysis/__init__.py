"""What trained models do and cost: where the prompt looks (attention maps), searching with words,
probes of the test prompt and of CLIP-ReID's stage 1, the ablation tables, figures of a ranking, FLOPs,
speed and memory."""
