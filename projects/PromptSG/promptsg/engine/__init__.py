"""FastReID glue: the patches for today's stack, checkpoints, start-up checks, the output folder's
lock, the evaluation hooks and the optimizer groups."""
