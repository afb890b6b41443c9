"""What a trained model does: where the prompt looks (attention maps) and searching with words."""
