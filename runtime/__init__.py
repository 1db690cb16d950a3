"""rexedge.runtime: tokenizer, prompts, preprocessing, output grammar, decode loop, backends, API."""
