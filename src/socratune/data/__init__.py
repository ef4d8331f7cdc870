"""Layer 1, from files to training text: dialogues loaded and validated, the seeded split, the
chat template with its label masks, and padding-free packing. No torch at import."""
