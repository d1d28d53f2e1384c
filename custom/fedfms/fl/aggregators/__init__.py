"""How the round's accepted updates become the global model: LoRA-SVD (FLAP-SAM) and robust rules."""
