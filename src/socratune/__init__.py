"""socratune: turn Japanese dialogue data into a Socratic chatbot by LoRA or QLoRA fine-tuning."""

__version__ = "0.1.0"
