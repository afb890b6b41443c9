"""FastReID glue: the patches for today's stack, checkpoints, start-up checks, the output folder's
lock, the evaluation hooks, the optimizer groups and launching under torchrun or srun."""
