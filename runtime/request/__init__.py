"""From an image and a task to model inputs: preprocessing, vision layout, tokenizer, prompts, positions."""
