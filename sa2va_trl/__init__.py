"""sa2va-trl: GRPO fine-tuning of Sa2VA models with cycle rewards on the Hugging Face stack."""

__version__ = "0.1.0.dev0"
