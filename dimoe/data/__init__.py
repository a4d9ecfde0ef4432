"""Data: formats, chat template, tokenizer, synthetic demo set, normalize, blends, loaders."""
