"""The paper: CLIP's towers, f_theta, the prompt, SupCon, the interaction module, the head, the
meta-architecture and its losses, and the training monitors computed in its forward pass."""
